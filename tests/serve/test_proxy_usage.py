"""The serving protocol reads each messages answer's usage into its record, on both routes, while
the answer reaches the client as it would without it (byte for byte on the passthrough route)."""

from __future__ import annotations

import gzip
import json

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from cmm.core.framing import LAST_CHUNK, encode_chunk
from cmm.core.records import RequestRecord, format_json, format_line
from cmm.testing.fakes import fake_usage, message_json, sse_events
from memory_harness import Harness, make_pki, settings as proxy_settings
from test_proxy_splits import decoded_response, split

PKI = make_pki()
HAIKU = "claude-haiku-4-5-20251001"  # routed to gemini-2.5-flash at the target
OPUS = "claude-opus-4-6"
PROMPT = 4000


def post(model: str, request_class: str | None = "main") -> bytes:
    body = json.dumps({"model": model, "max_tokens": 5, "stream": True, "messages": []}).encode()
    extra = b"" if request_class is None else b"x-claude-code-request-class: %s\r\n" % request_class.encode()
    return (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra, len(body), body))


def stream_body(model: str) -> bytes:
    return b"".join(sse_events(message_id="msg_1", model=model, provider="p", input_tokens=PROMPT, deltas=9,
                               thinking=True))


def sse_response(model: str, coding: str | None = None) -> bytes:
    body = stream_body(model)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    if coding == "gzip":
        body, head = gzip.compress(body), head + b"Content-Encoding: gzip\r\n"
    return head + b"\r\n" + b"".join(encode_chunk(body[i:i + 100]) for i in range(0, len(body), 100)) + LAST_CHUNK


def json_response(model: str, coding: str | None = None) -> bytes:
    body = message_json(message_id="msg_1", model=model, provider="p", input_tokens=PROMPT)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if coding == "gzip":
        body, head = gzip.compress(body), head + b"Content-Encoding: gzip\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def run(request: bytes, response: bytes, answering: str, cuts: tuple[int, ...] = (),
        later: bool = False) -> tuple[bytes, RequestRecord]:
    """The bytes the client got and the request's record; the answer comes ``cuts`` apart, a
    quarter of a second after the request was sent. ``later``: the record is handed over as its
    builder (as in a worker) and built once the connection is gone and time has passed."""
    harness = Harness(PKI, proxy_settings())
    builders: list = []
    if later:
        assert harness.context is not None
        harness.context.record_later = builders.append
    servers = []
    harness.upstreams[answering].reply = lambda server, exchange: servers.append(server)
    client, _ = harness.client()
    harness.send(client, request)
    [server] = servers
    harness.advance(0.25)
    for piece in split(response, list(cuts)):
        server.transport.write(piece)
        harness.flush()
    if later:
        assert harness.records == [] and len(builders) == 1
        client.transport.loseConnection()
        harness.flush()
        harness.advance(10.0)
        return bytes(client.received), builders[0]()
    [record] = harness.records
    return bytes(client.received), record


STREAMED = fake_usage(PROMPT, 9)
ANSWERED = fake_usage(PROMPT, 5)
CASES = {
    "intercepted-sse": (HAIKU, "target", sse_response, None, STREAMED),
    "intercepted-json": (HAIKU, "target", json_response, None, ANSWERED),
    "passthrough-sse": (OPUS, "anthropic", sse_response, None, STREAMED),
    "passthrough-json": (OPUS, "anthropic", json_response, None, ANSWERED),
    "passthrough-sse-gzip": (OPUS, "anthropic", sse_response, "gzip", STREAMED),
    "passthrough-json-gzip": (OPUS, "anthropic", json_response, "gzip", ANSWERED),
    "intercepted-sse-gzip": (HAIKU, "target", sse_response, "gzip", STREAMED),
}


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(0, 1 << 16), max_size=10))
def test_usage_in_the_record_whatever_the_split(name: str, cuts: list[int]) -> None:
    model, answering, make, coding, counts = CASES[name]
    served = "gemini-2.5-flash" if answering == "target" else model
    response = make(served, coding)
    received, record = run(post(model), response, answering, tuple(cuts))
    assert record.status == 200 and record.error is None
    assert {field: getattr(record, field) for field in counts} == counts
    assert record.served_model == served and record.request_class == "main"
    assert record.route == ("intercepted" if answering == "target" else "passthrough")
    assert record.upstream == ("127.0.0.1:8317" if answering == "target" else "anthropic")
    assert record.ttfb == pytest.approx(0.25)
    if answering == "anthropic":
        assert received == response  # byte for byte: the reader only looks
    else:
        assert decoded_response(received)[1] != b""


@pytest.mark.parametrize("name", list(CASES))
def test_a_record_built_later_is_the_record_built_at_once(name: str) -> None:
    """A worker builds its records with the batch, after the exchange: nothing the exchange does
    after its end (nor the client going, nor time passing) changes what its record says."""
    model, answering, make, coding, _ = CASES[name]
    response = make("gemini-2.5-flash" if answering == "target" else model, coding)
    at_once = run(post(model), response, answering, (300,))
    built_later = run(post(model), response, answering, (300,), later=True)
    assert built_later == at_once


def test_every_split_of_a_passthrough_stream() -> None:
    """Every byte boundary of the answer (head, chunk framing and payload alike)."""
    response = sse_response(OPUS)
    head_end = response.index(b"\r\n\r\n")
    for at in range(head_end - 5, len(response), 7):
        received, record = run(post(OPUS), response, "anthropic", (at,))
        assert received == response and record.output_tokens == 9 and record.cache_read_input_tokens == PROMPT // 2


def test_no_usage_where_there_is_none() -> None:
    """Errors, other endpoints and answers without usage leave the counts unknown; a request
    without a class header has none."""
    error = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    response = b"HTTP/1.1 529 Busy\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(error), error)
    received, record = run(post(OPUS, request_class=None), response, "anthropic")
    assert received == response and record.status == 529
    assert (record.input_tokens, record.output_tokens, record.served_model, record.request_class) == (
        None, None, None, None)
    models = b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n"
    answer = json_response(OPUS)
    received, record = run(models, answer, "anthropic")
    assert received == answer and record.input_tokens is None and record.route == "passthrough"


def test_log_lines_carry_the_counts() -> None:
    _, record = run(post(OPUS), sse_response(OPUS), "anthropic")
    line = format_line(record)
    expected = STREAMED
    assert (f" in={expected['input_tokens']} out=9 cache=r{expected['cache_read_input_tokens']}"
            f"/w{expected['cache_creation_input_tokens']}") in line
    document = json.loads(format_json(record))
    assert {field: document[field] for field in STREAMED} == STREAMED
    assert document["route"] == "passthrough" and document["upstream"] == "anthropic"
    assert document["served_model"] == OPUS and document["request_class"] == "main"
    unknown = attrs.evolve(record, input_tokens=None, output_tokens=None, cache_read_input_tokens=None,
                           cache_creation_input_tokens=None)
    assert " in=" not in format_line(unknown) and "cache=" not in format_line(unknown)
    assert "cache=r-/w7" in format_line(attrs.evolve(unknown, cache_creation_input_tokens=7))


def test_a_flaw_in_reading_costs_neither_the_answer_nor_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.logger import globalLogPublisher

    import cmm.serve.proxy

    def broken(*args: object) -> None:
        raise RuntimeError("a flaw in the reader")

    monkeypatch.setattr(cmm.serve.proxy, "usage_of", broken)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        response = sse_response(OPUS)
        received, record = run(post(OPUS), response, "anthropic")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert received == response and record.status == 200 and record.error is None
    assert record.input_tokens is None and record.route == "passthrough"
    assert any("token usage" in str(event.get("log_format")) for event in seen)
