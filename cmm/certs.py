"""The local CA and the ``api.anthropic.com`` certificate cmm serves, made with ``cryptography``.

Claude Code trusts cmm's CA through ``NODE_EXTRA_CA_CERTS``; anything that CA signs is trusted
for every name, so the CA is name-constrained to ``api.anthropic.com`` by default: a stolen CA
key cannot impersonate any other site. Only DNS names are constrained; IP addresses are left
unconstrained (RFC 5280: a NameConstraints without an iPAddress subtree does not restrict IPs),
so a server certificate may carry loopback IP SANs if ever needed.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: CA/Browser Forum limit for a TLS server certificate's lifetime, which clients may enforce.
MAX_SERVER_DAYS = 397
#: Clients whose clock runs a little behind must not see a "not yet valid" certificate.
CLOCK_SKEW = timedelta(hours=1)

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700


@attrs.frozen
class CertificatePaths:
    """Where the CA and the server certificate live inside cmm's configuration directory."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def certificate_paths(config_dir: Path) -> CertificatePaths:
    config_dir = Path(config_dir)
    return CertificatePaths(
        ca_cert=config_dir / "ca.crt",
        ca_key=config_dir / "ca.key",
        server_cert=config_dir / "server.crt",
        server_key=config_dir / "server.key",
    )


@attrs.frozen
class KeyPair:
    """A certificate and its private key, both PEM (the key unencrypted, PKCS#8)."""

    cert_pem: bytes
    key_pem: bytes


@attrs.frozen
class EnsureResult:
    """What :func:`ensure_certificates` found or did, so callers can tell the user."""

    paths: CertificatePaths
    created_ca: bool
    issued_server: bool
    server_not_after: datetime


def _utc(now: datetime) -> datetime:
    """Naive datetimes are taken as UTC: certificates only know UTC."""
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _random_serial() -> int:
    """A positive serial of at most 159 bits with 64+ bits of entropy, as RFC 5280 and CA/B ask."""
    return secrets.randbits(159) | 1


def make_ca(
    now: datetime,
    *,
    permitted_names: tuple[str, ...] | None = ("api.anthropic.com",),
    common_name: str = "cmm local CA",
    days: int = 3650,
) -> KeyPair:
    """A new self-signed CA; ``permitted_names=None`` gives an unconstrained one (tests only)."""
    if days <= 0:
        raise ValueError("days must be positive")
    now = _utc(now)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cmm"),
        ]
    )
    not_before = now - CLOCK_SKEW
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if permitted_names is not None:
        if not permitted_names:
            raise ValueError("permitted_names must name at least one DNS name (or be None)")
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(n) for n in permitted_names],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    cert = builder.sign(key, hashes.SHA256())
    return KeyPair(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def _load_ca(ca: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ValueError("the CA key does not belong to the CA certificate")
    return cert, key


def make_server_certificate(
    ca: KeyPair,
    now: datetime,
    *,
    hostnames: tuple[str, ...] = ("api.anthropic.com",),
    ip_addresses: tuple[str, ...] = (),
    days: int = MAX_SERVER_DAYS,
) -> KeyPair:
    """A TLS server certificate for ``hostnames`` (and IPs) signed by ``ca``."""
    if not 0 < days <= MAX_SERVER_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_SERVER_DAYS}")
    if not hostnames and not ip_addresses:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    now = _utc(now)
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else ip_addresses[0])]
    )
    not_before = now - CLOCK_SKEW
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def server_not_after(cert_pem: bytes) -> datetime:
    """When a certificate expires (aware, UTC)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def write_atomically(
    path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Readers (a worker reloading on SIGHUP) see the old file or the new one, never half of one.

    The temporary file gets its final mode and owner before it holds any data, so a key is never
    readable by others, not even for a moment.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_key_pair(cert_path: Path, key_path: Path) -> KeyPair | None:
    """The pair on disk, or None when either file is missing."""
    try:
        return KeyPair(cert_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes())
    except FileNotFoundError:
        return None


def ca_is_usable(pair: KeyPair | None, now: datetime) -> bool:
    """A readable CA whose key matches and that has not expired: worth keeping."""
    if pair is None:
        return False
    try:
        cert, _ = _load_ca(pair)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, x509.ExtensionNotFound):
        return False
    return constraints.ca and cert.not_valid_after_utc > now


def server_needs_issue(
    pair: KeyPair | None, ca_pem: bytes, now: datetime, renew_within: timedelta
) -> bool:
    """Missing, unreadable, key mismatch, not signed by ``ca_pem``, or expiring soon."""
    if pair is None:
        return True
    try:
        cert = x509.load_pem_x509_certificate(pair.cert_pem)
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return True
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        cert.public_key(), ec.EllipticCurvePublicKey
    ):
        return True
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        return True
    return cert.not_valid_after_utc - renew_within <= now


def ensure_certificates(
    config_dir: Path,
    *,
    now: datetime | None = None,
    force: bool = False,
    renew_within: timedelta = timedelta(days=30),
    owner: tuple[int, int] | None = None,
) -> EnsureResult:
    """Make what is missing, renew what is about to expire, leave everything else alone.

    The CA is only replaced when it is missing, unusable (unreadable, key mismatch, expired) or
    ``force`` is set, because a new CA has to be trusted again by the user. ``owner`` (uid, gid)
    hands the directory and files to the user who ran ``sudo``.
    """
    config_dir = Path(config_dir)
    now = _utc(now if now is not None else datetime.now(timezone.utc))
    paths = certificate_paths(config_dir)
    if not config_dir.exists():
        config_dir.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(config_dir, DIR_MODE)
    if owner is not None:
        os.chown(config_dir, *owner)

    ca = read_key_pair(paths.ca_cert, paths.ca_key)
    created_ca = force or not ca_is_usable(ca, now)
    if created_ca:
        ca = make_ca(now)
        write_atomically(paths.ca_key, ca.key_pem, KEY_MODE, owner)
        write_atomically(paths.ca_cert, ca.cert_pem, CERT_MODE, owner)
    assert ca is not None

    server = read_key_pair(paths.server_cert, paths.server_key)
    issued_server = created_ca or server_needs_issue(server, ca.cert_pem, now, renew_within)
    if issued_server:
        server = make_server_certificate(ca, now)
        write_atomically(paths.server_key, server.key_pem, KEY_MODE, owner)
        write_atomically(paths.server_cert, server.cert_pem, CERT_MODE, owner)
    assert server is not None

    if owner is not None:
        for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
            os.chown(path, *owner)

    return EnsureResult(
        paths=paths,
        created_ca=created_ca,
        issued_server=issued_server,
        server_not_after=server_not_after(server.cert_pem),
    )
