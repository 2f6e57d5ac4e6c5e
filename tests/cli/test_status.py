"""``cmm status``: reading the pid/state files, the report's wording, and the real probes (in a child)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError as TxConnectionRefused
from twisted.web._newclient import ResponseNeverReceived
from twisted.python.failure import Failure

from cmm.cli import status

from cmm.machine import certs, hosts
from cmm.testing.checkout import REPO, checkout_env
from cmm.testing.processes import free_port
from cmm.cli.processes import is_cmm_process
from cmm.cli.status import (
    CertInfo,
    HostsInfo,
    Instance,
    MappingInfo,
    Probe,
    RouteCounts,
    RunningState,
    StatusReport,
    TrustInfo,
)
from support import done

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
STATE = {
    "pid": 4242,
    "started": "2026-03-01T09:55:00Z",
    "port": 443,
    "listen": ["127.0.0.1", "::1"],
    "workers": 2,
    "mappings": [{"source": "claude-haiku-4-5", "target": "gemini-2.5-flash", "url": "http://localhost:8317/v1/messages"}],
    "hosts_file": "/etc/hosts",
    "config_dir": "/home/me/.cmm",
}


# --- the state file ------------------------------------------------------------------------------


def test_parse_state_reads_what_the_service_writes() -> None:
    state = status.parse_state(json.dumps(STATE))
    assert state == RunningState(
        pid=4242,
        started=datetime(2026, 3, 1, 9, 55, tzinfo=timezone.utc),
        port=443,
        listen=("127.0.0.1", "::1"),
        mappings=(MappingInfo("claude-haiku-4-5", "gemini-2.5-flash", "http://localhost:8317/v1/messages"),),
        hosts_file=Path("/etc/hosts"),
        config_dir=Path("/home/me/.cmm"),
    )


def test_parse_state_tolerates_missing_and_odd_fields() -> None:
    state = status.parse_state('{"pid": 7, "started": "not a time", "port": true, "hosts_file": null}')
    assert state == RunningState(7, None, None, (), (), None, None)
    naive = status.parse_state('{"pid": 7, "started": "2026-03-01T09:55:00"}')
    assert naive.started is not None and naive.started.tzinfo is not None  # taken as local time


@pytest.mark.parametrize("text", ["", "[]", '{"pid": "7"}', '{"pid": true}', "{half"])
def test_parse_state_refuses_junk(text: str) -> None:
    with pytest.raises(ValueError):
        status.parse_state(text)


def test_find_instance_without_files(tmp_path: Path) -> None:
    assert status.find_instance(tmp_path) == Instance(False, note=f"no pid file in {tmp_path}")


def test_find_instance_running_from_state(tmp_path: Path) -> None:
    (tmp_path / "cmm.state.json").write_text(json.dumps(STATE))
    found = status.find_instance(tmp_path, is_alive=lambda pid: pid == 4242, started_at=lambda pid: 0.0,
                                 is_cmm=lambda pid: pid == 4242)
    assert found.running and found.pid == 4242 and found.state is not None and found.state.port == 443


def test_find_instance_dead_pid_is_not_running(tmp_path: Path) -> None:
    (tmp_path / "cmm.state.json").write_text(json.dumps(STATE))
    found = status.find_instance(tmp_path, is_alive=lambda pid: False, started_at=lambda pid: None)
    assert not found.running and found.pid == 4242 and "gone" in found.note


def test_find_instance_reused_pid_is_not_running(tmp_path: Path) -> None:
    (tmp_path / "cmm.pid").write_text("4242\n")
    found = status.find_instance(tmp_path, is_alive=lambda pid: True, started_at=lambda pid: time.time() + 60)
    assert not found.running and "another process" in found.note


def test_find_instance_pid_file_only(tmp_path: Path) -> None:
    (tmp_path / "cmm.pid").write_text("4242\n")
    (tmp_path / "cmm.state.json").write_text("{half")
    found = status.find_instance(tmp_path, is_alive=lambda pid: True, started_at=lambda pid: None,
                                 is_cmm=lambda pid: True)
    assert found.running and found.state is None and "unreadable" in found.note


def test_find_instance_with_this_process(tmp_path: Path) -> None:
    """The real process table: this test's own pid runs, started before the file was written, and
    counts as cmm only for a predicate that says so (pytest is not cmm)."""
    (tmp_path / "cmm.pid").write_text(f"{os.getpid()}\n")
    assert status.find_instance(tmp_path, is_cmm=lambda pid: pid == os.getpid()).running
    found = status.find_instance(tmp_path)
    assert not found.running and "another process" in found.note


def test_find_instance_does_not_read_through_links(tmp_path: Path) -> None:
    """A pid file that is a link to a file naming a live cmm is no pid file at all."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("4242\n")
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "cmm.pid").symlink_to(elsewhere)
    found = status.find_instance(folder, is_alive=lambda pid: True, started_at=lambda pid: None,
                                 is_cmm=lambda pid: True)
    assert not found.running and found.pid is None


# --- files -------------------------------------------------------------------------------------


def test_read_hosts(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    assert status.read_hosts(None) == HostsInfo(None, None)
    assert status.read_hosts(path) == HostsInfo(path, False, "missing")
    path.write_text("127.0.0.1 localhost\n")
    assert status.read_hosts(path) == HostsInfo(path, False)
    path.write_text(hosts.add_block("127.0.0.1 localhost\n"))
    assert status.read_hosts(path) == HostsInfo(path, True)


def test_read_certificate(tmp_path: Path) -> None:
    assert status.read_certificate(tmp_path).problem == "missing"
    result = certs.ensure_certificates(tmp_path, now=NOW)
    assert status.read_certificate(tmp_path) == CertInfo(result.paths.server_cert, result.server_not_after)
    result.paths.server_cert.write_text("junk")
    assert status.read_certificate(tmp_path).problem == "not a PEM certificate"


def test_settings_and_configured_mappings(tmp_path: Path) -> None:
    assert status.read_settings(tmp_path)["PROXY_URL"] == "http://localhost:8317/v1/messages"
    assert status.configured_mappings(tmp_path, status.read_settings(tmp_path)) == ()
    (tmp_path / ".env").write_text("DEFAULT_SOURCE_MODEL=claude-haiku-4-5\nDEFAULT_TARGET_MODEL=g\nPROXY_URL=http://h:1/m\n")
    assert status.configured_mappings(tmp_path, status.read_settings(tmp_path)) == (
        MappingInfo("claude-haiku-4-5", "g", "http://h:1/m"),)
    (tmp_path / "mappings.toml").write_text('[[mapping]]\nsource = "a"\ntarget = "b"\n\n'
                                            '[[mapping]]\nsource = "c"\ntarget = "d"\nurl = "http://other:2/m"\n')
    assert status.configured_mappings(tmp_path, status.read_settings(tmp_path)) == (
        MappingInfo("a", "b", "http://h:1/m"), MappingInfo("c", "d", "http://other:2/m"),
        MappingInfo("claude-haiku-4-5", "g", "http://h:1/m"))  # the .env pair still applies
    (tmp_path / "mappings.toml").write_text('[[mapping]]\nsource = "claude-haiku-4-5"\ntarget = "x"\n')
    assert status.configured_mappings(tmp_path, status.read_settings(tmp_path)) == (
        MappingInfo("claude-haiku-4-5", "x", "http://h:1/m"),)  # the file wins for the same source
    (tmp_path / "mappings.toml").write_text("[[mapping]]\nsource = 1\n")
    assert status.configured_mappings(tmp_path, status.read_settings(tmp_path))[0].source == "claude-haiku-4-5"


def test_target_urls() -> None:
    configured = (MappingInfo("a", "b", "http://x/m"), MappingInfo("c", "d", "http://x/m"))
    assert status.target_urls(Instance(False), configured, "http://p/m") == ("http://x/m",)
    assert status.target_urls(Instance(False), (), "http://p/m") == ("http://p/m",)


def test_parse_live() -> None:
    data = {"routes": {"passthrough": {"requests": 5, "errors": {"502": 2, "-": 1}, "p50_ms": 12.5, "p99_ms": None},
                       "claude-haiku-4-5* → g": {"requests": 1, "errors": {}}}, "workers": {}}
    assert status.parse_live(data) == (RouteCounts("passthrough", 5, 3, 12.5, None, (("502", 2), ("-", 1))),
                                       RouteCounts("claude-haiku-4-5* → g", 1, 0))
    assert status.parse_live(None) == () and status.parse_live({"routes": []}) == ()


# --- formatting ------------------------------------------------------------------------------------


def report(**changes: Any) -> StatusReport:
    base = StatusReport(
        config_dir=Path("/home/me/.cmm"),
        now=NOW,
        instance=Instance(True, 4242, status.parse_state(json.dumps(STATE))),
        configured=(),
        hosts=HostsInfo(Path("/etc/hosts"), True),
        certificate=CertInfo(Path("/home/me/.cmm/server.crt"), NOW + timedelta(days=200)),
        trust=TrustInfo(True, "NODE_EXTRA_CA_CERTS → cmm's CA in ~/.bashrc"),
        targets=(Probe("http://localhost:8317/v1/messages", True, "HTTP 404"),),
        routes=(RouteCounts("passthrough", 3, 1, 24.0, 80.5),),
    )
    return attrs.evolve(base, **changes)


def test_format_running() -> None:
    text = status.format_report(report())
    assert text.splitlines() == [
        "cmm is running (pid 4242, up 2h 5m)",
        "  listening    127.0.0.1:443, [::1]:443",
        "  mapping      claude-haiku-4-5* → gemini-2.5-flash via http://localhost:8317/v1/messages",
        "  requests     passthrough: 3 (1 failed), p50 24 ms, p99 80.5 ms",
        "  target       http://localhost:8317/v1/messages answers (HTTP 404)",
        "  hosts        /etc/hosts points api.anthropic.com at cmm",
        "  certificate  valid until 2026-09-17 (200 days left)",
        "  trust        NODE_EXTRA_CA_CERTS → cmm's CA in ~/.bashrc",
        "  config       /home/me/.cmm",
    ]
    assert "⚠" not in text
    assert status.exit_code(report()) == 0


def test_format_not_running_with_stale_block_and_problems() -> None:
    text = status.format_report(report(
        instance=Instance(False, 4242, None, "pid 4242 from a previous run is gone"),
        configured=(MappingInfo("claude-haiku-4-5", "g", "http://localhost:8317/v1/messages"),),
        targets=(Probe("http://localhost:8317/v1/messages", False, "connection refused"),),
        certificate=CertInfo(Path("/c/server.crt"), NOW + timedelta(days=12, hours=1)),
        trust=TrustInfo(False, "no shell profile sets NODE_EXTRA_CA_CERTS to cmm's CA", "cmm setup"),
        routes=None,
    ))
    assert text.startswith("cmm is not running (pid 4242 from a previous run is gone)\n")
    assert "claude-haiku-4-5* → g via http://localhost:8317/v1/messages (configured, for the next start)" in text
    assert "⚠ http://localhost:8317/v1/messages does not answer (connection refused)" in text
    assert "⚠ /etc/hosts still points api.anthropic.com at 127.0.0.1 (left by a killed run): `sudo cmm stop`" in text
    assert "⚠ expires on 2026-03-13 (12 days left): run `cmm setup`" in text
    assert "⚠ no shell profile sets NODE_EXTRA_CA_CERTS to cmm's CA: cmm setup" in text
    assert "requests" not in text
    assert status.exit_code(report(instance=Instance(False))) == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"hosts": HostsInfo(None, None)}, "left alone (--no-hosts)"),
        ({"hosts": HostsInfo(Path("/etc/hosts"), False)}, "⚠ /etc/hosts has no cmm block"),
        ({"hosts": HostsInfo(Path("/etc/hosts"), None, "unreadable (Permission denied)")},
         "⚠ /etc/hosts is unreadable"),
        ({"certificate": CertInfo(Path("/c/server.crt"), NOW - timedelta(days=1))}, "⚠ expired on 2026-02-28"),
        ({"certificate": CertInfo(Path("/c/server.crt"), None, "missing")}, "⚠ /c/server.crt missing: run `cmm setup`"),
        ({"trust": None}, "config"),
        ({"routes": ()}, "requests     none since start"),
        ({"instance": Instance(True, 9, None, "")}, "⚠ no state file: port and mappings unknown"),
        ({"instance": Instance(False)}, "mapping      none configured: `cmm map add SOURCE TARGET`"),
    ],
)
def test_format_variants(changes: dict[str, Any], needle: str) -> None:
    assert needle in status.format_report(report(**changes))


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59, "59s"), (61, "1m 1s"), (3600 * 5 + 60, "5h 1m"),
                                                (86400 * 3 + 7200, "3d 2h"), (-5, "0s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert status.format_duration(seconds) == text


# --- collecting with injected collaborators ------------------------------------------------------


def test_collect_running(tmp_path: Path) -> None:
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts.add_block(""))
    state = status.parse_state(json.dumps({**STATE, "hosts_file": str(hosts_file), "config_dir": str(tmp_path),
                                           "mappings": [{"source": "a", "target": "b", "url": "http://t1/m"},
                                                        {"source": "c", "target": "d", "url": "http://t1/m"},
                                                        {"source": "e", "target": "f", "url": "http://t2/m"}]}))
    probed: list[str] = []
    asked: list[Path] = []

    async def probe(url: str) -> Probe:
        probed.append(url)
        return Probe(url, url.endswith("t1/m"), "x")

    async def live(path: Path) -> object:
        asked.append(path)
        return {"routes": {"passthrough": {"requests": 2, "errors": {}}}}

    found = done(status.collect(
        tmp_path, probe=probe, live=live, now=NOW, find=lambda d: Instance(True, 4242, state),
        trust=lambda d, e: TrustInfo(True, "fine"), hosts_file=tmp_path / "unused",
    ))
    assert probed == ["http://t1/m", "http://t2/m"]  # each target once
    assert asked == [tmp_path / "cmm.sock"]
    assert found.hosts == HostsInfo(hosts_file, True)
    assert found.routes == (RouteCounts("passthrough", 2, 0),)
    assert found.certificate.problem == "missing"
    assert [p.answers for p in found.targets] == [True, False]


def test_collect_not_running_probes_proxy_url(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PROXY_URL=http://127.0.0.1:9/v1/messages\n")

    async def probe(url: str) -> Probe:
        return Probe(url, False, "connection refused")

    async def live(path: Path) -> object:
        raise AssertionError("no live counters when nothing runs")

    found = done(status.collect(tmp_path, probe=probe, live=live, now=NOW, find=lambda d: Instance(False),
                                trust=lambda d, e: None, hosts_file=tmp_path / "hosts"))
    assert found.targets == (Probe("http://127.0.0.1:9/v1/messages", False, "connection refused"),)
    assert found.routes is None and found.trust is None
    assert found.hosts == HostsInfo(tmp_path / "hosts", False, "missing")


def test_explain() -> None:
    from OpenSSL import SSL

    refused = Failure(TxConnectionRefused())
    assert status.explain(refused) == "connection refused"
    assert status.explain(ResponseNeverReceived([refused])) == "connection refused"
    assert status.explain(defer.CancelledError(), 3) == "no answer within 3 s"
    tls = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert status.explain(tls) == "TLS failed: certificate verify failed"
    assert status.explain(ValueError("odd")) == "ValueError: odd"


# --- the real command, in a child process (the test process keeps no reactor) ---------------------


def cmm(args: list[str], home: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**checkout_env(), "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("NODE_EXTRA_CA_CERTS", None)
    return subprocess.run([sys.executable, "-c", "import sys, cmm.cli.main; sys.exit(cmm.cli.main.main())", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


@pytest.fixture
def fake_target(tmp_path: Path) -> Any:
    out = (tmp_path / "target.out").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "cmm.testing.fakes", "target", "--port", "0"], stdout=out,
                               stderr=subprocess.STDOUT, env=checkout_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in (tmp_path / "target.out").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "target.out").read_text()
            time.sleep(0.05)
        port = int((tmp_path / "target.out").read_text().split("listening on")[1].split()[0])
        yield process, port
    finally:
        process.terminate()
        process.wait(10)
        out.close()


def test_status_command_running(tmp_path: Path, fake_target: Any, request: pytest.FixtureRequest) -> None:
    """A state file naming a live process whose command line is cmm's (a sleeping stand-in: the real
    twistd runs in test_selftest), with its targets probed for real."""
    _, port = fake_target
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # stands in for twistd", "cmm"])
    request.addfinalizer(lambda: (process.kill(), process.wait()))
    deadline = time.monotonic() + 10
    while not is_cmm_process(process.pid):  # until it has exec'd
        assert time.monotonic() < deadline
        time.sleep(0.01)
    closed = free_port()
    config = tmp_path / "cfg"
    config.mkdir()
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(hosts.add_block("127.0.0.1 localhost\n"))
    state = {**STATE, "pid": process.pid, "started": datetime.now(timezone.utc).isoformat(), "port": 4443,
             "listen": ["127.0.0.1"], "hosts_file": str(hosts_file), "config_dir": str(config),
             "mappings": [{"source": "claude-haiku-4-5", "target": "g", "url": f"http://127.0.0.1:{port}/v1/messages"},
                          {"source": "claude-sonnet", "target": "h", "url": f"http://127.0.0.1:{closed}/v1/messages"}]}
    (config / "cmm.state.json").write_text(json.dumps(state))
    result = cmm(["status", "--config-dir", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"cmm is running (pid {process.pid}, up ")
    assert f"  target       http://127.0.0.1:{port}/v1/messages answers (HTTP 404)" in lines
    assert (f"  target       ⚠ http://127.0.0.1:{closed}/v1/messages does not answer (connection refused): "
            "start the target server or fix PROXY_URL") in lines
    assert f"  hosts        {hosts_file} points api.anthropic.com at cmm" in lines
    assert "  listening    127.0.0.1:4443" in lines


def test_status_command_not_running(tmp_path: Path) -> None:
    closed = free_port()
    (tmp_path / ".env").write_text(f"PROXY_URL=http://127.0.0.1:{closed}/v1/messages\n")
    result = cmm(["status", "--config-dir", str(tmp_path), "--hosts-file", str(tmp_path / "hosts")], tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith(f"cmm is not running (no pid file in {tmp_path})\n")
    assert "does not answer (connection refused)" in result.stdout
    assert "⚠ " + str(tmp_path / "server.crt") + " missing: run `cmm setup`" in result.stdout


def test_live_status_names_errors_bytes_and_workers() -> None:
    from cmm.cli.status import _route_line, _worker_line, parse_live, parse_workers

    data = {
        "routes": {"claude-haiku-4-5* → gemini-2.5-flash": {"requests": 7, "errors": {"502": 2, "-": 1},
                                                            "bytes_in": 12345, "bytes_out": 2_500_000,
                                                            "p50_ms": 12.0, "p99_ms": 80.5}},
        "workers": {"worker-2": {"requests": 3, "connections": 1, "in_flight": 1, "upstream_idle": 2,
                                 "upstream_opened": 4}, "worker-1": {"requests": 4}, "junk": 5},
    }
    [route] = parse_live(data)
    assert _route_line(route) == ("claude-haiku-4-5* → gemini-2.5-flash: 7 (3 failed: 502×2, -×1), ↑12.3 KB ↓2.5 MB, "
                                  "p50 12 ms, p99 80.5 ms")
    first, second = parse_workers(data)
    assert _worker_line(first) == "worker-1: 4 requests"
    assert _worker_line(second) == ("worker-2: 3 requests, 1 connections, 1 in flight, "
                                    "2 idle upstream connections (4 opened)")


def test_open_tunnels_are_shown_per_worker() -> None:
    from cmm.cli.status import _worker_line, parse_workers

    data = {"workers": {"worker-1": {"requests": 2, "connections": 3, "in_flight": 0, "tunnels": 2}}}
    [worker] = parse_workers(data)
    assert worker.tunnels == 2
    assert _worker_line(worker) == "worker-1: 2 requests, 3 connections, 0 in flight, 2 open tunnels"
