"""Connections to the two kinds of upstream, and a keep-alive pool of them.

Claude Code opens a new TLS connection for most requests; cmm keeps its own connections to
Anthropic and to the target alive between requests so that a request costs no TCP or TLS set-up
upstream. A connection is lent to one exchange at a time.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Protocol as TypingProtocol, Union

import attrs
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, tcp as twisted_tcp
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IProtocol, IReactorTime, \
    IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet._sslverify import IOpenSSLTrustRoot  # optionsForClientTLS's own annotation; not re-exported
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.python.failure import Failure

from cmm.core.values import ANTHROPIC_HOST, Destination
from cmm.serve.tls import DirectTLSEndpoint, connected

# What optionsForClientTLS verifies a server's certificate against.
TrustRoot = Union[IOpenSSLTrustRoot, Certificate]


# Read and buffer up to this much per connection before pausing the other side (Twisted's
# default is 64 KiB): a 2 MB body then moves in fewer reads, pauses and resumes, for about 15%
# less CPU (bench/run.py section 3); an SSE stream never comes near it.
SPLICE_BUFFER = 256 * 1024


# Writes up to this size are tried on the socket at once (see ``eager_writes``): heads, SSE events,
# small requests and answers. A large body comes as a run of TLS records (16 KiB each) in one
# reactor turn; buffered, as before, they leave together in fewer, larger sends.
EAGER_WRITE_MAX = 8 * 1024


def tune(transport: object) -> None:
    """Socket settings for one side of a splice (TLS wrappers are seen through to TCP).

    Nagle's algorithm goes: a splice writes each SSE event or body piece the moment it
    arrives, and Nagle would hold a small write back until the peer's delayed ACK (~40 ms),
    batching events and stalling uploads. Reads and the write buffer grow to SPLICE_BUFFER,
    and small writes leave at once (``eager_writes``).
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)
    tcp = getattr(transport, "transport", transport)  # under TLS, the TCP transport
    if hasattr(tcp, "bufferSize"):
        tcp.bufferSize = SPLICE_BUFFER
    if isinstance(tcp, twisted_tcp.Connection):
        eager_writes(tcp)


def eager_writes(tcp: twisted_tcp.Connection) -> None:
    """Make ``tcp.write`` send at once when nothing is waiting in its buffer.

    Twisted buffers every write and sends it when the reactor next finds the socket writable:
    two epoll_ctl calls and a reactor turn per write, which a small request pays four times (the
    request up, the answer down, on each side) and an SSE event waits for. A write that finds
    the buffer empty is sent now, and only what the socket does not take is buffered, so the
    bytes keep their order and backpressure (the buffer, its producer) works as before. A
    failed send buffers the bytes too: Twisted's own write then meets the error and reports the
    connection lost, as it would have.
    """
    buffered_write = tcp.write
    send = tcp.writeSomeData

    def write(data: bytes) -> None:
        if (isinstance(data, bytes) and 0 < len(data) <= EAGER_WRITE_MAX and not tcp._tempDataLen
                and tcp.offset == len(tcp.dataBuffer) and tcp.connected and not tcp.disconnecting
                and not tcp._writeDisconnected):
            sent = send(data)
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
        buffered_write(data)

    tcp.write = write  # type: ignore[method-assign]  # this connection's own write, see above


class UpstreamHandler(TypingProtocol):
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, reason: Failure) -> None: ...


class UpstreamConnection(Protocol):
    """One upstream connection; forwards its events to the exchange that borrowed it."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.handler: UpstreamHandler | None = None
        self.connected_now = False
        self.on_lost: Callable[[UpstreamConnection], None] | None = None

    def connectionMade(self) -> None:
        tune(self.transport)
        self.connected_now = True

    def dataReceived(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.upstream_data(data)
        else:  # an idle connection must stay silent; anything else means it is out of step
            connected(self).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_now = False
        if self.on_lost is not None:
            self.on_lost(self)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.upstream_lost(reason)


class _ConnectionFactory(Factory):
    """Builds one UpstreamConnection; quiet, since a busy cmm opens many."""

    noisy = False

    def __init__(self, destination: Destination) -> None:
        self.destination = destination

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return UpstreamConnection(self.destination)


def _open(endpoint: IStreamClientEndpoint, destination: Destination) -> defer.Deferred[UpstreamConnection]:
    return endpoint.connect(_ConnectionFactory(destination)).addCallback(_built)


def _built(protocol: IProtocol) -> UpstreamConnection:
    """What a connecting endpoint fires with: the protocol _ConnectionFactory built."""
    assert isinstance(protocol, UpstreamConnection)
    return protocol


Connect = Callable[[Destination], "defer.Deferred[UpstreamConnection]"]


# Idle connections kept per destination. A worker serves as many requests at once as its clients
# send: with fewer kept than that, every burst closes connections only to open new ones (a TCP
# and, to Anthropic, a TLS handshake each); at 64 connections over 2 workers, 16 kept cost a
# third of cmm's throughput. Each idle one costs some 30 KB until ``idle_timeout``.
MAX_IDLE = 128


class Pool:
    """Idle keep-alive connections per destination, closed after ``idle_timeout`` seconds.

    The idle timeout is kept shorter than the servers' own so that a connection is seldom
    closed by the server just as cmm sends on it; the exchange retries once when that happens
    and the whole request is still in hand. The most recently released connection is lent
    first. One delayed call for the whole pool closes what has been idle too long: lending and
    releasing, once a request each, touch no timer.
    """

    def __init__(self, connect: Connect, clock: IReactorTime, idle_timeout: float = 20.0,
                 max_idle: int = MAX_IDLE) -> None:
        self._connect = connect
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        # Per destination, oldest first: each connection with the time it went idle.
        self._idle: dict[Destination, list[tuple[UpstreamConnection, float]]] = defaultdict(list)
        self._sweep: IDelayedCall | None = None
        self.opened = 0

    def acquire(self, destination: Destination, fresh: bool = False) -> defer.Deferred[tuple[UpstreamConnection, bool]]:
        """A connection and whether it was reused."""
        idle = self._idle.get(destination)
        while idle and not fresh:
            connection, _ = idle.pop()
            if connection.connected_now:
                connection.on_lost = None
                return defer.succeed((connection, True))
        self.opened += 1
        return self._connect(destination).addCallback(lambda connection: (connection, False))

    def release(self, connection: UpstreamConnection) -> None:
        idle = self._idle[connection.destination]
        if not connection.connected_now or len(idle) >= self._max_idle:
            connected(connection).loseConnection()
            return
        connection.handler = None
        idle.append((connection, self._clock.seconds()))
        connection.on_lost = self._forget
        if self._sweep is None:
            self._sweep = self._clock.callLater(self._idle_timeout, self._close_expired)

    def _close_expired(self) -> None:
        """Close every connection idle for ``idle_timeout``; come back when the next one will be."""
        self._sweep = None
        now = self._clock.seconds()
        next_due: float | None = None
        for idle in self._idle.values():
            expired = 0
            while expired < len(idle) and idle[expired][1] + self._idle_timeout <= now:
                expired += 1
            gone, idle[:expired] = idle[:expired], []
            for connection, _ in gone:
                connection.on_lost = None
                connected(connection).loseConnection()
            if idle:
                due = idle[0][1] + self._idle_timeout
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep = self._clock.callLater(max(0.0, next_due - now), self._close_expired)

    def _forget(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.destination, [])
        for index, (candidate, _) in enumerate(idle):
            if candidate is connection:
                del idle[index]
                return

    def close_idle(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for idle in list(self._idle.values()):
            for connection, _ in list(idle):
                connection.on_lost = None
                connected(connection).loseConnection()
        self._idle.clear()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())


def system_trust(environ: Mapping[str, str] = os.environ) -> IOpenSSLTrustRoot:
    """The platform trust store, honouring SSL_CERT_FILE and SSL_CERT_DIR.

    A bundle named by SSL_CERT_FILE is read now rather than by OpenSSL at the first handshake:
    a worker drops its privileges after start-up and might no longer be allowed to read it.
    """
    # Twisted's two trust-root factories are unannotated: IOpenSSLTrustRoot(...) checks what they give.
    bundle = environ.get("SSL_CERT_FILE")
    if bundle:
        try:
            with warnings.catch_warnings():  # old roots with odd serials are the bundle owner's call
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                found = x509.load_pem_x509_certificates(Path(bundle).read_bytes())
        except (OSError, ValueError):
            return IOpenSSLTrustRoot(platformTrust())  # let OpenSSL report it at the handshake, as it would anyway
        return IOpenSSLTrustRoot(trustRootFromCertificates(
            [Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM)) for cert in found]))
    return IOpenSSLTrustRoot(platformTrust())


@attrs.define
class Connector:
    """Opens connections: Anthropic by its real addresses with TLS for its name, targets by URL.

    ``anthropic_addresses`` returns the current addresses (a Deferred: DNS may still be
    answering); each is tried in turn until one connects, and the one that worked goes first
    next time.
    """

    reactor: object
    anthropic_addresses: Callable[[], defer.Deferred[list[str]]]
    anthropic_tls: IOpenSSLClientConnectionCreator
    target_trust: TrustRoot = attrs.field(factory=system_trust)
    connect_timeout: float = 10.0
    # A target named ``localhost`` often resolves to ::1 first while it listens on 127.0.0.1 only:
    # Twisted waits its 0.3 s happy-eyeballs delay before the next address even when the first was
    # refused at once, so the first request to such a target paid 300 ms. A short delay still
    # races a slow address against the next one.
    attempt_delay: float = 0.05
    _preferred: str | None = None
    _target_options: dict[str, IOpenSSLClientConnectionCreator] = attrs.field(factory=dict)

    def connect(self, destination: Destination) -> defer.Deferred[UpstreamConnection]:
        if destination.anthropic:
            return defer.ensureDeferred(self._connect_anthropic(destination))
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, destination.host, destination.port, timeout=self.connect_timeout,
            attemptDelay=self.attempt_delay)
        if destination.scheme == "https":
            endpoint = DirectTLSEndpoint(self._target_tls(destination.host), endpoint)
        return _open(endpoint, destination)

    def _target_tls(self, host: str) -> IOpenSSLClientConnectionCreator:
        """One set of options per target host: each set makes its own OpenSSL context and loads
        the trust store into it (the whole SSL_CERT_FILE bundle, with one), too much for every
        connection."""
        options = self._target_options.get(host)
        if options is None:
            options = self._target_options[host] = optionsForClientTLS(
                host, trustRoot=self.target_trust, acceptableProtocols=[b"http/1.1"])
        return options

    async def _connect_anthropic(self, destination: Destination) -> UpstreamConnection:
        addresses = list(await self.anthropic_addresses())
        if not addresses:
            raise ConnectionError(f"no address known for {ANTHROPIC_HOST}")
        if self._preferred in addresses:
            addresses.remove(self._preferred)
            addresses.insert(0, self._preferred)
        failure: Exception | None = None
        for address in addresses:
            kind = TCP6ClientEndpoint if ipaddress.ip_address(address).version == 6 else TCP4ClientEndpoint
            endpoint = DirectTLSEndpoint(
                self.anthropic_tls, kind(self.reactor, address, destination.port, timeout=self.connect_timeout)
            )
            try:
                connection = await _open(endpoint, destination)
            except Exception as error:  # try the next address
                failure = error
                continue
            self._preferred = address
            return connection
        assert failure is not None
        raise failure


def anthropic_tls_options(trust_root: TrustRoot | None = None) -> IOpenSSLClientConnectionCreator:
    """TLS to the real API: its name for SNI and verification, HTTP/1.1 only."""
    return optionsForClientTLS(
        ANTHROPIC_HOST, trustRoot=trust_root if trust_root is not None else system_trust(),
        acceptableProtocols=[b"http/1.1"],
    )
