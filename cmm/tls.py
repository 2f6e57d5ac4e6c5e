"""The TLS face cmm shows Claude Code: its own certificate for api.anthropic.com, HTTP/1.1 only."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from zope.interface import implementer


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
