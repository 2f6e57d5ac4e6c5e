"""The CA and server certificate: exact extensions, real chain verification, renewal rules."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import DNSName
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cmm.machine import certs
from cmm.machine.certs import (
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
    assert nc.value.excluded_subtrees == [
        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
        x509.IPAddress(ipaddress.ip_network("::/0")),
    ]
    assert certs.has_cmm_constraint(cert)
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


def test_ip_sans_are_refused_under_cmm_ca(ca: KeyPair) -> None:
    pair = make_server_certificate(
        ca, NOW, hostnames=("api.anthropic.com",), ip_addresses=("127.0.0.1", "::1")
    )
    san = load(pair.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    # Every name in a leaf must satisfy the CA's constraint: an excluded IP spoils the DNS name too.
    with pytest.raises(VerificationError, match="excluded"):
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


def forge_leaf(ca: KeyPair, hostname: str | None = None, ip: str | None = None) -> x509.Certificate:
    """What an attacker holding the CA key could sign, bypassing make_server_certificate.

    An IP-only leaf has no common name: OpenSSL would check a hostname-like one against the DNS
    constraint, and a forger would not help it along.
    """
    ca_cert = load(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    if ip is None:
        subject = x509.NameAttribute(NameOID.COMMON_NAME, hostname or "")
        san: x509.GeneralName = DNSName(hostname or "")
    else:
        subject = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forger")
        san = x509.IPAddress(ipaddress.ip_address(ip))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([subject]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
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


#: The name constraint of a CA made before IP addresses were excluded.
OLD_CA_OPTIONS = {"excluded_networks": ()}
FORGED_IPS = ("10.0.0.1", "127.0.0.1", "::1", "2001:db8::1")


def ip_verifier(ca: KeyPair, ip: str):
    store = Store([load(ca.cert_pem)])
    return PolicyBuilder().store(store).time(NOW).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address(ip))
    )


@pytest.mark.parametrize("ip", FORGED_IPS)
def test_ca_key_cannot_mint_ip_certificates(ca: KeyPair, ip: str) -> None:
    with pytest.raises(VerificationError, match="excluded name constraint"):
        ip_verifier(ca, ip).verify(forge_leaf(ca, ip=ip), [])
    # An older CA's key could: the exclusion is what stops the forgery.
    old = make_ca(NOW, **OLD_CA_OPTIONS)
    ip_verifier(old, ip).verify(forge_leaf(old, ip=ip), [])


def openssl_verify_ip(tmp_path: Path, ca: KeyPair, leaf: x509.Certificate, ip: str) -> subprocess.CompletedProcess:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command (the same forgery is checked with cryptography's verifier)")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    argv = [openssl, "verify", "-attime", str(int(NOW.timestamp())), "-CAfile", str(tmp_path / "ca.pem"),
            "-verify_ip", ip, str(tmp_path / "leaf.pem")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("ip", ["10.0.0.1", "::1"])
def test_openssl_refuses_ip_certificates_from_ca_key(tmp_path: Path, ca: KeyPair, ip: str) -> None:
    refused = openssl_verify_ip(tmp_path, ca, forge_leaf(ca, ip=ip), ip)
    assert refused.returncode != 0 and "excluded subtree violation" in refused.stdout + refused.stderr
    old = make_ca(NOW, **OLD_CA_OPTIONS)
    accepted = openssl_verify_ip(tmp_path, old, forge_leaf(old, ip=ip), ip)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def constraint_ca(constraints: x509.NameConstraints | None, critical: bool = True) -> x509.Certificate:
    """A CA with exactly ``constraints``, for what make_ca cannot make."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cmm local CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=critical)
    return builder.sign(key, hashes.SHA256())


ANY_V4 = x509.IPAddress(ipaddress.ip_network("0.0.0.0/0"))
ANY_V6 = x509.IPAddress(ipaddress.ip_network("::/0"))
API = DNSName("api.anthropic.com")


def test_has_cmm_constraint_wants_exactly_cmms_subtrees() -> None:
    exact = x509.NameConstraints([API], [ANY_V4, ANY_V6])
    assert certs.has_cmm_constraint(constraint_ca(exact))
    assert certs.has_cmm_constraint(constraint_ca(x509.NameConstraints([API], [ANY_V6, ANY_V4])))
    refused = [
        constraint_ca(exact, critical=False),
        constraint_ca(None),
        constraint_ca(x509.NameConstraints([API], None)),  # an older cmm's CA
        constraint_ca(x509.NameConstraints([API], [ANY_V4])),  # IPv6 open
        constraint_ca(x509.NameConstraints([API], [ANY_V4, ANY_V6, DNSName("x.example")])),
        constraint_ca(x509.NameConstraints([API, DNSName("example.com")], [ANY_V4, ANY_V6])),
        constraint_ca(x509.NameConstraints([API, API], [ANY_V4, ANY_V6])),
        constraint_ca(x509.NameConstraints([DNSName("anthropic.com")], [ANY_V4, ANY_V6])),
        constraint_ca(x509.NameConstraints([API, ANY_V4], [ANY_V4, ANY_V6])),
        constraint_ca(x509.NameConstraints([API], [x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")), ANY_V6])),
        load(make_ca(NOW, permitted_names=None).cert_pem),
        load(make_ca(NOW, **OLD_CA_OPTIONS).cert_pem),
    ]
    assert [certs.has_cmm_constraint(cert) for cert in refused] == [False] * len(refused)


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


def test_a_ca_certificate_with_a_non_ec_key_is_refused_as_not_matching() -> None:
    """An Ed25519 CA certificate has no public numbers to compare: a clear ValueError, not an
    AttributeError from deep in the comparison."""
    ed_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not cmm's CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ed_key.public_key())
            .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1))
            .sign(ed_key, None))
    with pytest.raises(ValueError, match="does not belong to the CA certificate"):
        make_server_certificate(
            KeyPair(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=make_ca(NOW).key_pem), NOW)


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


def write_old_ca(directory: Path) -> KeyPair:
    old = make_ca(NOW, **OLD_CA_OPTIONS)
    paths = certificate_paths(directory)
    directory.mkdir(exist_ok=True)
    paths.ca_cert.write_bytes(old.cert_pem)
    paths.ca_key.write_bytes(old.key_pem)
    return old


def test_ensure_refuses_a_ca_without_cmms_constraint(tmp_path: Path) -> None:
    old = write_old_ca(tmp_path)
    with pytest.raises(certs.CertificateError, match=r"cmm setup --force") as refused:
        ensure_certificates(tmp_path, now=NOW)
    assert str(tmp_path / "ca.crt") in str(refused.value)
    # Nothing was signed with it, and it was left for the user to replace knowingly.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]
    assert (tmp_path / "ca.crt").read_bytes() == old.cert_pem
    replaced = ensure_certificates(tmp_path, now=NOW, force=True)
    assert replaced.created_ca and certs.has_cmm_constraint(load(replaced.paths.ca_cert.read_bytes()))


def test_ensure_replaces_an_expired_old_ca(tmp_path: Path) -> None:
    write_old_ca(tmp_path)
    result = ensure_certificates(tmp_path, now=NOW + timedelta(days=3651))
    assert result.created_ca and certs.has_cmm_constraint(load(result.paths.ca_cert.read_bytes()))


def test_ensure_returns_what_it_wrote(tmp_path: Path) -> None:
    result = ensure_certificates(tmp_path, now=NOW)
    assert result.server == KeyPair(result.paths.server_cert.read_bytes(), result.paths.server_key.read_bytes())


def test_ensure_refuses_a_linked_config_dir(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / ".cmm").symlink_to(real)
    with pytest.raises(certs.CertificateError, match="symbolic link"):
        ensure_certificates(tmp_path / ".cmm", now=NOW)
    assert list(real.iterdir()) == []


def test_ensure_does_not_follow_a_linked_file(tmp_path: Path) -> None:
    config = tmp_path / ".cmm"
    paths = ensure_certificates(config, now=NOW).paths
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    paths.ca_key.unlink()
    paths.ca_key.symlink_to(victim)
    with pytest.raises(certs.CertificateError, match="ca.key is a symbolic link"):
        ensure_certificates(config, now=NOW, owner=(4242, 4242))
    assert victim.read_bytes() == b"someone else's file"
    assert (victim.stat().st_uid, victim.stat().st_gid) == (os.getuid(), os.getgid())


def test_ensure_refuses_a_fifo(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, now=NOW).paths
    paths.server_cert.unlink()
    os.mkfifo(paths.server_cert)
    with pytest.raises(certs.CertificateError, match="not a regular file"):
        ensure_certificates(tmp_path, now=NOW)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_ensure_hands_files_over_but_not_hard_linked_ones(tmp_path: Path) -> None:
    config = tmp_path / ".cmm"
    paths = ensure_certificates(config, now=NOW).paths
    victim = tmp_path / "victim"
    os.link(paths.server_cert, victim)  # a root-owned file elsewhere, same content
    result = ensure_certificates(config, now=NOW, owner=(4242, 4343))
    assert not result.created_ca and not result.issued_server
    for p in (config, paths.ca_cert, paths.ca_key, paths.server_key):
        assert (p.stat().st_uid, p.stat().st_gid) == (4242, 4343)
    assert victim.stat().st_uid == os.getuid()


def test_atomic_write_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "f"
    certs.write_atomically(target, b"one", 0o600)
    certs.write_atomically(target, b"two", 0o644)
    assert target.read_bytes() == b"two" and mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_replaces_a_link_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "d").mkdir()
    link = tmp_path / "d" / "f"
    link.symlink_to(victim)
    certs.write_atomically(link, b"new", 0o600)
    assert victim.read_bytes() == b"keep"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_twistd_refuses_to_start_with_an_old_ca(tmp_path: Path) -> None:
    import socket

    from cmm.testing.checkout import twistd_command
    from support import process_env

    old = write_old_ca(tmp_path)
    with socket.socket() as probe:  # a free loopback port, should the refusal come too late
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--no-hosts", "--config-dir", str(tmp_path),
                           "--source", "claude-haiku-4-5", "--target", "other-model"])
    done = subprocess.run(argv, env=process_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "cmm setup --force" in done.stdout + done.stderr
    assert (tmp_path / "ca.crt").read_bytes() == old.cert_pem
    assert not (tmp_path / "server.crt").exists()


# --- the plan, without IO ----------------------------------------------------------------------


def written(plan: certs.CertificatePlan) -> dict[str, bytes]:
    return {write.name: write.data for write in plan.writes}


def test_plan_for_an_empty_folder_writes_all_four_keys_first() -> None:
    plan = certs.plan_certificates({}, NOW)
    assert [(w.name, w.mode) for w in plan.writes] == [
        ("ca.key", certs.KEY_MODE), ("ca.crt", certs.CERT_MODE),
        ("server.key", certs.KEY_MODE), ("server.crt", certs.CERT_MODE),
    ]
    assert plan.created_ca and plan.issued_server
    files = written(plan)
    assert plan.server == KeyPair(files["server.crt"], files["server.key"])
    assert certs.has_cmm_constraint(load(files["ca.crt"]))
    verifier(KeyPair(files["ca.crt"], files["ca.key"])).verify(load(files["server.crt"]), [])
    assert plan.server_not_after == load(files["server.crt"]).not_valid_after_utc


def test_plan_of_its_own_result_writes_nothing() -> None:
    files = written(certs.plan_certificates({}, NOW))
    again = certs.plan_certificates(files, NOW + timedelta(days=1))
    assert again.writes == () and not again.created_ca and not again.issued_server
    assert again.server == KeyPair(files["server.crt"], files["server.key"])


def test_plan_renews_an_expiring_server_only() -> None:
    files = written(certs.plan_certificates({}, NOW))
    later = load(files["server.crt"]).not_valid_after_utc - timedelta(days=10)
    plan = certs.plan_certificates(files, later)
    assert [w.name for w in plan.writes] == ["server.key", "server.crt"]
    assert plan.issued_server and not plan.created_ca
    verifier(KeyPair(files["ca.crt"], files["ca.key"]), at=later).verify(load(written(plan)["server.crt"]), [])


def test_plan_treats_half_a_pair_as_missing() -> None:
    files = written(certs.plan_certificates({}, NOW))
    del files["ca.key"]
    plan = certs.plan_certificates(files, NOW)
    assert plan.created_ca and written(plan)["ca.crt"] != files["ca.crt"]
    del files["server.crt"]
    files.update({"ca.key": b"garbage"})
    assert certs.plan_certificates(files, NOW).created_ca


def test_plan_force_replaces_everything() -> None:
    files = written(certs.plan_certificates({}, NOW))
    plan = certs.plan_certificates(files, NOW, force=True)
    assert [w.name for w in plan.writes] == ["ca.key", "ca.crt", "server.key", "server.crt"]
    assert all(files[w.name] != w.data for w in plan.writes)


def test_plan_refuses_a_ca_without_cmms_constraint_naming_the_folder() -> None:
    old = make_ca(NOW, **OLD_CA_OPTIONS)
    files = {"ca.crt": old.cert_pem, "ca.key": old.key_pem}
    with pytest.raises(certs.CertificateError, match=r"cmm setup --force") as refused:
        certs.plan_certificates(files, NOW, shown=Path("/home/me/.cmm"))
    assert "/home/me/.cmm/ca.crt" in str(refused.value)
    assert certs.plan_certificates(files, NOW, force=True).created_ca


def test_plan_takes_a_naive_time_as_utc() -> None:
    files = written(certs.plan_certificates({}, NOW))
    assert certs.plan_certificates(files, NOW.replace(tzinfo=None)).writes == ()
