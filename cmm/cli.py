"""The ``cmm`` command: setup, config and stop (serving itself is ``twistd cmm``).

:func:`main` takes its argv, environment and output streams as arguments and returns an exit
code instead of exiting, so tests drive it like a user would without touching the real home,
``/etc/hosts`` or process table beyond what they create themselves.
"""

from __future__ import annotations

import argparse
import enum
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

import attrs

from cmm import envfile, hosts, paths

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

STOP_TIMEOUT = 10.0


# --- argparse that writes to the injected streams and never calls sys.exit ---------------------


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: object, out: TextIO, err: TextIO, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._out = out
        self._err = err

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            (self._err if file is sys.stderr else self._out).write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._err.write(message)
        raise _Exit(status)


def _build_parser(out: TextIO, err: TextIO) -> _ArgumentParser:
    parser_class = functools.partial(_ArgumentParser, out=out, err=err)
    # SUPPRESS: the option may be given at any level without a lower level resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config-dir",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="settings and certificates (default: ~/.cmm of the user who ran sudo, else yours)",
    )

    parser = parser_class(prog="cmm", description="Route chosen Claude Code models to another server.", parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    commands.required = True

    setup = commands.add_parser("setup", parents=[common], help="create the local CA and server certificate")
    setup.add_argument("--force", action="store_true", help="make a new CA and server certificate")

    config = commands.add_parser("config", parents=[common], help="show or change settings in <config dir>/.env")
    actions = config.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    actions.add_parser("list", parents=[common], help="every setting with its value or default")
    get = actions.add_parser("get", parents=[common], help="print one setting")
    get.add_argument("key", metavar="KEY")
    set_ = actions.add_parser("set", parents=[common], help="store a setting")
    set_.add_argument("key", metavar="KEY")
    set_.add_argument("value", metavar="VALUE")
    delete = actions.add_parser("delete", parents=[common], help="remove a setting (back to its default)")
    delete.add_argument("key", metavar="KEY")

    stop = commands.add_parser("stop", parents=[common], help="stop a running cmm and clean up /etc/hosts")
    stop.add_argument("--hosts-file", type=Path, default=paths.HOSTS_FILE, metavar="PATH")
    stop.add_argument("--pid-file", type=Path, default=None, metavar="PATH", help="default: <config dir>/cmm.pid")
    return parser


# --- stopping a running instance ---------------------------------------------------------------


class StopState(enum.Enum):
    NO_PID_FILE = "no pid file"
    INVALID_PID_FILE = "invalid pid file"
    NOT_RUNNING = "not running"
    REUSED = "pid now belongs to another process"
    STOPPED = "stopped"
    TIMED_OUT = "still running"


@attrs.frozen
class StopResult:
    state: StopState
    pid: int | None = None


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first); None without /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_alive(pid: int, kill: Callable[[int, int], None] | None = None) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        (kill or os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    fields = _proc_stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), from /proc; None where that is unknown."""
    fields = _proc_stat_fields(pid)
    try:
        ticks = int(fields[19]) if fields else None
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    if ticks is None:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def stop_process(
    pid_file: Path,
    *,
    timeout: float = STOP_TIMEOUT,
    kill: Callable[[int, int], None] | None = None,
    is_alive: Callable[[int], bool] = process_alive,
    started_at: Callable[[int], float | None] = process_start_time,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> StopResult:
    """SIGTERM the process named in ``pid_file`` and wait for it; PermissionError if not allowed.

    A process that started after the pid file was written cannot be the one that wrote it (the pid
    was reused after a crash or reboot), so it is left alone.
    """
    try:
        text = pid_file.read_text()
        written = pid_file.stat().st_mtime
    except FileNotFoundError:
        return StopResult(StopState.NO_PID_FILE)
    try:
        pid = int(text.strip())
    except ValueError:
        return StopResult(StopState.INVALID_PID_FILE)
    if pid <= 1:  # 0 and negatives signal process groups; 1 is init
        return StopResult(StopState.INVALID_PID_FILE, pid)
    if not is_alive(pid):
        _remove_quietly(pid_file)
        return StopResult(StopState.NOT_RUNNING, pid)
    kill = kill or os.kill  # looked up now, so that a patched os.kill is honoured
    started = started_at(pid)
    if started is not None and started > written + 1.0:
        _remove_quietly(pid_file)
        return StopResult(StopState.REUSED, pid)
    kill(pid, signal.SIGTERM)
    deadline = clock() + timeout
    while is_alive(pid):
        if clock() >= deadline:
            return StopResult(StopState.TIMED_OUT, pid)
        sleep(0.05)
    _remove_quietly(pid_file)
    return StopResult(StopState.STOPPED, pid)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # twistd removes its own pid file; a root-owned leftover is harmless


# --- commands ----------------------------------------------------------------------------------


@attrs.frozen
class _Context:
    environ: Mapping[str, str]
    out: TextIO
    err: TextIO

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")

    def fail(self, line: str, status: int = EXIT_FAILURE) -> int:
        self.err.write(f"cmm: {line}\n")
        return status


def _config_dir(args: argparse.Namespace, ctx: _Context) -> Path:
    given = getattr(args, "config_dir", None)
    return given if given is not None else paths.config_dir(ctx.environ)


_SH_SPECIAL = '\\"$`'  # what must be escaped inside "..." in sh/bash/zsh
_FISH_SPECIAL = '\\"$'


def _double_quoted(value: str, special: str) -> str:
    return '"' + "".join("\\" + ch if ch in special else ch for ch in value) + '"'


def _shell_line(shell: str, ca_cert: Path) -> tuple[str, str]:
    """The NODE_EXTRA_CA_CERTS line for the user's shell and the profile it belongs in."""
    if shell.endswith("fish"):
        return f"set -gx NODE_EXTRA_CA_CERTS {_double_quoted(str(ca_cert), _FISH_SPECIAL)}", "~/.config/fish/config.fish"
    profile = {"zsh": "~/.zshrc", "bash": "~/.bashrc"}.get(Path(shell).name, "your shell profile (e.g. ~/.profile)")
    return f"export NODE_EXTRA_CA_CERTS={_double_quoted(str(ca_cert), _SH_SPECIAL)}", profile


def _setup(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm import certs  # imported here: only setup needs cryptography

    directory = _config_dir(args, ctx)
    try:
        result = certs.ensure_certificates(directory, force=args.force, owner=paths.invoking_user(ctx.environ))
    except PermissionError as error:
        return ctx.fail(f"permission denied writing {error.filename or directory}: {error.strerror}")
    except OSError as error:
        return ctx.fail(f"cannot write the certificates in {directory}: {error}")
    until = f"{result.server_not_after:%Y-%m-%d}"
    if result.created_ca:
        ctx.say(f"Created a local certificate authority: {result.paths.ca_cert}")
    if result.issued_server:
        ctx.say(f"Issued a server certificate for {hosts.HOSTNAME}, valid until {until}: {result.paths.server_cert}")
    if not (result.created_ca or result.issued_server):
        ctx.say(f"Certificates are in place in {directory} (server certificate valid until {until}).")
        ctx.say("Use --force to make new ones.")
    line, profile = _shell_line(ctx.environ.get("SHELL", ""), result.paths.ca_cert)
    ctx.say()
    ctx.say(f"Claude Code must trust the CA. Add this line to {profile}")
    ctx.say("(cmm setup does not edit shell profiles yet):")
    ctx.say()
    ctx.say(f"    {line}")
    ctx.say()
    ctx.say("Then open a new terminal so that Claude Code sees it.")
    return EXIT_OK


def _mask(value: str) -> str:
    return "****" + value[-4:] if len(value) > 4 else "****"


def _shown(key: str, value: str) -> str:
    return _mask(value) if envfile.SETTINGS[key].secret and value else value


def _default_text(key: str) -> str:
    return f"(default: {envfile.SETTINGS[key].default or 'empty'})"


def _config(args: argparse.Namespace, ctx: _Context) -> int:
    path = paths.env_file(_config_dir(args, ctx))
    key: str | None = getattr(args, "key", None)
    if key is not None and key not in envfile.SETTINGS:
        return ctx.fail(envfile.unknown_key_message(key), EXIT_USAGE)
    try:
        text = envfile.load_text(path)
    except PermissionError:
        return ctx.fail(f"permission denied reading {path}")
    values = envfile.parse_env(text)

    if args.action == "list":
        width = max(map(len, envfile.KEYS)) + 2
        for name in envfile.KEYS:
            if name in values:
                shown = _shown(name, values[name]) or "(empty)"
                problem = envfile.validate(name, values[name])
                if problem:
                    shown += f"  (invalid: {problem})"
            else:
                shown = _default_text(name)
            ctx.say(f"{name:<{width}}{shown}")
        return EXIT_OK

    assert key is not None
    if args.action == "get":
        ctx.say(values.get(key, envfile.SETTINGS[key].default))
        return EXIT_OK

    if args.action == "set":
        problem = envfile.validate(key, args.value)
        if problem:
            return ctx.fail(problem, EXIT_USAGE)
        new_text = envfile.set_value(text, key, args.value)
        message = f"Set {key}={_shown(key, args.value)} in {path}"
    else:  # delete
        if key not in values:
            ctx.say(f"{key} is not set in {path} {_default_text(key)}")
            return EXIT_OK
        new_text = envfile.delete_value(text, key)
        message = f"Deleted {key} from {path}; now {_default_text(key)}"
    try:
        envfile.save_text(path, new_text, owner=paths.invoking_user(ctx.environ))
    except PermissionError:
        return ctx.fail(f"permission denied writing {path}")
    ctx.say(message)
    return EXIT_OK


def _stop(args: argparse.Namespace, ctx: _Context, timeout: float = STOP_TIMEOUT) -> int:
    pid_file = args.pid_file if args.pid_file is not None else paths.pid_file(_config_dir(args, ctx))
    try:
        result = stop_process(pid_file, timeout=timeout)
    except PermissionError:
        return ctx.fail(f"permission denied stopping the process named in {pid_file}; use `sudo cmm stop`")
    pid = result.pid
    if result.state is StopState.TIMED_OUT:
        return ctx.fail(
            f"cmm (pid {pid}) did not exit within {timeout:g} s; end it with `sudo kill -9 {pid}`, "
            "then run `sudo cmm stop` again to clean up /etc/hosts"
        )
    ctx.say(
        {
            StopState.NO_PID_FILE: f"cmm is not running (no pid file at {pid_file}).",
            StopState.INVALID_PID_FILE: f"cmm is not running ({pid_file} holds no usable process id).",
            StopState.NOT_RUNNING: f"cmm is not running (stale pid file {pid_file} named pid {pid}).",
            StopState.REUSED: f"cmm is not running (pid {pid} from {pid_file} is now another process; left alone).",
            StopState.STOPPED: f"Stopped cmm (pid {pid}).",
        }[result.state]
    )
    hosts_file: Path = args.hosts_file
    try:
        changed = hosts.restore(hosts_file)
    except FileNotFoundError:
        ctx.say(f"{hosts_file} does not exist; nothing to restore.")
        return EXIT_OK
    except PermissionError:
        return ctx.fail(f"permission denied editing {hosts_file}; use `sudo cmm stop`")
    if changed:
        ctx.say(f"Removed the leftover cmm block from {hosts_file}.")
    else:
        ctx.say(f"{hosts_file} has no cmm block.")
    return EXIT_OK


_COMMANDS: Mapping[str, Callable[[argparse.Namespace, _Context], int]] = {
    "setup": _setup,
    "config": _config,
    "stop": _stop,
}


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one ``cmm`` command; returns the exit code (the console script passes it to sys.exit)."""
    ctx = _Context(
        environ=os.environ if environ is None else environ,
        out=sys.stdout if stdout is None else stdout,
        err=sys.stderr if stderr is None else stderr,
    )
    parser = _build_parser(ctx.out, ctx.err)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _Exit as done:
        return done.status
    return _COMMANDS[args.command](args, ctx)
