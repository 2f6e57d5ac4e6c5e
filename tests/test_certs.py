"""The CA and server certificate: exact extensions, real chain verification, renewal rules."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import DNSName
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cmm import certs
from cmm.certs import (
    CertificatePaths,
    KeyPair,
    certificate_paths,
    ensure_certificates,
    make_ca,
    make_server_certificate,
    server_not_after,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def verifier(ca: KeyPair, name: str = "api.anthropic.com", at: datetime = NOW):
    store = Store([load(ca.cert_pem)])
    return PolicyBuilder().store(store).time(at).build_server_verifier(DNSName(name))


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return make_ca(NOW)


@pytest.fixture(scope="module")
def server(ca: KeyPair) -> KeyPair:
    return make_server_certificate(ca, NOW)


def extension_oids(cert: x509.Certificate) -> set:
    return {e.oid for e in cert.extensions}


def test_certificate_paths() -> None:
    assert certificate_paths(Path("/x")) == CertificatePaths(
        ca_cert=Path("/x/ca.crt"),
        ca_key=Path("/x/ca.key"),
        server_cert=Path("/x/server.crt"),
        server_key=Path("/x/server.key"),
    )


def test_ca_extensions(ca: KeyPair) -> None:
    cert = load(ca.cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cmm local CA"
    ext = cert.extensions
    assert extension_oids(cert) == {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.NameConstraints.oid,
    }
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not any(
        getattr(ku.value, flag)
        for flag in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
        )
    )
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [DNSName("api.anthropic.com")]
    assert nc.value.excluded_subtrees is None
    assert cert.not_valid_before_utc == NOW - timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW - timedelta(hours=1) + timedelta(days=3650)


def test_unconstrained_ca_has_no_name_constraints() -> None:
    cert = load(make_ca(NOW, permitted_names=None, common_name="test CA").cert_pem)
    assert x509.NameConstraints.oid not in extension_oids(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"


def test_server_extensions(ca: KeyPair, server: KeyPair) -> None:
    cert = load(server.cert_pem)
    ca_cert = load(ca.cert_pem)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.issuer == ca_cert.subject
    assert cert.serial_number > 0
    ext = cert.extensions
    assert extension_oids(cert) == {
        x509.SubjectAlternativeName.oid,
        x509.ExtendedKeyUsage.oid,
        x509.KeyUsage.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.BasicConstraints.oid,
    }
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(DNSName) == ["api.anthropic.com"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.key_encipherment
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_before_utc == NOW - timedelta(hours=1)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= timedelta(days=397)
    assert server_not_after(server.cert_pem) == cert.not_valid_after_utc


def test_serials_are_random(ca: KeyPair) -> None:
    serials = {load(make_server_certificate(ca, NOW).cert_pem).serial_number for _ in range(5)}
    assert len(serials) == 5


def test_server_certificate_lifetime_is_capped(ca: KeyPair) -> None:
    with pytest.raises(ValueError):
        make_server_certificate(ca, NOW, days=398)


def test_ip_sans_and_extra_names(ca: KeyPair) -> None:
    pair = make_server_certificate(
        ca, NOW, hostnames=("api.anthropic.com",), ip_addresses=("127.0.0.1", "::1")
    )
    san = load(pair.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    # The DNS-only name constraint leaves IP addresses unconstrained, as documented.
    verifier(ca).verify(load(pair.cert_pem), [])


def test_chain_verifies(ca: KeyPair, server: KeyPair) -> None:
    chain = verifier(ca).verify(load(server.cert_pem), [])
    assert chain[-1] == load(ca.cert_pem)
    # Also still valid an hour before "now" (clock skew) and refused after expiry.
    verifier(ca, at=NOW - timedelta(minutes=59)).verify(load(server.cert_pem), [])
    with pytest.raises(VerificationError):
        verifier(ca, at=NOW + timedelta(days=398)).verify(load(server.cert_pem), [])


def test_wrong_hostname_is_refused(ca: KeyPair, server: KeyPair) -> None:
    with pytest.raises(VerificationError):
        verifier(ca, "evil.example.com").verify(load(server.cert_pem), [])


def forge_leaf(ca: KeyPair, hostname: str) -> x509.Certificate:
    """What an attacker holding the CA key could sign, bypassing make_server_certificate."""
    ca_cert = load(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([DNSName(hostname)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


def test_name_constraint_refuses_forged_leaf(ca: KeyPair) -> None:
    forged = forge_leaf(ca, "evil.example.com")
    with pytest.raises(VerificationError):
        verifier(ca, "evil.example.com").verify(forged, [])
    # The same forgery under an unconstrained CA verifies: the constraint is what stops it.
    open_ca = make_ca(NOW, permitted_names=None)
    verifier(open_ca, "evil.example.com").verify(forge_leaf(open_ca, "evil.example.com"), [])


def test_unconstrained_ca_for_test_names() -> None:
    open_ca = make_ca(NOW, permitted_names=None)
    pair = make_server_certificate(
        open_ca, NOW, hostnames=("api.anthropic.com", "localhost"), ip_addresses=("127.0.0.1",)
    )
    for name in ("api.anthropic.com", "localhost"):
        verifier(open_ca, name).verify(load(pair.cert_pem), [])


def test_key_must_match_ca() -> None:
    a, b = make_ca(NOW), make_ca(NOW)
    with pytest.raises(ValueError):
        make_server_certificate(KeyPair(cert_pem=a.cert_pem, key_pem=b.key_pem), NOW)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(paths: CertificatePaths) -> dict:
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
        for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
    }


def test_ensure_creates_everything(tmp_path: Path) -> None:
    config = tmp_path / "nested" / ".cmm"
    result = ensure_certificates(config, now=NOW)
    paths = result.paths
    assert paths == certificate_paths(config)
    assert result.created_ca and result.issued_server
    assert mode(config) == 0o700
    assert mode(paths.ca_key) == 0o600 and mode(paths.server_key) == 0o600
    assert mode(paths.ca_cert) == 0o644 and mode(paths.server_cert) == 0o644
    ca = KeyPair(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes())
    verifier(ca).verify(load(paths.server_cert.read_bytes()), [])
    assert result.server_not_after == server_not_after(paths.server_cert.read_bytes())
    assert sorted(p.name for p in config.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
    ]


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, now=NOW)
    before = snapshot(first.paths)
    second = ensure_certificates(tmp_path, now=NOW + timedelta(days=1))
    assert not second.created_ca and not second.issued_server
    assert second.server_not_after == first.server_not_after
    assert snapshot(second.paths) == before


def test_ensure_renews_server_keeping_ca(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, now=NOW)
    ca_before = (first.paths.ca_cert.read_bytes(), first.paths.ca_key.read_bytes())
    server_before = first.paths.server_cert.read_bytes()
    later = first.server_not_after - timedelta(days=10)
    renewed = ensure_certificates(tmp_path, now=later)
    assert renewed.issued_server and not renewed.created_ca
    assert (renewed.paths.ca_cert.read_bytes(), renewed.paths.ca_key.read_bytes()) == ca_before
    assert renewed.paths.server_cert.read_bytes() != server_before
    assert renewed.server_not_after > first.server_not_after
    # A wider renewal window renews earlier; a narrower one does not.
    assert not ensure_certificates(
        tmp_path, now=later, renew_within=timedelta(days=1)
    ).issued_server
    assert ensure_certificates(tmp_path, now=later, renew_within=timedelta(days=400)).issued_server


def test_ensure_force_replaces_ca(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, now=NOW)
    before = snapshot(first.paths)
    forced = ensure_certificates(tmp_path, now=NOW, force=True)
    assert forced.created_ca and forced.issued_server
    after = snapshot(forced.paths)
    assert all(after[p][0] != before[p][0] for p in before)


def test_ensure_reissues_server_not_signed_by_current_ca(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, now=NOW).paths
    stranger = make_server_certificate(make_ca(NOW), NOW)
    paths.server_cert.write_bytes(stranger.cert_pem)
    paths.server_key.write_bytes(stranger.key_pem)
    ca_before = paths.ca_cert.read_bytes()
    result = ensure_certificates(tmp_path, now=NOW)
    assert result.issued_server and not result.created_ca
    assert paths.ca_cert.read_bytes() == ca_before
    ca = KeyPair(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes())
    verifier(ca).verify(load(paths.server_cert.read_bytes()), [])


def test_ensure_reissues_when_ca_changed(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, now=NOW).paths
    paths.ca_key.unlink()
    server_before = paths.server_cert.read_bytes()
    result = ensure_certificates(tmp_path, now=NOW)
    assert result.created_ca and result.issued_server
    assert paths.server_cert.read_bytes() != server_before


def test_ensure_reissues_mismatched_or_garbage_server_key(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, now=NOW).paths
    paths.server_key.write_bytes(b"not a key")
    assert ensure_certificates(tmp_path, now=NOW).issued_server
    other = make_server_certificate(
        KeyPair(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes()), NOW
    )
    paths.server_key.write_bytes(other.key_pem)
    assert ensure_certificates(tmp_path, now=NOW).issued_server


def test_ensure_keeps_existing_directory_mode(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir(mode=0o755)
    os.chmod(config, 0o755)
    ensure_certificates(config, now=NOW)
    assert mode(config) == 0o755


def test_ensure_chowns_to_owner(tmp_path: Path) -> None:
    owner = (os.getuid(), os.getgid())
    result = ensure_certificates(tmp_path / "c", now=NOW, owner=owner)
    for p in (tmp_path / "c", *snapshot(result.paths)):
        assert (p.stat().st_uid, p.stat().st_gid) == owner


def test_atomic_write_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "f"
    certs.write_atomically(target, b"one", 0o600)
    certs.write_atomically(target, b"two", 0o644)
    assert target.read_bytes() == b"two" and mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
