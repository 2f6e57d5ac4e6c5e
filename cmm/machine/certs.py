"""The local CA and the ``api.anthropic.com`` certificate cmm serves, made with ``cryptography``.

Claude Code trusts cmm's CA through ``NODE_EXTRA_CA_CERTS``; anything that CA signs is trusted
for every name, so the CA carries a critical name constraint: DNS names are limited to
``api.anthropic.com`` and every IP address is excluded (RFC 5280: a NameConstraints without an
iPAddress subtree leaves IPs unrestricted, so ``https://10.0.0.1`` would otherwise be fair game).
A stolen CA key thus cannot impersonate any other site or address, and a CA on disk without
exactly this constraint (one made by an older cmm) is refused rather than used.

cmm may run as root in a folder its user can write, so files there are opened without following
symbolic links, temporary files are created exclusively, and ownership is handed over with
``fchown`` on an open descriptor, never by path.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmm.machine.hosts import HOSTNAME

#: CA/Browser Forum limit for a TLS server certificate's lifetime, which clients may enforce.
MAX_SERVER_DAYS = 397
#: Clients whose clock runs a little behind must not see a "not yet valid" certificate.
CLOCK_SKEW = timedelta(hours=1)

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700

#: The only name cmm's CA may vouch for, and the addresses it may never vouch for (all of them).
PERMITTED_NAMES = (HOSTNAME,)
EXCLUDED_NETWORKS = ("0.0.0.0/0", "::/0")
#: Certificate files are small; anything bigger is not one of cmm's.
MAX_FILE_BYTES = 1 << 20


class CertificateError(ValueError):
    """Certificate files cmm refuses to use; the message says what to do instead."""


def refused_ca_message(ca_cert: Path | str) -> str:
    return (
        f"{ca_cert} holds a CA without cmm's name constraint (only {HOSTNAME}, no IP addresses), "
        "probably made by an older cmm: its key could vouch for other sites. cmm does not use it. "
        "Run `cmm setup --force` to make a new CA (then open a new terminal; add --system-trust, "
        "with sudo, if the system trust store held the old one)"
    )


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
    server: KeyPair  # what the files hold now: serve these bytes, not whatever the path holds later


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
    permitted_names: tuple[str, ...] | None = PERMITTED_NAMES,
    excluded_networks: tuple[str, ...] = EXCLUDED_NETWORKS,
    common_name: str = "cmm local CA",
    days: int = 3650,
) -> KeyPair:
    """A new self-signed CA; ``permitted_names=None`` gives an unconstrained one, and other
    arguments than the defaults a CA that cmm refuses to use (tests only, both)."""
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
            _name_constraints(permitted_names, excluded_networks), critical=True
        )
    cert = builder.sign(key, hashes.SHA256())
    return KeyPair(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def _name_constraints(
    permitted_names: tuple[str, ...], excluded_networks: tuple[str, ...]
) -> x509.NameConstraints:
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(n) for n in permitted_names],
        excluded_subtrees=[x509.IPAddress(ipaddress.ip_network(n)) for n in excluded_networks] or None,
    )


def _same_subtrees(found: list[x509.GeneralName] | None, wanted: list[x509.GeneralName] | None) -> bool:
    found, wanted = found or [], wanted or []
    return len(found) == len(wanted) and set(found) == set(wanted)


def has_cmm_constraint(cert: x509.Certificate) -> bool:
    """The one test of whether a CA may be used or trusted: a critical NameConstraints with
    exactly cmm's subtrees (``api.anthropic.com`` permitted, all IPv4 and IPv6 excluded)."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except (x509.ExtensionNotFound, ValueError):  # ValueError: malformed or duplicate extensions
        return False
    wanted = _name_constraints(PERMITTED_NAMES, EXCLUDED_NETWORKS)
    return (
        extension.critical
        and _same_subtrees(extension.value.permitted_subtrees, wanted.permitted_subtrees)
        and _same_subtrees(extension.value.excluded_subtrees, wanted.excluded_subtrees)
    )


def _load_ca(ca: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    public = cert.public_key()  # of any kind: an Ed25519 one has no public_numbers to compare
    if not isinstance(public, ec.EllipticCurvePublicKey) or key.public_key().public_numbers() != public.public_numbers():
        raise ValueError("the CA key does not belong to the CA certificate")
    return cert, key


def make_server_certificate(
    ca: KeyPair,
    now: datetime,
    *,
    hostnames: tuple[str, ...] = (HOSTNAME,),
    ip_addresses: tuple[str, ...] = (),
    days: int = MAX_SERVER_DAYS,
) -> KeyPair:
    """A TLS server certificate for ``hostnames`` (and IPs) signed by ``ca``.

    IP addresses only verify under an unconstrained (test) CA: cmm's CA excludes them all.
    """
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


def _open_directory(path: Path, *, follow: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(path, flags)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and not follow:
            raise CertificateError(
                f"{path} is a symbolic link or not a folder: cmm keeps its keys only in a real folder "
                "(remove it, or point --config-dir at a folder)"
            ) from None
        raise


def open_config_dir(config_dir: Path, owner: tuple[int, int] | None = None) -> int:
    """A descriptor for ``config_dir``, made (mode 0700) if missing, never through a symbolic link.

    Everything afterwards happens relative to this descriptor, so swapping the folder for a link
    once it is open changes nothing. ``owner`` gets the folder (through the descriptor).
    """
    config_dir = Path(config_dir)
    created = False
    config_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(config_dir, DIR_MODE)  # does not follow a link in the last component
        created = True
    except FileExistsError:
        pass
    fd = _open_directory(config_dir, follow=False)
    try:
        if created:
            os.fchmod(fd, DIR_MODE)  # whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_at(dir_fd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def write_atomically(
    path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Readers (a worker reloading on SIGHUP) see the old file or the new one, never half of one.

    The temporary file is created exclusively (never through a link) and gets its final mode and
    owner before it holds any data, so a key is never readable by others, not even for a moment.
    """
    path = Path(path)
    dir_fd = _open_directory(path.parent, follow=True)
    try:
        _write_at(dir_fd, path.name, data, mode, owner)
    finally:
        os.close(dir_fd)


def _read_at(
    name: str, dir_fd: int | None = None, owner: tuple[int, int] | None = None, shown: Path | str | None = None
) -> bytes | None:
    """A regular file's bytes (None: missing), opened without following a link; ``owner`` gets
    the file unless it has other hard links (it could then be anyone's file)."""
    shown = shown or name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CertificateError(
                f"{shown} is a symbolic link: cmm does not follow links among its certificates "
                "(remove it and run `cmm setup`)"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CertificateError(f"{shown} is not a regular file (remove it and run `cmm setup`)")
        if info.st_size > MAX_FILE_BYTES:
            raise CertificateError(f"{shown} is too big to be a certificate or key ({info.st_size} bytes)")
        if owner is not None and info.st_nlink == 1 and (info.st_uid, info.st_gid) != owner:
            os.fchown(fd, *owner)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


def read_key_pair(cert_path: Path, key_path: Path) -> KeyPair | None:
    """The pair on disk, or None when either file is missing; links are refused."""
    cert_pem, key_pem = _read_at(str(cert_path)), _read_at(str(key_path))
    if cert_pem is None or key_pem is None:
        return None
    return KeyPair(cert_pem=cert_pem, key_pem=key_pem)


def read_ca_certificate(path: Path) -> x509.Certificate:
    """The CA in ``path`` if it is cmm's constrained CA, for handing to a system trust store.

    Root reads a file in the user's folder here: no link is followed, and the file must hold one
    certificate and nothing else, carrying exactly cmm's name constraint.
    """
    pem = _read_at(str(path))
    if pem is None:
        raise CertificateError(f"{path} does not exist: run `cmm setup` first")
    found = pem.count(b"-----BEGIN")
    if found != 1:
        raise CertificateError(f"{path} must hold exactly one certificate, not {found} PEM blocks")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate") from None
    if not has_cmm_constraint(cert):
        raise CertificateError(refused_ca_message(path))
    return cert


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)


def pem_certificates(data: bytes) -> tuple[bytes, ...]:
    """The DER of every PEM certificate in ``data`` (a single CA file or a bundle)."""
    found = []
    for body in _PEM_CERT.findall(data):
        try:
            found.append(base64.b64decode(b"".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            continue
    return tuple(found)


def pem_bundle_contains(bundle: bytes, ca_pem: bytes) -> bool:
    """Whether a PEM bundle holds the CA (a user who combined cmm's CA with another one)."""
    wanted = set(pem_certificates(ca_pem))
    return bool(wanted) and not wanted.isdisjoint(pem_certificates(bundle))


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
    public = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(public, ec.EllipticCurvePublicKey):
        return True
    if key.public_key().public_numbers() != public.public_numbers():
        return True
    return cert.not_valid_after_utc - renew_within <= now


@attrs.frozen
class FileWrite:
    """One file of cmm's folder to (re)write: its name there, its bytes and its mode."""

    name: str
    data: bytes
    mode: int


@attrs.frozen
class CertificatePlan:
    """What :func:`plan_certificates` decided: the files to write, in order, and the outcome."""

    writes: tuple[FileWrite, ...]  # each key before its certificate, the CA before the server
    created_ca: bool
    issued_server: bool
    server: KeyPair  # what the files hold once the writes are done
    server_not_after: datetime


def _pair_in(files: Mapping[str, bytes], cert: Path, key: Path) -> KeyPair | None:
    cert_pem, key_pem = files.get(cert.name), files.get(key.name)
    if cert_pem is None or key_pem is None:
        return None
    return KeyPair(cert_pem=cert_pem, key_pem=key_pem)


def plan_certificates(
    files: Mapping[str, bytes],
    now: datetime,
    *,
    force: bool = False,
    renew_within: timedelta = timedelta(days=30),
    shown: Path = Path("."),
) -> CertificatePlan:
    """The decisions of :func:`ensure_certificates` without any IO: ``files`` maps the names of
    the folder's certificate files (``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``) to the
    bytes they hold now (a missing file is left out); the plan says which to write, with what
    bytes and mode, and what the folder then holds.

    So whoever reads and writes the folder (directly, or as its owner from a staging copy) gets
    the same decisions. ``shown`` is the folder as messages name it. A usable CA without cmm's
    name constraint raises :class:`CertificateError` (unless ``force``).
    """
    now = _utc(now)
    names = certificate_paths(Path(shown))
    ca = _pair_in(files, names.ca_cert, names.ca_key)
    writes: list[FileWrite] = []
    created_ca = force or not ca_is_usable(ca, now)
    if created_ca:
        ca = make_ca(now)
        writes += [FileWrite(names.ca_key.name, ca.key_pem, KEY_MODE), FileWrite(names.ca_cert.name, ca.cert_pem, CERT_MODE)]
    assert ca is not None
    if not has_cmm_constraint(x509.load_pem_x509_certificate(ca.cert_pem)):
        raise CertificateError(refused_ca_message(names.ca_cert))
    server = _pair_in(files, names.server_cert, names.server_key)
    issued_server = created_ca or server_needs_issue(server, ca.cert_pem, now, renew_within)
    if issued_server:
        server = make_server_certificate(ca, now)
        writes += [
            FileWrite(names.server_key.name, server.key_pem, KEY_MODE),
            FileWrite(names.server_cert.name, server.cert_pem, CERT_MODE),
        ]
    assert server is not None
    return CertificatePlan(tuple(writes), created_ca, issued_server, server, server_not_after(server.cert_pem))


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
    ``force`` is set, because a new CA has to be trusted again by the user. A usable CA without
    cmm's name constraint raises :class:`CertificateError` (unless ``force``): replacing it
    silently would break trust, using it would keep its wider reach. ``owner`` (uid, gid) hands
    the folder and files to the user who ran ``sudo``. The decisions are :func:`plan_certificates`'.
    """
    config_dir = Path(config_dir)
    paths = certificate_paths(config_dir)
    dir_fd = open_config_dir(config_dir, owner)
    try:
        files: dict[str, bytes] = {}
        for path in attrs.astuple(paths, recurse=False):
            data = _read_at(path.name, dir_fd, owner, path)
            if data is not None:
                files[path.name] = data
        plan = plan_certificates(
            files, now if now is not None else datetime.now(timezone.utc), force=force,
            renew_within=renew_within, shown=config_dir,
        )
        for write in plan.writes:
            _write_at(dir_fd, write.name, write.data, write.mode, owner)
    finally:
        os.close(dir_fd)

    return EnsureResult(
        paths=paths,
        created_ca=plan.created_ca,
        issued_server=plan.issued_server,
        server_not_after=plan.server_not_after,
        server=plan.server,
    )
