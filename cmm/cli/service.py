"""``cmm service``: ``twistd -n cmm ...`` started at boot by systemd (Linux) or launchd (macOS).

The unit file and the plist are pure text generated from a :class:`Spec`, and every
``systemctl``/``launchctl`` call goes through an injected ``run``, so tests check both without
touching the machine's service manager.  The service runs as root (port 443, /etc/hosts) with
the user's ``~/.cmm`` named explicitly and ``SUDO_USER``/``SUDO_UID``/``SUDO_GID`` set as sudo would,
so files it creates there stay the user's, exactly as under ``sudo twistd cmm``.

Root runs that code at every boot, so ``install`` refuses unless only root can change it: the
interpreter, the twistd script, the cmm package, the standard library and the twistd plugin
folders, each checked from ``/`` down (see :func:`find_writable`).  The unit itself names no
script file and sets no ``PYTHON*`` variable; the user's ``~/.cmm`` holds data, never code.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import attrs

from cmm.cli import status

from cmm.config import paths

from cmm.machine import certs
from cmm.cli.status import Instance
from cmm.daemon.launch import TWISTD_CODE

ACTIONS = ("install", "uninstall", "start", "stop", "restart", "status")
UNIT_NAME = "cmm.service"
SYSTEMD_DIR = Path("/etc/systemd/system")
LABEL = "dev.cmm.interceptor"
LAUNCHD_DIR = Path("/Library/LaunchDaemons")
LAUNCHD_LOG = Path("/var/log/cmm-twistd.log")
FILE_MODE = 0o644  # launchd refuses a plist that others can write
SECRET_FLAGS = ("--proxy-api-key",)


@attrs.frozen
class Spec:
    """What the service runs: the command line and the environment it gets."""

    program: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Completed:
    returncode: int
    output: str


Run = Callable[[Sequence[str]], Completed]


def default_run(argv: Sequence[str]) -> Completed:
    try:
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    except FileNotFoundError:
        return Completed(127, f"{argv[0]}: command not found")
    return Completed(done.returncode, done.stdout)


# --- pure generators ---------------------------------------------------------------------------


def twistd_program(python: str = sys.executable, exists: Callable[[Path], bool] = Path.exists) -> tuple[str, ...]:
    """``twistd`` next to the Python cmm is installed in (so a virtual environment is honoured).

    The interpreter path is not resolved: a venv's python is a symlink to the base interpreter,
    whose directory has no cmm.  Without a twistd script there, that Python runs twistd itself.
    """
    interpreter = Path(os.path.abspath(python))
    twistd = interpreter.parent / "twistd"
    if exists(twistd):
        return (str(twistd),)
    return (str(interpreter), "-I", "-c", TWISTD_CODE)  # -I: no PYTHON* variables, no cwd on sys.path


# --- who could change what root runs --------------------------------------------------------------


@attrs.frozen
class FileSystem:
    """How :func:`find_writable` looks at files; tests pass fakes and need no real files."""

    lstat: Callable[[str], os.stat_result] = os.lstat
    realpath: Callable[[str], str] = os.path.realpath
    listdir: Callable[[str], list[str]] = os.listdir


@attrs.frozen
class Writable:
    """A path someone other than root could change, and why."""

    path: str
    why: str


@attrs.frozen
class CodePaths:
    """What root would run: ``files`` are checked with every folder above them, ``trees`` also
    with everything inside (a module anywhere in a package or plugin folder gets imported)."""

    files: tuple[str, ...] = ()
    trees: tuple[str, ...] = ()


def _problems(info: os.stat_result) -> list[str]:
    found = []
    if info.st_uid != 0:
        found.append(f"owned by uid {info.st_uid}")
    if not stat.S_ISLNK(info.st_mode):  # a link's own mode means nothing; its folder and target count
        if info.st_mode & stat.S_IWGRP:
            found.append(f"writable by group {info.st_gid}")
        if info.st_mode & stat.S_IWOTH:
            found.append("writable by everyone" + (" (sticky)" if info.st_mode & stat.S_ISVTX else ""))
    return found


def _chain(path: str, fs: FileSystem) -> Iterable[Writable]:
    """``path`` and every folder above it, as written and as resolved (links followed)."""
    written = os.path.abspath(path)
    for candidate in dict.fromkeys((written, fs.realpath(written))):
        parts = Path(candidate).parts
        for depth in range(1, len(parts) + 1):
            component = str(Path(*parts[:depth]))
            try:
                info = fs.lstat(component)
            except FileNotFoundError:
                yield Writable(component, "missing")
                break
            except OSError as error:
                yield Writable(component, f"cannot be checked ({error.strerror})")
                break
            for why in _problems(info):
                yield Writable(component, why)


def _tree(top: str, fs: FileSystem) -> Iterable[Writable]:
    """Everything inside ``top``; a link inside is checked where it leads."""
    try:
        names = sorted(fs.listdir(top))
    except OSError as error:
        yield Writable(top, f"cannot be listed ({error.strerror})")
        return
    for name in names:
        path = os.path.join(top, name)
        try:
            info = fs.lstat(path)
        except OSError as error:
            yield Writable(path, f"cannot be checked ({error.strerror})")
            continue
        if stat.S_ISLNK(info.st_mode):
            yield from _chain(path, fs)
            continue
        for why in _problems(info):
            yield Writable(path, why)
        if stat.S_ISDIR(info.st_mode):
            yield from _tree(path, fs)


def find_writable(code: CodePaths, fs: FileSystem = FileSystem()) -> list[Writable]:
    """Every path in ``code`` that is not root's alone: each must be owned by root and not
    writable by group or others, and so must every folder above it, from ``/`` down; a sticky
    folder such as /tmp does not count as safe (its owners may still change their own files)."""
    found: dict[Writable, None] = {}
    for path in code.files:
        found.update(dict.fromkeys(_chain(path, fs)))
    for top in code.trees:
        found.update(dict.fromkeys(_chain(top, fs)))
        found.update(dict.fromkeys(_tree(top, fs)))
    return list(found)


def _script_interpreter(script: str) -> str | None:
    """The interpreter in a script's ``#!`` line (pip writes an absolute path there)."""
    try:
        with open(script, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


def installed_code(program: Sequence[str], python: str = sys.executable,
                   script_interpreter: Callable[[str], str | None] = _script_interpreter) -> CodePaths:
    """What ``program`` (from :func:`twistd_program`) runs as root: this process's interpreter,
    standard library, cmm package and the twistd plugin folders, since the unit's interpreter is
    the one running ``cmm service install`` now."""
    import twisted.plugins

    import cmm

    files = [program[0], python, os.path.dirname(os.__file__)]
    if program[0] != python:
        interpreter = script_interpreter(program[0])
        files += [interpreter] if interpreter else []
    venv_config = Path(os.path.abspath(python)).parent.parent / "pyvenv.cfg"  # its "home" picks the stdlib
    if venv_config.exists():
        files.append(str(venv_config))
    plugins = [folder for folder in twisted.plugins.__path__ if os.path.isdir(folder)]
    return CodePaths(files=tuple(dict.fromkeys(files)), trees=(os.path.dirname(cmm.__file__), *plugins))


SYSTEM_WIDE = (
    "install cmm where only root can write, e.g. a root-owned virtual environment: "
    "`sudo python3 -m venv /opt/cmm && sudo /opt/cmm/bin/pip install .` in the cmm source folder, "
    "then `sudo /opt/cmm/bin/cmm service install ...`; or `sudo python3 -m pip install .` with a "
    "python3 that root owns"
)


def writable_message(found: Sequence[Writable], limit: int = 3) -> str:
    shown = "; ".join(f"{w.path} ({w.why})" for w in found[:limit])
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return f"the service would run as root code that not only root can change: {shown}{more}. To fix it, {SYSTEM_WIDE}"


def build_spec(twistd: Sequence[str], cmm_args: Sequence[str], config_dir: Path,
               user: tuple[str, int, int] | None) -> Spec:
    """``twistd -n --pidfile= cmm --config-dir DIR ARGS``; ``user`` = (name, uid, gid) of its owner."""
    program = (*twistd, "-n", "--pidfile=", "cmm", "--config-dir", str(config_dir), *cmm_args)
    environment: tuple[tuple[str, str], ...] = ()
    if user is not None:
        name, uid, gid = user
        environment = (("SUDO_USER", name), ("SUDO_UID", str(uid)), ("SUDO_GID", str(gid)))
    return Spec(program, environment)


def systemd_quote(argument: str) -> str:
    """One word of an ``ExecStart=`` line: ``%`` and ``$`` would be expanded by systemd otherwise."""
    if any(ch in argument for ch in "\r\n\0"):
        raise ValueError(f"a service argument cannot contain a line break: {argument!r}")
    escaped = argument.replace("%", "%%").replace("$", "$$")
    if escaped and not any(ch in escaped for ch in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(spec: Spec) -> str:
    lines = [
        "# Written by `cmm service install`; `cmm service uninstall` removes it.",
        "[Unit]",
        "Description=cmm: send chosen Claude Code models to another server",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(arg) for arg in spec.program),
    ]
    if spec.environment:
        lines.append("Environment=" + " ".join(systemd_quote(f"{k}={v}") for k, v in spec.environment))
    lines += [
        "Restart=on-failure",
        "RestartSec=2",
        "KillSignal=SIGTERM",  # cmm restores /etc/hosts on SIGTERM
        "TimeoutStopSec=15",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def launchd_plist(spec: Spec, label: str = LABEL, log: Path = LAUNCHD_LOG) -> bytes:
    data: dict[str, object] = {
        "Label": label,
        "ProgramArguments": list(spec.program),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
        "ExitTimeOut": 15,
    }
    if spec.environment:
        data["EnvironmentVariables"] = dict(spec.environment)
    return plistlib.dumps(data)


# --- the command -------------------------------------------------------------------------------


@attrs.frozen
class Manager:
    """One platform's service manager: where the file goes and how it is driven."""

    kind: str  # "systemd" or "launchd"
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / (UNIT_NAME if self.kind == "systemd" else f"{LABEL}.plist")


def manager_for(platform: str, directory: Path | None = None) -> Manager | None:
    if platform.startswith("linux"):
        return Manager("systemd", directory or SYSTEMD_DIR)
    if platform == "darwin":
        return Manager("launchd", directory or LAUNCHD_DIR)
    return None


def _own_options(extra: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """cmm service's own flags out of the arguments; the rest are ``twistd cmm`` options."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--unit-dir", type=Path, default=None)
    parser.add_argument("--print", action="store_true")
    parser.add_argument("--config-dir", type=Path, default=None)
    return parser.parse_known_args(list(extra))


def check_cmm_args(cmm_args: Sequence[str], config_dir: Path, environ: Mapping[str, str]) -> str | None:
    """What ``twistd cmm`` would refuse, found now rather than in a boot log."""
    from twisted.python import usage

    from cmm.daemon.tap import Options

    for flag in SECRET_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in cmm_args):
            return (f"{flag} would be readable by everyone in the service file and the process list; "
                    f"keep the key in {paths.env_file(config_dir)}: `cmm config set PROXY_API_KEY ...`")
    if any(arg in ("-h", "--help") for arg in cmm_args):
        return ("usage: cmm service install [--print] [--unit-dir DIR] [twistd cmm options]; "
                "`twistd cmm --help` lists those options")
    try:
        Options(environ=environ).parseOptions(["--config-dir", str(config_dir), *cmm_args])
    except usage.UsageError as error:
        return str(error)
    return None


def service_user(environ: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(name, uid, gid) of the user who ran sudo: the owner of ``~/.cmm``."""
    ids = paths.invoking_user(environ)
    name = environ.get("SUDO_USER", "")
    if ids is None or not name or name == "root":
        return None
    return name, ids[0], ids[1]


@attrs.define
class ServiceCommand:
    """``cmm service ACTION``: prints what it runs and stops at the first failure."""

    manager: Manager
    run: Run
    out: TextIO
    err: TextIO

    def fail(self, message: str) -> int:
        self.err.write(f"cmm: {message}\n")
        return 1

    def call(self, *argv: str, may_fail: bool = False) -> Completed:
        self.out.write("$ " + " ".join(argv) + "\n")
        done = self.run(argv)
        report = argv[1] in ("status", "print")  # their output is the answer, whatever the exit status
        if done.output and (done.returncode != 0 or report):
            stream = self.out if done.returncode == 0 or may_fail or report else self.err
            stream.write(done.output.rstrip("\n") + "\n")
        return done

    def steps(self, *commands: tuple[str, ...]) -> int:
        for argv in commands:
            done = self.call(*argv)
            if done.returncode != 0:
                return self.fail(self.explain(argv, done))
        return 0

    def explain(self, argv: Sequence[str], done: Completed) -> str:
        if done.returncode == 127:
            if self.manager.kind == "systemd":
                return ("systemctl not found: this system does not run systemd; run cmm with "
                        "`sudo twistd --pidfile /var/run/cmm.pid cmm ...` instead")
            return "launchctl not found"
        return f"`{' '.join(argv)}` failed (exit status {done.returncode})"

    # systemd ------------------------------------------------------------------------------------

    def systemd(self, action: str, existed: bool) -> int:
        unit = UNIT_NAME
        if action == "install":
            if existed:  # new arguments take effect now
                return self.steps(("systemctl", "daemon-reload"), ("systemctl", "enable", unit),
                                  ("systemctl", "restart", unit))
            return self.steps(("systemctl", "daemon-reload"), ("systemctl", "enable", "--now", unit))
        if action == "uninstall":
            code = self.steps(("systemctl", "disable", "--now", unit))
            if code:
                return code
            self.manager.path.unlink(missing_ok=True)
            self.out.write(f"Removed {self.manager.path}\n")
            return self.steps(("systemctl", "daemon-reload"))
        if action == "status":
            return 0 if self.call("systemctl", "status", "--no-pager", unit).returncode == 0 else 1
        return self.steps(("systemctl", action, unit))

    # launchd ------------------------------------------------------------------------------------

    def launchd(self, action: str, existed: bool) -> int:
        target, plist = f"system/{LABEL}", str(self.manager.path)
        if action == "install":
            if existed:
                self.call("launchctl", "bootout", target, may_fail=True)  # not loaded: nothing to do
            return self.steps(("launchctl", "bootstrap", "system", plist))
        if action == "uninstall":
            self.call("launchctl", "bootout", target, may_fail=True)
            self.manager.path.unlink(missing_ok=True)
            self.out.write(f"Removed {self.manager.path}\n")
            return 0
        if action == "start":
            if self.call("launchctl", "bootstrap", "system", plist, may_fail=True).returncode == 0:
                return 0
            return self.steps(("launchctl", "kickstart", target))  # already loaded: start it
        if action == "stop":
            return self.steps(("launchctl", "bootout", target))
        if action == "restart":
            return self.steps(("launchctl", "kickstart", "-k", target))
        return 0 if self.call("launchctl", "print", target).returncode == 0 else 1


def run(
    action: str,
    extra: Sequence[str],
    *,
    config_dir: Path | None,
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO,
    platform: str = sys.platform,
    run_command: Run = default_run,
    geteuid: Callable[[], int] = os.geteuid,
    python: str = sys.executable,
    find: Callable[[Path], Instance] = status.find_instance,
    code_paths: CodePaths | None = None,
    fs: FileSystem = FileSystem(),
) -> int:
    """``cmm service ACTION [--unit-dir DIR] [--print] [twistd cmm options]``.

    ``code_paths`` (default :func:`installed_code`) and ``fs`` decide what root would run and
    who could change it; ``install`` refuses, ``--print`` warns."""
    own, cmm_args = _own_options(extra)
    manager = manager_for(platform, own.unit_dir)
    if manager is None:
        err.write(f"cmm: services are supported on Linux (systemd) and macOS (launchd), not {platform}\n")
        return 1
    if cmm_args and action != "install":
        err.write(f"cmm: only `cmm service install` takes twistd cmm options, not {' '.join(cmm_args)}\n")
        return 2
    config_dir = Path(os.path.abspath(own.config_dir or config_dir or paths.config_dir(environ)))  # for the unit
    command = ServiceCommand(manager, run_command, out, err)

    if action == "install" or own.print:
        problem = check_cmm_args(cmm_args, config_dir, environ)
        if problem:
            command.fail(problem)
            return 2
        program = twistd_program(python)
        spec = build_spec(program, cmm_args, config_dir, service_user(environ))
        content = systemd_unit(spec).encode() if manager.kind == "systemd" else launchd_plist(spec)
        writable = find_writable(code_paths or installed_code(program, python), fs)
        if own.print:
            out.write(content.decode())
            if writable:
                err.write(f"cmm: warning: `cmm service install` refuses this: {writable_message(writable)}\n")
            return 0
        if writable:
            return command.fail(writable_message(writable))

    existed = manager.path.exists()
    if action != "install" and not existed:
        if action == "uninstall":
            out.write(f"cmm service is not installed (no {manager.path}).\n")
            return 0
        return command.fail(f"cmm service is not installed (no {manager.path}); "
                            "install it with `sudo cmm service install --source MODEL --target MODEL`")
    if action != "status" and geteuid() != 0:
        return command.fail(f"`cmm service {action}` changes {manager.path.parent} and the {manager.kind} "
                            f"services, which needs root: sudo cmm service {action} ... (if sudo does not "
                            "find cmm: sudo \"$(command -v cmm)\" service ...)")
    if action == "install":
        instance = find(config_dir)
        if instance.running and not existed:
            return command.fail(f"a cmm started by hand is running (pid {instance.pid}) and holds its port: "
                                "stop it first with `sudo cmm stop`")
        certs.write_atomically(manager.path, content, FILE_MODE)
        out.write(f"Wrote {manager.path}\n")
    code = command.systemd(action, existed) if manager.kind == "systemd" else command.launchd(action, existed)
    if code and action == "install" and not existed:
        manager.path.unlink(missing_ok=True)  # a failed first install leaves nothing behind
        out.write(f"Removed {manager.path} again.\n")
    if code == 0 and action == "install":
        logs = "journalctl -u cmm" if manager.kind == "systemd" else f"tail -f {LAUNCHD_LOG}"
        out.write(f"cmm runs as a {manager.kind} service now and at every boot. `cmm service status`; logs: "
                  f"`{logs}`; request log: {config_dir / paths.LOG_FILE_NAME}.\n")
        if not certs.certificate_paths(config_dir).ca_cert.exists():
            out.write("It creates its certificates at start; run `cmm setup` as yourself so Claude Code trusts them.\n")
    return code
