"""Body framing: where a body ends, whatever the split of the bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cmm.errors import HttpError
from cmm.framing import LAST_CHUNK, ChunkedBody, CloseBody, LengthBody, encode_chunk


def run(tracker, data: bytes, splits: list[int]) -> tuple[bytes, int, bool]:
    """Feed ``data`` in pieces; return payload, bytes consumed and whether it finished."""
    payload = b""
    consumed = 0
    start = 0
    for point in sorted(set(splits)) + [len(data)]:
        piece = data[start:point]
        start = point
        progress = tracker.feed(piece)
        payload += b"".join(progress.payload)
        consumed += progress.consumed
        if progress.done:
            return payload, consumed, True
        assert progress.consumed == len(piece)
    return payload, consumed, False


chunk_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@given(chunk_lists, st.lists(st.integers(min_value=0, max_value=3000), max_size=10), st.binary(max_size=30))
def test_chunked_any_split(chunks: list[bytes], splits: list[int], after: bytes) -> None:
    encoded = b"".join(encode_chunk(c) for c in chunks) + LAST_CHUNK
    payload, consumed, done = run(ChunkedBody(), encoded + after, splits)
    assert done
    assert payload == b"".join(chunks)
    assert consumed == len(encoded)


def test_chunk_extensions_and_trailers() -> None:
    body = b"5;name=value\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n"
    payload, consumed, done = run(ChunkedBody(), body + b"NEXT", [])
    assert (payload, consumed, done) == (b"hello", len(body), True)


@pytest.mark.parametrize(
    "body, words",
    [
        (b"zz\r\nhello\r\n", "bad chunk size"),
        (b"-5\r\nhello\r\n", "bad chunk size"),
        (b"\r\n", "bad chunk size"),
        (b"5\r\nhelloXX\r\n", "longer than its size"),
        (b"5\nhello\r\n", "bare LF"),
        (b"11111111111111111\r\n", "bad chunk size"),
        (b"0\r\nno-colon\r\n\r\n", "malformed trailer"),
        (b"1" * 5000, "too long"),
    ],
)
def test_bad_chunking_is_400(body: bytes, words: str) -> None:
    with pytest.raises(HttpError) as caught:
        run(ChunkedBody(), body, [])
    assert caught.value.status == 400
    assert words in caught.value.message


@given(st.integers(min_value=0, max_value=500), st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=5))
def test_length_body(length: int, data: bytes, splits: list[int]) -> None:
    payload, consumed, done = run(LengthBody(length), data, splits)
    assert done == (len(data) >= length) or length == 0
    assert payload == data[:length]
    assert consumed == min(length, len(data))


def test_close_body_ends_at_close() -> None:
    tracker = CloseBody()
    assert not tracker.feed(b"abc").done
    assert tracker.finish()
