"""Hostile bodies cost linear CPU and get an answer: every scan of client or upstream data is
timed on its worst input at two sizes (a quadratic scan takes ``FACTOR**2`` times as long for
``FACTOR`` times the input, a linear one about ``FACTOR`` times), and JSON nested beyond the
parser's recursion limit is answered, never raised."""

from __future__ import annotations

import json
import re
import time
from typing import Callable

import pytest
from hypothesis import given, settings, strategies as st

from cmm.core import cch, target_errors, thinking_edits, thinking_marks
from cmm.core.http_head import HeadCollector, Headers, parse_request_head
from cmm.core.model_finder import Found, ModelFinder, NotFound
from cmm.core.target_errors import delay_from_text, error_response, is_anthropic_error
from cmm.core.thinking_edits import Neutraliser, Unmarker
from cmm.core.thinking_marks import SseMarker, mark_event, mark_message

FACTOR = 8
# Linear time gives a ratio near FACTOR and quadratic near FACTOR**2: the bound sits between,
# with room for a noisy machine (each figure is the best of three runs).
RATIO_BOUND = 3 * FACTOR
DEEP = 100_000  # far beyond json's recursion limit


def best_time(run: Callable[[bytes], object], data: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        run(data)
        best = min(best, time.perf_counter() - began)
    return best


def assert_linear(run: Callable[[bytes], object], make: Callable[[int], bytes], size: int, limit: float) -> None:
    """``run`` on ``make(size)`` and on ``make(FACTOR * size)``: the second takes at most
    RATIO_BOUND times as long, and under ``limit`` seconds (generous: many times the linear
    cost, a fraction of the quadratic one).

    The two are timed in turns, best of several, and the whole measurement is tried up to three
    times: a busy machine slows some runs, but a quadratic scan fails every try by far.
    """
    small, large = make(size), make(FACTOR * size)
    for _ in range(3):
        best = [float("inf"), float("inf")]
        for _ in range(4):
            for index, data in enumerate((small, large)):
                began = time.perf_counter()
                run(data)
                best[index] = min(best[index], time.perf_counter() - began)
        if best[1] < limit and best[1] < RATIO_BOUND * max(best[0], 1e-3):
            return
    assert best[1] < limit, f"{best[1]:.3f} s for {FACTOR * size}"
    raise AssertionError(f"{best[0]:.4f} s -> {best[1]:.4f} s for {FACTOR} times the input: not linear")


# -- thinking: the request-side edits ---------------------------------------------------------------


class ForeignToolTurn:
    foreign_tool_turn = True


def test_thinking_off_is_linear_on_a_member_that_never_closes() -> None:
    """``"thinking":{`` then ``"type":"enabled",`` without end: a pattern with two unbounded
    runs tried every split (0.5 s at 68 KB, growing quadratically)."""
    def make(size: int) -> bytes:
        return b'"max_tokens":1,"thinking":{' + b'"type":"enabled",' * (size // 17)

    assert_linear(lambda tail: thinking_edits.thinking_off_if(ForeignToolTurn(), tail), make, 68_000, 1.0)
    assert thinking_edits.thinking_off_if(ForeignToolTurn(), make(1000)) == make(1000)  # not closed: kept


def _thinking_on_by_pattern(tail: bytes) -> tuple[int, int] | None:
    """What the scan must find, as the (slow on hostile input) pattern says it."""
    found = list(re.finditer(rb'"thinking":\{[^{}]*"type":"(?:enabled|adaptive)"[^{}]*\},?', tail))
    return found[-1].span() if found else None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b'"thinking":{', b'"type":"enabled"', b'"type":"adaptive"', b'"type":"disabled"', b"{", b"}", b",",
    b'"budget_tokens":1', b'"thinking":"x"', b"]", b" ",
]), max_size=14).map(b"".join))
def test_thinking_off_finds_what_the_pattern_found(tail: bytes) -> None:
    assert thinking_edits._thinking_on(tail) == _thinking_on_by_pattern(tail)


@pytest.mark.parametrize("scan", [thinking_edits.neutralise, thinking_edits.unmark, mark_message, cch.signing_form])
@pytest.mark.parametrize("shape", [
    lambda n: b'{"messages":' + b"[" * n,
    lambda n: b'{"messages":[{"role":"user","content":[' + b'{"a":' * n,
    lambda n: b'{"messages":[{"role":"user","content":[{"type":"thinking","signature":"cmm1.","x":' + b"[" * n,
    lambda n: b'{"content":[{"type":"thinking","signature":"s","x":' + b"[{" * (n // 2),
    lambda n: b'{"messages":[{"role":"user","content":[{"type":"text","text":"' + b'\\"' * (n // 2),
])
def test_body_scans_are_linear_on_deep_nesting_and_escapes(scan: Callable[[bytes], bytes], shape) -> None:
    """Nesting and escapes beyond any parser's limit: the scans keep no recursion and stay linear."""
    body = shape(DEEP)
    out = scan(body)
    assert isinstance(out, bytes) and (len(out) == len(body) or scan is mark_message)
    assert_linear(scan, shape, 20_000, 5.0)


def test_neutraliser_decides_a_deeply_nested_marked_block_in_pieces() -> None:
    """A marked block whose extra member nests 100 000 levels: blanked, same length, any split."""
    block = b'{"type":"thinking","signature":"cmm1.x","deep":' + b"[" * DEEP + b"]" * DEEP + b"}"
    body = b'{"messages":[{"role":"assistant","content":[{"type":"text","text":"t"},' + block + b"]}]}"
    for size in (len(body), 4096):
        transform = Neutraliser()
        out = b"".join(transform.feed(body[i : i + size]) for i in range(0, len(body), size)) + transform.finish()
        assert transform.changed and len(out) == len(body)
        assert json.loads(out) == {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "t"}]}]}
    transform = Unmarker()
    assert len(transform.feed(body) + transform.finish()) == len(body) and transform.changed


# -- cch -----------------------------------------------------------------------------------------


def test_cch_edit_list_is_built_once() -> None:
    """Many model strings, then many unsigned members: each member once dropped its nested edits
    by rebuilding the whole list (18 s for 740 KB)."""
    def make(size: int) -> bytes:
        count = size // 37
        return (b'{"system":[{"type":"text","text":"cch=00000;"}],"a":[' + b'{"model":"x"},' * count
                + b'{"max_tokens":1,"b":1},' * count + b"1]}")

    body = make(2000)
    form = cch.signing_form(body)
    assert b"max_tokens" not in form and b'"model":"x"' not in form
    assert json.loads(form)["a"][:2] == [{"model": ""}, {"model": ""}] and {"b": 1} in json.loads(form)["a"]
    assert_linear(cch.signing_form, make, 90_000, 5.0)


@pytest.mark.parametrize("shape", [
    lambda n: b'{"a":' + b'{"model":' * (n // 9),  # every model value a container, walked into once
    lambda n: b'{"a":' + b'{"fallbacks":[' * (n // 14),  # unsigned members that never end
    lambda n: b'{"a":' + b'{"fallbacks":[' * (n // 30) + b"1" + b"]}" * (n // 30) + b"}",  # and that do
    lambda n: b'{"a":[' + b'{"model":"x","max_tokens":1},' * (n // 30) + b"1]}",
    lambda n: b'{"a":"' + b'\\\"model\\\":' * (n // 12) + b'"}',  # keys in a string are no keys
    lambda n: b'{"a":"' + b"x" * n,
], ids=["models", "open-fallbacks", "closed-fallbacks", "members", "escaped", "unterminated"])
def test_cch_key_search_is_linear(shape) -> None:
    body = shape(DEEP)
    assert len(cch.signing_form(body)) <= len(body)
    assert_linear(cch.signing_form, shape, 100_000, 2.0)


def test_cch_unsigned_members_with_nested_models_drop_their_edits() -> None:
    body = (b'{"model":"m","fallbacks":[{"model":"a","max_tokens":2}],"x":{"max_tokens":3,"model":"b"},'
            b'"max_tokens":1}')
    assert cch.signing_form(body) == b'{"model":"","x":{"model":""}}'


# -- the model finder ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    lambda n: b'{"a":' + b"[" * n,
    lambda n: b'{"a":' + b'{"b":' * (n // 5),
    lambda n: b'{"a":"' + b'\\\\\\"' * (n // 4) + b'",',
    lambda n: b'{"' + b"\\u0061" * (n // 6),
    lambda n: b'{"a":' + b"1" * n,
])
def test_model_finder_is_linear_and_answers_on_hostile_bodies(shape) -> None:
    def run(body: bytes) -> object:
        finder = ModelFinder()
        finder.feed(body)
        return finder.finish()

    assert isinstance(run(shape(DEEP)), (Found, NotFound))
    assert_linear(run, shape, 40_000, 5.0)


def test_model_finder_finds_the_model_after_deep_nesting() -> None:
    body = b'{"a":' + b"[" * DEEP + b"]" * DEEP + b',"model":"claude-haiku-4-5"}'
    finder = ModelFinder()
    assert finder.feed(body) == Found("claude-haiku-4-5", len(body) - 19, len(body) - 1)


# -- responses: SSE and target errors ------------------------------------------------------------


def test_sse_event_nested_too_deeply_passes_unmarked() -> None:
    event = b'event: content_block_delta\ndata: {"type":"content_block_delta","signature":' + b"[" * DEEP + b"\n\n"
    assert mark_event(event) is event
    marker = SseMarker()
    after = b'data: {"type":"content_block_delta","delta":{"type":"signature_delta","signature":"s"}}\n\n'
    out = marker.feed(event + after) + marker.finish()
    assert out == event + after.replace(b'"signature":"s"', b'"signature":"cmm1.s"') and marker.marked == 1


@pytest.mark.parametrize("piece", [b"x" * 1000, b"signature" + b"y" * 991, b"\r\n" + b"z" * 998],
                         ids=["plain", "signature", "lines"])
def test_sse_marker_is_linear_on_a_stream_without_blank_lines(piece: bytes) -> None:
    """Each feed once rescanned everything held (2 s for 1 MB in 1 KB pieces)."""
    def run(stream: bytes) -> int:
        marker = SseMarker()
        return sum(len(marker.feed(stream[i : i + 1000])) for i in range(0, len(stream), 1000))

    assert_linear(run, lambda size: piece * (size // len(piece)), 250_000, 2.0)


@pytest.mark.parametrize("body", [
    b"[" * DEEP, b'{"type":"error","error":' + b"{" * DEEP, b'{"a":' * DEEP,
], ids=["arrays", "error-objects", "objects"])
def test_target_error_nested_too_deeply_is_quoted(body: bytes) -> None:
    assert not is_anthropic_error(body)
    response = error_response(b"HTTP/1.1 500 Internal Server Error", 500, Headers(()), body, "http://127.0.0.1:8317")
    head, _, sent = response.partition(b"\r\n\r\n")
    document = json.loads(sent)
    assert head.startswith(b"HTTP/1.1 500") and document["type"] == "error"
    assert document["error"]["message"].startswith("http://127.0.0.1:8317 answered 500: " + body[:20].decode())


@pytest.mark.parametrize("shape", [
    lambda n: b"<html>" + b"<" * n,
    lambda n: b"<body>" + b"<a" * (n // 2),
    lambda n: b"<html><" + b"a" * n,
])
def test_target_error_pages_are_quoted_in_linear_time(shape) -> None:
    """A tag pattern that ran to 200 bytes from every ``<``: 0.2 s a megabyte of ``<``, against
    0.002 s for plain text; each try now stops at the next ``<``."""
    def run(body: bytes) -> bytes:
        return error_response(b"HTTP/1.1 502 Bad Gateway", 502, Headers(()), body, "t")

    assert_linear(run, shape, 125_000, 1.0)
    plain = best_time(run, b"<html>" + b"a" * 1_000_000)
    assert best_time(run, shape(1_000_000)) < 30 * max(plain, 1e-3)


def test_tags_are_dropped_and_text_between_angle_brackets_is_kept() -> None:
    body = b"<html><body><h1>Bad gateway</h1> a < b <p>retry</p></body></html>"
    sent = error_response(b"HTTP/1.1 502 Bad Gateway", 502, Headers(()), body, "t").partition(b"\r\n\r\n")[2]
    assert json.loads(sent)["error"]["message"] == "t answered 502: Bad gateway a < b retry"


@pytest.mark.parametrize("shape", [
    lambda n: "retry in " + "1" * n,
    lambda n: "retry in " * (n // 9),
    lambda n: "try again in 1.1" * (n // 16),
    lambda n: "reset after " + " " * n + "x",
])
def test_delays_in_prose_are_found_in_linear_time(shape) -> None:
    assert_linear(lambda text: delay_from_text(text), shape, 125_000, 2.0)


# -- request heads -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    lambda n: b"POST / HTTP/1.1\r\nHost: x\r\na:" + b" " * n + b"\rx\r\n\r\n",
    lambda n: b"POST / HTTP/1.1\r\nHost: x\r\na:" + b" b" * (n // 2) + b" \r\n\r\n",
    lambda n: b"POST / HTTP/1.1\r\n" + b"a:b\r\n" * (n // 5) + b"x\r\n\r\n",
    lambda n: b"POST / HTTP/1.1\r\n" + b"a:" + b":" * n + b"\r\n\r\n",
])
def test_request_heads_are_parsed_in_linear_time(shape) -> None:
    def run(raw: bytes) -> object:
        try:
            return parse_request_head(raw)
        except Exception as error:  # refused: still an answer, which is what counts here
            return error

    assert_linear(run, shape, 7_000, 1.0)
    collector = HeadCollector()
    assert collector.feed(shape(7_000)[:-4]) is None


# -- through the serving protocol: every hostile body gets an answer ----------------------------


def _post(body: bytes) -> bytes:
    return (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-user\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("body, upstream", [
    (b'{"a":' + b"[" * DEEP, "anthropic"),  # no model before the nesting: passed through
    (b'{"model":"claude-haiku-4-5","x":' + b"[" * DEEP, "target"),
    (b'{"model":"claude-opus-4-6","messages":[{"role":"assistant","content":[{"type":"thinking",'
     b'"signature":"cmm1.x","x":' + b"[" * DEEP + b"]" * DEEP + b'}]}],"system":[{"type":"text","text":"cch=00000;"}],'
     b'"deep":' + b"{\"a\":" * DEEP + b"1" + b"}" * DEEP + b"}", "anthropic"),  # blanked and re-signed
], ids=["passthrough", "intercepted", "neutralised-and-resigned"])
def test_deeply_nested_request_bodies_are_forwarded_and_answered(body: bytes, upstream: str) -> None:
    from memory_harness import Harness, make_pki, responses, settings

    harness = Harness(make_pki(), settings())
    client, _ = harness.client()
    harness.send(client, _post(body))
    [exchange] = harness.upstreams[upstream].exchanges
    assert len(exchange.body) == len(body) + (len(b"gemini-2.5-flash") - len(b"claude-haiku-4-5")) * (upstream == "target")
    if b"cmm1." in body:
        assert b"cmm1." not in exchange.body and cch.is_valid(exchange.body)
    [(head, answer)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 200 ") and answer == b'{"ok":true}' and not client.lost


def test_deeply_nested_target_answers_reach_the_client() -> None:
    """An error body and an SSE event nested past the parser's limit: quoted, and passed on."""
    from memory_harness import Harness, make_pki, responses, settings

    harness = Harness(make_pki(), settings())
    # Deep, yet small enough to be held and rewritten (a larger error passes on as it comes).
    deep_error = b'{"type":"error","error":' + b"[" * (target_errors.MAX_ERROR_BODY - 100)
    harness.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(deep_error), deep_error))
    client, _ = harness.client()
    harness.send(client, _post(b'{"model":"claude-haiku-4-5","messages":[]}'))
    [(head, answer)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 500 ") and json.loads(answer)["type"] == "error" and not client.lost

    event = b'data: {"type":"content_block_delta","delta":{"signature":' + b"[" * DEEP + b"}}\n\n"
    stream = b"event: message_start\ndata: {}\n\n" + event + b"event: message_stop\ndata: {}\n\n"
    harness.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(stream), stream))
    client, _ = harness.client()
    harness.send(client, _post(b'{"model":"claude-haiku-4-5","messages":[],"stream":true}'))
    received = bytes(client.received)
    assert received.startswith(b"HTTP/1.1 200 ") and event in received and received.endswith(b"0\r\n\r\n")


def test_selftest_reads_no_message_from_a_deeply_nested_error() -> None:
    from cmm.cli.selftest import error_message

    assert error_message(b'{"error":' + b"[" * DEEP) == ""
    assert error_message(b'{"type":"error","error":{"type":"x","message":"m"}}') == "m"


@pytest.mark.parametrize("kind", [Neutraliser, Unmarker, thinking_marks._Marker, ModelFinder,
                                  lambda: cch.Resigner(lambda: True)], ids=["neutralise", "unmark", "mark", "finder", "resign"])
def test_body_stages_fed_in_small_pieces_are_linear(kind) -> None:
    """What the serving protocol does: 1 KB pieces of many blocks spelled with whitespace (each
    taking the general walk), then a long string of escapes."""
    def make(size: int) -> bytes:
        blocks = b'{ "type" : "thinking" , "signature" : "cmm1.x" } ,' * (size // 100)
        text = b'\\\\\\"' * (size // 8)
        return (b'{"system":"cch=00000;","messages":[{"role":"assistant","content":[' + blocks
                + b'{"type":"text","text":"' + text + b'"}]}]}')

    def run(body: bytes) -> None:
        stage = kind()
        for start in range(0, len(body), 1000):
            stage.feed(body[start : start + 1000])
        stage.finish()

    assert_linear(run, make, 50_000, 5.0)
