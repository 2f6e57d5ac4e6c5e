"""The TLS face cmm shows Claude Code: its own certificate for api.anthropic.com, HTTP/1.1 only."""

from __future__ import annotations

from typing import Callable, Union, cast

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IOpenSSLClientConnectionCreator, IOpenSSLContextFactory, \
    IOpenSSLServerConnectionCreator, IProtocol, IProtocolFactory, IPushProducer, IReactorTime, IStreamClientEndpoint, \
    ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

# Seconds a connection cmm closes may wait for the peer's close_notify (or its FIN) before it is
# cut: a peer that never answers would otherwise keep the socket, and its descriptor, for ever.
CLOSE_TIMEOUT = 5.0

# The most plaintext asked of OpenSSL at a time; it gives at most one record's (16 KiB).
RECORD_READ = 32 * 1024

# What TLSMemoryBIOFactory takes to make its connections' contexts.
TLSCreator = Union[IOpenSSLContextFactory, IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator]

# The private keys pyOpenSSL can put in a context (``Context.use_privatekey``); cryptography loads
# more kinds (X25519, DH, ...), which would fail only at the first handshake.
TLS_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
                 dsa.DSAPrivateKey)


class IConnectedTransport(ITCPTransport, IConsumer, IPushProducer):
    """What every transport cmm makes or accepts is: TCP, bare or under TLS, that both consumes
    (a producer can be registered with it) and produces (its reading can be paused)."""


def connected(protocol: Protocol) -> IConnectedTransport:
    """The transport of a protocol that is connected, with abortConnection.

    Twisted types ``transport`` as an optional ITransport: None until makeConnection. Every
    connection cmm makes or accepts is TCP, bare or under TLS (which provides ITCPTransport too).
    """
    transport = protocol.transport
    if transport is None:
        raise RuntimeError(f"{type(protocol).__name__} has no transport: it is not connected yet")
    return cast(IConnectedTransport, transport)


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
    """TLS that hands on a read's records at once, and ends a close it started within
    ``factory.close_timeout`` seconds.

    Twisted hands the wrapped protocol each TLS record (up to 16 KiB) on its own: a 2 MB body is
    some 120 calls down cmm's whole path, each with its per-call costs. One TCP read holds up
    to ``cmm.serve.upstream.SPLICE_BUFFER`` of records; their plaintext goes on joined, in one
    call, for a copy at memcpy speed. What came before a peer's close_notify or a TLS error is
    handed on before either is acted on, as Twisted does, and nothing is after an abort.

    A TLS close sends close_notify and waits for the peer's: Twisted has no limit on that wait.
    The timer counts from ``loseConnection``, so it also covers a peer that stopped reading the
    last response; a peer still taking that response's last bytes, however slowly, gets another
    period each time the bytes cmm has yet to send went down.
    """

    factory: DirectTLSFactory
    _close_timer: IDelayedCall | None = None
    _unsent_at_arming: int = 0

    def _flushReceiveBIO(self) -> None:
        pieces: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                pieces.append(self._tlsConnection.recv(RECORD_READ))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the peer's close_notify: no more data will come
                self._hand_on(pieces)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                self._hand_on(pieces)
                self._tlsShutdownFinished(failure)
        self._hand_on(pieces)
        self._flushSendBIO()  # a handshake or a close may have something to send

    def _hand_on(self, pieces: list[bytes]) -> None:
        if pieces and not self._aborted:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            ProtocolWrapper.dataReceived(self, data)

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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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

    def __init__(self, contextFactory: TLSCreator, isClient: bool, wrappedFactory: IProtocolFactory,
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
        return connecting.addCallback(_wrapped)


def _wrapped(tls: IProtocol) -> IProtocol:
    """The protocol inside the TLS one that DirectTLSFactory built."""
    assert isinstance(tls, TLSMemoryBIOProtocol)
    return tls.wrappedProtocol


def server_options(cert_pem: bytes, key_pem: bytes) -> CertificateOptions:
    """Options for the listening side; ALPN offers only ``http/1.1`` (cmm never speaks h2).

    Built from PEM bytes rather than paths so that a process that no longer may read the key
    file (an unprivileged worker) can still be handed the material. A key of a kind TLS cannot
    use is refused here, not at the first handshake.
    """
    key = load_pem_private_key(key_pem, password=None)
    if not isinstance(key, TLS_KEY_TYPES):
        raise ValueError(f"the TLS private key is {type(key).__name__}: not a kind OpenSSL serves with "
                         "(RSA, EC, Ed25519, Ed448 or DSA)")
    # Twisted annotates pyOpenSSL's PKey and X509 (deprecated), but hands both straight to
    # Context.use_privatekey/use_certificate, which take cryptography's objects as well.
    options = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]  # see above: Twisted's annotation is too narrow
        certificate=x509.load_pem_x509_certificate(cert_pem),  # type: ignore[arg-type]  # likewise
        acceptableProtocols=[b"http/1.1"],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    local_key_exchange(options.getContext())  # the one context every connection gets
    return options


# The key exchanges cmm's own listener agrees to. Its connections never leave the machine (the
# hosts file points api.anthropic.com at loopback), so a post-quantum hybrid protects nothing
# there, while OpenSSL 3.5+ keeps the peer's X25519MLKEM768 share with each connection: about
# 8 KiB more per open stream. Clients that offer the hybrid (a recent Node does) offer X25519
# beside it, so they get it without a retry. cmm's connections to Anthropic keep
# OpenSSL's defaults, hybrid first.
LOCAL_GROUPS = b"X25519:P-256"


def local_key_exchange(context: SSL.Context) -> None:
    """Limit the listener's key exchange groups to ``LOCAL_GROUPS`` (pyOpenSSL has no call for it)."""
    lib = Binding.lib
    if lib.SSL_CTX_set1_curves_list(context._context, LOCAL_GROUPS) != 1:
        raise ValueError(f"OpenSSL refused the key exchange groups {LOCAL_GROUPS.decode()}")


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """Hands each new connection the current options, so a reload (SIGHUP) can swap the
    certificate without rebinding; connections already open keep the one they started with."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> SSL.Context:
        return self.options.getContext()

