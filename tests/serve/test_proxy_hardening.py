"""The serving protocol against slow, stuck and hostile peers (in-memory TLS, fake clock): strict
framing both ways, head deadlines, the connection cap, TLS closes that end, replays only when
nothing came back, and target responses too large to hold."""

from __future__ import annotations

import json

import pytest
from twisted.logger import capturedLogs, formatEvent

from cmm.core.exchange import Splice
from cmm.core.framing import LAST_CHUNK, encode_chunk
from cmm.core.thinking_marks import MAX_SSE_EVENT
from cmm.serve.proxy import FD_RESERVE, fit_open_files
from cmm.serve.tls import CLOSE_TIMEOUT
from memory_harness import TARGET_URL, Harness, make_pki, ok_reply, responses, settings

PKI = make_pki()
HAIKU = b'{"model":"claude-haiku-4-5-20251001","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
OPUS = b'{"model":"claude-opus-4-6","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
CHUNKED_HEAD = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
# The start of a TLS ClientHello, as a client that wraps TLS in TLS sends it: 125 bytes, no line end.
CLIENT_HELLO = bytes.fromhex("160301007801000074030300") + bytes(range(14, 127))


def post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra, len(body), body)


@pytest.fixture
def harness() -> Harness:
    return Harness(PKI, settings())


def status_of(client) -> int:
    [(head, _)] = responses(bytes(client.received))
    return int(head.split(b" ")[1])


def error_message(client) -> str:
    [(_, body)] = responses(bytes(client.received))
    document = json.loads(body)
    assert document["type"] == "error"
    return document["error"]["message"]


# -- strict framing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extension", [b";a\x00b", b";a\rb", b";a=\"x\x01\"", b"; a=b c"])
@pytest.mark.parametrize("first", [b"", encode_chunk(OPUS[:30])], ids=["first-chunk", "later-chunk"])
def test_a_chunk_extension_outside_the_grammar_never_reaches_anthropic(harness: Harness, extension: bytes,
                                                                       first: bytes) -> None:
    rest = OPUS[30:] if first else OPUS
    client, _ = harness.client()
    harness.send(client, CHUNKED_HEAD + first + b"%x%s\r\n%s\r\n" % (len(rest), extension, rest) + LAST_CHUNK)
    assert status_of(client) == 400 and "malformed chunk extension" in error_message(client)
    assert client.lost
    for server in harness.upstreams["anthropic"].servers:
        assert extension not in server.seen  # the line was never forwarded
        assert server.transport.disconnecting  # a half-sent body: the connection is not pooled
    assert harness.upstreams["anthropic"].exchanges == [] and harness.pool.idle_count() == 0


def test_a_bad_trailer_never_reaches_anthropic(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, CHUNKED_HEAD + encode_chunk(OPUS) + b"0\r\nX-T: a\rb\r\n\r\n")
    assert status_of(client) == 400 and "trailer" in error_message(client)
    assert all(b"X-T" not in server.seen for server in harness.upstreams["anthropic"].servers)
    assert harness.upstreams["anthropic"].exchanges == []


def test_valid_chunk_extensions_still_pass_byte_for_byte(harness: Harness) -> None:
    client, _ = harness.client()
    request = CHUNKED_HEAD + b"%x;name=\"va;lue\" ; x\r\n%s\r\n" % (len(OPUS), OPUS) + b"0\r\nX-T: ok\r\n\r\n"
    harness.send(client, request)
    assert status_of(client) == 200
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert exchange.raw == request


@pytest.mark.parametrize("route", ["passthrough", "intercepted"])
def test_a_response_chunk_extension_outside_the_grammar_is_502_and_never_forwarded(harness: Harness,
                                                                                    route: str) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    name = "anthropic" if route == "passthrough" else "target"
    harness.upstreams[name].reply = lambda server, exchange: None
    client, _ = harness.client()
    harness.send(client, post(OPUS if route == "passthrough" else HAIKU))
    server = harness.upstreams[name].servers[0]
    server.transport.write(answer + b"5;a\x00b\r\nhello\r\n" + LAST_CHUNK)
    harness.flush()
    assert b"\x00" not in client.received and b"hello" not in client.received
    assert client.lost and server.transport.disconnecting
    assert "malformed chunk extension" in harness.records[0].error


def test_a_response_with_a_bad_extension_before_anything_was_sent_is_502(harness: Harness) -> None:
    """An intercepted JSON message is held to be marked: nothing reached the client yet."""
    harness.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3;\x00\r\nbad\r\n0\r\n\r\n")
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    assert status_of(client) == 502 and "malformed chunk extension" in error_message(client)


def test_a_tls_client_hello_inside_tls_is_refused_at_once(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, CLIENT_HELLO)  # no clock advance: not the head deadline
    assert status_of(client) == 400 and "not an HTTP/1.1 request" in error_message(client)
    assert client.lost


def test_an_upstream_that_answers_in_tls_is_502_at_once(harness: Harness) -> None:
    harness.upstreams["target"].reply = lambda server, exchange: b"\x15\x03\x03\x00\x02\x02\x46"
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    assert status_of(client) == 502 and "malformed status line" in error_message(client)


# -- deadlines ------------------------------------------------------------------------------------------

def test_the_head_deadline_counts_from_the_first_byte_however_slowly_bytes_come(harness: Harness) -> None:
    client, _ = harness.client()
    head = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Slow: " + b"a" * 40
    harness.advance(50)  # idle before the request: the idle timeout's business (120 s)
    for index, byte in enumerate(head):
        harness.send(client, bytes([byte]))
        if index < 29:
            harness.advance(1)
    assert client.received == b""
    harness.advance(0.5)  # 29.5 s after the first byte, bytes still trickling in
    assert client.received == b""
    harness.advance(1)
    assert status_of(client) == 408 and client.lost


def test_a_keep_alive_connection_s_next_head_has_its_own_deadline(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    assert status_of(client) == 200
    client.received.clear()
    harness.advance(100)  # idle, within --idle-timeout 120
    harness.send(client, b"\r\n")  # a stray empty line neither starts the head nor extends the idle wait
    harness.advance(15)
    harness.send(client, b"POST /v1/messages HTTP/1.1\r\n")  # at 115 s: the head's first byte
    harness.advance(29)
    assert client.received == b"" and not client.lost  # past the idle timeout, within the head's
    harness.advance(1.5)
    assert status_of(client) == 408


def head_for(body: bytes, path: bytes = b"/v1/messages") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n" % (path, len(body))


@pytest.mark.parametrize("path", [b"/v1/messages", b"/v1/messages/count_tokens"])
def test_a_body_trickling_in_before_its_model_is_cut_after_the_head_timeout(harness: Harness, path: bytes) -> None:
    """A byte every 119 s never meets the silence timeout: the read that routes has a total one."""
    client, _ = harness.client()
    harness.send(client, head_for(OPUS, path))
    for index in range(20):  # '{"model":"claude-opu': the value is not complete yet
        harness.send(client, OPUS[index : index + 1])
        harness.advance(1.45)
    assert client.received == b"" and not client.lost
    harness.advance(1.5)  # 30.5 s after the body's start
    assert status_of(client) == 408 and client.lost
    assert "request body up to its model" in error_message(client)
    assert harness.upstreams["anthropic"].servers == []  # nothing was sent anywhere
    [record] = harness.records
    assert record.status == 408 and record.model is None


def test_the_routing_deadline_is_the_head_timeout_even_with_a_long_silence_timeout() -> None:
    harness = Harness(PKI, settings(head_timeout=5, idle_timeout=1000))
    client, _ = harness.client()
    harness.send(client, head_for(OPUS) + OPUS[:3])
    harness.advance(4)
    harness.send(client, OPUS[3:5])
    assert not client.lost
    harness.advance(1.5)
    assert status_of(client) == 408 and client.lost


def test_a_slow_body_after_its_model_only_has_to_keep_moving(harness: Harness) -> None:
    body = OPUS[:-1] + b' ' * 20 + b'}'
    client, _ = harness.client()
    harness.send(client, head_for(body) + body[:40])  # the model is known: routed, spliced from now on
    for index in range(40, len(body)):  # ~50 bytes, one every 100 s: far past the head timeout in all
        harness.advance(100)
        assert not client.lost
        harness.send(client, body[index : index + 1])
    assert status_of(client) == 200
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert exchange.raw.endswith(body)


def test_a_routed_body_that_stops_moving_is_cut_after_the_silence_timeout(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, head_for(OPUS) + OPUS[:40])
    harness.advance(119)
    assert not client.lost
    harness.advance(1.5)
    assert status_of(client) == 408 and client.lost


def test_a_whole_body_sent_at_once_leaves_no_routing_timer_behind(harness: Harness) -> None:
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    assert status_of(client) == 200
    assert client.server.request is None  # the finished request's record is dropped, timer and all
    assert all(call.func != client.server._routing_timed_out for call in harness.clock.getDelayedCalls())
    harness.advance(31)
    assert not client.lost  # idle keep-alive, well within its 120 s


def test_empty_lines_do_not_keep_an_idle_connection_open(harness: Harness) -> None:
    client, _ = harness.client()
    for _ in range(5):
        harness.advance(30)
        harness.send(client, b"\r\n")
    harness.advance(1)
    assert client.lost and client.received == b""  # 120 s after it became idle, without a word


def test_a_close_the_peer_never_answers_ends_within_the_close_timeout(harness: Harness) -> None:
    client, _ = harness.client()
    client.tls.dataReceived = lambda data: None  # a peer that reads nothing more: no close_notify back
    harness.advance(120.5)  # idle timeout: cmm closes
    server_tls = client.server.transport
    assert server_tls.disconnecting and not client.lost
    harness.advance(CLOSE_TIMEOUT - 1)
    assert not client.lost
    harness.advance(1.5)
    assert client.lost


def test_a_peer_still_taking_the_last_bytes_is_not_cut(harness: Harness) -> None:
    client, _ = harness.client()
    client.tls.dataReceived = lambda data: None
    underlying = client.server.transport.transport
    underlying.dataBuffer, underlying.offset = b"x" * 3000, 0  # what cmm will have yet to send
    harness.advance(120.5)  # idle timeout: cmm closes
    for _ in range(2):  # a slow reader: a third of it goes out per period
        harness.advance(CLOSE_TIMEOUT - 1)
        underlying.offset += 1000
        harness.advance(1.5)
        assert not client.lost
    harness.advance(CLOSE_TIMEOUT + 1)  # no progress in a whole period: cut
    assert client.lost


def test_a_peer_that_stopped_reading_is_cut_although_bytes_wait_for_it(harness: Harness) -> None:
    client, _ = harness.client()
    client.tls.dataReceived = lambda data: None
    underlying = client.server.transport.transport
    underlying.dataBuffer, underlying.offset = b"x" * 3000, 0
    harness.advance(120.5)
    harness.advance(CLOSE_TIMEOUT + 0.5)
    assert client.lost


def test_unsent_bytes_of_a_real_tcp_transport() -> None:
    from twisted.internet import abstract

    from cmm.serve.tls import unsent_bytes

    transport = abstract.FileDescriptor.__new__(abstract.FileDescriptor)
    transport.dataBuffer, transport.offset, transport._tempDataLen = b"abcdef", 2, 5
    assert unsent_bytes(transport) == 9
    assert unsent_bytes(object()) == 0


# -- the connection cap -------------------------------------------------------------------------------

def test_a_new_connection_closes_the_longest_idle_one_when_the_cap_is_reached() -> None:
    harness = Harness(PKI, settings(max_connections=3))
    first, _ = harness.client()
    harness.advance(5)
    second, _ = harness.client()
    harness.advance(5)
    busy, _ = harness.client()
    harness.send(busy, b"POST /v1/messages HTTP/1.1\r\n")  # a head under way is not idle
    harness.advance(1)
    newest, _ = harness.client()
    assert first.lost and not second.lost and not busy.lost and not newest.lost
    harness.send(newest, post(OPUS))
    assert status_of(newest) == 200


def test_when_every_connection_is_busy_a_new_one_is_refused_and_the_others_go_on() -> None:
    harness = Harness(PKI, settings(max_connections=2))
    harness.upstreams["anthropic"].reply = lambda server, exchange: None  # requests stay in flight
    busy = [harness.client()[0] for _ in range(2)]
    for client in busy:
        harness.send(client, post(OPUS))
    refused, _ = harness.client()
    assert refused.lost and refused.received == b""
    context = harness.factory.wrappedFactory.context
    assert context.refused == 1 and len(context.connections) == 2
    for server in harness.upstreams["anthropic"].servers:
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    harness.flush()
    assert all(bytes(client.received).endswith(b"\r\n\r\nok") and not client.lost for client in busy)
    again, _ = harness.client()  # room again: the two are idle now
    harness.send(again, post(OPUS))
    assert not again.lost


class FakeLimits:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        assert which == self.RLIMIT_NOFILE and limits[1] == self.limits[1] and limits[0] <= limits[1] or limits[1] == -1
        self.limits = limits


def test_the_open_file_limit_is_raised_to_fit_the_cap() -> None:
    limits = FakeLimits(1024, 524288)
    assert fit_open_files(1024, limits) == 1024
    assert limits.limits == (2 * 1024 + FD_RESERVE, 524288)
    unlimited = FakeLimits(1024, -1)
    assert fit_open_files(1024, unlimited) == 1024 and unlimited.limits[0] == 2 * 1024 + FD_RESERVE
    roomy = FakeLimits(100000, 100000)
    assert fit_open_files(1024, roomy) == 1024 and roomy.limits == (100000, 100000)  # never lowered


def test_a_hard_limit_too_low_for_the_cap_lowers_the_cap() -> None:
    limits = FakeLimits(256, 1280)
    assert fit_open_files(1024, limits) == (1280 - FD_RESERVE) // 2 and limits.limits == (1280, 1280)
    stuck = FakeLimits(1024, 524288, refuse=True)
    assert fit_open_files(1024, stuck) == (1024 - FD_RESERVE) // 2


# -- replays and retries ----------------------------------------------------------------------------

def _second_request_meets(harness: Harness, answer: bytes) -> object:
    """A first request leaves its connection in the pool; the second finds it answering
    ``answer`` (perhaps nothing) and closing."""
    client, _ = harness.client()
    harness.send(client, post(OPUS))
    client.received.clear()
    server = harness.upstreams["anthropic"].servers[0]

    def die(data: bytes) -> None:
        server.transport.write(answer)
        server.transport.loseConnection()
    server.dataReceived = die
    harness.upstreams["anthropic"].reply = ok_reply(b'{"second":true}')
    harness.send(client, post(OPUS))
    return client


def test_a_pooled_connection_closed_before_any_byte_is_replayed_on_a_fresh_one(harness: Harness) -> None:
    client = _second_request_meets(harness, b"")
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"second":true}'
    assert harness.pool.opened == 2


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-", b"H", b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_a_pooled_connection_that_sent_part_of_an_answer_is_not_replayed(harness: Harness, answer: bytes) -> None:
    client = _second_request_meets(harness, answer)
    assert bytes(client.received).count(b"HTTP/1.1 502 ") == 1
    assert harness.pool.opened == 1 and len(harness.upstreams["anthropic"].exchanges) == 1
    assert harness.records[-1].status == 502


def test_a_429_retry_on_a_stale_pooled_connection_is_still_replayed(harness: Harness) -> None:
    """What the first try read (the 429) must not count against the retry: its connection came
    from the pool, closed before answering, and the request goes once more on a fresh one."""
    limited = b"HTTP/1.1 429 Slow\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nreset after 1s"

    def reply(server, exchange) -> bytes:
        if len(harness.upstreams["target"].exchanges) > 1:
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
        server.dataReceived = lambda data: server.transport.loseConnection()  # stale by the retry
        return limited
    harness.upstreams["target"].reply = reply
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    harness.advance(1)
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"ok":true}' and not client.lost
    assert harness.pool.opened == 2 and len(harness.upstreams["target"].exchanges) == 2


# -- target responses too large to hold -------------------------------------------------------------

@pytest.mark.parametrize("status, kind", [(b"500 Oops", b"text/plain"), (b"429 Slow", b"text/plain"),
                                          (b"200 OK", b"application/json")])
def test_a_target_response_declaring_a_huge_length_is_passed_on_not_held(harness: Harness, status: bytes,
                                                                         kind: bytes) -> None:
    harness.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: 10000000000\r\n\r\nthe first bytes" % (status, kind))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status) and b"Content-Length: 10000000000" in head
    assert b"x-cmm-provider: cliproxyapi" in head and body == b"the first bytes"
    assert len(harness.upstreams["target"].exchanges) == 1  # a 429 this large is not retried either
    exchange = client.server.exchange
    assert isinstance(exchange.mode, Splice)  # neither held as an error nor as a message


def test_a_target_error_just_within_the_bound_is_still_rewritten(harness: Harness) -> None:
    text = b"x" * (64 * 1024)
    harness.upstreams["target"].reply = lambda server, exchange: (
        b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
    client, _ = harness.client()
    harness.send(client, post(HAIKU))
    assert status_of(client) == 500 and "answered 500" in error_message(client)


# -- logs that cannot be forged -------------------------------------------------------------------------

def test_a_content_encoding_with_obs_text_is_logged_escaped(harness: Harness) -> None:
    client, _ = harness.client()
    with capturedLogs() as events:
        harness.send(client, post(OPUS, b"Content-Encoding: x\x85\x9b31m\r\n"))
    [text] = [formatEvent(event) for event in events if "body to find its model" in formatEvent(event)]
    assert text == "Cannot read a x\\x85\\x9b31m body to find its model; passing it through"
    assert harness.upstreams["anthropic"].exchanges  # passed through as it came


def test_a_streamed_event_too_large_to_mark_is_passed_and_warned_about_once(harness: Harness) -> None:
    event = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":' \
            b'{"type":"signature_delta","signature":"tgt-' + b"A" * MAX_SSE_EVENT + b'"}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    # Two events that grow past the bound before their blank line arrives.
    pieces = [event[:600_000], event[600_000:], b"\n\n" + event, b"\n\n"]
    harness.upstreams["target"].reply = lambda server, exchange: None
    client, _ = harness.client()
    with capturedLogs() as events:
        harness.send(client, post(HAIKU))
        server = harness.upstreams["target"].servers[0]
        server.transport.write(head)
        for piece in pieces:
            server.transport.write(encode_chunk(piece))
            harness.flush()
        server.transport.write(LAST_CHUNK)
        harness.flush()
    warnings = [formatEvent(event) for event in events if "not marked" in formatEvent(event)]
    assert warnings == [f"{TARGET_URL} streamed an event larger than 1 MiB: it went to the client as it came, "
                        "so the thinking signatures in it were not marked as the target's (cmm holds at most "
                        "1 MiB of one event to mark it)"]
    received = bytes(client.received)
    assert received.count(b'"signature":"tgt-AAAA') == 2 and b"cmm1." not in received
    assert harness.records[0].status == 200 and harness.records[0].error is None
