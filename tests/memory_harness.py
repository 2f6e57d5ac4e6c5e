"""In-memory plumbing for proxy tests: a TLS client, cmm's serving protocol and scripted upstreams,
all joined by ``twisted.test.iosim`` pumps and driven by a fake clock. No sockets, no reactor."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from cmm.machine import certs
from cmm.core.framing import tracker_for
from cmm.core.http_head import HeadCollector, parse_request_head
from cmm.core.values import ProxySettings
from cmm.serve.proxy import ProxyContext, ProxyFactory
from cmm.core.router import Mapping, Router, Upstream
from cmm.serve.tls import server_factory, server_options
from cmm.core.values import Destination
from cmm.serve.upstream import Pool, UpstreamConnection

NOW = datetime(2026, 11, 24, tzinfo=timezone.utc)
TARGET_URL = "http://127.0.0.1:8317/v1/messages"


@attrs.define
class Pki:
    ca: certs.KeyPair
    server: certs.KeyPair


def make_pki() -> Pki:
    ca = certs.make_ca(NOW)
    return Pki(ca, certs.make_server_certificate(ca, NOW))


class Recorder(Protocol):
    """The test's client: collects everything cmm sends back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = False
        self.alpn: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.alpn is None:
            self.alpn = getattr(self.transport, "negotiatedProtocol", None)

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


@attrs.define
class Exchange:
    """A whole request as one scripted upstream saw it."""

    head: bytes
    body: bytes  # payload, de-chunked
    raw: bytes  # the exact bytes received for this request


Reply = Callable[["FakeServer", Exchange], bytes | None]


def ok_reply(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Reply:
    def reply(server: FakeServer, exchange: Exchange) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
            extra, len(body), body)
    return reply


class FakeServer(Protocol):
    """A scripted upstream: parses requests with cmm's own framing code and answers per ``reply``."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.seen = bytearray()  # every byte that reached this connection, framed or not
        self._reset()

    def _reset(self) -> None:
        self.collector = HeadCollector()
        self.head = None
        self.tracker = None
        self.raw = bytearray()
        self.body = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.seen += data
        while data:
            if self.head is None:
                done = self.collector.feed(data)
                if done is None:
                    self.raw += data
                    return
                head_raw, data = done
                self.raw = bytearray(head_raw)
                self.head = parse_request_head(head_raw)
                self.tracker = tracker_for(self.head.framing)
            progress = self.tracker.feed(data)
            self.raw += data[: progress.consumed]
            self.body += b"".join(progress.payload)
            data = data[progress.consumed:]
            if not progress.done:
                return
            exchange = Exchange(self.head.raw, bytes(self.body), bytes(self.raw))
            self.upstream.exchanges.append(exchange)
            self._reset()
            answer = self.upstream.reply(self, exchange)
            if answer is not None:
                self.transport.write(answer)


@attrs.define
class FakeUpstream:
    reply: Reply = attrs.field(factory=ok_reply)
    exchanges: list[Exchange] = attrs.field(factory=list)
    servers: list[FakeServer] = attrs.field(factory=list)
    refuse: Exception | None = None
    hang: bool = False  # never complete the connection
    held: list = attrs.field(factory=list)  # connections completed only by Harness.complete_connects
    hold: bool = False


@attrs.define
class Harness:
    """One cmm serving unit wired to scripted upstreams for Anthropic and the target."""

    pki: Pki
    settings: ProxySettings
    clock: Clock = attrs.field(factory=Clock)
    upstreams: dict[str, FakeUpstream] = attrs.field(factory=lambda: {"anthropic": FakeUpstream(), "target": FakeUpstream()})
    pumps: list[iosim.IOPump] = attrs.field(factory=list)
    records: list = attrs.field(factory=list)
    pool: Pool | None = None
    factory: Factory | None = None
    context: ProxyContext | None = None

    def __attrs_post_init__(self) -> None:
        self.pool = Pool(self._connect, self.clock)
        self.context = ProxyContext(self.settings, self.pool, self.clock, self.records.append, wall_clock=lambda: 0.0)
        self.factory = server_factory(server_options(self.pki.server.cert_pem, self.pki.server.key_pem),
                                      ProxyFactory(self.context), clock=self.clock)

    def _connect(self, destination: Destination) -> defer.Deferred[UpstreamConnection]:
        upstream = self.upstreams["anthropic" if destination.anthropic else "target"]
        if upstream.refuse is not None:
            return defer.fail(upstream.refuse)
        if upstream.hang:
            return defer.Deferred()
        if upstream.hold:
            waiting: defer.Deferred[UpstreamConnection] = defer.Deferred()
            upstream.held.append((destination, waiting))
            return waiting
        return defer.succeed(self._open(upstream, destination))

    def _open(self, upstream: FakeUpstream, destination: Destination) -> UpstreamConnection:
        server = FakeServer(upstream)
        upstream.servers.append(server)
        connection = UpstreamConnection(destination)
        self.pumps.append(iosim.connect(server, iosim.FakeTransport(server, True), connection,
                                        iosim.FakeTransport(connection, False), greet=False))
        return connection

    def complete_connects(self, name: str) -> None:
        upstream = self.upstreams[name]
        upstream.hold = False
        held, upstream.held = upstream.held, []
        for destination, waiting in held:
            waiting.callback(self._open(upstream, destination))
        self.flush()

    def client(self, protocols: list[bytes] | None = None) -> tuple[Recorder, iosim.FakeTransport]:
        recorder = Recorder()
        options = optionsForClientTLS("api.anthropic.com", trustRoot=Certificate.loadPEM(self.pki.ca.cert_pem),
                                      acceptableProtocols=protocols or [b"http/1.1"])
        client_tls = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: recorder),
                                        clock=self.clock).buildProtocol(None)
        server_tls = self.factory.buildProtocol(None)
        client_transport = iosim.FakeTransport(client_tls, False)
        self.pumps.append(iosim.connect(server_tls, iosim.FakeTransport(server_tls, True), client_tls,
                                        client_transport, greet=False))
        self.flush()
        recorder.tls = client_tls
        recorder.server = server_tls.wrappedProtocol  # cmm's ClientConnection for this client
        return recorder, client_transport

    def send(self, recorder: Recorder, data: bytes) -> None:
        recorder.tls.write(data)
        self.flush()

    def flush(self) -> None:
        for _ in range(1000):
            self.clock.advance(0)  # TLS transports batch small writes until the next iteration
            if not any([pump.pump(advanceClock=False) for pump in list(self.pumps)]) and not any(
                    call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls()):
                return
        raise AssertionError("pumps never went quiet")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()


def settings(**changes: object) -> ProxySettings:
    mapping = Mapping("claude-haiku-4-5", "gemini-2.5-flash", Upstream.from_url(TARGET_URL, "sk-proxy"))
    return attrs.evolve(ProxySettings(router=Router((mapping,))), **changes)


def responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a byte stream of Content-Length responses into (head, body) pairs."""
    out = []
    while data:
        end = data.index(b"\r\n\r\n") + 4
        head = data[:end]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        out.append((head, data[end : end + length]))
        data = data[end + length :]
    return out
