"""The ``cmm`` command, driven through main() with temporary directories and files only."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmm import cli
from cmm.cli import StopState, main, process_alive, process_start_time, stop_process
from cmm.hosts import BEGIN_MARK, add_block


def run(argv: list[str], environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ=environ if environ is not None else {}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# --- parsing -------------------------------------------------------------------------------------


def test_no_command_is_a_usage_error() -> None:
    code, out, err = run([])
    assert code == 2
    assert "usage: cmm" in err


def test_help_goes_to_stdout() -> None:
    code, out, err = run(["--help"])
    assert code == 0
    assert "setup" in out and "config" in out and "stop" in out
    assert err == ""


def test_console_script_target_returns_exit_code() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys, cmm.cli; sys.exit(cmm.cli.main(['config', 'get', 'NOPE']))"],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": "/nonexistent"},
    )
    assert result.returncode == 2
    assert "PROXY_URL" in result.stderr


# --- config --------------------------------------------------------------------------------------


def test_config_defaults_from_home(tmp_path: Path) -> None:
    code, out, err = run(["config", "list"], {"HOME": str(tmp_path)})
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["PROXY_URL", "(default:", "http://localhost:8317/v1/messages)"]
    assert "PROXY_API_KEY" in out and "(default: empty)" in out
    assert not (tmp_path / ".cmm").exists()  # listing creates nothing


def test_config_set_get_list_delete(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)}
    env_path = tmp_path / ".cmm" / ".env"

    code, out, err = run(["config", "set", "PROXY_API_KEY", "sk-secret-1234"], environ)
    assert code == 0, err
    assert "sk-secret" not in out and "1234" in out
    assert env_path.read_text() == "PROXY_API_KEY=sk-secret-1234\n"
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_path.parent.stat().st_mode) == 0o700

    assert run(["config", "set", "PROXY_URL", "https://proxy.test:8443/v1/messages"], environ)[0] == 0
    assert run(["config", "get", "PROXY_API_KEY"], environ)[1] == "sk-secret-1234\n"
    assert run(["config", "get", "DEFAULT_TARGET_MODEL"], environ)[1] == "\n"

    code, out, _ = run(["config", "list"], environ)
    assert code == 0
    assert "****1234" in out and "sk-secret" not in out
    assert "https://proxy.test:8443/v1/messages" in out
    assert "DEFAULT_SOURCE_MODEL" in out

    code, out, _ = run(["config", "delete", "PROXY_URL"], environ)
    assert code == 0 and "default: http://localhost:8317/v1/messages" in out
    assert run(["config", "get", "PROXY_URL"], environ)[1] == "http://localhost:8317/v1/messages\n"
    code, out, _ = run(["config", "delete", "PROXY_URL"], environ)
    assert code == 0 and "not set" in out


def test_config_edit_keeps_comments(tmp_path: Path) -> None:
    env_path = tmp_path / ".env"
    env_path.write_text("# mine\nexport DEFAULT_SOURCE_MODEL=claude-haiku-4-5  # haiku\nOTHER=1\n")
    code, _, err = run(["config", "set", "DEFAULT_SOURCE_MODEL", "claude-sonnet-4", "--config-dir", str(tmp_path)])
    assert code == 0, err
    assert env_path.read_text() == "# mine\nexport DEFAULT_SOURCE_MODEL=claude-sonnet-4\nOTHER=1\n"


def test_config_dir_option_at_any_level(tmp_path: Path) -> None:
    for argv in (
        ["--config-dir", str(tmp_path / "a"), "config", "set", "DEFAULT_TARGET_MODEL", "m"],
        ["config", "--config-dir", str(tmp_path / "b"), "set", "DEFAULT_TARGET_MODEL", "m"],
        ["config", "set", "DEFAULT_TARGET_MODEL", "m", "--config-dir", str(tmp_path / "c")],
    ):
        assert run(argv)[0] == 0
    assert all((tmp_path / name / ".env").read_text() == "DEFAULT_TARGET_MODEL=m\n" for name in "abc")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["config", "set", "NOPE", "x"], "valid keys: PROXY_URL, PROXY_API_KEY"),
        (["config", "get", "NOPE"], "valid keys"),
        (["config", "delete", "NOPE"], "valid keys"),
        (["config", "set", "PROXY_URL", "ftp://x/"], "http:// or https://"),
        (["config", "set", "PROXY_URL", "localhost:8317"], "http:// or https://"),
        (["config", "set", "DEFAULT_SOURCE_MODEL", "a b"], "whitespace"),
    ],
)
def test_config_errors_exit_2(tmp_path: Path, argv: list[str], needle: str) -> None:
    code, out, err = run(argv + ["--config-dir", str(tmp_path)])
    assert code == 2
    assert needle in err
    assert out == ""
    assert not (tmp_path / ".env").exists()


def test_config_list_flags_invalid_hand_edits(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PROXY_URL=nonsense\n")
    code, out, _ = run(["config", "list", "--config-dir", str(tmp_path)])
    assert code == 0
    assert "invalid" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_config_set_under_sudo_gives_file_to_user(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "SUDO_UID": "4321", "SUDO_GID": "8765"}
    assert run(["config", "set", "DEFAULT_TARGET_MODEL", "m"], environ)[0] == 0
    info = (tmp_path / ".cmm" / ".env").stat()
    assert (info.st_uid, info.st_gid) == (4321, 8765)


# --- setup ---------------------------------------------------------------------------------------


def test_setup_creates_certificates_and_prints_export_line(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "SHELL": "/bin/zsh"}
    code, out, err = run(["setup"], environ)
    assert code == 0, err
    directory = tmp_path / ".cmm"
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert (directory / name).exists()
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert "Created a local certificate authority" in out
    assert "Issued a server certificate for api.anthropic.com" in out
    assert f'export NODE_EXTRA_CA_CERTS="{directory}/ca.crt"' in out
    assert "~/.zshrc" in out and "new terminal" in out and "does not edit" in out

    code, out, _ = run(["setup"], environ)
    assert code == 0
    assert "Created" not in out and "Issued" not in out and "in place" in out

    ca_before = (directory / "ca.crt").read_bytes()
    code, out, _ = run(["setup", "--force"], environ)
    assert code == 0 and "Created" in out
    assert (directory / "ca.crt").read_bytes() != ca_before


def test_setup_fish_syntax(tmp_path: Path) -> None:
    code, out, _ = run(["setup", "--config-dir", str(tmp_path)], {"SHELL": "/usr/bin/fish"})
    assert code == 0
    assert f'set -gx NODE_EXTRA_CA_CERTS "{tmp_path}/ca.crt"' in out
    assert "export " not in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_export_line_survives_odd_paths(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird $dir `x` \\'
    line, _ = cli._shell_line("/bin/bash", odd / "ca.crt")
    printed = subprocess.run(["bash", "-c", f'{line}; printf %s "$NODE_EXTRA_CA_CERTS"'], capture_output=True, text=True)
    assert printed.stdout == str(odd / "ca.crt")


def test_setup_passes_sudo_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmm import certs

    seen: dict[str, object] = {}
    real = certs.ensure_certificates

    def spy(config_dir: Path, **kwargs: object) -> object:
        seen.update(kwargs, config_dir=config_dir)
        kwargs["owner"] = None  # the test is not root's to give away
        return real(config_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(certs, "ensure_certificates", spy)
    environ = {"SUDO_USER": "root", "HOME": str(tmp_path), "SUDO_UID": "1000", "SUDO_GID": "1001"}
    assert run(["setup"], environ)[0] == 0
    assert seen == {"config_dir": tmp_path / ".cmm", "force": False, "owner": (1000, 1001)}


def test_setup_permission_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmm import certs

    def denied(config_dir: Path, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(config_dir / "ca.key"))

    monkeypatch.setattr(certs, "ensure_certificates", denied)
    code, out, err = run(["setup", "--config-dir", str(tmp_path)])
    assert code == 1
    assert "permission denied" in err and "ca.key" in err


# --- stop ----------------------------------------------------------------------------------------


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n")
    return path


def test_stop_terminates_process_and_removes_stale_block(tmp_path: Path, hosts_file: Path) -> None:
    hosts_file.write_text(add_block("127.0.0.1 localhost\n"))
    child = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "cmm.pid").write_text(f"{child.pid}\n")
        started = time.monotonic()
        code, out, err = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
        assert code == 0, err
        assert time.monotonic() - started < 5
        assert child.wait(timeout=5) == -15  # SIGTERM
        assert f"Stopped cmm (pid {child.pid})" in out
        assert "Removed the leftover cmm block" in out
        assert hosts_file.read_text() == "127.0.0.1 localhost\n"
        assert not (tmp_path / "cmm.pid").exists()
    finally:
        child.kill()
        child.wait()


def test_stop_when_nothing_runs(tmp_path: Path, hosts_file: Path) -> None:
    code, out, err = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
    assert code == 0, err
    assert "not running" in out and "no pid file" in out
    assert "has no cmm block" in out
    assert hosts_file.read_text() == "127.0.0.1 localhost\n"


def test_stop_with_stale_pid_file_still_cleans_hosts(tmp_path: Path, hosts_file: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names no process now
    pid_file = tmp_path / "other.pid"
    pid_file.write_text(str(child.pid))
    hosts_file.write_text(add_block("127.0.0.1 localhost"))
    code, out, _ = run(["stop", "--pid-file", str(pid_file), "--hosts-file", str(hosts_file)])
    assert code == 0
    assert "stale pid file" in out
    assert not pid_file.exists()
    assert hosts_file.read_text() == "127.0.0.1 localhost"


@pytest.mark.parametrize("content", ["", "garbage", "0", "-1", "1"])
def test_stop_ignores_unusable_pid_file(tmp_path: Path, hosts_file: Path, content: str) -> None:
    (tmp_path / "cmm.pid").write_text(content)
    code, out, _ = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
    assert code == 0
    assert "no usable process id" in out


def test_stop_missing_hosts_file(tmp_path: Path) -> None:
    code, out, _ = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(tmp_path / "nope")])
    assert code == 0
    assert "does not exist" in out


def test_stop_hosts_permission_error(tmp_path: Path, hosts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli.hosts, "restore", denied)
    code, out, err = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
    assert code == 1
    assert "sudo cmm stop" in err


def test_stop_signal_permission_error(tmp_path: Path, hosts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root-owned cmm and a user without sudo: SIGTERM is refused."""
    real_kill = os.kill

    def refuse_term(pid: int, sig: int) -> None:
        if sig == signal.SIGTERM:
            raise PermissionError(1, "Operation not permitted")
        real_kill(pid, sig)

    child = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(cli.os, "kill", refuse_term)
        (tmp_path / "cmm.pid").write_text(str(child.pid))
        code, _, err = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
        monkeypatch.undo()
        assert code == 1
        assert "sudo cmm stop" in err
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


# --- stop_process with injected collaborators ---------------------------------------------------


class FakeProcesses:
    def __init__(self, alive: set[int], exit_on_term: bool = True) -> None:
        self.alive = alive
        self.exit_on_term = exit_on_term
        self.signals: list[tuple[int, int]] = []
        self.now = 0.0

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        if self.exit_on_term:
            self.alive.discard(pid)

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_stop_process_times_out(tmp_path: Path) -> None:
    pid_file = tmp_path / "cmm.pid"
    pid_file.write_text("4242")
    fake = FakeProcesses({4242}, exit_on_term=False)
    result = stop_process(
        pid_file,
        timeout=10.0,
        kill=fake.kill,
        is_alive=fake.alive.__contains__,
        started_at=lambda pid: None,
        sleep=fake.sleep,
        clock=lambda: fake.now,
    )
    assert result.state is StopState.TIMED_OUT
    assert 10.0 <= fake.now < 10.2
    assert pid_file.exists()


def test_stop_process_leaves_reused_pid_alone(tmp_path: Path) -> None:
    pid_file = tmp_path / "cmm.pid"
    pid_file.write_text("4242")
    fake = FakeProcesses({4242})
    result = stop_process(
        pid_file,
        kill=fake.kill,
        is_alive=fake.alive.__contains__,
        started_at=lambda pid: pid_file.stat().st_mtime + 3600,
        sleep=fake.sleep,
        clock=lambda: fake.now,
    )
    assert result.state is StopState.REUSED
    assert fake.signals == []


def test_process_introspection_on_real_processes() -> None:
    assert process_alive(os.getpid())
    child = subprocess.Popen(["sleep", "60"])
    try:
        started = process_start_time(child.pid)
        if started is not None:  # Linux
            assert abs(started - time.time()) < 30
        child.terminate()
        deadline = time.monotonic() + 5
        while process_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not process_alive(child.pid)  # a zombie counts as exited
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_stop_times_out_through_main(tmp_path: Path, hosts_file: Path) -> None:
    """A process that ignores SIGTERM: failure, exit 1, and the live process's hosts block stays."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        (tmp_path / "cmm.pid").write_text(str(child.pid))
        hosts_file.write_text(add_block(""))
        out, err = io.StringIO(), io.StringIO()
        args = cli._build_parser(out, err).parse_args(
            ["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)]
        )
        code = cli._stop(args, cli._Context({}, out, err), timeout=0.3)
        assert code == 1
        assert "did not exit" in err.getvalue() and f"kill -9 {child.pid}" in err.getvalue()
        assert BEGIN_MARK in hosts_file.read_text()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
