"""Writes that leave at once: a small write to an empty buffer is sent without waiting for the
reactor, bytes keep their order behind buffered ones, and what one upstream read sends the client
goes in one write."""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.protocol import Protocol

from cmm.serve.upstream import EAGER_WRITE_MAX, eager_writes
from memory_harness import Harness, make_pki, settings as proxy_settings

PKI = make_pki()


class WriterLog:
    """Just enough reactor for a tcp.Connection: records which descriptors wait to write."""

    def __init__(self) -> None:
        self.writers: list[object] = []

    def addWriter(self, selectable: object) -> None:
        if selectable not in self.writers:
            self.writers.append(selectable)

    def removeWriter(self, selectable: object) -> None:
        if selectable in self.writers:
            self.writers.remove(selectable)

    def addReader(self, selectable: object) -> None:
        pass

    def removeReader(self, selectable: object) -> None:
        pass


def connection(send_buffer: int | None = None) -> tuple[tcp.Connection, socket.socket, WriterLog]:
    ours, peer = socket.socketpair()
    if send_buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    ours.setblocking(False)
    reactor = WriterLog()
    transport = tcp.Connection(ours, Protocol(), reactor)  # type: ignore[arg-type]  # enough of one
    transport.connected = True
    eager_writes(transport)
    return transport, peer, reactor


def read_all(peer: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        piece = peer.recv(size - len(got))
        assert piece, "peer closed early"
        got += piece
    return bytes(got)


def test_a_small_write_leaves_without_waiting_for_the_reactor() -> None:
    transport, peer, reactor = connection()
    transport.write(b"event: ping\n\n")
    assert peer.recv(100) == b"event: ping\n\n"
    assert reactor.writers == []  # nothing buffered, nothing to wait for


def test_a_write_behind_buffered_bytes_waits_its_turn() -> None:
    transport, peer, reactor = connection()
    large = bytes(range(256)) * (EAGER_WRITE_MAX // 256 + 1)  # beyond the eager size: buffered
    transport.write(large)
    transport.write(b"after")
    assert reactor.writers == [transport]
    peer.setblocking(False)
    try:
        assert peer.recv(10) == b""
    except BlockingIOError:
        pass  # nothing came yet: right
    peer.setblocking(True)
    while reactor.writers:
        transport.doWrite()
    assert read_all(peer, len(large) + 5) == large + b"after"


def test_what_a_full_socket_does_not_take_is_buffered_in_order() -> None:
    transport, peer, reactor = connection(send_buffer=4096)
    pieces = [bytes([n]) * EAGER_WRITE_MAX for n in range(1, 41)]  # each eager, together beyond the socket's room
    for piece in pieces:
        transport.write(piece)
    assert reactor.writers == [transport]  # the socket took part: the rest waits for the reactor
    peer.settimeout(5)
    got = bytearray()
    while reactor.writers or len(got) < 40 * EAGER_WRITE_MAX:
        got += peer.recv(65536)
        if reactor.writers:
            transport.doWrite()
    assert bytes(got) == b"".join(pieces)


def test_a_failed_send_is_left_to_twisted_to_report() -> None:
    transport, peer, reactor = connection()
    peer.close()
    transport.write(b"nobody reads this")
    assert reactor.writers == [transport]  # buffered: the reactor's write turn meets the error
    assert transport.doWrite() is main.CONNECTION_LOST


def test_non_bytes_are_refused_as_twisted_refuses_them() -> None:
    transport, _, _ = connection()
    for wrong in ("text", bytearray(b"x")):
        try:
            transport.write(wrong)  # type: ignore[arg-type]  # the point of the test
        except TypeError:
            continue
        raise AssertionError(f"{type(wrong).__name__} was accepted")


def written_to_client(response: bytes, body: bytes) -> list[bytes]:
    """What cmm's serving protocol wrote to the client's TLS connection for one passthrough answer
    that came from the upstream in one read."""
    harness = Harness(PKI, proxy_settings())
    servers: list[Any] = []
    harness.upstreams["anthropic"].reply = lambda server, exchange: servers.append(server)
    client, _ = harness.client()
    writes: list[bytes] = []
    tls = client.server.transport
    original = tls.write

    def write(data: bytes) -> None:
        writes.append(data)
        original(data)
    tls.write = write
    harness.send(client, b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    [server] = servers
    server.transport.write(response)
    harness.flush()
    assert bytes(client.received) == response  # byte for byte, as ever
    return writes


def test_an_answer_read_at_once_goes_to_the_client_in_one_write() -> None:
    body = json.dumps({"model": "claude-opus-4-6", "max_tokens": 5, "messages": []}).encode()
    message = b'{"type":"message","content":[]}'
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(message), message)
    assert written_to_client(response, body) == [response]
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + response  # an interim head goes with it
    assert written_to_client(interim, body) == [interim]
