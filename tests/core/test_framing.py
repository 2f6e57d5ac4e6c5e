"""Body framing: where a body ends, whatever the split of the bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cmm.core.errors import HttpError
from cmm.core.framing import LAST_CHUNK, ChunkedBody, CloseBody, LengthBody, encode_chunk


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


_TCHARS = st.text("!#$%&'*+-.^_`|~09AZaz", min_size=1, max_size=6).map(str.encode)
_QUOTED = st.lists(st.sampled_from([b"a", b" ", b"\t", b";", b"=", b"\\\"", b"\\\\", b"\xe9", b","]),
                   max_size=6).map(lambda parts: b'"' + b"".join(parts) + b'"')
_BWS = st.sampled_from([b"", b" ", b"\t ", b"  "])
_EXTENSION = st.tuples(_BWS, _BWS, _TCHARS, st.one_of(st.just(None), st.tuples(_BWS, _BWS, st.one_of(_TCHARS, _QUOTED)))
                       ).map(lambda p: p[0] + b";" + p[1] + p[2] + (b"" if p[3] is None else
                                                                 p[3][0] + b"=" + p[3][1] + p[3][2]))
_TRAILER = st.tuples(_TCHARS, st.lists(st.sampled_from([b"v", b" ", b"\t", b"\xe9", b":", b'"']), max_size=8)
                     ).map(lambda p: p[0] + b":" + b"".join(p[1]) + b"\r\n")


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.lists(_EXTENSION, max_size=3)), max_size=5),
       st.lists(_TRAILER, max_size=3), st.lists(st.integers(0, 600), max_size=8))
def test_valid_extensions_and_trailers_are_read_whatever_the_split(
        chunks: list[tuple[bytes, list[bytes]]], trailers: list[bytes], splits: list[int]) -> None:
    encoded = b"".join(b"%x%s\r\n%s\r\n" % (len(data), b"".join(ext), data) for data, ext in chunks)
    encoded += b"0\r\n" + b"".join(trailers) + b"\r\n"
    payload, consumed, done = run(ChunkedBody(), encoded + b"GET / HTTP/1.1\r\n", splits)
    assert (payload, consumed, done) == (b"".join(data for data, _ in chunks), len(encoded), True)


@pytest.mark.parametrize("line", [
    b"5;a=\"q\\\"x\";b\r\n", b"5 ; a = b\r\n", b"5\t;a\r\n", b"5;a=\"\xe9\t\"\r\n",
])
def test_extensions_in_the_grammar_are_accepted(line: bytes) -> None:
    assert run(ChunkedBody(), line + b"hello\r\n0\r\n\r\n", []) == (b"hello", len(line) + 12, True)


BAD_EXTENSIONS = [
    b"5;a\x00b\r\n",  # NUL: the attack, as it was forwarded
    b"5;a\rb\r\n",  # bare CR: "Expected LF after chunk size" upstream
    b"5;a=b\x7f\r\n",
    b"5;a=\"x\x01\"\r\n",
    b"5;\r\n",
    b"5 \r\n",
    b"5;a=\r\n",
    b"5;a=b c\r\n",
    b"5;=b\r\n",
    b"5;a=\"open\r\n",
    b"5;a=\"x\"y\r\n",
    b"5;a@b\r\n",
]


@pytest.mark.parametrize("line", BAD_EXTENSIONS)
@pytest.mark.parametrize("what", ["request", "upstream response"])
def test_extensions_outside_the_grammar_are_refused_whatever_the_split(line: bytes, what: str) -> None:
    body = line + b"hello\r\n0\r\n\r\n"
    for cut in range(len(body) + 1):
        with pytest.raises(HttpError) as caught:
            run(ChunkedBody(what), body, [cut])
        assert caught.value.status == 400
        assert f"Invalid chunked {what} body: malformed chunk extension" in caught.value.message


@pytest.mark.parametrize("trailer, words", [
    (b"X-T: a\x00b", "control character in trailer field X-T"),
    (b"X-T: a\rb", "control character in trailer field X-T"),
    (b"X-T: a\x1bb", "control character in trailer field X-T"),
    (b"X T: a", "malformed trailer field"),
    (b"X-\xc3\xa9: a", "malformed trailer field"),
    (b" X-T: a", "malformed trailer field"),
    (b": a", "malformed trailer field"),
])
def test_trailer_fields_outside_the_grammar_are_refused(trailer: bytes, words: str) -> None:
    with pytest.raises(HttpError) as caught:
        run(ChunkedBody(), b"0\r\nX-Fine: yes\t \r\n" + trailer + b"\r\n\r\n", [])
    assert caught.value.status == 400 and words in caught.value.message
