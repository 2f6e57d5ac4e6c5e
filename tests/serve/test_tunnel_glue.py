"""The tunnel glue in memory (TLS client, cmm's serving protocol, a scripted upstream, a fake clock):
closes from either side, the idle limit, draining, the gauge, and a switch cmm must refuse."""

from __future__ import annotations

from cmm.core.values import ProxySettings
from memory_harness import Exchange, FakeServer, Harness, make_pki, settings

PKI = make_pki()
IDLE = 60.0
UPGRADE = (b"GET /api/ws/speech_to_text/voice_stream HTTP/1.1\r\nHost: api.anthropic.com\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def switch(first: bytes = b""):
    def reply(server: FakeServer, exchange: Exchange) -> bytes:
        server.tunnelled = bytearray()  # type: ignore[attr-defined]
        server.dataReceived = server.tunnelled.extend  # type: ignore[method-assign]  # no more HTTP
        return SWITCH + first
    return reply


def tunnel_harness(first: bytes = b"", **changes: object) -> Harness:
    harness = Harness(PKI, settings(tunnel_idle_timeout=IDLE, **changes))
    harness.upstreams["anthropic"].reply = switch(first)
    return harness


def context(harness: Harness):
    return next(iter(harness.factory.wrappedFactory.context.connections)).context  # type: ignore[union-attr]


def open_tunnel(harness: Harness, pipelined: bytes = b""):
    client, transport = harness.client()
    harness.send(client, UPGRADE + pipelined)
    server = harness.upstreams["anthropic"].servers[-1]
    return client, transport, server


def test_the_switch_reaches_the_client_byte_for_byte_and_bytes_flow_both_ways() -> None:
    harness = tunnel_harness(first=b"\x81\x02hi")
    client, _, server = open_tunnel(harness, pipelined=b"\x81\x85early")
    assert bytes(client.received) == SWITCH + b"\x81\x02hi"  # the head as it came, the first frame with it
    assert server.seen.startswith(UPGRADE)  # the Upgrade and Connection fields went as they came
    assert bytes(server.tunnelled) == b"\x81\x85early"  # what the client sent with its request
    harness.send(client, b"client bytes")
    server.transport.write(b"upstream bytes")
    harness.flush()
    assert bytes(server.tunnelled).endswith(b"client bytes")
    assert bytes(client.received).endswith(b"upstream bytes")
    assert context(harness).gauges()["tunnels"] == 1
    assert harness.records == []  # recorded once, at the end


def test_an_upstream_close_closes_the_client_after_what_it_is_owed() -> None:
    harness = tunnel_harness()
    client, _, server = open_tunnel(harness)
    harness.send(client, b"12345")
    server.transport.write(b"last words")
    server.transport.loseConnection()
    harness.flush()
    assert bytes(client.received).endswith(b"last words") and client.lost
    [record] = harness.records
    assert (record.status, record.route, record.error) == (101, "tunnel", None)
    assert record.bytes_in == len(UPGRADE) + 5 and record.bytes_out == len(SWITCH) + len(b"last words")


def test_a_client_close_closes_the_upstream() -> None:
    harness = tunnel_harness()
    client, transport, server = open_tunnel(harness)
    harness.send(client, b"bye")
    client.tls.loseConnection()
    harness.flush()
    assert bytes(server.tunnelled) == b"bye"
    assert server.transport.disconnected or server.transport.disconnecting
    [record] = harness.records
    assert record.status == 101 and record.error is None


def test_silence_both_ways_closes_a_tunnel_at_the_idle_limit_and_any_byte_restarts_it() -> None:
    harness = tunnel_harness()
    client, _, server = open_tunnel(harness)
    harness.advance(IDLE * 0.6)
    server.transport.write(b"ping")  # upstream → client counts
    harness.flush()
    harness.advance(IDLE * 0.6)
    harness.send(client, b"pong")  # client → upstream too
    harness.advance(IDLE * 0.6)
    assert not client.lost and harness.records == []
    harness.advance(IDLE * 0.5)
    assert client.lost
    [record] = harness.records
    assert record.status == 101 and "--tunnel-idle-timeout" in (record.error or "")
    assert IDLE * 0.6 * 2 + IDLE <= record.duration <= IDLE * 0.6 * 3 + IDLE * 0.5  # the clock moves in steps
    assert context_gauge_after_close(harness) == 0


def context_gauge_after_close(harness: Harness) -> int:
    connections = harness.factory.wrappedFactory.context.connections  # type: ignore[union-attr]
    return sum(1 for c in connections if c.tunnel is not None)


def test_draining_waits_for_an_open_tunnel() -> None:
    harness = tunnel_harness()
    client, _, server = open_tunnel(harness)
    proxy_context = context(harness)
    drained = proxy_context.drain()
    fired: list[object] = []
    drained.addCallback(fired.append)
    harness.advance(5)
    assert not fired and not client.lost
    harness.send(client, b"still carried")
    assert bytes(server.tunnelled) == b"still carried"
    server.transport.loseConnection()
    harness.flush()
    assert fired == [None] and client.lost


def test_a_switch_before_the_request_body_was_sent_is_refused() -> None:
    harness = tunnel_harness()
    client, _ = harness.client()
    head = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 10\r\n\r\n")
    harness.send(client, head + b"12345")
    harness.upstreams["anthropic"].servers[-1].transport.write(SWITCH)  # before the rest of the body
    harness.flush()
    assert bytes(client.received).startswith(b"HTTP/1.1 502 ")
    assert b"before the request body was sent" in client.received
    [record] = harness.records
    assert record.status == 502 and record.route == "passthrough"  # refused: no tunnel


def test_the_idle_limit_is_the_one_the_tunnel_started_with() -> None:
    harness = tunnel_harness()
    client, _, _ = open_tunnel(harness)
    proxy_context = context(harness)
    proxy_context.settings = ProxySettings(router=proxy_context.settings.router, tunnel_idle_timeout=1.0)  # a reload
    harness.advance(2)
    assert not client.lost
    harness.advance(IDLE)
    assert client.lost
