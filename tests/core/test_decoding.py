"""Bounded, incremental decoding of compressed request bodies."""

from __future__ import annotations

import functools
import gc
import gzip
import json
import random
import subprocess
import sys
import tracemalloc
import weakref
import zlib
from pathlib import Path

import brotli
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from cmm.testing.checkout import checkout_env
from cmm.core.decoding import STEP, BodyDecoder
from cmm.core.errors import HttpError

MiB = 1 << 20
BODY_LIMIT = 32 * MiB  # the default --body-limit

BODY = json.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "été " * 500}]}).encode()

ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def decode(coding: str, data: bytes, splits: list[int], limit: int = 1 << 20) -> bytes:
    decoder = BodyDecoder([coding], limit)
    out = b""
    start = 0
    for point in sorted(set(splits)) + [len(data)]:
        out += b"".join(decoder.feed(data[start:point]))
        start = point
    decoder.finish()
    return out


@pytest.mark.parametrize("coding", sorted(ENCODERS))
@given(splits=st.lists(st.integers(min_value=0, max_value=3000), max_size=10))
@settings(max_examples=30)
def test_round_trip_in_any_split(coding: str, splits: list[int]) -> None:
    assert decode(coding, ENCODERS[coding](BODY), splits) == BODY


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)  # no header or trailer: the stream's end is the input's end
    return compressor.compress(data) + compressor.flush()


# Encoders by the Content-Encoding they are sent as: "deflate" comes raw from some clients.
STACK_ENCODERS = {**ENCODERS, "raw deflate": raw_deflate}
STACKS = [["gzip"], ["deflate"], ["raw deflate"], ["br"], ["zstd"], ["gzip", "gzip"], ["raw deflate", "zstd"],
          ["zstd", "br"], ["br", "gzip"]]
TEXTS = st.text(alphabet=st.sampled_from('{}":, ab\\é😀\n'), max_size=3000).map(str.encode)


@given(body=st.binary(max_size=3000) | TEXTS, codings=st.sampled_from(STACKS),
       splits=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
       step=st.integers(min_value=1, max_value=5000), slack=st.integers(min_value=-2, max_value=2))
@settings(max_examples=300, deadline=None)
def test_any_reads_and_steps_decode_the_same_within_the_same_limit(
        body: bytes, codings: list[str], splits: list[int], step: int, slack: int) -> None:
    """However the body is split into reads and however small the steps, the decoded bytes are the
    same, no piece is larger than a step, and the limit (on every layer) is exact."""
    layers = [body]
    for coding in codings:
        layers.append(STACK_ENCODERS[coding](layers[-1]))
    data = layers.pop()
    largest = max(len(layer) for layer in layers)  # each layer's output, undone from the outside in
    limit = max(0, largest + slack)
    codings = [coding.removeprefix("raw ") for coding in codings]
    decoder = BodyDecoder(codings, limit, step=step)
    out: list[bytes] = []
    try:
        start = 0
        for point in sorted(set(splits)) + [len(data)]:
            out.extend(decoder.feed(data[start:point]))
            start = max(start, point)
        decoder.finish()
    except HttpError as error:
        assert error.status == 413 and limit < largest
        assert decoder.decoded <= limit + max(step, STEP)
        return
    assert limit >= largest and b"".join(out) == body and decoder.decoded == len(body)
    # brotli's own unit of output is one 32 KiB block, whatever step is asked for
    assert all(len(piece) <= (max(step, STEP) if codings[0] == "br" else step) for piece in out)


@functools.cache
def large_body() -> bytes:
    """1.5 MB of JSON-like text: each layer produces many steps, and brotli many full blocks."""
    generator = random.Random(3)
    words = ["alpha", "beta", "été", "tool_use", "{", "}", "\\n", "😀"] + [f"w{i}" for i in range(500)]
    text = " ".join(generator.choice(words) for _ in range(250_000))
    return json.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": text}]}).encode()


@pytest.mark.parametrize("codings", [["gzip"], ["deflate"], ["br"], ["zstd"], ["gzip", "gzip"], ["br", "zstd"]])
def test_large_bodies_decode_whole_in_any_reads(codings: list[str]) -> None:
    body = large_body()
    data = body
    for coding in codings:
        data = brotli.compress(data, quality=5) if coding == "br" else ENCODERS[coding](data)  # q11 takes seconds
    for read in (len(data), 16 * 1024, 1000):
        decoder = BodyDecoder(codings, BODY_LIMIT)
        out = [piece for start in range(0, len(data), read) for piece in decoder.feed(data[start : start + read])]
        decoder.finish()
        assert b"".join(out) == body, f"{codings} read {read} at a time"
        assert max(len(piece) for piece in out) <= STEP


def test_raw_deflate_and_stacked_codings() -> None:
    raw = zlib.compressobj(wbits=-15)
    data = raw.compress(BODY) + raw.flush()
    assert decode("deflate", data, [7]) == BODY
    decoder = BodyDecoder(["gzip", "br"], 1 << 20)  # gzip applied first, then br
    assert b"".join(decoder.feed(brotli.compress(gzip.compress(BODY)))) == BODY
    decoder.finish()


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_bombs_stop_at_the_limit(coding: str) -> None:
    bomb = ENCODERS[coding](b"\0" * (64 << 20))
    decoder = BodyDecoder([coding], 1 << 20)
    with pytest.raises(HttpError) as caught:
        for start in range(0, len(bomb), 65536):
            decoder.feed(bomb[start : start + 65536])
    assert caught.value.status == 413
    assert decoder.decoded <= (1 << 20) + STEP  # one step past the limit at most


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_truncated_and_corrupt_bodies_are_400(coding: str) -> None:
    data = ENCODERS[coding](BODY)
    decoder = BodyDecoder([coding], 1 << 20)
    decoder.feed(data[: len(data) // 2])
    with pytest.raises(HttpError, match="Truncated") as caught:
        decoder.finish()
    assert caught.value.status == 400
    with pytest.raises(HttpError, match="Malformed") as caught:
        BodyDecoder([coding], 1 << 20).feed(b"\xff" * 64 + data)
    assert caught.value.status == 400


def test_unsupported_codings_are_refused() -> None:
    with pytest.raises(ValueError, match="compress"):
        BodyDecoder(["compress"], 10)


# -- decompression bombs -----------------------------------------------------------------------------


def zstd_rle_bomb(blocks: int) -> bytes:
    """A zstd frame of RLE blocks: 4 bytes each, each standing for 128 KiB (16 KiB: 512 MiB)."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0x00, (17 - 10) << 3])  # no content size, a 128 KiB window
    block = ((128 << 10) << 3 | 1 << 1).to_bytes(3, "little") + b"\0"
    last = ((128 << 10) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\0"
    return header + block * (blocks - 1) + last


def zeros_compressed(compress, finish, mib: int) -> bytes:
    chunk = b"\0" * MiB
    return b"".join(compress(chunk) for _ in range(mib)) + finish()


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[list[str], bytes]]:
    brotli_bomb = brotli.Compressor(quality=5, lgwin=24)
    gzipped = zlib.compressobj(9, wbits=31)
    inner = zeros_compressed(gzipped.compress, gzipped.flush, 128)
    made = {
        "zstd": (["zstd"], zstd_rle_bomb(4096)),
        "br": (["br"], zeros_compressed(brotli_bomb.process, brotli_bomb.finish, 256)),
        "gzip, gzip": (["gzip", "gzip"], gzip.compress(inner, 9)),
    }
    assert len(made["zstd"][1]) < 16500 and len(made["br"][1]) < 300 and len(made["gzip, gzip"][1]) < 1000
    return made


@pytest.mark.parametrize("name", ["zstd", "br", "gzip, gzip"])
@pytest.mark.parametrize("limit", [MiB, BODY_LIMIT])
@pytest.mark.parametrize("read", [None, 512])
def test_bombs_hold_no_more_than_the_limit(bombs: dict, name: str, limit: int, read: int | None) -> None:
    """Peak memory while a bomb is decoded, whether it comes in one read or many small ones (what
    is returned is kept, as the proxy keeps it): the limit and one step, not the bomb's size."""
    codings, bomb = bombs[name]
    read = read or len(bomb)
    decoder = BodyDecoder(codings, limit)
    kept: list[bytes] = []
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(HttpError) as caught:
            for start in range(0, len(bomb), read):
                kept.extend(decoder.feed(bomb[start : start + read]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.status == 413 and "limit" in caught.value.message
    assert limit < decoder.decoded <= limit + STEP  # stopped within a step of the limit
    assert sum(len(piece) for piece in kept) <= limit
    assert peak <= limit + 2 * MiB, f"{name} held {peak / MiB:.1f} MiB decoding under a {limit / MiB:g} MiB limit"


# VmHWM, not ru_maxrss: that one starts at the forking parent's peak, which may be larger.
_RSS_PROBE = """
import sys
from pathlib import Path
from cmm.core.decoding import BodyDecoder
from cmm.core.errors import HttpError
def kib(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
codings, bomb, limit = sys.argv[1].split(","), Path(sys.argv[2]).read_bytes(), int(sys.argv[3])
decoder = BodyDecoder(codings, limit)
peak, now = kib("VmHWM:"), kib("VmRSS:")
status = None
try:
    decoder.feed(bomb)
except HttpError as error:
    status = error.status
try:  # what glibc keeps of freed small pieces is its business, not a live reference: return it
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except (OSError, AttributeError):
    pass
print(status, kib("VmHWM:") - peak, kib("VmRSS:") - now)  # the decoder is still referenced
"""


@pytest.mark.parametrize("name", ["zstd", "br", "gzip, gzip"])
def test_bombs_grow_a_process_by_the_limit_at_most(bombs: dict, name: str, tmp_path: Path) -> None:
    """The whole process, decompressors' own buffers and windows included (tracemalloc sees only
    Python's): a fresh interpreter's peak resident size while a bomb is refused, and what it
    still holds afterwards."""
    codings, bomb = bombs[name]
    (tmp_path / "bomb").write_bytes(bomb)
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, ",".join(codings), str(tmp_path / "bomb"), str(BODY_LIMIT)],
                           env=checkout_env(), capture_output=True, text=True, timeout=60, check=True)
    status, peak_kib, kept_kib = probe.stdout.split()
    assert status == "413"
    # brotli may keep a 16 MiB window; zstd's is capped at 8 MiB.
    assert int(peak_kib) * 1024 <= BODY_LIMIT + 24 * MiB, f"{name} grew the process by {int(peak_kib) >> 10} MiB"
    # A failed decoder may live on with its connection: it must have let go of its windows.
    assert int(kept_kib) * 1024 <= 4 * MiB, f"{name} still holds {int(kept_kib) >> 10} MiB after the 413"


def test_more_than_two_codings_are_refused_before_decoding() -> None:
    with pytest.raises(HttpError, match="at most 2") as caught:  # at construction: before any byte
        BodyDecoder(["gzip", "identity", "gzip", "gzip"], MiB)
    assert caught.value.status == 415
    decoder = BodyDecoder(["gzip", "identity", "gzip"], MiB)  # identity is no layer
    assert b"".join(decoder.feed(gzip.compress(gzip.compress(BODY)))) == BODY
    decoder.finish()


def test_a_zstd_frame_asking_for_a_large_window_is_refused() -> None:
    def frame(window_log: int) -> bytes:  # one RLE block of 1000 "x", in a frame declaring this window
        block = (1000 << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"x"
        return b"\x28\xb5\x2f\xfd" + bytes([0x00, (window_log - 10) << 3]) + block

    with pytest.raises(HttpError, match="Malformed zstd") as caught:
        BodyDecoder(["zstd"], MiB).feed(frame(24))
    assert caught.value.status == 400
    assert decode("zstd", frame(23), []) == b"x" * 1000


@pytest.mark.parametrize("name", ["zstd", "br", "gzip, gzip"])
def test_a_dropped_decoder_is_freed_at_once(bombs: dict, name: str) -> None:
    """No reference cycles: a worker must get a decoder's windows back when the request ends, not
    at some later garbage collection (zstd's writer is opaque to the collector: a cycle through
    it is never collected)."""
    codings, bomb = bombs[name]
    valid = BODY
    for coding in codings:
        valid = ENCODERS[coding](valid)
    gc.disable()
    try:
        for data, status in ((bomb, 413), (valid, None), (b"\xff" * 64, 400), (valid[:-9], 400)):
            decoder = BodyDecoder(codings, MiB)
            alive = weakref.ref(decoder)
            outcome: int | None = None
            try:  # no assert around the calls: pytest's rewriting would keep decoder.feed alive
                pieces = decoder.feed(data)
                decoder.finish()
            except HttpError as error:
                outcome = error.status
            else:
                assert b"".join(pieces) == BODY
            assert outcome == status
            del decoder
            assert alive() is None, f"a {name} decoder that ended with {status or 'success'} is kept alive by a cycle"
    finally:
        gc.enable()


@pytest.mark.parametrize("coding", sorted(ENCODERS))
@pytest.mark.parametrize("apart", [False, True])
def test_bytes_after_the_end_are_400(coding: str, apart: bool) -> None:
    data = ENCODERS[coding](BODY)
    decoder = BodyDecoder([coding], MiB)
    with pytest.raises(HttpError, match="Malformed") as caught:
        if apart:  # the stream ends exactly at a read's end; the extra bytes come in the next read
            decoder.feed(data)
            decoder.feed(b"{}")
        else:
            decoder.feed(data + b"{}")
    assert caught.value.status == 400


def test_zstd_frames_follow_one_another_and_skippable_frames_decode_to_nothing() -> None:
    frame = ENCODERS["zstd"](BODY)
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(b"[1]")
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"meta!"
    data = skippable + frame + checked + skippable
    for splits in ([], [3, 9, 14, len(data) - 4], list(range(0, len(data), 5))):
        assert decode("zstd", data, splits) == BODY + b"[1]"
    with pytest.raises(HttpError, match="Truncated"):
        decode("zstd", data[:-1], [])  # inside the last skippable frame
    with pytest.raises(HttpError, match="Truncated"):
        decode("zstd", frame + checked[:-2], [])  # inside the checksum


# -- through cmm's serving protocol ------------------------------------------------------------------


def json_bombs() -> list[tuple[str, bytes]]:
    """Bombs whose decoded start is a messages body still looking for its model: the proxy must
    read on through them however they are split (a body plainly not JSON may be passed through
    undecoded once a read has shown it)."""
    start = b'{"messages":['
    raw_block = (len(start) << 3).to_bytes(3, "little") + start
    spaces = ((128 << 10) << 3 | 1 << 1).to_bytes(3, "little") + b" "
    last = ((128 << 10) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b" "
    zstd_bomb = b"\x28\xb5\x2f\xfd" + bytes([0x00, (17 - 10) << 3]) + raw_block + spaces * 1023 + last  # 128 MiB
    brotli_bomb = brotli.Compressor(quality=5, lgwin=24)
    gzipped = zlib.compressobj(9, wbits=31)
    chunk = b" " * MiB
    return [
        ("zstd", zstd_bomb),
        ("br", brotli_bomb.process(start) + b"".join(brotli_bomb.process(chunk) for _ in range(64)) + brotli_bomb.finish()),
        ("gzip, gzip", gzip.compress(gzipped.compress(start) + b"".join(gzipped.compress(chunk) for _ in range(64))
                                     + gzipped.flush())),
    ]


def test_the_proxy_refuses_bombs_with_413_and_three_codings_with_415() -> None:
    from memory_harness import Harness, make_pki, responses, settings as proxy_settings

    harness = Harness(make_pki(), proxy_settings())
    cases = [(codings, bomb, 413, "request_too_large") for codings, bomb in json_bombs()]
    cases.append(("gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(BODY))), 415, "invalid_request_error"))
    for codings, data, status, kind in cases:
        client, _ = harness.client()
        harness.send(client, b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Type: application/json\r\n"
                             b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (codings.encode(), len(data), data))
        [(head, body)] = responses(bytes(client.received))
        assert head.startswith(b"HTTP/1.1 %d " % status), (codings, head)
        assert json.loads(body)["error"]["type"] == kind
    assert all(upstream.exchanges == [] for upstream in harness.upstreams.values())  # nothing was forwarded
