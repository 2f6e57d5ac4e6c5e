"""Bounded, incremental decoding of compressed request bodies."""

from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from cmm.decoding import BodyDecoder
from cmm.errors import HttpError

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
    assert decoder.decoded <= (1 << 20) + 16 * 1024 * 64  # never far past the limit


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
