"""The TLS face cmm shows Claude Code: its own certificate for api.anthropic.com, HTTP/1.1 only."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory, IProtocol, \
    IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer


class DirectTLSFactory(TLSMemoryBIOFactory):
    """TLS whose writes are encrypted and handed to TCP at once.

    Twisted's default TLS transport holds writes under 64 KB until the next reactor turn and
    copies them twice to batch them. cmm writes what it reads, in pieces as large as the reads
    came, and an SSE event must leave when it arrives: the batching could only delay events and
    copy bodies.
    """

    protocol = TLSMemoryBIOProtocol
    noisy = False


def server_factory(options: IOpenSSLContextFactory, wrapped: IProtocolFactory) -> DirectTLSFactory:
    """The listening side's TLS around cmm's serving protocol."""
    return DirectTLSFactory(options, False, wrapped)


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
