"""``cmm doctor``: each check from observed values, the gathering, DNS against a real name server on loopback,
and the real probes and the whole command in a child."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
import pytest

from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor
from twisted.names import dns

from cmm.cli import doctor

from cmm.machine import certs, hosts
from cmm.testing.checkout import REPO, checkout_env
from cmm.cli.doctor import Check
from cmm.cli.status import HostsInfo, Instance, Probe, RunningState, TrustInfo
from support import done
from support import HOST, dns_server, queries_received, spin

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.ensure_certificates(directory, now=NOW)
    return directory


def running(port: int = 443, hosts_file: Path | None = Path("/etc/hosts")) -> Instance:
    return Instance(True, 4242, RunningState(4242, NOW, port, ("127.0.0.1", "::1"), (), hosts_file, None))


# --- certificates --------------------------------------------------------------------------------


def test_certificates_fine(pki: Path) -> None:
    check = doctor.check_certificates(doctor.read_cert_files(pki), NOW)
    assert check.ok is True and "396 days left" in check.detail


def test_certificates_missing(tmp_path: Path) -> None:
    check = doctor.check_certificates(doctor.read_cert_files(tmp_path), NOW)
    assert check == Check("certificates", False, f"missing in {tmp_path}: ca.crt, ca.key, server.crt, server.key",
                          "cmm setup")


def test_certificates_expiring_and_expired(pki: Path) -> None:
    files = doctor.read_cert_files(pki)
    soon = doctor.check_certificates(files, NOW + timedelta(days=380))
    assert soon.ok is False and "16 days left" in soon.detail and soon.fix.startswith("cmm setup")
    gone = doctor.check_certificates(files, NOW + timedelta(days=400))
    assert gone.ok is False and "expired" in gone.detail


def test_certificates_server_from_another_ca(pki: Path, tmp_path: Path) -> None:
    other = certs.make_server_certificate(certs.make_ca(NOW), NOW)
    files = attrs.evolve(doctor.read_cert_files(pki), server_cert=other.cert_pem, server_key=other.key_pem)
    check = doctor.check_certificates(files, NOW)
    assert check.ok is False and "not signed by ca.crt" in check.detail


def test_certificates_broken_ca(pki: Path) -> None:
    files = attrs.evolve(doctor.read_cert_files(pki), ca_key=certs.make_ca(NOW).key_pem)
    check = doctor.check_certificates(files, NOW)
    assert check.ok is False and "cmm setup --force" in check.fix


def test_certificates_loose_key_mode(pki: Path) -> None:
    files = attrs.evolve(doctor.read_cert_files(pki), key_modes={"ca.key": 0o100644, "server.key": 0o100600})
    check = doctor.check_certificates(files, NOW)
    assert check == Check("certificates", False, "private keys readable by others: ca.key",
                          f"chmod 600 {pki / 'ca.key'}")


def test_name_constraint(pki: Path) -> None:
    assert doctor.check_name_constraint((pki / "ca.crt").read_bytes()).ok is True
    open_ca = certs.make_ca(NOW, permitted_names=None)
    assert doctor.check_name_constraint(open_ca.cert_pem) == Check(
        "CA scope", False, "the CA may sign certificates for any site (no name constraint)",
        "cmm setup --force (a new, constrained CA; open a new terminal afterwards)")
    wide = certs.make_ca(NOW, permitted_names=("api.anthropic.com", "example.com"))
    assert doctor.check_name_constraint(wide.cert_pem).ok is False
    old = certs.make_ca(NOW, excluded_networks=())
    assert doctor.check_name_constraint(old.cert_pem) == Check(
        "CA scope", False,
        "the CA may sign certificates for IP addresses (made by an older cmm); cmm refuses to use it",
        "cmm setup --force (a new, constrained CA; open a new terminal afterwards)")
    v4_only = certs.make_ca(NOW, excluded_networks=("0.0.0.0/0",))
    assert doctor.check_name_constraint(v4_only.cert_pem).ok is False
    assert doctor.check_name_constraint(None).ok is None
    assert doctor.check_name_constraint(b"junk").ok is False


# --- NODE_EXTRA_CA_CERTS ---------------------------------------------------------------------------


def test_ca_variable(pki: Path, tmp_path: Path) -> None:
    ca = pki / "ca.crt"
    ca_pem = ca.read_bytes()
    unset = doctor.check_ca_variable({"SHELL": "/bin/bash"}, ca, ca_pem)
    assert unset.ok is False and unset.fix.startswith(f'export NODE_EXTRA_CA_CERTS="{ca}"')
    fish = doctor.check_ca_variable({"SHELL": "/usr/bin/fish"}, ca, ca_pem)
    assert fish.fix.startswith(f'set -gx NODE_EXTRA_CA_CERTS "{ca}"')
    assert doctor.check_ca_variable({"SUDO_USER": "me"}, ca, ca_pem).ok is None
    assert doctor.check_ca_variable({"NODE_EXTRA_CA_CERTS": str(ca)}, ca, ca_pem).ok is True
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(certs.make_ca(NOW).cert_pem + ca_pem)
    assert doctor.check_ca_variable({"NODE_EXTRA_CA_CERTS": str(bundle)}, ca, ca_pem).ok is True
    other = tmp_path / "other.pem"
    other.write_bytes(certs.make_ca(NOW).cert_pem)
    wrong = doctor.check_ca_variable({"NODE_EXTRA_CA_CERTS": str(other)}, ca, ca_pem)
    assert wrong.ok is False and "does not hold cmm's CA" in wrong.detail
    missing = doctor.check_ca_variable({"NODE_EXTRA_CA_CERTS": str(tmp_path / "nope")}, ca, ca_pem)
    assert missing.ok is False and "cannot be read" in missing.detail
    assert doctor.check_ca_variable({"NODE_EXTRA_CA_CERTS": str(ca)}, ca, None).ok is None


def test_trust_check_passes_the_summary_on() -> None:
    expected = Check("shell profiles", False, "no profile", "cmm setup")
    assert doctor.check_trust(TrustInfo(False, "no profile", "")) == expected
    assert doctor.check_trust(TrustInfo(True, "in ~/.zshrc")).ok is True


# --- port, hosts, DNS, settings, target ----------------------------------------------------------


def test_port() -> None:
    free = doctor.check_port(443, {"127.0.0.1": False, "::1": None}, Instance(False))
    assert free == Check("port 443", True, "free on 127.0.0.1 and ::1")
    held = doctor.check_port(443, {"127.0.0.1": True, "::1": True}, running())
    assert held == Check("port 443", True, "held by cmm (pid 4242)")
    other = doctor.check_port(443, {"127.0.0.1": True, "::1": True}, Instance(False), platform="linux")
    assert other.ok is False and other.detail == "another program listens on 127.0.0.1:443, [::1]:443"
    assert "ss -ltnp 'sport = :443'" in other.fix
    mac = doctor.check_port(443, {"127.0.0.1": True, "::1": False}, running(port=8443), platform="darwin")
    assert mac.ok is False and "lsof -nP -iTCP:443" in mac.fix


@pytest.mark.parametrize(
    ("info", "instance", "ok", "needle"),
    [
        (HostsInfo(Path("/etc/hosts"), True), running(), True, "points api.anthropic.com at cmm"),
        (HostsInfo(Path("/etc/hosts"), False), running(), False, "bypasses it"),
        (HostsInfo(Path("/etc/hosts"), True), Instance(False), False, "left by a killed run"),
        (HostsInfo(Path("/etc/hosts"), False), Instance(False), True, "no cmm block"),
        (HostsInfo(None, None), running(hosts_file=None), True, "--no-hosts"),
        (HostsInfo(Path("/etc/hosts"), None, "unreadable (Permission denied)"), Instance(False), False, "unreadable"),
    ],
)
def test_hosts(info: HostsInfo, instance: Instance, ok: bool, needle: str) -> None:
    check = doctor.check_hosts(info, instance)
    assert check.ok is ok and needle in check.detail
    if not ok and "killed" in check.detail:
        assert check.fix == "sudo cmm stop"


def test_dns_check_on_real_lookups(answering: int, silent: socket.socket) -> None:
    """What dns_lookup really returns (or raises), from a real name server on loopback, fed to the check."""
    reactor = SelectReactor()
    found = spin(reactor, defer.ensureDeferred(doctor.dns_lookup(reactor, (("127.0.0.1", answering),))))
    assert doctor.check_dns(found) == Check("DNS", True, "api.anthropic.com is at 160.79.104.10, 2607:6bc0::10")
    with dns_server({HOST: [dns.Record_A("127.0.0.1"), dns.Record_AAAA("::1")]}) as port:
        error = spin_error(reactor, defer.ensureDeferred(doctor.dns_lookup(reactor, (("127.0.0.1", port),))))
    looped = doctor.check_dns(error)
    assert looped.ok is False and looped.detail == "DNS gave no usable address for api.anthropic.com (only loopback answers)"
    down = spin_error(reactor, defer.ensureDeferred(doctor.dns_lookup(reactor, (silent.getsockname(),))), timeout=10)
    failed = doctor.check_dns(down)
    assert failed == Check("DNS", False,
                           "DNS gave no usable address for api.anthropic.com (no answer from the name servers)",
                           failed.fix)
    assert "--anthropic-ip" in failed.fix and "--dns-server" in failed.fix
    assert doctor.check_dns(["127.0.0.1", "::1"]).ok is False  # a lookup that let loopback through


def spin_error(reactor: SelectReactor, deferred: defer.Deferred, timeout: float = 5.0) -> BaseException:
    try:
        spin(reactor, deferred, timeout)
    except Exception as error:
        return error
    raise AssertionError("the lookup did not fail")


def test_settings(tmp_path: Path) -> None:
    assert doctor.check_settings({}, tmp_path / ".env") == Check("settings", True, "defaults (no .env yet)")
    bad = doctor.check_settings({"PROXY_URL": "localhost:8317", "OTHER": "x"}, tmp_path / ".env")
    assert bad.ok is False and "PROXY_URL must be an http:// or https:// URL" in bad.detail


def test_mappings(tmp_path: Path) -> None:
    assert doctor._mappings_check(tmp_path) == []
    (tmp_path / "mappings.toml").write_text('[[mapping]]\nsource = "a"\ntarget = "b"\n')
    assert doctor._mappings_check(tmp_path) == [Check("mappings", True, f"{tmp_path / 'mappings.toml'}: 1 mapping")]
    (tmp_path / "mappings.toml").write_text("[[mapping]]\nsource = 1\n")
    [broken] = doctor._mappings_check(tmp_path)
    assert broken.ok is False and "cmm map" in broken.fix


def test_target() -> None:
    assert doctor.check_target(Probe("http://h/m", True, "HTTP 404")).ok is True
    down = doctor.check_target(Probe("http://h/m", False, "connection refused"))
    assert down.ok is False and "cmm config set PROXY_URL" in down.fix


def test_format_and_exit_code() -> None:
    checks = [Check("a", True, "fine"), Check("bb", False, "broken", "do this"), Check("c", None, "not here")]
    assert doctor.format_checks(checks) == textwrap.dedent("""\
        ✓ a   fine
        ✗ bb  broken
              fix: do this
        – c   not here

        1 of 3 checks failed.
    """)
    assert doctor.exit_code(checks) == 1
    assert doctor.exit_code([checks[0], checks[2]]) == 0
    assert doctor.format_checks([checks[0]]).endswith("\nAll checks passed.\n")


# --- gathering -------------------------------------------------------------------------------------


def test_diagnose_with_fakes(pki: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.mkdir()
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        (config / name).write_bytes((pki / name).read_bytes())
        os.chmod(config / name, 0o600)
    (config / ".env").write_text("PROXY_URL=http://127.0.0.1:9/v1/messages\n")
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts.add_block("127.0.0.1 localhost\n"))
    asked: list[tuple[str, int]] = []

    async def connect(host: str, port: int) -> bool | None:
        asked.append((host, port))
        return host == "127.0.0.1"

    async def lookup() -> list[str]:
        raise LookupError("DNS gave no usable address for api.anthropic.com (DNSQueryTimeoutError)")

    async def probe(url: str) -> Probe:
        return Probe(url, False, "connection refused")

    checks = done(doctor.diagnose(
        config, connect=connect, lookup=lookup, probe=probe, hosts_file=hosts_file, port=8443, now=NOW,
        environ={"NODE_EXTRA_CA_CERTS": str(config / "ca.crt")}, find=lambda d: Instance(False),
        trust=lambda d, e: TrustInfo(True, "in ~/.bashrc"), platform="linux",
    ))
    assert asked == [("127.0.0.1", 8443), ("::1", 8443)]
    assert [(c.name, c.ok) for c in checks] == [
        ("certificates", True), ("CA scope", True), ("shell profiles", True), ("NODE_EXTRA_CA_CERTS", True),
        ("port 8443", False), ("hosts file", False), ("DNS", False), ("settings", True), ("target server", False),
    ]
    assert checks[5].fix == "sudo cmm stop"
    assert checks[8].detail == "http://127.0.0.1:9/v1/messages does not answer (connection refused)"


def test_diagnose_uses_the_running_instance(tmp_path: Path, answering: int) -> None:
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts.add_block(""))
    instance = running(hosts_file=hosts_file)
    reactor = SelectReactor()

    async def connect(host: str, port: int) -> bool | None:
        return True

    async def probe(url: str) -> Probe:
        return Probe(url, True, "HTTP 404")

    checks = spin(reactor, defer.ensureDeferred(doctor.diagnose(
        tmp_path, connect=connect, lookup=lambda: doctor.dns_lookup(reactor, (("127.0.0.1", answering),)),
        probe=probe, now=NOW, environ={}, find=lambda d: instance, trust=lambda d, e: None,
        hosts_file=tmp_path / "unused")))
    by_name = {c.name: c for c in checks}
    assert "shell profiles" not in by_name  # no trust information: no check
    assert by_name["port 443"].ok is True and by_name["hosts file"].ok is True
    assert by_name["DNS"] == Check("DNS", True, "api.anthropic.com is at 160.79.104.10, 2607:6bc0::10")


def test_real_probes_in_a_child(tmp_path: Path) -> None:
    """port_accepts and probe_target on the real reactor, against loopback sockets only."""
    script = textwrap.dedent("""
        import json, socket, sys
        from cmm.cli import doctor, status
        listening = socket.socket(); listening.bind(("127.0.0.1", 0)); listening.listen()
        closed = socket.socket(); closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        open_port, closed_port = listening.getsockname()[1], closed.getsockname()[1]

        async def work(reactor):
            return [await doctor.port_accepts(reactor, "127.0.0.1", open_port),
                    await doctor.port_accepts(reactor, "127.0.0.1", closed_port),
                    (await status.probe_target(f"http://127.0.0.1:{closed_port}/v1/messages", reactor=reactor)).detail,
                    (await status.probe_target(f"http://127.0.0.1:{open_port}/v1/messages", reactor=reactor,
                                               timeout=0.5)).detail]

        print(json.dumps(status.run_async(work)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=checkout_env(),
                            cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, False, "connection refused", "no answer within 0.5 s"]


def run_doctor(tmp_path: Path, dns_server: str) -> subprocess.CompletedProcess[str]:
    """The real ``cmm doctor`` in a child, HOME and config dir in tmp, DNS on loopback only."""
    script = "import sys; from cmm.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**checkout_env(), "HOME": str(tmp_path)}
    env.pop("NODE_EXTRA_CA_CERTS", None)
    env.pop("SUDO_USER", None)
    return subprocess.run([sys.executable, "-c", script, "doctor", "--config-dir", str(tmp_path / "cfg"), "--port", "1",
                           "--hosts-file", str(tmp_path / "hosts"), "--timeout", "0.5", "--dns-server", dns_server],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def test_doctor_command_runs_with_dns_down(tmp_path: Path, silent: socket.socket) -> None:
    host, port = silent.getsockname()
    result = run_doctor(tmp_path, f"{host}:{port}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Unhandled" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("✗ certificates") and "fix: cmm setup" in lines[1]
    assert any(line.startswith("✓ port 1 ") for line in lines)
    assert any(line.startswith("✗ NODE_EXTRA_CA_CERTS") for line in lines)
    dns_line = lines.index(next(line for line in lines if line.startswith("✗ DNS")))
    assert lines[dns_line].endswith("DNS gave no usable address for api.anthropic.com (no answer from the name servers)")
    assert "--anthropic-ip" in lines[dns_line + 1]
    assert lines[-1].endswith("checks failed.")
    assert len(queries_received(silent)) == 4  # A and AAAA, each tried twice: it was asked, and only there


def test_doctor_command_runs_with_dns_answering(tmp_path: Path, answering: int) -> None:
    result = run_doctor(tmp_path, f"127.0.0.1:{answering}")
    assert "Traceback" not in result.stderr, result.stderr
    assert any(line.startswith("✓ DNS") and line.endswith("api.anthropic.com is at 160.79.104.10, 2607:6bc0::10")
               for line in result.stdout.splitlines()), result.stdout


def test_doctor_refuses_a_bad_dns_server(tmp_path: Path) -> None:
    result = run_doctor(tmp_path, "ns.example")
    assert result.returncode == 2 and "--dns-server" in result.stderr and "is not an IP address" in result.stderr
    assert "Traceback" not in result.stderr
