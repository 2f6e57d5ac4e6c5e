"""The serving protocol over in-memory TLS: routing, rewriting, keep-alive, framing, errors and
timeouts, with scripted upstreams and a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionRefusedError

from cmm.core import cch
from cmm.core.framing import LAST_CHUNK, encode_chunk
from memory_harness import Harness, make_pki, ok_reply, responses, settings

PKI = make_pki()
HAIKU = b'{"model":"claude-haiku-4-5-20251001","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
OPUS = b'{"model":"claude-opus-4-6","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'


def post(body: bytes, path: bytes = b"/v1/messages?beta=true", extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nContent-Type: application/json\r\nx-api-key: sk-user\r\n"
        b"Authorization: Bearer user-oauth\r\nCookie: c=1\r\n%sHost: api.anthropic.com\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path, extra, len(body), body)
    )


def chunked_post(chunks: list[bytes], path: bytes = b"/v1/messages") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-user\r\nTransfer-Encoding: chunked\r\n\r\n"
            % path + b"".join(encode_chunk(c) for c in chunks) + LAST_CHUNK)


@pytest.fixture
def harness() -> Harness:
    return Harness(PKI, settings())


def error_of(body: bytes) -> dict:
    document = json.loads(body)
    assert document["type"] == "error"
    assert set(document["error"]) == {"type", "message"}
    return document["error"]


def test_alpn_is_http11(harness: Harness) -> None:
    client, _ = harness.client([b"h2", b"http/1.1"])
    harness.send(client, b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
    assert client.tls.negotiatedProtocol == b"http/1.1"


def test_passthrough_is_byte_identical(harness: Harness) -> None:
    client, _ = harness.client()
    request = post(OPUS, extra=b"X-Odd:  spaced value \r\n")
    harness.send(client, request)
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert exchange.raw == request
    assert harness.upstreams["target"].exchanges == []
    [(head, body)] = responses(bytes(client.received))
    assert b"x-cmm-provider" not in head.lower()
    assert body == b'{"ok":true}'
    [record] = harness.records
    assert (record.model, record.intercepted, record.status) == ("claude-opus-4-6", False, 200)


def test_intercepted_request_is_rewritten(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(HAIKU, extra=b"anthropic-version: 2023-06-01\r\n"))
    [exchange] = harness.upstreams["target"].exchanges
    lines = exchange.head.split(b"\r\n")
    assert lines[0] == b"POST /v1/messages?beta=true HTTP/1.1"
    lowered = exchange.head.lower()
    assert b"sk-user" not in lowered and b"user-oauth" not in lowered and b"cookie" not in lowered
    assert b"Authorization: Bearer sk-proxy\r\n" in exchange.head
    assert b"Host: 127.0.0.1:8317\r\n" in exchange.head
    assert b"anthropic-version: 2023-06-01\r\n" in exchange.head
    assert exchange.body == HAIKU.replace(b"claude-haiku-4-5-20251001", b"gemini-2.5-flash")
    assert b"Content-Length: %d\r\n" % len(exchange.body) in exchange.head
    [(head, _)] = responses(bytes(client.received))
    assert b"x-cmm-provider: cliproxyapi\r\n" in head
    [record] = harness.records
    assert (record.intercepted, record.target) == (True, "gemini-2.5-flash")


def test_keep_alive_routes_each_request_and_reuses_upstreams(harness: Harness) -> None:
    client, _ = harness.client()
    for body in (OPUS, HAIKU, OPUS, HAIKU):
        harness.send(client, post(body))
    got = responses(bytes(client.received))
    assert [b"x-cmm-provider" in head for head, _ in got] == [False, True, False, True]
    assert len(harness.upstreams["anthropic"].exchanges) == 2
    assert len(harness.upstreams["target"].exchanges) == 2
    assert harness.pool.opened == 2  # one connection per upstream, reused
    assert not client.lost


def test_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(OPUS) + post(HAIKU) + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    got = responses(bytes(client.received))
    assert len(got) == 3
    assert [b"x-cmm-provider" in head for head, _ in got] == [False, True, False]
    assert harness.upstreams["anthropic"].exchanges[1].head.startswith(b"GET /v1/models")


def test_chunked_request_routed_and_rechunked(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, chunked_post([HAIKU[:12], HAIKU[12:30], HAIKU[30:]]))
    [exchange] = harness.upstreams["target"].exchanges
    assert exchange.body == HAIKU.replace(b"claude-haiku-4-5-20251001", b"gemini-2.5-flash")
    assert b"Transfer-Encoding: chunked" in exchange.head and b"Content-Length" not in exchange.head
    raw = chunked_post([OPUS[:5], OPUS[5:]])
    harness.send(client, raw)
    assert harness.upstreams["anthropic"].exchanges[0].raw == raw


def test_chunked_body_streams_after_the_model(harness: Harness) -> None:
    client, _ = harness.client()
    head = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    harness.send(client, head + encode_chunk(HAIKU[:40]))
    assert harness.pool.opened == 1  # routed as soon as the model was known
    harness.send(client, encode_chunk(HAIKU[40:]) + LAST_CHUNK)
    [exchange] = harness.upstreams["target"].exchanges
    assert exchange.body == HAIKU.replace(b"claude-haiku-4-5-20251001", b"gemini-2.5-flash")


def test_body_sent_while_the_upstream_connects_is_not_lost(harness: Harness) -> None:
    harness.upstreams["target"].hold = True
    client, _ = harness.client()
    request = chunked_post([HAIKU[:40], HAIKU[40:60], HAIKU[60:]])
    second = request.index(HAIKU[40:60]) - 4
    third = request.index(HAIKU[60:]) - 4
    harness.send(client, request[:second])
    harness.send(client, request[second:third])  # arrives while cmm is still connecting
    assert client.server.valve.paused
    harness.complete_connects("target")
    assert not client.server.valve.paused  # reading again for the rest of the body
    harness.send(client, request[third:])
    [exchange] = harness.upstreams["target"].exchanges
    assert exchange.body == HAIKU.replace(b"claude-haiku-4-5-20251001", b"gemini-2.5-flash")
    harness.send(client, post(HAIKU))  # and the connection still reads the next request
    assert len(responses(bytes(client.received))) == 2


def test_count_tokens_goes_to_the_target(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(HAIKU, path=b"/v1/messages/count_tokens"))
    [exchange] = harness.upstreams["target"].exchanges
    assert exchange.head.startswith(b"POST /v1/messages/count_tokens HTTP/1.1\r\n")


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
    b"HEAD /api/hello HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
    post(HAIKU, path=b"/api/event_logging/v2/batch"),
    post(HAIKU, path=b"/v1/messages/batches"),
    post(b'{"messages":[],"metadata":{"model":"claude-haiku-4-5"}}'),
    post(b"not json"),
])
def test_everything_else_passes_through(harness: Harness, request_bytes: bytes) -> None:
    client, _ = harness.client()
    harness.send(client, request_bytes)
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert exchange.raw == request_bytes
    assert harness.upstreams["target"].exchanges == []


def test_model_late_in_a_large_body(harness: Harness) -> None:
    messages = [{"role": "user", "content": "x" * 5000} for _ in range(200)]
    body = json.dumps({"messages": messages, "model": "claude-haiku-4-5"}).encode()
    client, _ = harness.client()
    harness.send(client, post(body))
    [exchange] = harness.upstreams["target"].exchanges
    assert json.loads(exchange.body)["model"] == "gemini-2.5-flash"


def test_expect_continue_is_answered_for_candidates(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(HAIKU, extra=b"Expect: 100-continue\r\n"))
    assert bytes(client.received).startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert b"expect" not in harness.upstreams["target"].exchanges[0].head.lower()


def test_upstream_unreachable_is_502(harness: Harness) -> None:
    harness.upstreams["target"].refuse = ConnectionRefusedError("Connection refused")
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 502 ")
    error = error_of(body)
    assert error["type"] == "api_error" and "http://127.0.0.1:8317" in error["message"]
    assert client.lost
    assert harness.records[0].status == 502


def test_upstream_connect_hang_is_504(harness: Harness) -> None:
    harness.upstreams["anthropic"].hang = True
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    harness.advance(599)
    assert client.received == b""
    harness.advance(2)
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 504 ") and error_of(body)["type"] == "timeout_error"


def test_upstream_silent_is_504_and_stream_silence_cuts(harness: Harness) -> None:
    harness.upstreams["anthropic"].reply = lambda server, exchange: None
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    harness.advance(601)
    [(head, _)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 504 ")
    assert harness.upstreams["anthropic"].servers[0].transport.disconnecting


def test_stream_goes_through_as_it_arrives_and_silence_is_not_total_time(harness: Harness) -> None:
    harness.upstreams["anthropic"].reply = lambda server, exchange: (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    server = harness.upstreams["anthropic"].servers[0]
    for index in range(5):
        harness.advance(500)  # long total time, never 600 s of silence
        server.transport.write(encode_chunk(b"event: ping\ndata: {}\n\n"))
        harness.flush()
        assert bytes(client.received).count(b"event: ping") == index + 1
    server.transport.write(LAST_CHUNK)
    harness.flush()
    assert bytes(client.received).endswith(LAST_CHUNK) and not client.lost
    assert harness.records[0].status == 200


def test_upstream_gone_mid_response_closes_the_client(harness: Harness) -> None:
    harness.upstreams["anthropic"].reply = lambda server, exchange: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    harness.upstreams["anthropic"].servers[0].transport.loseConnection()
    harness.flush()
    assert bytes(client.received).endswith(b"partial")
    assert client.lost
    assert "mid-response" in harness.records[0].error


def test_client_gone_closes_the_upstream(harness: Harness) -> None:
    harness.upstreams["anthropic"].reply = lambda server, exchange: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    client, transport = harness.client()
    harness.send(client, post(OPUS))
    transport.loseConnection()
    harness.flush()
    assert harness.upstreams["anthropic"].servers[0].transport.disconnected or \
        harness.upstreams["anthropic"].servers[0].transport.disconnecting
    assert harness.pool.idle_count() == 0
    assert harness.records[0].error == "client closed the connection"


def test_body_limit_413_from_the_head_and_from_chunks() -> None:
    harness = Harness(PKI, settings(body_limit=100))
    client, _ = harness.client()
    harness.send(client, post(b"x" * 101))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 413 ") and error_of(body)["type"] == "request_too_large"
    assert harness.upstreams["anthropic"].exchanges == []
    client, _ = harness.client()
    harness.send(client, chunked_post([b'{"messages":[' + b" " * 60, b" " * 60]))
    [(head, _)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 413 ") and client.lost


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nX: y\r\n folded\r\n\r\n", 400),
    (b"POST /v1/messages HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
])
def test_malformed_requests_get_anthropic_errors(harness: Harness, raw: bytes, status: int) -> None:
    client, _ = harness.client()
    harness.send(client, raw)
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert error_of(body)["message"]
    assert client.lost
    assert harness.upstreams["anthropic"].exchanges == [] and harness.upstreams["target"].exchanges == []


def test_slow_head_gets_408_and_idle_keep_alive_closes(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, b"POST /v1/messages HTTP/1.1\r\nHost: a")
    harness.advance(31)
    [(head, _)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 408 ") and client.lost
    idle, _ = harness.client()
    harness.advance(119)
    assert not idle.lost
    harness.advance(2)
    assert idle.lost and idle.received == b""


def test_stale_pooled_connection_is_retried_once(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    first_server = harness.upstreams["anthropic"].servers[0]
    # The server will close the pooled connection just as the next request arrives.
    harness.upstreams["anthropic"].reply = ok_reply(b'{"second":true}')
    first_server.dataReceived = lambda data: first_server.transport.loseConnection()
    harness.send(client, post(OPUS))
    got = responses(bytes(client.received))
    assert [body for _, body in got] == [b'{"ok":true}', b'{"second":true}']
    assert harness.pool.opened == 2


def test_early_upstream_answer_closes_both_sides(harness: Harness) -> None:
    harness.upstreams["anthropic"].reply = None
    client, _ = harness.client()
    head = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    harness.send(client, head + encode_chunk(OPUS[:40]))
    server = harness.upstreams["anthropic"].servers[0]
    server.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
    harness.flush()
    [(status_head, body)] = responses(bytes(client.received))
    assert status_head.startswith(b"HTTP/1.1 413 ") and body == b"no"
    assert client.lost


def test_reload_applies_from_the_next_request(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    context = harness.factory.wrappedFactory.context
    context.settings = settings(router=type(context.settings.router)(()))
    harness.send(client, post(HAIKU))
    assert len(harness.upstreams["target"].exchanges) == 1
    assert len(harness.upstreams["anthropic"].exchanges) == 1


def test_content_is_logged_only_when_asked(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    assert harness.records[0].content is None
    logging = Harness(PKI, settings(log_content=True))
    client, _ = logging.client()
    logging.send(client, post(HAIKU))
    content = logging.records[0].content
    assert content.startswith("POST /v1/messages?beta=true HTTP/1.1\n")
    assert "x-api-key: [redacted]" in content and "sk-user" not in content and "user-oauth" not in content
    assert content.endswith("\n\n" + HAIKU.decode())


def test_a_413_on_a_keep_alive_connection_logs_none_of_the_previous_requests_content() -> None:
    harness = Harness(PKI, settings(log_content=True, body_limit=len(HAIKU)))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    too_big = HAIKU + b" "
    request = post(too_big, path=b"/v1/messages/count_tokens")
    harness.send(client, request)
    [(first, _), (refused, _)] = responses(bytes(client.received))
    assert first.startswith(b"HTTP/1.1 200 ") and refused.startswith(b"HTTP/1.1 413 ")
    ok, too_large = harness.records
    assert ok.content is not None and HAIKU.decode() in ok.content
    assert (too_large.status, too_large.path, too_large.content) == (413, "/v1/messages/count_tokens", None)
    assert too_large.bytes_in == len(request) - len(too_big)  # its head alone: refused before its body


def compressed_post(body: bytes, coding: bytes, chunked: bool = False) -> bytes:
    if chunked:
        return (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Encoding: %s\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" % coding + encode_chunk(body[:10]) + encode_chunk(body[10:])
                + LAST_CHUNK)
    return post(body, extra=b"Content-Encoding: %s\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n" % coding)


@pytest.mark.parametrize("chunked", [False, True])
def test_gzip_bodies_are_routed_and_decoded_for_the_target(harness: Harness, chunked: bool) -> None:
    import gzip

    client, _ = harness.client()
    opus = compressed_post(gzip.compress(OPUS), b"gzip", chunked)
    harness.send(client, opus)
    assert harness.upstreams["anthropic"].exchanges[0].raw == opus  # compressed bytes, untouched
    harness.send(client, compressed_post(gzip.compress(HAIKU), b"gzip", chunked))
    [exchange] = harness.upstreams["target"].exchanges
    assert exchange.body == HAIKU.replace(b"claude-haiku-4-5-20251001", b"gemini-2.5-flash")
    lowered = exchange.head.lower()
    assert b"content-encoding" not in lowered and b"transfer-encoding: chunked" in lowered
    assert b"accept-encoding: identity\r\n" in lowered and b"gzip" not in lowered
    assert len(responses(bytes(client.received))) == 2


def test_truncated_gzip_is_400_and_nothing_is_forwarded(harness: Harness) -> None:
    import gzip

    data = gzip.compress(HAIKU)[:-12]  # the JSON is all there, the gzip trailer is not
    client, _ = harness.client()
    harness.send(client, compressed_post(data, b"gzip"))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 400 ") and "Truncated gzip" in error_of(body)["message"]
    assert harness.upstreams["target"].exchanges == [] and harness.upstreams["anthropic"].exchanges == []


def test_gzip_bomb_is_413() -> None:
    import gzip

    harness = Harness(PKI, settings(body_limit=1 << 20))
    bomb = gzip.compress(b'{"messages":[' + b" " * (50 << 20))
    client, _ = harness.client()
    harness.send(client, compressed_post(bomb, b"gzip"))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 413 ") and error_of(body)["type"] == "request_too_large"


def test_unknown_coding_passes_through_untouched(harness: Harness) -> None:
    client, _ = harness.client()
    request = compressed_post(b"\x1f\x9d\x90compressed", b"compress")
    harness.send(client, request)
    assert harness.upstreams["anthropic"].exchanges[0].raw == request


def test_a_connection_closed_while_connecting_reads_again_to_finish_closing(harness: Harness) -> None:
    harness.upstreams["target"].refuse = ConnectionRefusedError("Connection refused")
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    assert client.lost
    assert not client.server.valve.paused  # else TLS shutdown waits forever for the peer


def replies(*answers: bytes):
    """A target that answers each request with the next of ``answers`` (the last one repeats)."""
    queue = list(answers)

    def reply(server, exchange) -> bytes:
        return queue.pop(0) if len(queue) > 1 else queue[0]
    return reply


def plain(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s" % (status, extra, len(body), body)


OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


def test_a_429_is_retried_after_the_delay_the_target_wrote(harness: Harness) -> None:
    limited = plain(b"429 Too Many Requests", b"quota exceeded, reset after 2s")
    harness.upstreams["target"].reply = replies(limited, limited, OK_JSON)
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    assert client.received == b"" and len(harness.upstreams["target"].exchanges) == 1
    harness.advance(2)
    assert len(harness.upstreams["target"].exchanges) == 2 and client.received == b""
    harness.advance(2)
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"ok":true}'
    first, second, third = harness.upstreams["target"].exchanges
    assert first.raw == second.raw == third.raw  # the same request each time
    assert harness.records[-1].status == 200 and not client.lost


def test_retries_are_bounded_then_the_429_reaches_the_client_with_retry_after(harness: Harness) -> None:
    harness.upstreams["target"].reply = replies(plain(b"429 Too Many Requests", b"Please retry after 3 seconds"))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    harness.advance(3)
    harness.advance(3)
    [(head, body)] = responses(bytes(client.received))
    assert len(harness.upstreams["target"].exchanges) == 3  # three tries in all (the default)
    assert head.startswith(b"HTTP/1.1 429 ") and b"retry-after: 3\r\n" in head
    assert b"x-cmm-provider: cliproxyapi\r\n" in head
    error = error_of(body)
    assert error["type"] == "rate_limit_error" and "Please retry after 3 seconds" in error["message"]


def test_the_target_connection_is_reused_after_a_rewritten_error(harness: Harness) -> None:
    harness.upstreams["target"].reply = replies(plain(b"400 Bad Request", b"no such model"), OK_JSON)
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    harness.send(client, post(HAIKU))
    got = responses(bytes(client.received))
    assert [head.split(b"\r\n")[0] for head, _ in got] == [b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 200 OK"]
    assert error_of(got[0][1])["type"] == "invalid_request_error"  # rewritten into Anthropic's format
    assert harness.pool.opened == 1  # the error's connection served the second request too
    assert not client.lost


def test_a_long_requested_wait_is_passed_on_at_once(harness: Harness) -> None:
    harness.upstreams["target"].reply = replies(plain(b"429 Too Many Requests", b"", b"Retry-After: 120\r\n"))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 120\r\n" in head
    assert "empty body" in error_of(body)["message"]
    assert len(harness.upstreams["target"].exchanges) == 1


@pytest.mark.parametrize("answer, status, quoted", [
    (plain(b"500 Internal Server Error", b"panic: runtime error: index out of range"), 500, "panic: runtime error"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 58\r\n\r\n"
     b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>\n\n\n", 502, "502 Bad Gateway nginx"),
    (plain(b"503 Service Unavailable", b""), 503, "with an empty body"),
])
def test_target_errors_in_other_shapes_become_anthropic_errors(harness: Harness, answer: bytes, status: int,
                                                                quoted: str) -> None:
    harness.upstreams["target"].reply = replies(answer)
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"content-type: application/json\r\n" in head
    error = error_of(body)
    assert quoted in error["message"] and "http://127.0.0.1:8317" in error["message"]
    assert error["type"] == ("api_error" if status != 504 else "timeout_error")


def test_anthropic_format_errors_pass_unchanged(harness: Harness) -> None:
    document = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    harness.upstreams["target"].reply = replies(
        b"HTTP/1.1 529 Overloaded\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(document), document))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 529 ") and body == document


def test_large_request_bodies_are_not_kept_for_retries() -> None:
    harness = Harness(PKI, settings(retry_body_cap=50))
    harness.upstreams["target"].reply = replies(plain(b"429 Too Many Requests", b"reset after 1s"))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, _)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 429 ") and b"retry-after: 1\r\n" in head
    assert len(harness.upstreams["target"].exchanges) == 1


# -- thinking blocks across providers ------------------------------------------------------------------

VECTOR = (Path(__file__).resolve().parents[1] / "vectors" / "cch-2.json").read_bytes()


def sse(*events: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(encode_chunk(e) for e in events) + LAST_CHUNK


def test_target_signatures_are_marked_in_streams_and_messages(harness: Harness) -> None:
    signature = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
                b'"delta":{"type":"signature_delta","signature":"tgt-abc"}}\n\n'
    text = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,' \
           b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    harness.upstreams["target"].reply = replies(sse(signature, text))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    received = bytes(client.received)
    assert b'"signature":"cmm1.tgt-abc"' in received and text in received
    message = b'{"type":"message","content":[{"type":"thinking","thinking":"t","signature":"tgt-xyz"},' \
              b'{"type":"text","text":"hi"}]}'
    harness.upstreams["target"].reply = replies(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(message), message))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, body)] = responses(bytes(client.received))
    assert json.loads(body)["content"][0]["signature"] == "cmm1.tgt-xyz"
    assert b"Content-Length: %d\r\n" % len(body) in head and b"x-cmm-provider: cliproxyapi\r\n" in head


def test_marked_blocks_never_reach_anthropic_and_the_hash_is_re_signed(harness: Harness) -> None:
    body = cch.resign(VECTOR.replace(b"claude-haiku-4-5-20251001", b"claude-opus-4-6")
                      .replace(b'"signature":"EqQBCkYIBxgCKkBsig"', b'"signature":"cmm1.tgt-EqQBCkYIBx"'))
    assert cch.is_valid(body)
    client, _ = harness.client()
    harness.send(client, post(body))
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert len(exchange.body) == len(body) and b"cmm1." not in exchange.body
    sent = json.loads(exchange.body)
    assert [block["type"] for block in sent["messages"][1]["content"]] == ["tool_use"]  # the thinking went
    assert cch.is_valid(exchange.body) and cch.current(exchange.body) != cch.current(body)


def test_anthropic_bodies_without_foreign_blocks_pass_byte_for_byte(harness: Harness) -> None:
    body = VECTOR.replace(b"claude-haiku-4-5-20251001", b"claude-opus-4-6")
    client, _ = harness.client()
    request = post(body)
    harness.send(client, request)
    assert harness.upstreams["anthropic"].exchanges[0].raw == request


def test_the_target_gets_its_own_signatures_back_unmarked(harness: Harness) -> None:
    body = VECTOR.replace(b'"signature":"EqQBCkYIBxgCKkBsig"', b'"signature":"cmm1.tgt-EqQBCkYIBx"')
    client, _ = harness.client()
    harness.send(client, post(body))
    [exchange] = harness.upstreams["target"].exchanges
    sent = json.loads(exchange.body)
    assert sent["messages"][1]["content"][0]["signature"] == "tgt-EqQBCkYIBx"
    assert sent["model"] == "gemini-2.5-flash"
    assert len(exchange.body) == len(body) - len(b"claude-haiku-4-5-20251001") + len(b"gemini-2.5-flash")


def test_a_client_that_asked_to_close_is_told_so_by_intercepted_responses(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(HAIKU, extra=b"Connection: close\r\n"))
    [(head, _)] = responses(bytes(client.received))
    assert b"Connection: close\r\n" in head and client.lost
    assert b"connection" not in harness.upstreams["target"].exchanges[0].head.lower()
    assert harness.pool.idle_count() == 1  # the target connection stays pooled


def test_compressed_bodies_with_foreign_blocks_reach_anthropic_decoded_blanked_and_re_signed(harness: Harness) -> None:
    import gzip

    body = cch.resign(VECTOR.replace(b"claude-haiku-4-5-20251001", b"claude-opus-4-6")
                      .replace(b'"signature":"EqQBCkYIBxgCKkBsig"', b'"signature":"cmm1.tgt-EqQBCkYIBx"'))
    client, _ = harness.client()
    harness.send(client, compressed_post(gzip.compress(body), b"gzip"))
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert b"content-encoding" not in exchange.head.lower()
    assert b"Content-Length: %d\r\n" % len(body) in exchange.head
    assert b"cmm1." not in exchange.body and cch.is_valid(exchange.body) and len(exchange.body) == len(body)


def test_a_compressed_body_that_decodes_too_large_to_check_goes_as_it_came(harness: Harness, monkeypatch) -> None:
    import gzip

    import cmm.serve.proxy

    monkeypatch.setattr(cmm.serve.proxy, "NEUTRALISE_MAX", 2000)
    text = "".join(f"{n:08x}" for n in range(6000))  # compresses little, so it decodes as it arrives
    body = json.dumps({"model": "claude-opus-4-6", "messages": [{"role": "user", "content": text}]}).encode()
    compressed = gzip.compress(body)
    request = compressed_post(compressed, b"gzip")
    head_end = request.index(b"\r\n\r\n") + 4
    client, _ = harness.client()
    harness.send(client, request[: head_end + 2000])  # the model: routed, held
    harness.send(client, request[head_end + 2000 : -10])  # decodes past the limit: released as it came
    assert not client.server.request.forward.editing
    harness.send(client, request[-10:])
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert exchange.raw == request


def test_a_stream_sent_with_content_length_is_marked_too(harness: Harness) -> None:
    events = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"signature_delta","signature":"tgt-abc"}}\n\n')
    harness.upstreams["target"].reply = replies(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(events), events))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    [(head, body)] = responses(bytes(client.received))
    assert b'"signature":"cmm1.tgt-abc"' in body and b"Content-Length: %d\r\n" % len(body) in head


def test_an_intercepted_request_is_let_go_once_the_answer_is_not_a_429(harness: Harness) -> None:
    """Kept for a retry while a 429 may come; once a stream starts it may last minutes, and the
    request it answers is not held meanwhile."""
    harness.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    exchange = client.server.exchange
    assert exchange is not None and exchange.kept is None and exchange.response.status == 200
    server = harness.upstreams["target"].servers[0]
    server.transport.write(encode_chunk(b"event: ping\ndata: {}\n\n") + LAST_CHUNK)
    harness.flush()
    assert b"event: ping" in bytes(client.received) and harness.records[-1].status == 200


@pytest.mark.parametrize(("body", "upstream"), [(HAIKU, "target"), (OPUS, "anthropic")])
def test_a_streaming_answer_holds_none_of_the_request_bytes(harness: Harness, body: bytes, upstream: str) -> None:
    """The bytes first sent upstream (head and body so far) could be sent again only before any
    answer: once one streams to the client, for minutes, they are let go, on both routes."""
    harness.upstreams[upstream].reply = lambda server, exchange: (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    client, _ = harness.client()
    harness.send(client, post(body))
    exchange = client.server.exchange
    assert exchange is not None and exchange.response_started
    assert exchange.first == b"" and exchange.kept is None
    server = harness.upstreams[upstream].servers[0]
    server.transport.write(encode_chunk(b"event: ping\ndata: {}\n\n") + LAST_CHUNK)
    harness.flush()
    assert b"event: ping" in bytes(client.received) and harness.records[-1].status == 200


def test_a_429_keeps_the_request_for_its_retry(harness: Harness) -> None:
    limited = plain(b"429 Too Many Requests", b"quota exceeded, reset after 2s")
    harness.upstreams["target"].reply = replies(limited, OK_JSON)
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    exchange = client.server.exchange
    assert exchange is not None and b"".join(exchange.kept or ()) == harness.upstreams["target"].exchanges[0].raw
