"""The request/response head parser: limits, framing, and refusal of anything ambiguous."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cmm.core.errors import HttpError
from cmm.core.http_head import (
    MAX_HEAD_BYTES,
    Framing,
    HeadCollector,
    parse_request_head,
    parse_response_head,
)

CLAUDE_HEAD = (
    b"POST /v1/messages?beta=true HTTP/1.1\r\n"
    b"Accept: application/json\r\n"
    b"Content-Type: application/json\r\n"
    b"User-Agent: claude-cli/2.1.330 (external, sdk-cli)\r\n"
    b"X-Claude-Code-Session-Id: 6a1f0b1e-0000-4000-8000-000000000001\r\n"
    b"X-Stainless-Arch: x64\r\n"
    b"X-Stainless-Lang: js\r\n"
    b"X-Stainless-OS: Linux\r\n"
    b"X-Stainless-Package-Version: 0.70.0\r\n"
    b"X-Stainless-Retry-Count: 0\r\n"
    b"X-Stainless-Runtime: node\r\n"
    b"X-Stainless-Runtime-Version: v24.3.0\r\n"
    b"X-Stainless-Timeout: 600\r\n"
    b"anthropic-beta: claude-code-20250219,interleaved-thinking-2025-05-14\r\n"
    b"anthropic-dangerous-direct-browser-access: true\r\n"
    b"anthropic-version: 2023-06-01\r\n"
    b"x-api-key: sk-ant-user-secret\r\n"
    b"x-app: cli\r\n"
    b"Connection: keep-alive\r\n"
    b"Host: api.anthropic.com\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Content-Length: 88000\r\n"
    b"\r\n"
)


def collect(data: bytes, splits: list[int] | None = None, response: bool = False) -> tuple[bytes, bytes]:
    collector = HeadCollector(response=response)
    points = sorted(set(splits or [])) + [len(data)]
    start = 0
    for point in points:
        done = collector.feed(data[start:point])
        start = point
        if done is not None:
            head, rest = done
            return head, rest + data[start:]
    raise AssertionError("head never completed")


def request(raw: bytes):
    head, rest = collect(raw)
    assert rest == b""
    return parse_request_head(head)


def test_claude_code_head() -> None:
    head = request(CLAUDE_HEAD)
    assert head.method == b"POST"
    assert head.path == b"/v1/messages"
    assert head.query == b"?beta=true"
    assert head.framing == Framing("length", 88000)
    assert head.keep_alive
    assert head.headers.get(b"HOST") == b"api.anthropic.com"
    assert head.headers.fields[0] == (b"Accept", b"application/json")  # order and case kept
    assert head.raw == CLAUDE_HEAD


@given(st.lists(st.integers(min_value=0, max_value=len(CLAUDE_HEAD) + 20), max_size=12), st.binary(max_size=40))
def test_split_points_do_not_matter(splits: list[int], body: bytes) -> None:
    head, rest = collect(CLAUDE_HEAD + body, splits)
    assert head == CLAUDE_HEAD
    assert rest == body


def test_leading_empty_lines_are_skipped() -> None:
    head, rest = collect(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"GET / ")
    assert parse_request_head(head).framing.kind == "none"


@pytest.mark.parametrize(
    "raw, status, words",
    [
        (b"GET / HTTP/1.1\nHost: x\n\n", 400, "bare LF"),
        (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400, "bare LF"),
        (b"GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400, "folding"),
        (b"GET / HTTP/1.1\r\nX-\xc3\xa9: 1\r\n\r\n", 400, "header name"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "header name"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, "header name"),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "control character"),
        (b"GET  / HTTP/1.1\r\n\r\n", 400, "request line"),
        (b"GET / HTTP/2.0\r\n\r\n", 400, "HTTP/1.1 only"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "Content-Length with"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400, "several Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400, "Invalid Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Invalid Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400, "Invalid Content-Length"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "only 'chunked'"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501, "only"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
    ],
)
def test_ambiguous_or_malformed_heads_are_refused(raw: bytes, status: int, words: str) -> None:
    with pytest.raises(HttpError) as caught:
        request(raw)
    assert caught.value.status == status
    assert words in caught.value.message


def test_bare_lf_in_the_body_after_the_head_is_fine() -> None:
    head, rest = collect(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nb")
    assert rest == b"a\nb"


def test_head_size_limit() -> None:
    collector = HeadCollector()
    big = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * MAX_HEAD_BYTES
    with pytest.raises(HttpError) as caught:
        collector.feed(big)
    assert caught.value.status == 431


def test_head_size_limit_counts_a_complete_head_too() -> None:
    raw = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    with pytest.raises(HttpError) as caught:
        HeadCollector().feed(raw)
    assert caught.value.status == 431


def test_header_count_limit() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(101))
    with pytest.raises(HttpError) as caught:
        request(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    assert caught.value.status == 431
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    assert len(request(b"GET / HTTP/1.1\r\n" + fields + b"\r\n").headers.fields) == 100


def test_obs_text_in_values_is_kept_opaque() -> None:
    head = request(b"GET / HTTP/1.1\r\nX-Name: caf\xc3\xa9 \r\n\r\n")
    assert head.headers.get(b"x-name") == b"caf\xc3\xa9"


def test_framing_kinds() -> None:
    assert request(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").framing == Framing("chunked")
    assert request(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").framing.kind == "none"
    assert request(b"POST / HTTP/1.1\r\n\r\n").framing.kind == "none"


def test_keep_alive_rules() -> None:
    assert not request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    assert not request(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive
    assert request(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expects_continue


def response(raw: bytes, method: bytes = b"POST"):
    head, _ = collect(raw, response=True)
    return parse_response_head(head, method)


def test_response_framing() -> None:
    assert response(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n").framing == Framing("length", 12)
    assert response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing.kind == "chunked"
    assert response(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n").framing.kind == "close"
    assert not response(b"HTTP/1.1 200 OK\r\n\r\n").keep_alive
    assert response(b"HTTP/1.1 204 No Content\r\n\r\n").framing.kind == "none"
    assert response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").framing.kind == "none"
    assert response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"HEAD").framing.kind == "none"
    interim = response(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert interim.interim and interim.framing.kind == "none"
    assert not response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    ],
)
def test_bad_upstream_heads_are_502(raw: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        response(raw)
    assert caught.value.status == 502


_VALUE_BYTES = st.sampled_from([b"a", b"Z", b"0", b" ", b"\t", b":", b",", b"\xe9", b'"', b"/"])


@given(st.lists(st.tuples(st.sampled_from([b"X-A", b"x-b", b"Accept", b"te"]),
                          st.lists(_VALUE_BYTES, max_size=12).map(b"".join)), max_size=8))
def test_field_values_are_trimmed_of_surrounding_whitespace_only(fields: list[tuple[bytes, bytes]]) -> None:
    """Each value as RFC 9112 reads it: the bytes between the colon and CRLF, less the spaces
    and tabs around them; names and order as sent."""
    raw = b"GET / HTTP/1.1\r\n" + b"".join(name + b":" + value + b"\r\n" for name, value in fields) + b"\r\n"
    head = parse_request_head(raw)
    assert head.headers.fields == tuple((name, value.strip(b" \t")) for name, value in fields)


def test_a_long_run_of_spaces_in_a_value_is_read_in_one_pass() -> None:
    """The run must not be matched two ways: with backtracking this head took about 5 s."""
    raw = b"GET / HTTP/1.1\r\nX: a" + b" " * 60_000 + b"b \r\nY:" + b" " * 3_000 + b"\r\n\r\n"
    assert parse_request_head(raw).headers.fields == ((b"X", b"a" + b" " * 60_000 + b"b"), (b"Y", b""))


# What a client speaking TLS to a plain endpoint sends first: a ClientHello record (type 0x16).
CLIENT_HELLO = bytes.fromhex("160301007801000074030300") + bytes(range(14, 127))


@pytest.mark.parametrize("start, part", [
    (CLIENT_HELLO, "method"),
    (CLIENT_HELLO[:1], "method"),
    (b"\x00", "method"),
    (b" GET", "method"),
    (b"GET\r\n", "method"),
    (b"G\xc3\xa9T / HTTP/1.1", "method"),
    (b"\r\x00", "method"),
    (b"\r\n\r\nPOST\t/", "method"),
    (b"GET  /", "target"),
    (b"GET /a\x00b", "target"),
    (b"GET /\xc3\xa9 ", "target"),
    (b"GET /\r\n", "target"),
    (b"GET / \x16\x03", "version"),
    (b"GET / HTTP/1.1 ", "version"),
    (b"GET / http/1.1", "version"),
    (b"GET / HTTP/11", "version"),
])
def test_bytes_that_cannot_begin_a_request_line_are_refused_at_once(start: bytes, part: str) -> None:
    assert len(CLIENT_HELLO) == 125 and b"\n" not in CLIENT_HELLO
    with pytest.raises(HttpError) as caught:
        HeadCollector().feed(start)  # no line end needed: refused before any
    assert caught.value.status == 400
    assert f"in the {part}" in caught.value.message


@pytest.mark.parametrize("start", [b"", b"\r", b"\r\n", b"\r\n\r", b"POST", b"POST ", b"POST /v1/messages",
                                   b"POST /v1/messages ", b"POST /v1/messages HTTP/1", b"GET / HTTP/2.0\r",
                                   b"GET / HTTP/1.1\r\nX-Odd: \x00\x16"])
def test_a_plausible_start_waits_for_more(start: bytes) -> None:
    assert HeadCollector().feed(start) is None


_PIECES = st.sampled_from([b"GET", b"POST", b" ", b"/v1/x?a=b", b"HTTP/1.1", b"\r\n", b"\r", b"\n", b"Host: a",
                           b"\x16\x03\x01", b"\x00", b"\xc3\xa9", b"\t", b"e"])


def _outcome(data: bytes, splits: list[int], response: bool = False) -> tuple:
    collector = HeadCollector(response=response)
    start = 0
    try:
        for point in sorted(set(splits)) + [len(data)]:
            done = collector.feed(data[start:point])
            start = point
            if done is not None:
                return "head", done[0], done[1] + data[start:]
    except HttpError as error:
        return "error", error.status
    return ("pending",)


@given(st.lists(_PIECES, max_size=14).map(b"".join), st.lists(st.integers(0, 80), max_size=8), st.booleans())
def test_early_refusal_does_not_depend_on_the_split(data: bytes, splits: list[int], response: bool) -> None:
    data = (b"HTTP/1.1 200 OK" + data) if response and data[:1] == b"H" else data
    assert _outcome(data, splits, response) == _outcome(data, [], response)


@pytest.mark.parametrize("start", [b"ICY 200", b"\x16\x03\x03", b"HTTP/2 200", b"<html>"])
def test_an_upstream_that_does_not_speak_http1_is_refused_at_once(start: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        HeadCollector(what="upstream response", response=True).feed(start)
    assert caught.value.status == 502
