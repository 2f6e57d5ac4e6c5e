"""The ``cmm`` command, driven through main() with temporary directories and files only."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from cmm.cli import main as cli
from cmm.cli import context, processes, setup, stop
from cmm.cli.main import StopState, main, stop_process
from cmm.cli.processes import process_alive, process_start_time
from cmm.machine.commands import CommandResult, Machine
from cmm.machine.hosts import BEGIN_MARK, add_block
from support import process_env


# A process whose command line is cmm's checkout form (python -c '...twistd...' ... cmm): `cmm stop`
# signals nothing else. The real twistd is stopped in test_system.
STAND_IN = [sys.executable, "-c", "import time; time.sleep(60)  # stands in for twistd", "-n", "cmm"]


def start_stand_in() -> subprocess.Popen[bytes]:
    child = subprocess.Popen(STAND_IN)
    deadline = time.monotonic() + 10
    while not processes.is_cmm_process(child.pid):  # until it has exec'd
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    return child


def run(
    argv: list[str], environ: dict[str, str] | None = None, machine: Machine | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, environ=environ if environ is not None else {}, stdout=out, stderr=err, machine=machine)
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
        [sys.executable, "-c", "import sys, cmm.cli.main; sys.exit(cmm.cli.main.main(['config', 'get', 'NOPE']))"],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": "/nonexistent"},
    )
    assert result.returncode == 2
    assert "PROXY_URL" in result.stderr


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "cmm.cli", "config", "get", "NOPE"], capture_output=True, text=True,
                            env={**os.environ, "HOME": "/nonexistent"}, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2
    assert result.stderr.startswith("cmm: unknown key 'NOPE'")


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


@pytest.mark.parametrize("action", [["list"], ["get", "PROXY_URL"], ["set", "PROXY_URL", "http://h/"]])
def test_config_with_a_folder_where_env_belongs_says_so(tmp_path: Path, action: list[str]) -> None:
    (tmp_path / ".env").mkdir()
    code, out, err = run(["config", *action, "--config-dir", str(tmp_path)])
    assert (code, out) == (1, "")
    assert err.startswith(f"cmm: cannot read {tmp_path / '.env'}: ") and err.count("\n") == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no folder can be made")
def test_config_set_where_no_folder_can_be_made_says_so() -> None:
    directory = Path("/proc/cmm-no-such-folder/cmm")
    code, out, err = run(["config", "set", "PROXY_URL", "http://h/", "--config-dir", str(directory)])
    assert (code, out) == (1, "")
    assert err == f"cmm: cannot write {directory / '.env'}: No such file or directory\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_config_set_under_sudo_gives_file_to_user(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "SUDO_UID": "4321", "SUDO_GID": "8765"}
    assert run(["config", "set", "DEFAULT_TARGET_MODEL", "m"], environ)[0] == 0
    info = (tmp_path / ".cmm" / ".env").stat()
    assert (info.st_uid, info.st_gid) == (4321, 8765)


# --- setup ---------------------------------------------------------------------------------------


@attrs.define
class Commands:
    """A fake for every external command: records it and succeeds (or fails, for ``fail``)."""

    calls: list[str] = attrs.field(factory=list)
    fail: bool = False

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(" ".join([Path(argv[0]).name, *argv[1:]]))
        return CommandResult(1, "", "it broke") if self.fail else CommandResult(0)


def fake_machine(
    tmp_path: Path, *, shell: str = "/bin/zsh", debian: bool = False, is_root: bool = False
) -> tuple[Machine, Commands]:
    """Home is tmp_path; the system root is tmp_path/root, with update-ca-certificates if ``debian``."""
    commands = Commands()
    (tmp_path / "root").mkdir(exist_ok=True)
    machine = Machine(
        home=tmp_path,
        shell=shell,
        is_root=is_root,
        root=tmp_path / "root",
        platform="linux",
        which=lambda name: f"/usr/sbin/{name}" if debian and name == "update-ca-certificates" else None,
        run=commands,
    )
    return machine, commands


MARKED = "# cmm-managed"


def test_setup_creates_certificates_and_profile_line(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "SHELL": "/bin/zsh"}
    machine, commands = fake_machine(tmp_path)
    code, out, err = run(["setup"], environ, machine)
    assert code == 0, err
    directory = tmp_path / ".cmm"
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert (directory / name).exists()
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert "Created a local certificate authority" in out
    assert "Issued a server certificate for api.anthropic.com" in out
    line = f'export NODE_EXTRA_CA_CERTS="{directory}/ca.crt"'
    assert f"    {line}\n" in out and "in this one, run" in out
    assert "sudo twistd -n cmm --source claude-haiku --target " in out  # a family prefix, not one generation
    assert "shell profile ~/.zshrc: created it with the NODE_EXTRA_CA_CERTS line" in out  # no profile existed
    assert (tmp_path / ".zshrc").read_text() == f"{line} {MARKED}\n"
    assert err == "" and commands.calls == []

    code, out, _ = run(["setup"], environ, machine)
    assert code == 0
    assert "Created" not in out and "Issued" not in out and "in place" in out
    assert "~/.zshrc: NODE_EXTRA_CA_CERTS line already there" in out

    ca_before = (directory / "ca.crt").read_bytes()
    code, out, _ = run(["setup", "--force"], environ, machine)
    assert code == 0 and "Created" in out
    assert (directory / "ca.crt").read_bytes() != ca_before
    assert (tmp_path / ".zshrc").read_text() == f"{line} {MARKED}\n"  # same path, same line
    assert commands.calls == []


def test_setup_force_while_cmm_runs_says_how_to_reload(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "SHELL": "/bin/zsh"}
    machine, _ = fake_machine(tmp_path)
    assert run(["setup"], environ, machine)[0] == 0
    code, out, _ = run(["setup", "--force"], environ, machine)
    assert code == 0 and "kill -HUP" not in out  # nothing runs: nothing to reload
    child = start_stand_in()
    try:
        (tmp_path / ".cmm" / "cmm.pid").write_text(f"{child.pid}\n")
        code, out, err = run(["setup", "--force"], environ, machine)
        assert code == 0, err
        assert f"cmm is running (pid {child.pid})" in out and f"sudo kill -HUP {child.pid}\n" in out
        assert "restart them" in out  # a new CA
        code, out, _ = run(["setup"], environ, machine)
        assert code == 0 and "kill -HUP" not in out  # nothing new was issued
    finally:
        child.kill()
        child.wait()


def test_setup_edits_every_existing_profile_and_leaves_conflicts(tmp_path: Path) -> None:
    machine, _ = fake_machine(tmp_path, shell="/bin/bash")
    (tmp_path / ".bashrc").write_text("alias ll='ls -l'\n")
    (tmp_path / ".profile").write_text("")
    (tmp_path / ".zshrc").write_text("export NODE_EXTRA_CA_CERTS=/etc/corp.pem\n")
    code, out, err = run(["setup"], {"HOME": str(tmp_path)}, machine)
    assert code == 0, err
    line = f'export NODE_EXTRA_CA_CERTS="{tmp_path}/.cmm/ca.crt" {MARKED}\n'
    assert (tmp_path / ".bashrc").read_text() == "alias ll='ls -l'\n" + line
    assert (tmp_path / ".profile").read_text() == line
    assert (tmp_path / ".zshrc").read_text() == "export NODE_EXTRA_CA_CERTS=/etc/corp.pem\n"
    assert not (tmp_path / ".bash_profile").exists()
    assert "~/.bashrc: added" in out and "~/.profile: added" in out and ".zshrc" not in out
    assert err.startswith("cmm: ~/.zshrc already sets NODE_EXTRA_CA_CERTS to /etc/corp.pem")
    assert "single file" in err and "combine" in err


def test_setup_no_profile(tmp_path: Path) -> None:
    machine, _ = fake_machine(tmp_path, shell="/bin/zsh")
    code, out, _ = run(["setup", "--no-profile"], {"HOME": str(tmp_path)}, machine)
    assert code == 0
    assert not (tmp_path / ".zshrc").exists()
    assert "add this line to ~/.zshrc" in out and "--no-profile" in out
    assert f'    export NODE_EXTRA_CA_CERTS="{tmp_path}/.cmm/ca.crt"\n' in out


def test_setup_fish_syntax(tmp_path: Path) -> None:
    machine, _ = fake_machine(tmp_path, shell="/usr/bin/fish")
    code, out, _ = run(["setup", "--config-dir", str(tmp_path / "cfg")], {"SHELL": "/usr/bin/fish"}, machine)
    assert code == 0
    assert f'    set -gx NODE_EXTRA_CA_CERTS "{tmp_path}/cfg/ca.crt"\n' in out
    assert "export " not in out
    config_fish = tmp_path / ".config/fish/config.fish"
    assert config_fish.read_text() == f'set -gx NODE_EXTRA_CA_CERTS "{tmp_path}/cfg/ca.crt" {MARKED}\n'


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_export_line_survives_odd_paths(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird $dir `x` \\'
    line, _ = setup._shell_line("/bin/bash", odd / "ca.crt")
    printed = subprocess.run(
        ["bash", "-c", f'{line}; printf %s "$NODE_EXTRA_CA_CERTS"'], capture_output=True, text=True
    )
    assert printed.stdout == str(odd / "ca.crt")


def test_setup_system_trust(tmp_path: Path) -> None:
    machine, commands = fake_machine(tmp_path, debian=True, is_root=True)
    environ = {"HOME": str(tmp_path)}
    anchor = tmp_path / "root/usr/local/share/ca-certificates/cmm-local-ca.crt"
    code, out, err = run(["setup", "--system-trust", "--no-profile"], environ, machine)
    assert code == 0, err
    assert anchor.read_bytes() == (tmp_path / ".cmm/ca.crt").read_bytes()
    assert commands.calls == ["update-ca-certificates"]
    assert "system trust store: added cmm's CA to update-ca-certificates" in out

    code, out, _ = run(["setup", "--system-trust", "--no-profile"], environ, machine)
    assert code == 0 and "already trusts" in out and commands.calls == ["update-ca-certificates"]

    # --force makes a new CA: the store, which trusted the old one, gets the new one (no flag needed)
    code, out, _ = run(["setup", "--force", "--no-profile"], environ, machine)
    assert code == 0 and "replaced the old cmm CA" in out
    assert anchor.read_bytes() == (tmp_path / ".cmm/ca.crt").read_bytes()
    assert commands.calls == ["update-ca-certificates"] * 2

    # the same as an ordinary user is refused before anything changes
    ca_before = (tmp_path / ".cmm/ca.crt").read_bytes()
    code, out, err = run(["setup", "--force"], environ, attrs.evolve(machine, is_root=False))
    assert code == 1 and out == ""
    assert "sudo cmm setup --force" in err
    assert (tmp_path / ".cmm/ca.crt").read_bytes() == ca_before


@pytest.mark.parametrize(
    ("debian", "is_root", "needle"),
    [(True, False, "--system-trust needs root: run `sudo cmm setup --system-trust`"),
     (False, True, "no system trust store tool found")],
)
def test_setup_system_trust_refused_before_anything_is_made(
    tmp_path: Path, debian: bool, is_root: bool, needle: str
) -> None:
    machine, commands = fake_machine(tmp_path, debian=debian, is_root=is_root)
    code, out, err = run(["setup", "--system-trust"], {"HOME": str(tmp_path)}, machine)
    assert code == 1 and out == ""
    assert needle in err
    assert not (tmp_path / ".cmm").exists() and not (tmp_path / ".zshrc").exists()
    assert commands.calls == []


def test_setup_system_trust_tool_failure(tmp_path: Path) -> None:
    machine, commands = fake_machine(tmp_path, debian=True, is_root=True)
    commands.fail = True
    code, out, err = run(["setup", "--system-trust"], {"HOME": str(tmp_path)}, machine)
    assert code == 1
    assert "update-ca-certificates failed (exit status 1): it broke" in err
    assert (tmp_path / ".cmm/ca.crt").exists() and "~/.zshrc" in out  # the rest was done


def test_setup_refuses_a_ca_without_cmms_constraint(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from cryptography import x509

    from cmm.machine import certs

    machine, commands = fake_machine(tmp_path, debian=True, is_root=True)
    old = certs.make_ca(datetime.now(timezone.utc), excluded_networks=())
    (tmp_path / ".cmm").mkdir()
    (tmp_path / ".cmm/ca.crt").write_bytes(old.cert_pem)
    (tmp_path / ".cmm/ca.key").write_bytes(old.key_pem)
    code, out, err = run(["setup", "--system-trust", "--no-profile"], {"HOME": str(tmp_path)}, machine)
    assert code == 1 and "cmm setup --force" in err
    assert commands.calls == [] and not (tmp_path / "root/usr/local/share/ca-certificates").exists()
    code, out, err = run(["setup", "--force", "--system-trust", "--no-profile"], {"HOME": str(tmp_path)}, machine)
    assert code == 0, err
    assert certs.has_cmm_constraint(x509.load_pem_x509_certificate((tmp_path / ".cmm/ca.crt").read_bytes()))


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_setup_under_sudo_makes_the_certificates_as_the_user(tmp_path: Path) -> None:
    environ = {"SUDO_USER": "root", "HOME": str(tmp_path), "SUDO_UID": "4321", "SUDO_GID": "8765"}
    code, out, err = run(["setup"], environ, fake_machine(tmp_path)[0])
    assert code == 0, err
    assert f"Created a local certificate authority: {tmp_path / '.cmm' / 'ca.crt'}" in out
    for name in (".", "ca.crt", "ca.key", "server.crt", "server.key"):
        info = (tmp_path / ".cmm" / name).stat()
        assert (info.st_uid, info.st_gid) == (4321, 8765), name
    assert os.geteuid() == 0 and os.getegid() == 0  # and root again afterwards


def test_setup_permission_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmm.config.userfiles import UserDir

    def denied(self: UserDir, name: str, data: bytes, mode: int = 0o600) -> None:
        raise PermissionError(13, "Permission denied", str(self.path / name))

    monkeypatch.setattr(UserDir, "write_bytes", denied)
    code, out, err = run(["setup", "--config-dir", str(tmp_path)], {}, fake_machine(tmp_path)[0])
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
    child = start_stand_in()
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
def test_stop_refuses_an_unusable_pid_file(tmp_path: Path, hosts_file: Path, content: str) -> None:
    (tmp_path / "cmm.pid").write_text(content)
    hosts_file.write_text(add_block("127.0.0.1 localhost\n"))
    code, out, err = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
    assert code == 1
    assert err.startswith(f"cmm: {tmp_path / 'cmm.pid'} ") and "names no process to stop" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert hosts_file.read_text() == "127.0.0.1 localhost\n"  # the leftover block still goes


@pytest.mark.parametrize("given", [True, False])
def test_stop_with_a_folder_as_pid_file_says_so(tmp_path: Path, given: bool) -> None:
    """`cmm stop --pid-file /tmp`, or a ~/.cmm/cmm.pid that is a folder: one line, exit 1."""
    config = tmp_path / "cfg"
    (config / "cmm.pid").mkdir(parents=True)
    argv = ["--pid-file", str(tmp_path)] if given else ["--config-dir", str(config)]
    result = subprocess.run([sys.executable, "-m", "cmm.cli", "stop", *argv, "--hosts-file", str(tmp_path / "none")],
                            capture_output=True, text=True, env=process_env(HOME=str(tmp_path)), timeout=60)
    named = tmp_path if given else config / "cmm.pid"
    assert result.returncode == 1
    assert result.stderr == (
        f"cmm: {named} is not a regular file, so it names no process to stop; "
        + ("give --pid-file the file twistd wrote\n" if given else f"if cmm is not running, move it away "
                                                                   f"(mv {named} {named}.old)\n")
    )
    assert named.is_dir()


def test_stop_on_a_stale_pid_file_removes_the_state_file_too(tmp_path: Path) -> None:
    """Else `cmm status` keeps reporting the dead run."""
    child = subprocess.Popen(["true"])
    child.wait()
    config = tmp_path / "cfg"
    config.mkdir(mode=0o700)
    (config / "cmm.pid").write_text(f"{child.pid}\n")
    state = config / "cmm.state.json"
    state.write_text(json.dumps({"pid": child.pid, "port": 443}))
    env = process_env(HOME=str(tmp_path))
    before = subprocess.run([sys.executable, "-m", "cmm.cli", "status", "--config-dir", str(config),
                             "--hosts-file", str(tmp_path / "none"), "--timeout", "0.5"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert "from a previous run is gone" in before.stdout

    result = subprocess.run([sys.executable, "-m", "cmm.cli", "stop", "--config-dir", str(config),
                             "--hosts-file", str(tmp_path / "none")], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "stale pid file" in result.stdout and "Removed the state file" in result.stdout
    assert not state.exists() and not (config / "cmm.pid").exists()
    after = subprocess.run([sys.executable, "-m", "cmm.cli", "status", "--config-dir", str(config),
                            "--hosts-file", str(tmp_path / "none"), "--timeout", "0.5"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert "previous run" not in after.stdout


def test_stop_keeps_a_state_file_of_another_process(tmp_path: Path, hosts_file: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    (tmp_path / "cmm.pid").write_text(f"{child.pid}\n")
    stand_in = start_stand_in()
    try:
        state = tmp_path / "cmm.state.json"
        state.write_text(json.dumps({"pid": stand_in.pid}))  # a run that is alive: not ours to remove
        code, out, err = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(hosts_file)])
        assert code == 0, err
        assert state.exists() and "state file" not in out
        other = tmp_path / "other"
        other.mkdir()
        (other / "cmm.pid").write_text(f"{child.pid}\n")
        (other / "cmm.state.json").write_text(json.dumps({"pid": child.pid + 100000}))  # names another pid
        code, out, err = run(["stop", "--config-dir", str(other), "--hosts-file", str(hosts_file)])
        assert code == 0 and (other / "cmm.state.json").exists(), err
    finally:
        stand_in.kill()
        stand_in.wait()


def test_stop_missing_hosts_file(tmp_path: Path) -> None:
    code, out, _ = run(["stop", "--config-dir", str(tmp_path), "--hosts-file", str(tmp_path / "nope")])
    assert code == 0
    assert "does not exist" in out


def test_stop_hosts_permission_error(tmp_path: Path, hosts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(stop.hosts, "restore", denied)
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

    child = start_stand_in()
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
        is_cmm=lambda pid: True,
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
        is_cmm=lambda pid: True,
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
         "print('ready', flush=True); time.sleep(60)  # stands in for twistd", "cmm"],
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
        code = stop.run(args, context.Context({}, out, err), timeout=0.3)
        assert code == 1
        assert "did not exit" in err.getvalue() and f"kill -9 {child.pid}" in err.getvalue()
        assert BEGIN_MARK in hosts_file.read_text()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


# --- uninstall -----------------------------------------------------------------------------------


def test_uninstall_undoes_everything(tmp_path: Path, hosts_file: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    machine, commands = fake_machine(home, debian=True, is_root=True)
    environ = {"HOME": str(home)}
    (home / ".bashrc").write_bytes(b"alias ll='ls -l'")  # no final line break
    assert run(["setup", "--system-trust"], environ, machine)[0] == 0
    anchor = home / "root/usr/local/share/ca-certificates/cmm-local-ca.crt"
    assert anchor.exists() and MARKED in (home / ".bashrc").read_text()
    (home / ".cmm" / ".env").write_text("PROXY_API_KEY=k\n")
    hosts_file.write_text(add_block("127.0.0.1 localhost\n"))
    child = start_stand_in()
    try:
        (home / ".cmm" / "cmm.pid").write_text(str(child.pid))
        code, out, err = run(["uninstall", "--hosts-file", str(hosts_file)], environ, machine)
        assert code == 0, err
        assert child.wait(timeout=5) == -15
    finally:
        child.kill()
        child.wait()
    assert f"Stopped cmm (pid {child.pid})" in out
    assert "Removed the leftover cmm block" in out and hosts_file.read_text() == "127.0.0.1 localhost\n"
    assert "System trust store: removed cmm's CA" in out and not anchor.exists()
    assert commands.calls == ["update-ca-certificates"] * 2
    assert "~/.bashrc: removed the NODE_EXTRA_CA_CERTS line" in out
    assert (home / ".bashrc").read_bytes() == b"alias ll='ls -l'"
    assert f"Removed {home / '.cmm'} (" in out and not (home / ".cmm").exists()
    assert "cmm is uninstalled" in out and "unset NODE_EXTRA_CA_CERTS" in out
    assert err == ""


def test_uninstall_when_nothing_is_installed(tmp_path: Path, hosts_file: Path) -> None:
    machine, commands = fake_machine(tmp_path, shell="/usr/bin/fish")
    code, out, err = run(["uninstall", "--hosts-file", str(hosts_file)], {"HOME": str(tmp_path)}, machine)
    assert code == 0, err
    assert "not running" in out and "has no cmm block" in out
    assert f"{tmp_path / '.cmm'} does not exist." in out
    assert "set -e NODE_EXTRA_CA_CERTS" in out
    assert commands.calls == [] and hosts_file.read_text() == "127.0.0.1 localhost\n"


def test_uninstall_keeps_files_cmm_did_not_make(tmp_path: Path, hosts_file: Path) -> None:
    machine, _ = fake_machine(tmp_path)
    config = tmp_path / "somewhere"
    assert run(["setup", "--config-dir", str(config)], {"HOME": str(tmp_path)}, machine)[0] == 0
    (config / "my-notes.txt").write_text("precious")
    code, out, err = run(["uninstall", "--config-dir", str(config), "--hosts-file", str(hosts_file)],
                         {"HOME": str(tmp_path)}, machine)
    assert code == 0
    assert sorted(p.name for p in config.iterdir()) == ["my-notes.txt"]
    assert "Removed cmm's 4 files" in out
    assert f"kept {config}: it also holds my-notes.txt, which cmm did not make" in err
    assert MARKED not in (tmp_path / ".zshrc").read_text()


def test_uninstall_without_root_keeps_everything_while_the_store_has_the_ca(tmp_path: Path, hosts_file: Path) -> None:
    machine, _ = fake_machine(tmp_path, debian=True, is_root=True)
    environ = {"HOME": str(tmp_path)}
    assert run(["setup", "--system-trust"], environ, machine)[0] == 0
    zshrc = (tmp_path / ".zshrc").read_text()
    code, out, err = run(["uninstall", "--hosts-file", str(hosts_file)], environ, attrs.evolve(machine, is_root=False))
    assert code == 1
    assert "needs root; run `sudo cmm uninstall`" in err and "was kept" in err
    assert (tmp_path / ".cmm" / "ca.crt").exists() and (tmp_path / ".zshrc").read_text() == zshrc


def test_uninstall_stops_when_stop_fails(tmp_path: Path, hosts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine, _ = fake_machine(tmp_path)
    assert run(["setup"], {"HOME": str(tmp_path)}, machine)[0] == 0

    def denied(path: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(stop.hosts, "restore", denied)
    code, _, err = run(["uninstall", "--hosts-file", str(hosts_file)], {"HOME": str(tmp_path)}, machine)
    assert code == 1
    assert "sudo cmm stop" in err and "nothing else was removed" in err
    assert (tmp_path / ".cmm" / "ca.crt").exists() and MARKED in (tmp_path / ".zshrc").read_text()


def test_help_lists_uninstall() -> None:
    code, out, _ = run(["--help"])
    assert code == 0 and "uninstall" in out
    code, out, _ = run(["setup", "--help"])
    assert "--system-trust" in out and "--no-profile" in out


def test_stop_flushes_the_dns_cache_only_when_it_removed_a_block(tmp_path: Path) -> None:
    import io

    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n# cmm-managed begin\n127.0.0.1 api.anthropic.com\n# cmm-managed end\n")
    flushes: list[int] = []
    args = ["stop", "--config-dir", str(tmp_path / ".cmm"), "--hosts-file", str(hosts_file)]
    out = io.StringIO()
    assert cli.main(args, environ={"HOME": str(tmp_path)}, stdout=out, stderr=io.StringIO(),
                    flush_dns=lambda: flushes.append(1)) == 0
    assert hosts_file.read_text() == "127.0.0.1 localhost\n" and flushes == [1]
    assert cli.main(args, environ={"HOME": str(tmp_path)}, stdout=out, stderr=io.StringIO(),
                    flush_dns=lambda: flushes.append(1)) == 0
    assert flushes == [1]


def test_uninstall_refuses_while_a_boot_service_is_installed(tmp_path: Path, hosts_file: Path) -> None:
    import io

    units = tmp_path / "units"
    units.mkdir()
    (units / "cmm.service").write_text("[Unit]\n")
    config = tmp_path / ".cmm"
    config.mkdir()
    (config / "ca.crt").write_text("x")
    err = io.StringIO()
    code = cli.main(["uninstall", "--config-dir", str(config), "--hosts-file", str(hosts_file),
                     "--unit-dir", str(units)], environ={"HOME": str(tmp_path)}, stdout=io.StringIO(), stderr=err)
    assert code == 1 and "sudo cmm service uninstall" in err.getvalue()
    assert (config / "ca.crt").exists()
