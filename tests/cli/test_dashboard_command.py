"""``cmm dashboard``: whom it runs as, where it listens, what it prints; and as a real process,
that root under sudo gives up root before serving."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor

from cmm.cli import dashboard
from cmm.cli.context import Context
from cmm.cli.dashboard import RunAs, run_as
from cmm.cli.main import main
from support import process_env

SUDO = {"SUDO_USER": "me", "SUDO_UID": "1000", "SUDO_GID": "1001"}


@pytest.mark.parametrize("euid, environ, owner, expected", [
    (1000, {}, 1000, None),  # the user: nothing to change
    (1000, SUDO, 0, None),
    (0, SUDO, 0, RunAs(1000, 1001, "me")),  # sudo: the user who ran it, whoever owns the folder
    (0, {**SUDO, "SUDO_UID": "0", "SUDO_GID": "0"}, 0, None),  # sudo by root, root's own folder
    (0, {}, 0, None),  # root without sudo in root's own folder: root is the user
    (0, {}, None, None),  # no folder yet
    (0, {"SUDO_UID": "x"}, 0, None),
])
def test_whom_the_dashboard_runs_as(euid: int, environ: dict[str, str], owner: int | None,
                                    expected: RunAs | None) -> None:
    assert run_as(euid, environ, owner) == expected


def test_root_without_sudo_becomes_the_folder_s_owner() -> None:
    found = run_as(0, {}, 65534)
    assert found is not None and found.uid == 65534


@pytest.mark.parametrize("port, message", [("70000", "not a port number (0..65535)"), ("x", "'x' is not a port")])
def test_a_bad_port_is_refused(port: str, message: str) -> None:
    err = io.StringIO()
    assert main(["dashboard", "--port", port], environ={"HOME": "/nonexistent"}, stdout=io.StringIO(), stderr=err) == 2
    assert message in err.getvalue()


def _args(tmp_path: Path, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{"config_dir": tmp_path, "port": 8399, "no_browser": False, **changes})


def test_it_listens_on_loopback_only_prints_the_address_and_opens_it(tmp_path: Path) -> None:
    reactor, out, opened = MemoryReactor(), io.StringIO(), []
    ctx = Context(environ={"HOME": str(tmp_path)}, out=out, err=io.StringIO())
    assert dashboard.run(_args(tmp_path), ctx, reactor=reactor, open_browser=lambda url: opened.append(url) or True,
                         euid=lambda: 1000) == 0
    ((port, _, _, interface),) = reactor.tcpServers
    assert (port, interface) == (8399, "127.0.0.1") and reactor.hasRun
    url = re.search(r"http://127\.0\.0\.1:\d+/\?token=([\w-]+)", out.getvalue())
    assert url is not None and len(url.group(1)) >= 40
    assert opened == [url.group()]
    assert f"reading {tmp_path / 'usage.sqlite3'}" in out.getvalue()


def test_no_browser_and_a_browser_that_fails_only_print(tmp_path: Path) -> None:
    def broken(url: str) -> bool:
        raise RuntimeError("no display")

    for args, opener in ((_args(tmp_path, no_browser=True), broken), (_args(tmp_path), broken)):
        out = io.StringIO()
        ctx = Context(environ={}, out=out, err=io.StringIO())
        assert dashboard.run(args, ctx, reactor=MemoryReactor(), open_browser=opener, euid=lambda: 1000) == 0
        assert ("open the address above yourself" in out.getvalue()) is (not args.no_browser)


def test_under_sudo_it_becomes_the_user_before_listening(tmp_path: Path) -> None:
    became: list[RunAs] = []
    reactor = MemoryReactor()

    def become(user: RunAs) -> None:
        assert reactor.tcpServers == []
        became.append(user)

    ctx = Context(environ=SUDO, out=io.StringIO(), err=io.StringIO())
    assert dashboard.run(_args(tmp_path, no_browser=True), ctx, reactor=reactor, euid=lambda: 0, become=become) == 0
    assert became == [RunAs(1000, 1001, "me")] and "as me" in ctx.out.getvalue()  # type: ignore[attr-defined]


def test_a_failed_drop_stops_it(tmp_path: Path) -> None:
    def become(user: RunAs) -> None:
        raise PermissionError("setuid refused")

    reactor, err = MemoryReactor(), io.StringIO()
    ctx = Context(environ=SUDO, out=io.StringIO(), err=err)
    assert dashboard.run(_args(tmp_path), ctx, reactor=reactor, euid=lambda: 0, become=become) == 1
    assert "cannot run as me" in err.getvalue() and reactor.tcpServers == []


def _start(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-m", "cmm.cli.main", "dashboard", "--no-browser", *args],
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 15
    while not (found := re.search(r"http://127\.0\.0\.1:\d+/\?token=[\w-]+", log.read_text())):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(log.read_text())
        time.sleep(0.05)
    return child, found.group()


def test_a_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "cmm.cli.main", "dashboard", "--no-browser", "--config-dir",
                               str(tmp_path), "--port", str(port)], capture_output=True, text=True,
                              env=process_env(), timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port 0" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving up root can only be tested as root")
def test_under_sudo_the_real_process_serves_as_the_user(tmp_path: Path) -> None:
    nobody = {"SUDO_USER": "nobody", "SUDO_UID": "65534", "SUDO_GID": "65534"}
    child, url = _start(["--config-dir", str(tmp_path), "--port", "0"], process_env(**nobody), tmp_path / "out")
    try:
        status = Path(f"/proc/{child.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
        gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
        assert uids == ["65534"] * 4 and gids == ["65534"] * 4
        with urllib.request.urlopen(url.replace("/?", "/api/status?"), timeout=10) as answer:
            found = json.load(answer)
        assert found["cmm"]["running"] is False
        assert "Permission denied" in found["store"]["detail"]  # root's own folder is closed to the user
        assert "as nobody" in (tmp_path / "out").read_text()
    finally:
        child.terminate()
        child.wait(10)


def test_live_status_reads_the_running_cmm_s_counters(tmp_path: Path) -> None:
    from cmm.cli.status import Instance, MappingInfo, RunningState

    from support import done

    state = RunningState(pid=4242, started=datetime(2026, 3, 1, 9, 55, tzinfo=timezone.utc), port=443,
                         listen=("127.0.0.1",), mappings=(MappingInfo("claude-haiku-4-5", "gemini-2.5-flash", "u"),),
                         hosts_file=None, config_dir=tmp_path / "served")
    asked: list[Path] = []

    async def read(path: Path) -> object:
        asked.append(path)
        return {"routes": {"passthrough": {"requests": 3, "errors": {"529": 1}, "p50_ms": 80.0, "p99_ms": 95.0,
                                           "bytes_in": 10, "bytes_out": 20}},
                "workers": {"worker-1": {"requests": 3, "connections": 2}}}

    found = done(dashboard.live_status(tmp_path, None, find=lambda _: Instance(True, 4242, state), read=read))
    assert asked == [tmp_path / "served" / "cmm.sock"]
    assert found["running"] is True and found["pid"] == 4242 and found["started"] == "2026-03-01T09:55:00+00:00"
    assert found["routes"] == [{"route": "passthrough", "requests": 3, "errors": 1, "p50_ms": 80.0, "p99_ms": 95.0,
                                "by_status": {"529": 1}, "bytes_in": 10, "bytes_out": 20}]
    assert found["workers"][0]["name"] == "worker-1" and found["workers"][0]["connections"] == 2
    json.dumps(found)  # plain JSON values all through

    async def silent(path: Path) -> object:
        return None

    quiet = done(dashboard.live_status(tmp_path, None, find=lambda _: Instance(True, 4242, state), read=silent))
    assert quiet["routes"] == [] and "did not answer" in quiet["note"]
    gone = done(dashboard.live_status(tmp_path, None, find=lambda _: Instance(False, note="no pid file")))
    assert gone == {"running": False, "pid": None, "note": "no pid file", "routes": [], "workers": []}
