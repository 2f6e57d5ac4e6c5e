"""The request's decisions, tested as values: the same bytes split any way give the same route,
the same response events and the same modes; reuse and retry follow the rules the proxy relies on."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings, strategies as st

from cmm.core.decoding import BodyDecoder
from cmm.core.errors import HttpError
from cmm.core.exchange import (Body, ClientState, ClientTimeout, Dispose, Edits, Head, Interim, Lost, ModelSniffer,
                               RequestBody, ResponseMode, ResponseReader, RetryLater, Reuse, Sniffed, Start,
                               UpstreamRequest, can_answer_error, dispose_for, edits_for, keep_for_retry,
                               needs_rechunk, on_client_timeout, on_upstream_lost, plan_request, replay_on_fresh,
                               response_mode, retry_decision, reuse_after, route, start_for)
from cmm.core.framing import LAST_CHUNK, encode_chunk
from cmm.core.http_head import Framing, HeadCollector, RequestHead, parse_request_head, parse_response_head
from cmm.core.model_finder import Found, NotFound
from cmm.core.router import BodySize, Mapping, Router, Upstream

MAPPING = Mapping("claude-haiku-4-5", "gemini-2.5-flash", Upstream.from_url("http://127.0.0.1:8317/v1/messages"))
ROUTER = Router((MAPPING,))
ANY_SIZE = BodySize(0, complete=True)  # no rule here has a size condition
LIMIT = 1024 * 1024

cuts = st.lists(st.integers(0, 1 << 20), max_size=12)


def split(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (taken modulo its length), no piece empty."""
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:]) if b > a]


# -- requests ------------------------------------------------------------------------------------

def request(body: bytes, path: bytes = b"/v1/messages?beta=true", extra: bytes = b"",
            chunked: bool = False) -> bytes:
    if chunked:
        framed = b"".join(encode_chunk(body[i:i + 7]) for i in range(0, len(body), 7)) + LAST_CHUNK
        return b"POST %s HTTP/1.1\r\nHost: api.anthropic.com\r\n%sTransfer-Encoding: chunked\r\n\r\n%s" % (
            path, extra, framed)
    return b"POST %s HTTP/1.1\r\nHost: api.anthropic.com\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path, extra, len(body), body)


MESSAGES = [{"role": "user", "content": [{"type": "tool_result", "content": '{"model": "decoy"}'}]}]
CLAUDE_CODE = json.dumps({"model": "claude-haiku-4-5-20251001", "messages": MESSAGES, "max_tokens": 5},
                         separators=(",", ":")).encode()
MODEL_LAST = json.dumps({"messages": MESSAGES, "system": "x" * 300, "model": "claude-opus-4-6"}).encode()
ESCAPED = b'{"metadata":{"model":"no"}, "model" : "claude-\\u0068aiku-4-5", "max_tokens":5}'
NO_MODEL = json.dumps({"messages": MESSAGES}).encode()
NEXT = b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"  # a pipelined request behind

REQUESTS = [  # (the bytes on the wire, the request's body as JSON)
    (request(CLAUDE_CODE) + NEXT, CLAUDE_CODE),
    (request(MODEL_LAST, chunked=True) + NEXT, MODEL_LAST),
    (request(ESCAPED, path=b"/v1/messages/count_tokens"), ESCAPED),
    (request(NO_MODEL) + NEXT, NO_MODEL),
    (request(gzip.compress(CLAUDE_CODE, mtime=0), extra=b"Content-Encoding: gzip\r\n") + NEXT, CLAUDE_CODE),
    (NEXT + NEXT, b""),
]


def read_request(pieces: list[bytes]) -> tuple[RequestHead, object, Sniffed | None, bytes]:
    """Read one request as the proxy does: the head, then the body up to its model; return the head,
    the plan, what was sniffed and every byte that came after the sniffed part (for the splice)."""
    collector = HeadCollector()
    pieces = list(pieces)
    while True:
        done = collector.feed(pieces.pop(0))
        if done is not None:
            break
    raw, rest = done
    head = parse_request_head(raw)
    plan = plan_request(head, LIMIT)
    if not plan.sniff:
        return head, plan, None, rest + b"".join(pieces)
    sniffer = ModelSniffer(BodyDecoder(list(plan.codings), LIMIT) if plan.codings else None)
    body = RequestBody(head, LIMIT)
    data = rest
    while True:
        part = body.feed(data)
        body.check_limit()
        sniffed = sniffer.feed(part)
        if sniffed is not None:
            return head, plan, sniffed, part.rest + b"".join(pieces)
        data = pieces.pop(0)


@pytest.mark.parametrize("stream, body", REQUESTS, ids=["claude-code", "model-last-chunked", "escaped-count-tokens",
                                                  "no-model", "gzip", "not-a-candidate"])
@settings(max_examples=60, deadline=None)
@given(points=cuts)
def test_the_route_does_not_depend_on_how_the_request_is_split(stream: bytes, body: bytes, points: list[int]) -> None:
    whole = read_request([stream])
    head, plan, sniffed, after = read_request(split(stream, points))
    assert (head, plan) == whole[:2]
    if sniffed is None:
        assert whole[2] is None and head.raw + after == stream  # passed through at once, byte for byte
        return
    assert whole[2] is not None and sniffed.result == whole[2].result
    assert route(sniffed.result, ROUTER, head, ANY_SIZE) == route(whole[2].result, ROUTER, head, ANY_SIZE)
    # Nothing is lost or doubled: what was read to route plus what follows is the stream itself.
    assert head.raw + sniffed.raw + after == stream
    assert body.startswith(sniffed.payload)  # as JSON (de-chunked, decoded), from its first byte on
    if isinstance(sniffed.result, Found):
        assert sniffed.result.end <= len(sniffed.payload)  # the model's token is in hand to rewrite


def test_the_routes_of_the_realistic_requests() -> None:
    read = [read_request([stream]) for stream, _ in REQUESTS]
    results = [sniffed for _, _, sniffed, _ in read]
    assert [route(s.result, ROUTER, head, ANY_SIZE) if s else "passthrough" for head, _, s, _ in read] == \
        [MAPPING, None, MAPPING, None, MAPPING, "passthrough"]
    assert isinstance(results[3].result, NotFound)
    escaped = results[2].result
    assert isinstance(escaped, Found) and ESCAPED[escaped.start:escaped.end] == b'"claude-\\u0068aiku-4-5"'


def test_plan_request_decides_from_the_head_alone() -> None:
    def plan(raw: bytes):
        return plan_request(parse_request_head(raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"), 100)
    assert plan(request(b"{}")).sniff and plan(request(b"{}")).endpoint == "messages"
    assert plan(request(b"{}", path=b"/v1/messages/count_tokens?x=1")).endpoint == "count_tokens"
    assert not plan(NEXT).sniff and plan(NEXT).endpoint is None
    assert not plan(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\n\r\n").sniff  # no body to read
    gz = plan(request(b"{}", extra=b"Content-Encoding: gzip\r\n"))
    assert gz.codings == ("gzip",) and gz.sniff
    assert plan(request(b"{}", extra=b"Content-Encoding: identity\r\n")).codings == ()
    odd = plan(request(b"{}", extra=b"Content-Encoding: compress\r\n"))
    assert odd.unreadable == ("compress",) and odd.endpoint is None and not odd.sniff
    with pytest.raises(HttpError) as refused:
        plan(request(b"x" * 101))
    assert refused.value.status == 413


def test_a_body_past_the_limit_is_refused_once_counted() -> None:
    head = parse_request_head(b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = RequestBody(head, 10)
    part = body.feed(encode_chunk(b"x" * 11))
    assert part.payload == (b"x" * 11,) and not part.done
    with pytest.raises(HttpError) as refused:
        body.check_limit()
    assert refused.value.status == 413


# -- responses ------------------------------------------------------------------------------------

def sse(*events: dict) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)


STREAM = sse({"type": "message_start", "message": {"id": "m"}},
             {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "Eq1"}},
             {"type": "message_stop"})
CHUNKED_SSE = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               + b"".join(encode_chunk(STREAM[i:i + 50]) for i in range(0, len(STREAM), 50)) + LAST_CHUNK)
JSON_BODY = b'{"type":"message","content":[{"type":"thinking","thinking":"t","signature":"Eq"}]}'
JSON_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(JSON_BODY), JSON_BODY)
ERROR_429 = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 2\r\n"
             b"Content-Length: 21\r\n\r\n{\"error\":\"slow down\"}")
CLOSE_DELIMITED = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nServer: t\r\n\r\n"
RESPONSES = [CHUNKED_SSE, JSON_200, ERROR_429, CLOSE_DELIMITED, NO_CONTENT]


def read_response(pieces: list[bytes], after: bytes = b"") -> tuple[list[object], bool, bytes, bytes, bytes]:
    """Feed pieces (the last followed by ``after``, bytes past the response) until the response is
    done; return the interim and final heads, whether it finished, its raw body and payload, and
    what came past its end."""
    reader = ResponseReader(b"POST")
    heads: list[object] = []
    fed, used, raw, payload, done, extra = b"", 0, b"", b"", False, b""
    for piece in pieces[:-1] + [pieces[-1] + after]:
        fed += piece
        for event in reader.feed(piece):
            assert not done  # nothing after the end
            if isinstance(event, Interim):
                heads.append(event.raw)
                used += len(event.raw)
            elif isinstance(event, Head):
                heads.append(event.response)
                used += len(event.raw)
                assert reader.response is event.response
            else:
                assert isinstance(event, Body)
                raw += event.raw
                used += len(event.raw)
                payload += b"".join(event.progress.payload)
                done = event.progress.done
                extra = fed[used:] if done else b""
                assert event.extra == (done and bool(extra))
        if done:
            break
    return heads, done, raw, payload, extra


@pytest.mark.parametrize("stream", RESPONSES, ids=["chunked-sse", "json", "429", "close-delimited", "204"])
@settings(max_examples=60, deadline=None)
@given(points=cuts)
def test_response_events_do_not_depend_on_how_the_response_is_split(stream: bytes, points: list[int]) -> None:
    whole = read_response([stream])
    assert read_response(split(stream, points)) == whole
    heads, done, raw, payload, _ = whole
    head_bytes = sum(len(h) if isinstance(h, bytes) else len(h.raw) for h in heads)
    assert stream[head_bytes:] == raw  # every body byte, none twice
    assert done == (stream is not CLOSE_DELIMITED)  # that one ends only when the connection does


@settings(max_examples=60, deadline=None)
@given(points=cuts)
def test_bytes_past_the_end_of_a_response_are_reported_not_swallowed(points: list[int]) -> None:
    heads, done, raw, payload, extra = read_response(split(JSON_200, points), after=b"HTTP/1.1 200")
    assert done and payload == JSON_BODY and extra == b"HTTP/1.1 200"


def test_the_realistic_responses_are_read_right() -> None:
    heads, done, _, payload, _ = read_response([CHUNKED_SSE])
    assert heads[0] == b"HTTP/1.1 100 Continue\r\n\r\n" and heads[1].status == 200 and payload == STREAM
    heads, done, raw, payload, _ = read_response([NO_CONTENT])
    assert done and raw == b"" and payload == b"" and heads[0].status == 204


@pytest.mark.parametrize("stream", [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
                                    b"\x16\x03\x03\x00\x40 a TLS record"])
def test_a_response_cmm_cannot_frame_is_refused(stream: bytes) -> None:
    with pytest.raises(HttpError) as refused:
        list(ResponseReader(b"POST").feed(stream))
    assert refused.value.status == 502


def test_events_before_a_bad_byte_are_still_yielded() -> None:
    events = ResponseReader(b"POST").feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Up\r\n\r\n")
    assert next(events) == Interim(b"HTTP/1.1 100 Continue\r\n\r\n")
    with pytest.raises(HttpError):
        next(events)


# -- decisions ------------------------------------------------------------------------------------

def response_head(raw: bytes):
    return parse_response_head(raw, b"POST")


@pytest.mark.parametrize("raw, intercepted, endpoint, mode", [
    (CHUNKED_SSE[25:], True, "messages", ResponseMode.MARK_STREAM),
    (CHUNKED_SSE[25:], True, "count_tokens", ResponseMode.SPLICE),
    (CHUNKED_SSE[25:], False, "messages", ResponseMode.SPLICE),  # Anthropic's answers pass untouched
    (JSON_200, True, "messages", ResponseMode.HOLD_MESSAGE),
    (JSON_200, False, "messages", ResponseMode.SPLICE),
    (ERROR_429, True, "messages", ResponseMode.HOLD_ERROR),
    (ERROR_429, True, "count_tokens", ResponseMode.HOLD_ERROR),
    (ERROR_429, False, "messages", ResponseMode.SPLICE),
    (CLOSE_DELIMITED, True, "messages", ResponseMode.SPLICE),  # no length to hold a message against
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 100001\r\n\r\n", True, "messages", ResponseMode.SPLICE),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 100000\r\n\r\n", True, "messages", ResponseMode.HOLD_ERROR),
    (b"HTTP/1.1 500 Oops\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\n", True, "messages",
     ResponseMode.SPLICE),  # compressed: cmm cannot rewrite it
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000001\r\n\r\n", True, "messages", ResponseMode.SPLICE),
    (b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n", True, "messages", ResponseMode.SPLICE),
])
def test_response_mode(raw: bytes, intercepted: bool, endpoint: str, mode: ResponseMode) -> None:
    response = response_head(raw[: raw.index(b"\r\n\r\n") + 4])
    assert response_mode(response, intercepted, endpoint, 100_000, 1_000_000) is mode


def retry(**changes: object) -> RetryLater | None:
    values: dict = dict(status=429, delay=None, tries=1, retries=3, kept=True, body_done=True, awaiting_response=True,
                        max_delay=30.0, keep_alive=True, extra=False, close=False)
    values.update(changes)
    return retry_decision(**values)


def test_a_429_is_retried_only_when_everything_allows_it() -> None:
    assert retry() == RetryLater(1.0, reusable=True)  # no Retry-After: a second
    assert retry(delay=2.5) == RetryLater(2.5, reusable=True)
    assert retry(delay=30.0) == RetryLater(30.0, reusable=True)
    assert retry(extra=True) == RetryLater(1.0, reusable=False)
    assert retry(close=True) == RetryLater(1.0, reusable=False)
    assert retry(keep_alive=False) == RetryLater(1.0, reusable=False)
    for refusal in [dict(status=500), dict(status=503), dict(tries=3), dict(kept=False), dict(body_done=False),
                    dict(awaiting_response=False), dict(delay=30.5)]:
        assert retry(**refusal) is None, refusal


def test_a_request_is_replayed_on_a_fresh_connection_only_before_any_answer() -> None:
    assert replay_on_fresh(received=0, reused=True, replayable=True, retried=False)
    assert not replay_on_fresh(received=1, reused=True, replayable=True, retried=False)  # maybe acted on
    assert not replay_on_fresh(received=0, reused=False, replayable=True, retried=False)  # a new one failed
    assert not replay_on_fresh(received=0, reused=True, replayable=False, retried=False)  # body not in hand
    assert not replay_on_fresh(received=0, reused=True, replayable=True, retried=True)  # only once


def test_reuse_after_a_response() -> None:
    assert reuse_after(True, False, True, False, True) == Reuse(upstream=True, client=True)
    assert reuse_after(True, False, True, False, False) == Reuse(upstream=True, client=False)
    assert reuse_after(True, False, True, True, True) == Reuse(upstream=False, client=True)  # upstream out of step
    assert reuse_after(False, False, True, False, True) == Reuse(False, False)  # answered before the body was sent
    assert reuse_after(True, True, True, False, True) == Reuse(False, False)  # ended by the close
    assert reuse_after(True, False, False, False, True) == Reuse(False, False)  # upstream said close
    assert dispose_for(True, False) is Dispose.RELEASE and dispose_for(True, True) is Dispose.RELEASE
    assert dispose_for(False, True) is Dispose.ABORT and dispose_for(False, False) is Dispose.CLOSE


def test_request_framing_and_retry_keeping() -> None:
    assert needs_rechunk(True, False, True) and needs_rechunk(True, True, False)
    assert not needs_rechunk(True, False, False) and not needs_rechunk(False, True, True)
    assert keep_for_retry(True, 3, 10, 10) and not keep_for_retry(True, 3, 11, 10)
    assert not keep_for_retry(True, 1, 10, 10) and not keep_for_retry(False, 3, 10, 10)


def test_client_states_compare_as_their_names() -> None:
    assert ClientState.CLOSED == "closed" and ClientState("sniff") is ClientState.SNIFF
    assert len(ClientState) == 7 and ClientState("tunnel") is ClientState.TUNNEL


def test_the_edits_a_body_gets() -> None:
    length, big, chunked = Framing("length", 100), Framing("length", 101), Framing("chunked", 0)
    signed = b'{"messages":[{"type":"thinking","signature":"cmm1.x"}]}'
    assert edits_for("messages", True, chunked, 100, None) is Edits.UNMARK
    assert edits_for("messages", False, length, 100, None) is Edits.NEUTRALISE
    assert edits_for("count_tokens", False, length, 100, None) is Edits.NEUTRALISE
    assert edits_for("messages", False, big, 100, None) is Edits.NONE  # beyond what is checked
    assert edits_for("messages", False, chunked, 100, None) is Edits.NONE
    assert edits_for(None, True, length, 100, None) is Edits.NONE  # not a candidate
    assert edits_for("messages", True, length, 100, b'{"model":"x"}') is Edits.NONE  # whole, nothing to edit
    assert edits_for("messages", False, length, 100, signed) is Edits.NEUTRALISE
    assert edits_for("messages", True, length, 100, signed) is Edits.UNMARK
    assert start_for(True, Edits.NONE, True) is Start.INTERCEPT
    assert start_for(False, Edits.NEUTRALISE, True) is Start.HOLD_DECODED
    assert start_for(False, Edits.NEUTRALISE, False) is Start.EDIT
    assert start_for(False, Edits.NONE, True) is Start.PASS


def test_what_a_client_timeout_means() -> None:
    assert on_client_timeout(ClientState.HEAD, head_begun=False) is ClientTimeout.CLOSE
    assert on_client_timeout(ClientState.HEAD, head_begun=True) is ClientTimeout.REFUSE
    assert on_client_timeout(ClientState.SNIFF, head_begun=False) is ClientTimeout.REFUSE
    assert on_client_timeout(ClientState.BODY, head_begun=False) is ClientTimeout.REFUSE
    for state in (ClientState.CONNECTING, ClientState.RESPONSE, ClientState.CLOSED):
        assert on_client_timeout(state, head_begun=True) is ClientTimeout.IGNORE


def test_an_error_is_answered_only_before_the_response_began() -> None:
    assert can_answer_error(False, ClientState.RESPONSE) and can_answer_error(False, ClientState.BODY)
    assert not can_answer_error(True, ClientState.RESPONSE) and not can_answer_error(False, ClientState.CLOSED)


def test_what_an_upstream_closing_means() -> None:
    assert on_upstream_lost(0, True, True, False, close_delimited=False, response_started=False) is Lost.REPLAY
    assert on_upstream_lost(0, True, True, True, close_delimited=False, response_started=False) is Lost.REFUSE
    assert on_upstream_lost(5, True, True, False, close_delimited=True, response_started=True) is Lost.COMPLETE
    assert on_upstream_lost(5, True, True, False, close_delimited=False, response_started=False) is Lost.REFUSE
    assert on_upstream_lost(5, False, True, False, close_delimited=False, response_started=True) is Lost.ABORT


# -- the request as sent upstream -----------------------------------------------------------------

OPUS_FIRST = CLAUDE_CODE.replace(b"claude-haiku-4-5-20251001", b"claude-opus-4-6")
FORWARDED = [  # (the client's request, whether cmm may re-frame it, the body the upstream must get)
    (request(CLAUDE_CODE), False, CLAUDE_CODE.replace(b'"claude-haiku-4-5-20251001"', b'"gemini-2.5-flash"')),
    (request(CLAUDE_CODE, chunked=True), True,
     CLAUDE_CODE.replace(b'"claude-haiku-4-5-20251001"', b'"gemini-2.5-flash"')),
    (request(gzip.compress(CLAUDE_CODE, mtime=0), extra=b"Content-Encoding: gzip\r\n"), True,
     CLAUDE_CODE.replace(b'"claude-haiku-4-5-20251001"', b'"gemini-2.5-flash"')),
    (request(MODEL_LAST, chunked=True), False, MODEL_LAST),
    (request(OPUS_FIRST), False, OPUS_FIRST),
    (request(gzip.compress(OPUS_FIRST, mtime=0), extra=b"Content-Encoding: gzip\r\n"), False,
     gzip.compress(OPUS_FIRST, mtime=0)),  # held to check, unchanged: sent as it came
]


def forward(pieces: list[bytes]) -> bytes:
    """Everything sent upstream for one request arriving in ``pieces``, as the proxy sends it."""
    collector, pieces = HeadCollector(), list(pieces)
    while (done := collector.feed(pieces.pop(0))) is None:
        pass
    raw, data = done
    head = parse_request_head(raw)
    plan = plan_request(head, LIMIT)
    decoder = BodyDecoder(list(plan.codings), LIMIT) if plan.codings else None
    sniffer, body = ModelSniffer(decoder), RequestBody(head, LIMIT)
    while (sniffed := sniffer.feed(part := body.feed(data))) is None:
        data = pieces.pop(0)
    mapping = route(sniffed.result, ROUTER, head, ANY_SIZE)
    edits = edits_for(plan.endpoint, mapping is not None, head.framing, LIMIT, sniffed.payload if part.done else None)
    upstream = UpstreamRequest(head, edits, decoder, mapping, LIMIT)
    out = upstream.first(sniffed, plan.endpoint, part.done)
    remaining = ([part.rest] if part.rest else []) + pieces
    while not part.done:
        part = body.feed(remaining.pop(0))
        out += upstream.feed(part)
    assert not part.rest and not remaining
    return out


def request_body(data: bytes) -> tuple[RequestHead, bytes]:
    raw, rest = HeadCollector().feed(data)
    head = parse_request_head(raw)
    progress = RequestBody(head, LIMIT).feed(rest)
    assert progress.done and not progress.rest
    return head, b"".join(progress.payload)


@pytest.mark.parametrize("stream, reframed, expected", FORWARDED,
                         ids=["intercepted", "intercepted-chunked", "intercepted-gzip", "passthrough-chunked",
                              "passthrough", "passthrough-gzip"])
@settings(max_examples=60, deadline=None)
@given(points=cuts)
def test_what_goes_upstream_does_not_depend_on_the_split(stream: bytes, reframed: bool, expected: bytes,
                                                         points: list[int]) -> None:
    whole = forward([stream])
    sent = forward(split(stream, points))
    head, body = request_body(sent)
    assert body == expected and head == request_body(whole)[0]
    if not reframed:
        assert sent == whole  # byte for byte: only a body cmm re-chunks may be framed differently
    if expected in (OPUS_FIRST, MODEL_LAST, gzip.compress(OPUS_FIRST, mtime=0)):
        assert sent == stream  # passthrough: exactly what the client sent
