"""The TLS face cmm shows Claude Code: its own certificate for api.anthropic.com, HTTP/1.1 only."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.ssl import CertificateOptions, TLSVersion


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
