"""The TLS face cmm shows Claude Code: its own certificate for api.anthropic.com, HTTP/1.1 only."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion


def server_options(cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"") -> CertificateOptions:
    """Options for the listening side; ALPN offers only ``http/1.1`` (cmm never speaks h2)."""
    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in _pem_blocks(chain_pem)]
    return CertificateOptions(
        privateKey=key,
        certificate=certificate,
        extraCertChain=chain or None,
        acceptableProtocols=[b"http/1.1"],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def server_options_from_files(cert_path: Path, key_path: Path) -> CertificateOptions:
    return server_options(cert_path.read_bytes(), key_path.read_bytes())


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in part]
