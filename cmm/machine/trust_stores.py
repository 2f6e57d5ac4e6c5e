"""The system trust store (``--system-trust``, for curl, Python and other tools that use it).

It is optional: Claude Code trusts cmm's CA through ``NODE_EXTRA_CA_CERTS``.  Which mechanism the
machine has is detected from the tools and folders present, never guessed from the
distribution's name.  Root hands a store only cmm's constrained CA, re-encoded and copied into a
folder only root can reach.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_to_bytes

import attrs
from cryptography.hazmat.primitives import serialization

from cmm.config.userfiles import read_file
from cmm.machine import certs
from cmm.machine.certs import pem_certificates
from cmm.machine.commands import CommandResult, Machine, as_owner


# --- CA files ----------------------------------------------------------------------------------


def _ca_facts(ca_pem: bytes | None) -> tuple[str, str | None, bytes | None]:
    """(common name, SHA-1 hex of the DER, subject key identifier) of the CA, as far as known."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    default = "cmm local CA"
    if not ca_pem:
        return default, None, None
    try:
        cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return default, None, None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else default
    sha1 = hashlib.sha1(pem_certificates(ca_pem)[0]).hexdigest().upper()
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    return name, sha1, ski


def read_ca(ca_cert: Path, machine: Machine) -> bytes | None:
    """The CA file's bytes as its owner reads them, never through a link (None: none usable).

    Root must not read a path in the user's folder with its own rights: a link there could name
    any file on the machine."""
    with as_owner(machine):
        try:
            return read_file(ca_cert)
        except OSError:
            return None


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --- the system trust store --------------------------------------------------------------------


# --- the stores --------------------------------------------------------------------------------


class StoreKind(enum.Enum):
    DEBIAN = "update-ca-certificates"
    FEDORA = "update-ca-trust"
    P11KIT = "p11-kit trust"
    MACOS = "macOS System keychain"


ANCHOR_NAME = "cmm-local-ca.crt"
DEBIAN_ANCHORS = "/usr/local/share/ca-certificates"
FEDORA_ANCHORS = "/etc/pki/ca-trust/source/anchors"
MACOS_KEYCHAIN = "/Library/Keychains/System.keychain"


@attrs.frozen
class SystemStore:
    """The machine's trust store mechanism: its tool and, for file-based ones, cmm's anchor file
    (for macOS, the keychain)."""

    kind: StoreKind
    command: str
    location: Path | None = None

    def describe(self) -> str:
        if self.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
            return f"{self.kind.value} ({self.location})"
        return str(self.kind.value)


class TrustError(Exception):
    """A trust-store step that cannot be done; the message says what to do instead."""


def detect_system_store(machine: Machine) -> SystemStore | None:
    """The first mechanism whose tool (and folder) is present, in this order: macOS security with
    the System keychain; update-ca-certificates (Debian, Ubuntu); update-ca-trust with
    /etc/pki/ca-trust (Fedora, RHEL); p11-kit's ``trust`` (Arch and others).  None if none is."""
    if machine.platform == "darwin":
        security = machine.which("security")
        keychain = machine.system_path(MACOS_KEYCHAIN)
        if security and keychain.exists():
            return SystemStore(StoreKind.MACOS, security, keychain)
    command = machine.which("update-ca-certificates")
    if command:
        return SystemStore(StoreKind.DEBIAN, command, machine.system_path(DEBIAN_ANCHORS) / ANCHOR_NAME)
    command = machine.which("update-ca-trust")
    if command and machine.system_path(FEDORA_ANCHORS).is_dir():
        return SystemStore(StoreKind.FEDORA, command, machine.system_path(FEDORA_ANCHORS) / ANCHOR_NAME)
    command = machine.which("trust")
    if command:
        return SystemStore(StoreKind.P11KIT, command)
    return None


NO_STORE_MESSAGE = (
    "no system trust store tool found (looked for update-ca-certificates, update-ca-trust with "
    f"{FEDORA_ANCHORS}, p11-kit's trust, and macOS security); Claude Code does not need one: "
    "it trusts cmm's CA through NODE_EXTRA_CA_CERTS"
)


@attrs.frozen
class SystemTrustStatus:
    """cmm's entries in the system store: ``present`` (any), ``current`` (the CA given; None when
    that cannot be told)."""

    store: SystemStore | None
    present: bool = False
    current: bool | None = False


def parse_trust_list(output: str) -> tuple[tuple[str, str], ...]:
    """(pkcs11 URI, label) of each entry printed by ``trust list``."""
    entries: list[tuple[str, str]] = []
    uri: str | None = None
    for line in output.splitlines():
        if line.startswith("pkcs11:"):
            uri = line.strip()
            entries.append((uri, ""))
        elif uri is not None and line.strip().startswith("label:"):
            entries[-1] = (uri, line.split(":", 1)[1].strip())
    return tuple(entries)


def _uri_id(uri: str) -> bytes | None:
    match = re.search(r"[:;]id=([^;]*)", uri)
    return unquote_to_bytes(match.group(1)) if match else None


def parse_keychain_hashes(output: str) -> tuple[str, ...]:
    """The SHA-1 hashes printed by ``security find-certificate -Z``."""
    return tuple(h.upper() for h in re.findall(r"SHA-1 hash:\s*([0-9A-Fa-f]{40})", output))


def _p11kit_entries(store: SystemStore, machine: Machine, name: str) -> tuple[tuple[str, str], ...]:
    result = machine.run([store.command, "list", "--filter=ca-anchors"])
    if result.returncode != 0:
        raise TrustError(f"`trust list` failed: {result.output}")
    return tuple(entry for entry in parse_trust_list(result.stdout) if entry[1] == name)


def _keychain_hashes(store: SystemStore, machine: Machine, name: str) -> tuple[str, ...]:
    result = machine.run([store.command, "find-certificate", "-a", "-c", name, "-Z", str(store.location)])
    if result.returncode != 0:
        return ()  # "The specified item could not be found in the keychain."
    return parse_keychain_hashes(result.stdout)


def system_status(store: SystemStore | None, ca_pem: bytes | None, machine: Machine) -> SystemTrustStatus:
    """Whether the store holds a cmm CA, and whether it is ``ca_pem``; needs no root."""
    if store is None:
        return SystemTrustStatus(None)
    name, sha1, ski = _ca_facts(ca_pem)
    if store.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
        assert store.location is not None
        installed = _read_optional(store.location)
        if installed is None:
            return SystemTrustStatus(store)
        current = bool(ca_pem) and set(pem_certificates(installed)) == set(pem_certificates(ca_pem or b""))
        return SystemTrustStatus(store, True, current)
    if store.kind is StoreKind.P11KIT:
        try:
            entries = _p11kit_entries(store, machine, name)
        except TrustError:
            return SystemTrustStatus(store, False, None)
        if not entries:
            return SystemTrustStatus(store)
        ids = [_uri_id(uri) for uri, _ in entries]
        return SystemTrustStatus(store, True, None if ski is None or None in ids else ski in ids)
    hashes = _keychain_hashes(store, machine, name)
    if not hashes:
        return SystemTrustStatus(store)
    return SystemTrustStatus(store, True, None if sha1 is None else sha1 in hashes)


def _check(result: CommandResult, what: str) -> None:
    if result.returncode != 0:
        raise TrustError(f"{what} failed (exit status {result.returncode}): {result.output or 'no output'}")


def _need_root(machine: Machine, what: str) -> None:
    if not machine.is_root:
        raise TrustError(f"{what} needs root")


#: Where root puts the copy of the CA a store's tool reads: /tmp's sticky bit keeps other users
#: from renaming root's folder there, unlike a TMPDIR the user may have passed through sudo.
PRIVATE_COPY_PARENT = "/tmp"


def trusted_ca_pem(ca_cert: Path) -> bytes:
    """The only bytes root hands to a system store: cmm's constrained CA, read from the user's
    folder without following a link, re-encoded from the parsed certificate (nothing else rides
    along). Raises TrustError with what to do otherwise."""
    try:
        cert = certs.read_ca_certificate(ca_cert)
    except certs.CertificateError as error:
        raise TrustError(f"not making {ca_cert} a system root: {error}") from None
    except OSError as error:
        raise TrustError(f"cannot read {ca_cert}: {error.strerror}") from None
    return cert.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _private_copy(ca_pem: bytes) -> Iterator[Path]:
    """A file holding ``ca_pem`` in a folder only root can reach, for a store's tool to read:
    never the user's path, whose file could be swapped after cmm checked it."""
    with tempfile.TemporaryDirectory(prefix="cmm-ca-", dir=PRIVATE_COPY_PARENT) as private:
        copy = Path(private) / certs.certificate_paths(Path(private)).ca_cert.name
        certs.write_atomically(copy, ca_pem, certs.CERT_MODE)
        yield copy


def install_system_trust(store: SystemStore, ca_cert: Path, machine: Machine) -> str:
    """Make the store trust ``ca_cert``, replacing an older cmm CA there; says what it did.

    Only a CA carrying exactly cmm's name constraint is installed, read as the folder's owner.
    Tools that read a file get a private copy of the checked bytes, never the user's path.
    Raises TrustError when not root, when the CA is refused, or when the store's tool fails.
    """
    with as_owner(machine):
        ca_pem = trusted_ca_pem(ca_cert)
    status = system_status(store, ca_pem, machine)
    if status.present and status.current:
        return f"already trusts cmm's CA: {store.describe()}"
    _need_root(machine, "adding cmm's CA to the system trust store")
    if store.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
        assert store.location is not None
        store.location.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        certs.write_atomically(store.location, ca_pem, certs.CERT_MODE)
        argv = [store.command] if store.kind is StoreKind.DEBIAN else [store.command, "extract"]
        _check(machine.run(argv), " ".join(argv))
    else:
        if status.present:
            _remove_system_entries(store, machine, ca_pem)
        with _private_copy(ca_pem) as copy:
            if store.kind is StoreKind.P11KIT:
                _check(machine.run([store.command, "anchor", "--store", str(copy)]), "trust anchor --store")
            else:
                argv = [store.command, "add-trusted-cert", "-d", "-r", "trustRoot", "-k", str(store.location),
                        str(copy)]
                _check(machine.run(argv), "security add-trusted-cert")
    verb = "replaced the old cmm CA in" if status.present else "added cmm's CA to"
    return f"{verb} {store.describe()}"


def _remove_system_entries(store: SystemStore, machine: Machine, ca_pem: bytes | None) -> bool:
    name, sha1, _ = _ca_facts(ca_pem)
    if store.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
        assert store.location is not None
        try:
            store.location.unlink()
        except FileNotFoundError:
            return False
        argv = [store.command] if store.kind is StoreKind.DEBIAN else [store.command, "extract"]
        _check(machine.run(argv), " ".join(argv))
        return True
    if store.kind is StoreKind.P11KIT:
        entries = _p11kit_entries(store, machine, name)
        for uri, _ in entries:
            _check(machine.run([store.command, "anchor", "--remove", uri]), "trust anchor --remove")
        return bool(entries)
    hashes = _keychain_hashes(store, machine, name)
    if ca_pem and sha1 in hashes:  # its trust setting, named by a private copy of that certificate
        from cryptography import x509

        single = x509.load_der_x509_certificate(pem_certificates(ca_pem)[0])
        with _private_copy(single.public_bytes(serialization.Encoding.PEM)) as copy:
            machine.run([store.command, "remove-trusted-cert", "-d", str(copy)])
    for digest in hashes:
        argv = [store.command, "delete-certificate", "-Z", digest, str(store.location)]
        _check(machine.run(argv), "security delete-certificate")
    return bool(hashes)


def remove_system_trust(store: SystemStore, machine: Machine, ca_cert: Path | None = None) -> str | None:
    """Take every cmm CA out of the store; what was done, or None when there was nothing."""
    ca_pem = read_ca(ca_cert, machine) if ca_cert is not None else None
    if not system_status(store, ca_pem, machine).present:
        return None
    _need_root(machine, "removing cmm's CA from the system trust store")
    if not _remove_system_entries(store, machine, ca_pem):
        return None
    return f"removed cmm's CA from {store.describe()}"
