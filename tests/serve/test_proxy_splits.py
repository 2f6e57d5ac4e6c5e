"""The whole serving protocol, fed the same request and response cut at arbitrary points: the
upstream gets the same bytes and the client the same answer, whatever the split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from cmm.core.framing import LAST_CHUNK, encode_chunk, tracker_for
from cmm.core.http_head import HeadCollector, parse_response_head
from memory_harness import Harness, make_pki, responses, settings as proxy_settings

PKI = make_pki()
HAIKU = json.dumps({"model": "claude-haiku-4-5-20251001", "max_tokens": 5, "messages": [
    {"role": "user", "content": [{"type": "tool_result", "content": '{"model":"decoy"}'}]}]},
    separators=(",", ":")).encode()
OPUS = HAIKU.replace(b"claude-haiku-4-5-20251001", b"claude-opus-4-6")


def post(body: bytes, chunked: bool = False) -> bytes:
    if chunked:
        framed = b"".join(encode_chunk(body[i:i + 40]) for i in range(0, len(body), 40)) + LAST_CHUNK
        return b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\n" \
               b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)


def sse_event(data: dict) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (data["type"].encode(), json.dumps(data).encode())


STREAM = b"".join(sse_event(e) for e in [
    {"type": "message_start", "message": {"id": "m"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "Eq1"}},
    {"type": "message_stop"}])
SSE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + \
    b"".join(encode_chunk(STREAM[i:i + 64]) for i in range(0, len(STREAM), 64)) + LAST_CHUNK
MESSAGE = b'{"type":"message","content":[{"type":"thinking","thinking":"t","signature":"Eq2"}]}'
JSON_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(MESSAGE), MESSAGE)
ERROR = b'{"error":{"message":"bad model"}}'
ERROR_RESPONSE = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(ERROR), ERROR)

# name: (request, response, the upstream that answers, whether the bytes sent upstream and to the
# client are the same whatever the split; else only their framing may differ: cmm re-chunks a
# chunked body it rewrites, and a marked stream goes out one chunk per piece that came)
CASES = {
    "intercepted-sse": (post(HAIKU), SSE_RESPONSE, "target", (True, False)),
    "intercepted-chunked-json": (post(HAIKU, chunked=True), JSON_RESPONSE, "target", (False, True)),
    "intercepted-error": (post(HAIKU), ERROR_RESPONSE, "target", (True, True)),
    "passthrough-sse": (post(OPUS), SSE_RESPONSE, "anthropic", (True, True)),
    "passthrough-chunked": (post(OPUS, chunked=True), JSON_RESPONSE, "anthropic", (True, True)),
}

cuts = st.lists(st.integers(0, 1 << 20), max_size=8)


def split(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:]) if b > a]


def decoded_response(data: bytes) -> tuple[bytes, bytes]:
    """A response's head and de-chunked body: cmm re-frames a marked stream as it goes."""
    head_raw, rest = HeadCollector(what="test", response=True).feed(data)
    head = parse_response_head(head_raw, b"POST")
    progress = tracker_for(head.framing, "test").feed(rest)
    assert progress.done and progress.consumed == len(rest)
    return head_raw, b"".join(progress.payload)


def run(name: str, request_cuts: list[int], response_cuts: list[int]) -> tuple[object, ...]:
    """What the upstream got and what the client got; the raw bytes only where they must not vary."""
    request, response, answering, (exact_request, exact_response) = CASES[name]
    harness = Harness(PKI, proxy_settings())
    servers = []

    def reply(server, exchange):
        servers.append(server)
        return None  # the test sends the answer, piece by piece
    harness.upstreams[answering].reply = reply
    client, _ = harness.client()
    for piece in split(request, request_cuts):
        harness.send(client, piece)
    [server] = servers
    for piece in split(response, response_cuts):
        server.transport.write(piece)
        harness.flush()
    [exchange] = harness.upstreams[answering].exchanges
    head, body = decoded_response(bytes(client.received))
    return (exchange.head, exchange.body, exchange.raw if exact_request else None, head, body,
            bytes(client.received) if exact_response else None,
            [(r.status, r.model, r.intercepted, r.error) for r in harness.records])


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=12, deadline=None)
@given(request_cuts=cuts, response_cuts=cuts)
def test_the_proxy_s_output_does_not_depend_on_how_bytes_arrive(name: str, request_cuts: list[int],
                                                                response_cuts: list[int]) -> None:
    assert run(name, request_cuts, response_cuts) == run(name, [], [])


def test_what_the_unsplit_runs_send() -> None:
    _, sent, _, head, body, _, records = run("intercepted-sse", [], [])
    assert b'"gemini-2.5-flash"' in sent and b"claude-haiku" not in sent and b"decoy" in sent
    assert b"x-cmm-provider: cliproxyapi" in head and b'"signature": "cmm1.Eq1"' in body
    assert records == [(200, "claude-haiku-4-5-20251001", True, None)]
    _, _, sent, _, _, received, records = run("passthrough-sse", [], [])
    assert sent == post(OPUS) and received == SSE_RESPONSE  # byte for byte both ways
    assert records == [(200, "claude-opus-4-6", False, None)]
    _, _, _, head, body, _, records = run("intercepted-error", [], [])
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["type"] == "error"


def run_keep_alive(request_cuts: list[int], hold: bool) -> tuple[object, ...]:
    """Two requests back to back on one connection, the second possibly read ahead (pipelined);
    ``hold``: the target's connection completes only once every byte was sent, so that what
    comes meanwhile is read ahead."""
    harness = Harness(PKI, proxy_settings())
    harness.upstreams["target"].hold = hold
    client, _ = harness.client()
    for piece in split(post(HAIKU) + post(OPUS, chunked=True), request_cuts):
        harness.send(client, piece)
    harness.complete_connects("target")
    target, anthropic = (harness.upstreams[name].exchanges for name in ("target", "anthropic"))
    return ([e.raw for e in target], [e.raw for e in anthropic], responses(bytes(client.received)),
            [(r.status, r.model, r.intercepted) for r in harness.records], client.lost)


@pytest.mark.parametrize("hold", [False, True], ids=["answered-at-once", "connecting-meanwhile"])
@settings(max_examples=25, deadline=None)
@given(request_cuts=cuts)
def test_keep_alive_requests_are_served_alike_however_they_arrive(hold: bool, request_cuts: list[int]) -> None:
    assert run_keep_alive(request_cuts, hold) == run_keep_alive([], False)


def test_the_unsplit_keep_alive_run() -> None:
    [intercepted], [passed], answers, records, lost = run_keep_alive([], False)
    assert b'"gemini-2.5-flash"' in intercepted and passed == post(OPUS, chunked=True)
    assert [head.split(b" ")[1] for head, _ in answers] == [b"200", b"200"] and not lost
    assert records == [(200, "claude-haiku-4-5-20251001", True), (200, "claude-opus-4-6", False)]
