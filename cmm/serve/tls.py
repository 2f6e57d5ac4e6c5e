"""The TLS face cmm shows Claude Code: its own certificate for api.anthropic.com, HTTP/1.1 only."""

from __future__ import annotations

from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IOpenSSLContextFactory, \
    IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

# Seconds a connection cmm closes may wait for the peer's close_notify (or its FIN) before it is
# cut: a peer that never answers would otherwise keep the socket, and its descriptor, for ever.
CLOSE_TIMEOUT = 5.0


def unsent_bytes(transport: object) -> int:
    """Bytes a TCP transport still holds for its peer (0 for a transport that does not say)."""
    buffered = getattr(transport, "dataBuffer", b"")
    offset = getattr(transport, "offset", 0)
    pending = getattr(transport, "_tempDataLen", 0)
    try:
        return max(0, len(buffered) - offset) + pending
    except TypeError:
        return 0


class ClosingTLSProtocol(TLSMemoryBIOProtocol):
    """TLS that ends a close it started within ``factory.close_timeout`` seconds.

    A TLS close sends close_notify and waits for the peer's: Twisted has no limit on that wait.
    The timer counts from ``loseConnection``, so it also covers a peer that stopped reading the
    last response; a peer still taking that response's last bytes, however slowly, gets another
    period each time the bytes cmm has yet to send went down.
    """

    _close_timer: IDelayedCall | None = None
    _unsent_at_arming: int = 0

    def loseConnection(self) -> None:
        super().loseConnection()
        if self.connected and self._close_timer is None:
            self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        self._unsent_at_arming = unsent_bytes(self.transport)
        self._close_timer = self.factory.close_timer(self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if not self.connected:
            return
        unsent = unsent_bytes(self.transport)
        if 0 < unsent < self._unsent_at_arming:
            self._arm_close_timer()  # still reading: not stuck
        else:
            self.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        super().connectionLost(reason)


class DirectTLSFactory(TLSMemoryBIOFactory):
    """TLS whose writes are encrypted and handed to TCP at once, and whose closes end.

    Twisted's default TLS transport holds writes under 64 KB until the next reactor turn and
    copies them twice to batch them. cmm writes what it reads, in pieces as large as the reads
    came, and an SSE event must leave when it arrives: the batching could only delay events and
    copy bodies.
    """

    protocol = ClosingTLSProtocol
    noisy = False

    def __init__(self, contextFactory: object, isClient: bool, wrappedFactory: IProtocolFactory,
                 clock: IReactorTime | None = None, close_timeout: float = CLOSE_TIMEOUT) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        self.close_timeout = close_timeout

    def close_timer(self, expired: Callable[[], None]) -> IDelayedCall:
        return self._clock.callLater(self.close_timeout, expired)


def server_factory(options: IOpenSSLContextFactory, wrapped: IProtocolFactory,
                   clock: IReactorTime | None = None) -> DirectTLSFactory:
    """The listening side's TLS around cmm's serving protocol."""
    return DirectTLSFactory(options, False, wrapped, clock)


@implementer(IStreamClientEndpoint)
class DirectTLSEndpoint:
    """``wrapClientTLS`` with :class:`DirectTLSFactory`: TLS to an upstream over ``endpoint``."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator, endpoint: IStreamClientEndpoint) -> None:
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self.endpoint.connect(DirectTLSFactory(self.creator, True, factory))
        return connecting.addCallback(lambda tls: tls.wrappedProtocol)


def server_options(cert_pem: bytes, key_pem: bytes) -> CertificateOptions:
    """Options for the listening side; ALPN offers only ``http/1.1`` (cmm never speaks h2).

    Built from PEM bytes rather than paths so that a process that no longer may read the key
    file (an unprivileged worker) can still be handed the material.
    """
    return CertificateOptions(
        privateKey=load_pem_private_key(key_pem, password=None),
        certificate=x509.load_pem_x509_certificate(cert_pem),
        acceptableProtocols=[b"http/1.1"],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """Hands each new connection the current options, so a reload (SIGHUP) can swap the
    certificate without rebinding; connections already open keep the one they started with."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> SSL.Context:
        return self.options.getContext()
