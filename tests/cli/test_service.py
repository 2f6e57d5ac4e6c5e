"""``cmm service``: the unit file and plist text, and the systemctl/launchctl calls (recorded, never run)."""

from __future__ import annotations

import io
import os
import plistlib
import stat
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from cmm.cli import service as unit
from cmm.cli.main import main
from cmm.cli.status import Instance
from cmm.cli.service import CodePaths, Completed, FileSystem, Spec, Writable

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
    assert fallback[:3] == ("/venv/bin/python", "-I", "-c") and "twisted.scripts.twistd" in fallback[3]


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


# --- who could change what root runs --------------------------------------------------------------

DIR, FILE, LINK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777


@attrs.define
class FakeFiles:
    """A file tree as (uid, gid, st_mode) per absolute path, with links; the rest does not exist."""

    entries: dict[str, tuple[int, int, int]] = attrs.field(factory=dict)
    links: dict[str, str] = attrs.field(factory=dict)

    def add(self, path: str, mode: int = FILE, uid: int = 0, gid: int = 0) -> FakeFiles:
        parts = Path(path).parts
        for depth in range(1, len(parts)):
            self.entries.setdefault(str(Path(*parts[:depth])), (0, 0, DIR))
        self.entries[path] = (uid, gid, mode)
        return self

    def link(self, path: str, target: str) -> FakeFiles:
        self.add(path, LINK)
        self.links[path] = target
        return self

    def lstat(self, path: str) -> os.stat_result:
        if path not in self.entries:
            raise FileNotFoundError(path)
        uid, gid, mode = self.entries[path]
        return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    def realpath(self, path: str) -> str:
        parts, done = Path(path).parts, Path("/")
        for part in parts[1:]:
            done = done / part
            while str(done) in self.links:
                done = Path(self.links[str(done)])
        return str(done)

    def listdir(self, path: str) -> list[str]:
        return [p.rsplit("/", 1)[1] for p in self.entries if p.rsplit("/", 1)[0] == path and p != "/"]

    def fs(self) -> FileSystem:
        return FileSystem(lstat=self.lstat, realpath=self.realpath, listdir=self.listdir)


def opt_install() -> FakeFiles:
    """A root-owned virtual environment in /opt/cmm, as the refusal message suggests."""
    return (FakeFiles().link("/opt/cmm/bin/python", "/usr/bin/python3.11").add("/opt/cmm/bin/twistd")
            .add("/usr/bin/python3.11").add("/usr/lib/python3.11/os.py").add("/opt/cmm/pyvenv.cfg")
            .add("/opt/cmm/lib/site-packages/cmm/__init__.py").add("/opt/cmm/lib/site-packages/cmm/__pycache__", DIR)
            .add("/opt/cmm/lib/site-packages/twisted/plugins/cmm_plugin.py"))


OPT_CODE = CodePaths(
    files=("/opt/cmm/bin/twistd", "/opt/cmm/bin/python", "/usr/lib/python3.11", "/opt/cmm/pyvenv.cfg"),
    trees=("/opt/cmm/lib/site-packages/cmm", "/opt/cmm/lib/site-packages/twisted/plugins"),
)


def check(files: FakeFiles, code: CodePaths = OPT_CODE) -> list[Writable]:
    return unit.find_writable(code, files.fs())


def test_a_root_owned_install_passes() -> None:
    assert check(opt_install()) == []


@pytest.mark.parametrize(
    ("path", "mode", "uid", "why"),
    [
        ("/opt", DIR, 1000, "owned by uid 1000"),
        ("/opt/cmm/bin", DIR | 0o020, 0, "writable by group 0"),
        ("/opt/cmm/bin/twistd", FILE | 0o002, 0, "writable by everyone"),
        ("/usr/bin/python3.11", FILE, 1000, "owned by uid 1000"),  # the venv's python leads here
        ("/usr/lib/python3.11", DIR | 0o002, 0, "writable by everyone"),
        ("/opt/cmm/pyvenv.cfg", FILE, 1000, "owned by uid 1000"),
        ("/opt/cmm/lib/site-packages/cmm/__pycache__", DIR | 0o002, 0, "writable by everyone"),
        ("/opt/cmm/lib/site-packages/cmm/proxy.py", FILE, 1000, "owned by uid 1000"),  # deep inside
        ("/opt/cmm/lib/site-packages/twisted/plugins/dropin.cache", FILE | 0o020, 0, "writable by group 0"),
        ("/opt/cmm/lib/site-packages/twisted/plugins/evil.py", FILE, 1000, "owned by uid 1000"),
    ],
)
def test_anything_root_would_run_that_others_can_change_is_found(path: str, mode: int, uid: int, why: str) -> None:
    files = opt_install()
    if path in files.entries:
        files.entries[path] = (uid, 0, mode)
    else:
        files.add(path, mode, uid)
    assert Writable(path, why) in check(files)


def test_sticky_folders_do_not_count_as_safe() -> None:
    files = FakeFiles().add("/tmp", DIR | 0o777 | stat.S_ISVTX).add("/tmp/venv/bin/python")
    assert check(files, CodePaths(files=("/tmp/venv/bin/python",))) == [
        Writable("/tmp", "writable by group 0"), Writable("/tmp", "writable by everyone (sticky)")
    ]


def test_links_are_checked_where_they_lead() -> None:
    files = opt_install().add("/home/alice", DIR, 1000).add("/home/alice/py/python3")
    files.link("/opt/cmm/bin/python", "/home/alice/py/python3")
    assert check(files) == [Writable("/home/alice", "owned by uid 1000")]
    inside = opt_install().add("/home/alice", DIR, 1000).add("/home/alice/router.py")
    inside.link("/opt/cmm/lib/site-packages/cmm/router.py", "/home/alice/router.py")
    assert Writable("/home/alice", "owned by uid 1000") in check(inside)


def test_missing_code_is_reported() -> None:
    files = opt_install()
    del files.entries["/opt/cmm/bin/twistd"]
    assert Writable("/opt/cmm/bin/twistd", "missing") in check(files)


def test_writable_paths_in_a_real_folder(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_bytes(b"")
    package = venv / "lib" / "cmm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_bytes(b"")
    (package / "proxy.py").write_bytes(b"")
    os.chmod(package / "proxy.py", 0o666)
    os.chmod(venv / "bin", 0o775)
    found = unit.find_writable(CodePaths(files=(str(venv / "bin" / "python"),), trees=(str(package),)))
    assert Writable(str(package / "proxy.py"), "writable by everyone") in found
    assert any(w.path == str(venv / "bin") and w.why.startswith("writable by group") for w in found)
    assert Writable("/tmp", "writable by everyone (sticky)") in found or not str(tmp_path).startswith("/tmp/")
    assert not any(w.path == str(package / "__init__.py") and "writable" in w.why for w in found)


def test_installed_code_is_this_interpreter_and_package() -> None:
    import sys

    import twisted.plugins

    import cmm

    program = unit.twistd_program(sys.executable)
    code = unit.installed_code(program, sys.executable, script_interpreter=lambda script: "/from/the/shebang")
    assert code.files[0] == program[0]
    assert sys.executable in code.files and os.path.dirname(os.__file__) in code.files
    assert ("/from/the/shebang" in code.files) == (program[0] != sys.executable)
    assert code.trees[0] == os.path.dirname(cmm.__file__)
    assert any(tree.endswith(os.path.join("twisted", "plugins")) for tree in code.trees[1:])
    assert set(code.trees[1:]) <= set(twisted.plugins.__path__)


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
    euid: int = 0, running: bool = False, environ: dict[str, str] | None = None, files: FakeFiles | None = None,
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
        code_paths=CodePaths(files=("/venv/bin/python",), trees=("/venv/lib/cmm",)),
        fs=(files or FakeFiles().add("/venv/bin/python").add("/venv/lib/cmm/__init__.py")).fs(),
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


def user_venv() -> FakeFiles:
    """cmm installed into the user's own virtual environment (pip install without sudo)."""
    return (FakeFiles().add("/venv", DIR, 1000).add("/venv/bin/python", FILE, 1000)
            .add("/venv/lib/cmm/__init__.py", FILE, 1000).add("/venv/lib/cmm/router.py", FILE, 1000))


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_install_refuses_code_the_user_can_change(tmp_path: Path, units: Path, platform: str) -> None:
    code, out, err, run = service("install", MAPPING, tmp_path, platform=platform, files=user_venv())
    assert code == 1 and run.calls == [] and list(units.iterdir()) == []
    assert "/venv (owned by uid 1000)" in err and "and 1 more" in err
    assert "sudo python3 -m venv /opt/cmm && sudo /opt/cmm/bin/pip install ." in err


def test_print_still_prints_but_warns(tmp_path: Path, units: Path) -> None:
    code, out, err, run = service("install", ["--print", *MAPPING], tmp_path, euid=1000, files=user_venv())
    assert code == 0 and "ExecStart=" in out
    assert err.startswith("cmm: warning: `cmm service install` refuses this:") and "/venv (owned by uid 1000)" in err
    assert run.calls == [] and list(units.iterdir()) == []
    _, _, quiet, _ = service("install", ["--print", *MAPPING], tmp_path, euid=1000)
    assert quiet == ""


def test_unit_names_no_user_code(tmp_path: Path, units: Path) -> None:
    """Nothing in the unit leads root to a file the user picks: no script path, no PYTHON* variable."""
    code, _, err, _ = service("install", MAPPING, tmp_path)
    assert code == 0, err
    text = (units / "cmm.service").read_text()
    environment = [line for line in text.splitlines() if line.startswith("Environment=")]
    assert environment == ["Environment=SUDO_USER=alice SUDO_UID=1000 SUDO_GID=1001"]
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[0] == "ExecStart=/venv/bin/python" and " -I -c " in exec_start
    assert str(tmp_path) not in exec_start.split(" cmm ")[0]  # the config folder only as cmm's data option


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
