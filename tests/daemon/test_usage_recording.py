"""Usage through a real running cmm (master, workers, recorder as processes): requests land in
the store, a recorder killed with -9 is started again without losing what it committed, the last
requests before a stop are kept, ``--workers 0`` records too, and ``cmm usage`` reads it all."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmm.cli.main import main
from cmm.testing.checkout import twistd_command
from cmm.testing.processes import Process, free_port
from cmm.usage import query
from test_integration import _env
from test_multiprocess import PASS, SOURCE, Stack, ask, children, status, wait_until, write_mappings


def rows(config_dir: Path) -> list[tuple]:
    database = config_dir / "usage.sqlite3"
    if not database.exists():
        return []
    with contextlib.closing(query.connect_readonly(database)) as connection:
        try:
            return connection.execute("SELECT model, route, status, bytes_in > 0, bytes_out > 0 FROM requests "
                                      "ORDER BY id").fetchall()
        except sqlite3.OperationalError as error:  # the file made, its table not yet
            assert "no such table" in str(error)
            return []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("usage"))
    try:
        yield stack
    finally:
        stack.stop()


def test_requests_land_in_the_store_and_survive_the_recorder_being_killed(stack: Stack) -> None:
    config_dir = stack.base / "recorded"
    config_dir.mkdir()
    write_mappings(config_dir, "gemini-2.5-flash", stack.target_url)
    master, config_dir, port = stack.start("recorded", workers=2)
    [recorder] = children(master.proc.pid, "cmm.daemon.recorder")
    assert status(config_dir)["usage"]["pid"] == recorder
    for model in (SOURCE, SOURCE, PASS):
        assert ask(port, config_dir, model)[0] == 200
    first = [(SOURCE, "intercepted", 200, 1, 1)] * 2 + [(PASS, "passthrough", 200, 1, 1)]
    wait_until(lambda: sorted(rows(config_dir)) == sorted(first), what="three rows in the store")

    os.kill(recorder, signal.SIGKILL)
    again = wait_until(lambda: [pid for pid in children(master.proc.pid, "cmm.daemon.recorder") if pid != recorder],
                       what="a new recorder")
    assert status(config_dir)["usage"] == {**status(config_dir)["usage"], "pid": again[0], "restarts": 1}
    assert ask(port, config_dir, PASS)[0] == 200
    wait_until(lambda: len(rows(config_dir)) == 4, what="the row after the restart")
    assert sorted(rows(config_dir)[:3]) == sorted(first)  # what was committed is still there
    assert "usage recorder" in master.output() and "starting it again" in master.output()

    os.kill(master.proc.pid, signal.SIGHUP)  # a reload with the same retention leaves it alone
    master.wait_for("Reloaded")
    assert children(master.proc.pid, "cmm.daemon.recorder") == again
    assert ask(port, config_dir, SOURCE)[0] == 200
    wait_until(lambda: len(rows(config_dir)) == 5, what="the row after the reload")

    out = io.StringIO()
    assert main(["usage", "--config-dir", str(config_dir), "--json", "--by", "route"], environ={"HOME": "/x"},
                stdout=out, stderr=io.StringIO()) == 0
    found = {group["key"]: group["requests"] for group in json.loads(out.getvalue())["groups"]}
    assert found == {"intercepted": 3, "passthrough": 2}


def test_the_last_requests_before_a_stop_are_kept(stack: Stack) -> None:
    master, config_dir, port = stack.start("stopping", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                                           "--proxy-url", stack.target_url, workers=1)
    for _ in range(5):
        assert ask(port, config_dir, SOURCE)[0] == 200
    os.kill(master.proc.pid, signal.SIGTERM)  # within the recorder's flush interval
    master.proc.wait(timeout=30)
    # closed cleanly (no -wal left), with every row
    assert sorted(p.name for p in config_dir.iterdir() if p.name.startswith("usage")) == ["usage.sqlite3"]
    assert len(rows(config_dir)) == 5


def test_the_recorder_goes_when_the_master_is_killed(stack: Stack) -> None:
    master, config_dir, port = stack.start("killed", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                                           "--proxy-url", stack.target_url, workers=1)
    [recorder] = children(master.proc.pid, "cmm.daemon.recorder")
    assert ask(port, config_dir, PASS)[0] == 200
    time.sleep(0.3)  # the record reaches the master, which passes it on within its batch delay
    os.kill(master.proc.pid, signal.SIGKILL)
    master.proc.wait(timeout=5)
    wait_until(lambda: not Path(f"/proc/{recorder}").exists()
               or "Z" in Path(f"/proc/{recorder}/stat").read_text().split()[2], what="the recorder to exit")
    assert len(rows(config_dir)) == 1  # its stdin closed: it wrote what it had


def test_workers_0_records_through_its_own_recorder_process(stack: Stack) -> None:
    config_dir = stack.base / "inline"
    config_dir.mkdir()
    port = free_port()
    argv = twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--config-dir", str(config_dir),
                           "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(stack.anthropic), "--no-hosts",
                           "--workers", "0", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                           "--proxy-url", stack.target_url])
    master = Process("cmm inline", argv, _env(SSL_CERT_FILE=str(stack.ca_bundle)), stack.base / "inline.out")
    stack.processes.append(master)
    master.wait_for(rf"cmm serving on port {port}\b")
    assert children(master.proc.pid) == [] and len(children(master.proc.pid, "cmm.daemon.recorder")) == 1
    assert ask(port, config_dir, SOURCE)[0] == 200
    wait_until(lambda: rows(config_dir) == [(SOURCE, "intercepted", 200, 1, 1)], what="the row")


def test_under_sudo_the_recorder_is_the_user_and_so_are_the_files(stack: Stack) -> None:
    """A root master with SUDO_UID, the config dir the user's: the database is never root's."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a master that drops privileges")
    config_dir = Path(tempfile.mkdtemp(prefix="cmm-sudo-usage-", dir="/tmp"))  # reachable by uid 65534
    try:
        os.chown(config_dir, 65534, 65534)
        port = free_port()
        argv = twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--config-dir", str(config_dir),
                               "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(stack.anthropic), "--no-hosts",
                               "--workers", "1", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                               "--proxy-url", stack.target_url])
        env = _env(SSL_CERT_FILE=str(stack.ca_bundle), SUDO_UID="65534", SUDO_GID="65534")
        master = Process("cmm sudo", argv, env, stack.base / "sudo.out")
        stack.processes.append(master)
        master.wait_for(rf"cmm serving on port {port}\b")
        [recorder] = children(master.proc.pid, "cmm.daemon.recorder")
        wait_until(lambda: "Uid:\t65534\t65534\t65534\t65534" in Path(f"/proc/{recorder}/status").read_text(),
                   what="the recorder to become the user")  # it starts as root, imports, then drops
        assert ask(port, config_dir, SOURCE)[0] == 200
        database = config_dir / "usage.sqlite3"
        wait_until(lambda: Path(f"{database}-wal").exists(), what="the first commit")
        files = {path.name: (path.stat().st_uid, path.stat().st_mode & 0o777)
                 for path in config_dir.iterdir() if path.name.startswith("usage")}
        assert files == {name: (65534, 0o600) for name in ("usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm")}
        os.kill(master.proc.pid, signal.SIGTERM)
        master.proc.wait(timeout=30)
        assert rows(config_dir) == [(SOURCE, "intercepted", 200, 1, 1)]
    finally:
        shutil.rmtree(config_dir)
