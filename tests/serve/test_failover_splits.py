"""Failover in the serving protocol against scripted upstreams (in-memory TLS, fake clock): a refusal
however it is split, refusals too large to read, a refusal before the request is all sent (failed
over once it is), a closed connection, an answer already begun, and a client that leaves
mid-failover."""

from __future__ import annotations

import json

import attrs
from hypothesis import given, settings as settings_, strategies as st

from cmm.core.router import Mapping, Router, Upstream
from memory_harness import TARGET_URL, Harness, make_pki, ok_reply, responses, settings

PKI = make_pki()
HAIKU = b'{"model":"claude-haiku-4-5-20251001","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
ERROR = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
REFUSAL = b'HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nretry-after: 20\r\n' \
          b'Content-Length: %d\r\n\r\n%s' % (len(ERROR), ERROR)


def post(body: bytes = HAIKU, extra: bytes = b"") -> bytes:
    return b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-ant-user\r\n%s" \
           b"Content-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def harness(**rule: object) -> Harness:
    mapping = Mapping("claude-haiku-4-5", "gemini-2.5-flash", Upstream.from_url(TARGET_URL, "sk-proxy"),
                      **({"mode": "fallback"} | rule))  # type: ignore[arg-type]
    made = Harness(PKI, attrs.evolve(settings(), router=Router((mapping,))))
    made.upstreams["target"].reply = ok_reply(b'{"from":"target"}')
    return made


def held(made: Harness) -> list:
    """Anthropic's connections whose answer the test writes itself."""
    waiting: list = []
    made.upstreams["anthropic"].reply = lambda server, exchange: waiting.append(server)
    return waiting


def the_one_answer(client) -> tuple[bytes, bytes]:
    [(head, body)] = responses(bytes(client.received))  # exactly one response, nothing around it
    return head, body


def test_a_refusal_arriving_a_byte_at_a_time_is_read_whole_then_the_target_answers() -> None:
    made = harness()
    waiting = held(made)
    client, _ = made.client()
    made.send(client, post())
    [server] = waiting
    for byte in REFUSAL[:-1]:
        server.transport.write(bytes([byte]))
        made.flush()
        assert client.received == b"" and made.upstreams["target"].exchanges == []
    server.transport.write(REFUSAL[-1:])
    made.flush()
    head, body = the_one_answer(client)
    assert head.startswith(b"HTTP/1.1 200") and b"x-cmm-fallback: anthropic 429\r\n" in head and body == b'{"from":"target"}'
    assert made.pool.idle_count() == 2  # Anthropic's connection, read to its end, is pooled again; and the target's
    assert not server.transport.disconnecting
    [record] = made.records
    assert record.fallback == "anthropic 429" and record.route == "fallback"


def test_a_refusal_too_large_to_read_drops_its_connection_and_fails_over() -> None:
    made = harness()
    waiting = held(made)
    client, _ = made.client()
    made.send(client, post())
    [server] = waiting
    server.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(20):
        server.transport.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        made.flush()
    head, _ = the_one_answer(client)
    assert b"x-cmm-fallback: anthropic 503\r\n" in head and b"x" * 100 not in bytes(client.received)
    assert server.transport.disconnecting


def test_a_refusal_before_the_request_is_all_sent_fails_over_once_it_is() -> None:
    made = harness()
    made.upstreams["anthropic"].reply = lambda server, exchange: None
    client, _ = made.client()
    request = post()
    made.send(client, request[: len(request) - 10])  # the model is known: routed, body still coming
    [server] = made.upstreams["anthropic"].servers
    server.transport.write(REFUSAL)
    made.flush()
    assert client.received == b"" and made.upstreams["target"].exchanges == []
    assert server.transport.disconnecting  # half a body on it: not reused
    made.send(client, request[len(request) - 10:])
    head, body = the_one_answer(client)
    assert b"x-cmm-fallback: anthropic 429\r\n" in head and body == b'{"from":"target"}'
    [sent] = made.upstreams["target"].exchanges
    assert json.loads(sent.body)["model"] == "gemini-2.5-flash"


def test_a_refusal_before_a_body_that_then_outgrows_the_bound_is_a_502_that_says_why() -> None:
    made = Harness(PKI, attrs.evolve(harness().settings, fallback_body_max=300))
    made.upstreams["anthropic"].reply = lambda server, exchange: None
    client, _ = made.client()
    body = HAIKU[:-1] + b',"pad":"' + b"x" * 400 + b'"}'
    head = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    made.send(client, head + b"%x\r\n%s\r\n" % (len(body[:100]), body[:100]))
    [server] = made.upstreams["anthropic"].servers
    server.transport.write(REFUSAL)
    made.flush()
    made.send(client, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body[100:]), body[100:]))
    head_out, answer = the_one_answer(client)
    assert head_out.startswith(b"HTTP/1.1 502") and b"--fallback-body-max" in answer
    assert made.upstreams["target"].exchanges == []


def test_a_connection_closed_before_any_answer_fails_over() -> None:
    made = harness()
    made.upstreams["anthropic"].reply = lambda server, exchange: server.transport.loseConnection()
    client, _ = made.client()
    made.send(client, post())
    head, body = the_one_answer(client)
    assert b"x-cmm-fallback: anthropic closed\r\n" in head and body == b'{"from":"target"}'


def test_an_answer_already_begun_is_never_followed_by_another() -> None:
    made = harness()
    waiting = held(made)
    client, _ = made.client()
    made.send(client, post())
    [server] = waiting
    server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial")
    made.flush()
    server.transport.loseConnection()
    made.flush()
    assert client.received.startswith(b"HTTP/1.1 200 OK") and client.received.count(b"HTTP/1.1") == 1
    assert client.lost and made.upstreams["target"].exchanges == []


def test_a_client_gone_while_the_target_is_being_reached_ends_quietly() -> None:
    made = harness()
    made.upstreams["anthropic"].reply = lambda server, exchange: REFUSAL
    made.upstreams["target"].hold = True
    client, transport = made.client()
    made.send(client, post())
    assert len(made.upstreams["target"].held) == 1  # failing over
    transport.loseConnection()
    made.flush()
    made.complete_connects("target")
    [record] = made.records
    assert record.error == "client closed the connection" and made.upstreams["target"].exchanges == []


def test_the_target_s_compressed_5xx_hands_the_request_back_before_a_byte_of_it_goes_out() -> None:
    made = harness(mode="always", on_target_error="anthropic")
    made.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nxxxx")
    made.upstreams["anthropic"].reply = ok_reply(b'{"from":"anthropic"}')
    client, _ = made.client()
    request = post()
    made.send(client, request)
    head, body = the_one_answer(client)
    assert b"x-cmm-fallback: target 502\r\n" in head and body == b'{"from":"anthropic"}'
    [sent] = made.upstreams["anthropic"].exchanges
    assert sent.raw == request  # as Claude Code sent it: its credentials, its model
    assert json.loads(made.upstreams["target"].exchanges[0].body)["model"] == "gemini-2.5-flash"


def test_the_request_log_says_who_answered_and_why() -> None:
    import time

    from cmm.core.records import format_json, format_line

    made = harness()
    made.upstreams["anthropic"].reply = lambda server, exchange: REFUSAL
    client, _ = made.client()
    made.send(client, post())
    [record] = made.records
    line = format_line(record, localtime=time.gmtime)
    assert "→ INTERCEPTED → gemini-2.5-flash (fallback: anthropic 429) ✓ 200" in line
    document = json.loads(format_json(record))
    assert document["route"] == "fallback" and document["fallback"] == "anthropic 429"
    assert document["mapping"] == "claude-haiku-4-5" and document["upstream"] == "127.0.0.1:8317"


SSE = b"".join(b"event: %s\ndata: {\"n\":%d}\n\n" % (kind, n) for n, kind in enumerate(
    [b"message_start", b"content_block_start", b"content_block_delta", b"content_block_stop", b"message_stop"]))


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % len(data) for c in cuts if c % len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@settings_(max_examples=40, deadline=None)
@given(refusal_cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=6),
       answer_cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=6))
def test_however_both_answers_are_split_the_client_gets_the_target_s_stream_once(refusal_cuts: list[int],
                                                                                 answer_cuts: list[int]) -> None:
    made = harness()
    waiting = held(made)
    targets: list = []
    made.upstreams["target"].reply = lambda server, exchange: targets.append(server)
    client, _ = made.client()
    made.send(client, post())
    [server] = waiting
    for piece in pieces(REFUSAL, refusal_cuts):
        server.transport.write(piece)
        made.flush()
    [target] = targets
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + \
        b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces(SSE, answer_cuts)) + b"0\r\n\r\n"
    for piece in pieces(answer, answer_cuts):
        target.transport.write(piece)
        made.flush()
    received = bytes(client.received)
    head, rest = received.split(b"\r\n\r\n", 1)
    assert received.count(b"HTTP/1.1") == 1 and b"x-cmm-fallback: anthropic 429" in head
    assert b"slow down" not in received  # nothing of the refusal
    body = b""
    while rest:
        size, rest = rest.split(b"\r\n", 1)
        body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2:]
    assert body == SSE
