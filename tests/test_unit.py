"""``cmm service``: the unit file and plist text, and the systemctl/launchctl calls (recorded, never run)."""

from __future__ import annotations

import io
import plistlib
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from cmm import unit
from cmm.cli import main
from cmm.status import Instance
from cmm.unit import Completed, Spec

TWISTD = "/venv/bin/twistd"
SUDO = {"SUDO_USER": "alice", "SUDO_UID": "1000", "SUDO_GID": "1001"}


# --- pure generators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "quoted"),
    [
        ("--pidfile=", "--pidfile="),
        ("/home/alice/.cmm", "/home/alice/.cmm"),
        ("", '""'),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ("import sys; run()", '"import sys; run()"'),
        ("it's", '"it\'s"'),
    ],
)
def test_systemd_quote(argument: str, quoted: str) -> None:
    assert unit.systemd_quote(argument) == quoted


def test_systemd_quote_refuses_line_breaks() -> None:
    with pytest.raises(ValueError):
        unit.systemd_quote("a\nExecStartPre=/bin/evil")


def test_twistd_program_next_to_the_interpreter() -> None:
    assert unit.twistd_program("/venv/bin/python", exists=lambda p: True) == ("/venv/bin/twistd",)
    fallback = unit.twistd_program("/venv/bin/python", exists=lambda p: False)
    assert fallback[:2] == ("/venv/bin/python", "-c") and "twisted.scripts.twistd" in fallback[2]


def test_build_spec() -> None:
    spec = unit.build_spec((TWISTD,), ["--source", "a", "--target", "b"], Path("/home/alice/.cmm"),
                           ("alice", 1000, 1001))
    assert spec == Spec(
        (TWISTD, "-n", "--pidfile=", "cmm", "--config-dir", "/home/alice/.cmm", "--source", "a", "--target", "b"),
        (("SUDO_USER", "alice"), ("SUDO_UID", "1000"), ("SUDO_GID", "1001")),
    )
    assert unit.build_spec((TWISTD,), [], Path("/root/.cmm"), None).environment == ()


def test_systemd_unit_text() -> None:
    spec = unit.build_spec((TWISTD,), ["--source", "claude haiku"], Path("/home/alice/.cmm"), ("alice", 1000, 1001))
    text = unit.systemd_unit(spec)
    lines = text.splitlines()
    assert ('ExecStart=/venv/bin/twistd -n --pidfile= cmm --config-dir /home/alice/.cmm --source "claude haiku"'
            in lines)
    assert "Environment=SUDO_USER=alice SUDO_UID=1000 SUDO_GID=1001" in lines
    for line in ("[Unit]", "[Service]", "[Install]", "Restart=on-failure", "KillSignal=SIGTERM",
                 "WantedBy=multi-user.target", "After=network-online.target", "Type=simple"):
        assert line in lines
    assert text.endswith("\n")
    assert "Environment" not in unit.systemd_unit(Spec(("x",)))


def test_launchd_plist() -> None:
    spec = unit.build_spec((TWISTD,), ["--source", "a"], Path("/Users/alice/.cmm"), ("alice", 501, 20))
    data = plistlib.loads(unit.launchd_plist(spec, log=Path("/var/log/x.log")))
    assert data == {
        "Label": "dev.cmm.interceptor",
        "ProgramArguments": [TWISTD, "-n", "--pidfile=", "cmm", "--config-dir", "/Users/alice/.cmm", "--source", "a"],
        "EnvironmentVariables": {"SUDO_USER": "alice", "SUDO_UID": "501", "SUDO_GID": "20"},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "StandardOutPath": "/var/log/x.log",
        "StandardErrorPath": "/var/log/x.log",
        "ExitTimeOut": 15,
    }
    assert "EnvironmentVariables" not in plistlib.loads(unit.launchd_plist(Spec(("x",))))


def test_manager_for() -> None:
    assert unit.manager_for("linux").path == Path("/etc/systemd/system/cmm.service")
    assert unit.manager_for("darwin").path == Path("/Library/LaunchDaemons/dev.cmm.interceptor.plist")
    assert unit.manager_for("darwin", Path("/x")).path == Path("/x/dev.cmm.interceptor.plist")
    assert unit.manager_for("win32") is None


def test_service_user() -> None:
    assert unit.service_user(SUDO) == ("alice", 1000, 1001)
    assert unit.service_user({}) is None
    assert unit.service_user({"SUDO_USER": "root", "SUDO_UID": "0", "SUDO_GID": "0"}) is None


# --- the command, with recorded calls --------------------------------------------------------------


class Recorder:
    def __init__(self, answers: dict[str, Completed] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def __call__(self, argv: Sequence[str]) -> Completed:
        self.calls.append(list(argv))
        return self.answers.get(" ".join(argv), Completed(0, "output of " + " ".join(argv) + "\n"))


def service(
    action: str, extra: list[str], tmp_path: Path, *, platform: str = "linux", run: Recorder | None = None,
    euid: int = 0, running: bool = False, environ: dict[str, str] | None = None,
) -> tuple[int, str, str, Recorder]:
    run = run or Recorder()
    out, err = io.StringIO(), io.StringIO()
    config = tmp_path / "cfg"
    config.mkdir(exist_ok=True)
    code = unit.run(
        action, [*extra, "--unit-dir", str(tmp_path / "units")], config_dir=config,
        environ=SUDO if environ is None else environ, out=out, err=err, platform=platform, run_command=run,
        geteuid=lambda: euid, python="/venv/bin/python",
        find=lambda d: Instance(True, 77) if running else Instance(False),
    )
    return code, out.getvalue(), err.getvalue(), run


@pytest.fixture
def units(tmp_path: Path) -> Path:
    (tmp_path / "units").mkdir()
    return tmp_path / "units"


MAPPING = ["--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash"]


def test_systemd_install(tmp_path: Path, units: Path) -> None:
    code, out, err, run = service("install", MAPPING, tmp_path)
    assert code == 0, err
    assert run.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "cmm.service"]]
    path = units / "cmm.service"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    assert f"--config-dir {tmp_path / 'cfg'} --source claude-haiku-4-5 --target gemini-2.5-flash" in text
    assert "SUDO_USER=alice" in text
    assert f"Wrote {path}" in out and "$ systemctl enable --now cmm.service" in out and "journalctl -u cmm" in out
    assert "cmm setup" in out  # no certificates yet

    # Installing again replaces the file and restarts with the new arguments.
    code, _, err, run = service("install", ["--source", "claude-sonnet", "--target", "x"], tmp_path, running=True)
    assert code == 0, err
    assert run.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "cmm.service"],
                         ["systemctl", "restart", "cmm.service"]]
    assert "--source claude-sonnet" in path.read_text()


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_systemd_simple_actions(tmp_path: Path, units: Path, action: str) -> None:
    (units / "cmm.service").write_text("x")
    code, out, err, run = service(action, [], tmp_path)
    assert code == 0, err
    assert run.calls == [["systemctl", action, "cmm.service"]]
    assert out == f"$ systemctl {action} cmm.service\n"


def test_systemd_status_needs_no_root_and_shows_the_output(tmp_path: Path, units: Path) -> None:
    (units / "cmm.service").write_text("x")
    code, out, _, run = service("status", [], tmp_path, euid=1000)
    assert code == 0 and run.calls == [["systemctl", "status", "--no-pager", "cmm.service"]]
    assert "output of systemctl status --no-pager cmm.service" in out
    inactive = Recorder({"systemctl status --no-pager cmm.service": Completed(3, "inactive (dead)\n")})
    code, out, _, _ = service("status", [], tmp_path, euid=1000, run=inactive)
    assert code == 1 and "inactive (dead)" in out


def test_systemd_uninstall(tmp_path: Path, units: Path) -> None:
    (units / "cmm.service").write_text("x")
    code, out, err, run = service("uninstall", [], tmp_path)
    assert code == 0, err
    assert run.calls == [["systemctl", "disable", "--now", "cmm.service"], ["systemctl", "daemon-reload"]]
    assert not (units / "cmm.service").exists()
    code, out, _, run = service("uninstall", [], tmp_path)
    assert code == 0 and run.calls == [] and "not installed" in out


def test_not_installed(tmp_path: Path, units: Path) -> None:
    for action in ("start", "stop", "restart", "status"):
        code, _, err, run = service(action, [], tmp_path)
        assert code == 1 and run.calls == [] and "not installed" in err and "sudo cmm service install" in err


def test_needs_root(tmp_path: Path, units: Path) -> None:
    code, _, err, run = service("install", MAPPING, tmp_path, euid=1000)
    assert code == 1 and run.calls == [] and "needs root" in err and "sudo" in err
    assert not (units / "cmm.service").exists()


def test_install_refuses_what_twistd_cmm_would(tmp_path: Path, units: Path) -> None:
    for extra, needle in (
        (["--source", "a"], "no mapping"),
        (["--frobnicate"], "frobnicate"),
        (["--proxy-api-key", "sk-secret"], "cmm config set PROXY_API_KEY"),
        (["--proxy-api-key=sk-secret", *MAPPING], "readable by everyone"),
        (["--help"], "twistd cmm --help"),
    ):
        code, _, err, run = service("install", extra, tmp_path)
        assert code == 2 and needle in err and run.calls == [], (extra, err)
    assert list(units.iterdir()) == []


def test_install_takes_the_mapping_from_env(tmp_path: Path, units: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / ".env").write_text("DEFAULT_SOURCE_MODEL=claude-haiku-4-5\nDEFAULT_TARGET_MODEL=g\n")
    code, _, err, _ = service("install", [], tmp_path)
    assert code == 0, err


def test_install_refuses_while_a_hand_started_cmm_runs(tmp_path: Path, units: Path) -> None:
    code, _, err, run = service("install", MAPPING, tmp_path, running=True)
    assert code == 1 and "pid 77" in err and "sudo cmm stop" in err and run.calls == []


def test_options_only_for_install(tmp_path: Path, units: Path) -> None:
    (units / "cmm.service").write_text("x")
    code, _, err, run = service("start", ["--source", "a"], tmp_path)
    assert code == 2 and run.calls == []


def test_systemctl_missing_or_failing(tmp_path: Path, units: Path) -> None:
    missing = Recorder({"systemctl daemon-reload": Completed(127, "systemctl: command not found")})
    code, _, err, run = service("install", MAPPING, tmp_path, run=missing)
    assert code == 1 and run.calls == [["systemctl", "daemon-reload"]] and "does not run systemd" in err
    assert list(units.iterdir()) == []  # rolled back
    failing = Recorder({"systemctl enable --now cmm.service": Completed(1, "Failed to enable unit\n")})
    code, _, err, run = service("install", MAPPING, tmp_path, run=failing)
    assert code == 1 and "Failed to enable unit" in err and "exit status 1" in err


def test_print_changes_nothing_and_needs_no_root(tmp_path: Path, units: Path) -> None:
    code, out, err, run = service("install", ["--print", *MAPPING], tmp_path, euid=1000)
    assert code == 0, err
    assert out.startswith("# Written by `cmm service install`") and "ExecStart=" in out
    assert run.calls == [] and list(units.iterdir()) == []
    code, out, _, _ = service("install", ["--print", *MAPPING], tmp_path, platform="darwin", euid=1000)
    assert plistlib.loads(out.encode())["Label"] == "dev.cmm.interceptor"


def test_launchd_install_and_reinstall(tmp_path: Path, units: Path) -> None:
    plist = units / "dev.cmm.interceptor.plist"
    code, out, err, run = service("install", MAPPING, tmp_path, platform="darwin")
    assert code == 0, err
    assert run.calls == [["launchctl", "bootstrap", "system", str(plist)]]
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][-4:] == MAPPING
    assert stat.S_IMODE(plist.stat().st_mode) == 0o644
    not_loaded = Recorder({"launchctl bootout system/dev.cmm.interceptor": Completed(3, "No such process\n")})
    code, _, err, run = service("install", MAPPING, tmp_path, platform="darwin", run=not_loaded)
    assert code == 0, err
    assert run.calls == [["launchctl", "bootout", "system/dev.cmm.interceptor"],
                         ["launchctl", "bootstrap", "system", str(plist)]]


def test_launchd_actions(tmp_path: Path, units: Path) -> None:
    plist = units / "dev.cmm.interceptor.plist"
    plist.write_bytes(b"x")
    label = "system/dev.cmm.interceptor"
    expected = {
        "stop": [["launchctl", "bootout", label]],
        "restart": [["launchctl", "kickstart", "-k", label]],
        "status": [["launchctl", "print", label]],
        "start": [["launchctl", "bootstrap", "system", str(plist)]],
    }
    for action, calls in expected.items():
        code, _, err, run = service(action, [], tmp_path, platform="darwin")
        assert code == 0 and run.calls == calls, (action, err)
    loaded = Recorder({f"launchctl bootstrap system {plist}": Completed(5, "Bootstrap failed: 5\n")})
    code, _, _, run = service("start", [], tmp_path, platform="darwin", run=loaded)
    assert code == 0 and run.calls[-1] == ["launchctl", "kickstart", label]
    code, _, _, run = service("uninstall", [], tmp_path, platform="darwin")
    assert code == 0 and run.calls == [["launchctl", "bootout", label]] and not plist.exists()


def test_unsupported_platform(tmp_path: Path) -> None:
    code, _, err, run = service("install", MAPPING, tmp_path, platform="win32")
    assert code == 1 and "Linux (systemd) and macOS (launchd)" in err and run.calls == []


# --- through the cmm command -----------------------------------------------------------------------


def test_cli_lists_the_commands() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["--help"], environ={}, stdout=out, stderr=err) == 0
    for command in ("status", "test", "doctor", "service"):
        assert f"    {command} " in out.getvalue()


def test_cli_service_print(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(["service", "--config-dir", str(tmp_path), "install", "--print", *MAPPING], environ={}, stdout=out,
                stderr=err)
    assert code == 0, err.getvalue()
    assert f"cmm --config-dir {tmp_path} --source claude-haiku-4-5" in out.getvalue()
    code = main(["service", "install", "--print", "--config-dir", str(tmp_path / "x"), *MAPPING], environ={},
                stdout=out, stderr=err)
    assert code == 0 and f"--config-dir {tmp_path / 'x'} " in out.getvalue()


def test_cli_service_usage_errors() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["service", "reboot"], environ={}, stdout=out, stderr=err) == 2
    assert "invalid choice" in err.getvalue()
