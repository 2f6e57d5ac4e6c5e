"""The ``cmm`` command: setup, config and stop (serving itself is ``twistd cmm``).

:func:`main` takes its argv, environment and output streams as arguments and returns an exit
code instead of exiting, so tests drive it like a user would without touching the real home,
``/etc/hosts`` or process table beyond what they create themselves.
"""

from __future__ import annotations

import argparse
import enum
import errno
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

import attrs

from cmm.config import envfile, paths

from cmm.machine import dnsflush, hosts
from cmm.cli.processes import is_cmm_process, process_alive, process_start_time
from cmm.config.userfiles import UnsafeDirectory, UserDir

if TYPE_CHECKING:  # cmm.machine.trust loads cryptography: only setup and uninstall import it, when run
    from cmm.machine.trust import Machine, Report

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
    setup.add_argument(
        "--no-profile", action="store_true", help="leave shell profiles alone (only print the NODE_EXTRA_CA_CERTS line)"
    )
    setup.add_argument(
        "--system-trust",
        action="store_true",
        help="also add the CA to the system trust store, for curl, Python and the like (needs root)",
    )
    uninstall = commands.add_parser(
        "uninstall", parents=[common], help="stop cmm, remove its trust entries, profile lines and config dir"
    )
    uninstall.add_argument("--hosts-file", type=Path, default=paths.HOSTS_FILE, metavar="PATH")
    uninstall.add_argument("--pid-file", type=Path, default=None, metavar="PATH", help="default: <config dir>/cmm.pid")
    uninstall.add_argument("--unit-dir", type=Path, default=None, metavar="DIR",
                           help="where `cmm service install` put its unit (default: the platform's)")

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
    _add_map_parser(commands, common, parser_class)
    _add_check_parsers(commands, common)
    return parser


# --- stopping a running instance ---------------------------------------------------------------


class StopState(enum.Enum):
    NO_PID_FILE = "no pid file"
    INVALID_PID_FILE = "invalid pid file"
    NOT_RUNNING = "not running"
    REUSED = "pid now belongs to another process"
    NOT_CMM = "pid belongs to a process that is not cmm"
    STOPPED = "stopped"
    TIMED_OUT = "still running"


@attrs.frozen
class StopResult:
    state: StopState
    pid: int | None = None
    reason: str = ""  # what is wrong with an unusable pid file


def stop_process(
    pid_file: Path,
    *,
    timeout: float = STOP_TIMEOUT,
    kill: Callable[[int, int], None] | None = None,
    is_alive: Callable[[int], bool] = process_alive,
    is_cmm: Callable[[int], bool] | None = None,
    started_at: Callable[[int], float | None] = process_start_time,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    environ: Mapping[str, str] = os.environ,
) -> StopResult:
    """SIGTERM the process named in ``pid_file`` and wait for it; PermissionError if not allowed.

    Only a process that is cmm is signalled: anyone who can write the pid file could otherwise
    have root kill any process. One that started after the pid file was written cannot be the
    one that wrote it (the pid was reused after a crash or reboot), so it is left alone too.
    The file is read and removed as the owner of its folder, never through a link; UnsafeDirectory
    when that folder must not be used.
    """
    try:
        folder = paths.user_dir(pid_file.parent, environ, create=False)
        text = folder.read_bytes(pid_file.name).decode("ascii", "replace")
        written = folder.lstat(pid_file.name).st_mtime
    except FileNotFoundError:
        return StopResult(StopState.NO_PID_FILE)
    except OSError as error:  # a folder, a link, a FIFO, unreadable: names no process
        return StopResult(StopState.INVALID_PID_FILE, reason=_file_problem(error))
    try:
        pid = int(text.strip())
    except ValueError:
        return StopResult(StopState.INVALID_PID_FILE, reason="holds no process id")
    if pid <= 1:  # 0 and negatives signal process groups; 1 is init
        return StopResult(StopState.INVALID_PID_FILE, pid, f"names pid {pid}, which is never cmm")
    if not is_alive(pid):
        _remove_quietly(folder, pid_file.name)
        return StopResult(StopState.NOT_RUNNING, pid)
    kill = kill or os.kill  # looked up now, so that a patched os.kill is honoured
    if not (is_cmm or is_cmm_process)(pid):  # looked up now, as kill is
        _remove_quietly(folder, pid_file.name)
        return StopResult(StopState.NOT_CMM, pid)
    started = started_at(pid)
    if started is not None and started > written + 1.0:
        _remove_quietly(folder, pid_file.name)
        return StopResult(StopState.REUSED, pid)
    kill(pid, signal.SIGTERM)
    deadline = clock() + timeout
    while is_alive(pid):
        if clock() >= deadline:
            return StopResult(StopState.TIMED_OUT, pid)
        sleep(0.05)
    _remove_quietly(folder, pid_file.name)
    return StopResult(StopState.STOPPED, pid)


def _file_problem(error: OSError) -> str:
    if error.errno == errno.EISDIR or (error.errno == errno.EINVAL and "regular" in str(error.strerror)):
        return "is not a regular file"
    return f"cannot be read ({error.strerror or error})"


def remove_stale_state(config_dir: Path, pid: int | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Remove the state file a dead run left behind (as the folder's owner), when it names ``pid``
    (None: any pid) and that process is not a running cmm; whether it was removed.

    Otherwise ``cmm status`` keeps reporting the previous run once its pid file is gone."""
    from cmm.cli import status

    instance = status.find_instance(config_dir)
    if instance.running or instance.state is None or (pid is not None and instance.state.pid != pid):
        return False
    try:
        folder = paths.user_dir(config_dir, environ, create=False)
        return folder.unlink(status.state_file(config_dir).name)
    except (OSError, UnsafeDirectory):
        return False


def _remove_quietly(folder: UserDir, name: str) -> None:
    try:
        folder.unlink(name)
    except (OSError, UnsafeDirectory):
        pass  # twistd removes its own pid file; a root-owned leftover is harmless


# --- commands ----------------------------------------------------------------------------------


@attrs.frozen
class _Context:
    environ: Mapping[str, str]
    out: TextIO
    err: TextIO
    machine: Machine | None = None  # trust's view of the computer; None: the real one
    flush_dns: Callable[[], object] = dnsflush.flush

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")

    def fail(self, line: str, status: int = EXIT_FAILURE) -> int:
        self.err.write(f"cmm: {line}\n")
        return status


def _config_dir(args: argparse.Namespace, ctx: _Context) -> Path:
    given = getattr(args, "config_dir", None)
    return given if given is not None else paths.config_dir(ctx.environ)


def _user_dir(args: argparse.Namespace, ctx: _Context) -> UserDir:
    """The config dir, checked (UnsafeDirectory: :func:`main` says what to fix) and created as the
    user when missing; whatever a command does in it runs as its owner."""
    return paths.user_dir(_config_dir(args, ctx), ctx.environ)


def _existing_user_dir(args: argparse.Namespace, ctx: _Context) -> UserDir | None:
    """As :func:`_user_dir` for commands that only read: None (nothing made) when it is missing."""
    try:
        return paths.user_dir(_config_dir(args, ctx), ctx.environ, create=False)
    except FileNotFoundError:
        return None


def _shell_line(shell: str, ca_cert: Path) -> tuple[str, str]:
    """The NODE_EXTRA_CA_CERTS line for the user's shell and the profile it belongs in."""
    from cmm.machine import trust

    return trust.export_line(trust.syntax_of(shell), ca_cert), str(trust.default_profile(Path("~"), shell).path)


def _machine(ctx: _Context) -> Machine:
    from cmm.machine import trust

    return ctx.machine if ctx.machine is not None else trust.Machine.from_environ(ctx.environ)


def _say_report(ctx: _Context, report: Report, indent: str = "") -> None:
    for line in report.lines:
        ctx.say(f"{indent}{line}")
    for warning in report.warnings:
        ctx.err.write(f"cmm: {warning}\n")


def _setup(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm.machine import certs, trust  # imported here: only setup and uninstall need cryptography

    from cmm.daemon.tap import ensure_certificates

    directory = _config_dir(args, ctx)
    machine = _machine(ctx)
    store, problem = trust.system_preflight(
        certs.certificate_paths(directory).ca_cert, machine, requested=args.system_trust, force=args.force
    )
    if problem:
        return ctx.fail(problem)
    try:
        folder = _user_dir(args, ctx)
        directory = folder.path
        result = ensure_certificates(folder, force=args.force)
    except certs.CertificateError as error:  # a CA cmm will not use, a linked folder or file
        return ctx.fail(str(error))
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
    else:
        _say_reload(ctx, directory, result.created_ca)
    report = trust.setup_trust(
        result.paths.ca_cert,
        machine,
        profile=not args.no_profile,
        store=store,
        system_requested=args.system_trust,
        created_ca=result.created_ca,
    )
    line, profile = _shell_line(machine.shell, result.paths.ca_cert)
    if report.lines:
        ctx.say()
        ctx.say("Trust for the CA:")
        _say_report(ctx, report, "  ")
    else:
        _say_report(ctx, report)
    ctx.say()
    if args.no_profile:
        ctx.say(f"Claude Code trusts the CA through NODE_EXTRA_CA_CERTS: add this line to {profile}")
        ctx.say("(--no-profile: cmm did not) and run it in this terminal:")
    else:
        ctx.say("New terminals get NODE_EXTRA_CA_CERTS from your shell profile; in this one, run:")
    ctx.say()
    ctx.say(f"    {line}")
    ctx.say()
    ctx.say("Claude Code must be started from a terminal that has it.")
    return EXIT_FAILURE if report.failed else EXIT_OK


def _say_reload(ctx: _Context, directory: Path, created_ca: bool) -> None:
    """A running cmm keeps serving the certificate it loaded until SIGHUP: say how to reload."""
    from cmm.cli import status

    instance = status.find_instance(directory)
    if not instance.running:
        return
    ctx.say(f"cmm is running (pid {instance.pid}) and still serves the previous certificate; "
            f"load the new one with: sudo kill -HUP {instance.pid}")
    if created_ca:
        ctx.say("Claude Code sessions started before now trust the previous CA only: restart them.")


def _mask(value: str) -> str:
    return "****" + value[-4:] if len(value) > 4 else "****"


def _shown(key: str, value: str) -> str:
    return _mask(value) if envfile.SETTINGS[key].secret and value else value


def _default_text(key: str) -> str:
    return f"(default: {envfile.SETTINGS[key].default or 'empty'})"


def _config(args: argparse.Namespace, ctx: _Context) -> int:
    key: str | None = getattr(args, "key", None)
    if key is not None and key not in envfile.SETTINGS:
        return ctx.fail(envfile.unknown_key_message(key), EXIT_USAGE)
    folder = _existing_user_dir(args, ctx)
    path = paths.env_file(folder.path if folder is not None else _config_dir(args, ctx))
    try:
        text = envfile.load_from(folder) if folder is not None else ""
    except PermissionError:
        return ctx.fail(f"permission denied reading {path}")
    except OSError as error:
        return ctx.fail(f"cannot read {path}: {error.strerror or error}")
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
        envfile.save_text(folder or _user_dir(args, ctx), new_text)
    except PermissionError:
        return ctx.fail(f"permission denied writing {path}")
    except OSError as error:
        return ctx.fail(f"cannot write {path}: {error.strerror or error}")
    ctx.say(message)
    return EXIT_OK


def _stop(args: argparse.Namespace, ctx: _Context, timeout: float = STOP_TIMEOUT) -> int:
    config_dir = _config_dir(args, ctx)
    if args.pid_file is not None:  # named by whoever runs cmm (e.g. /var/run, a link to /run): its folder is resolved
        pid_file = Path(os.path.realpath(args.pid_file.parent)) / args.pid_file.name
    else:
        pid_file = paths.pid_file(config_dir)
    try:
        result = stop_process(pid_file, timeout=timeout, environ=ctx.environ)
    except PermissionError:
        return ctx.fail(f"permission denied stopping the process named in {pid_file}; use `sudo cmm stop`")
    pid = result.pid
    if result.state is StopState.TIMED_OUT:
        return ctx.fail(
            f"cmm (pid {pid}) did not exit within {timeout:g} s; end it with `sudo kill -9 {pid}`, "
            "then run `sudo cmm stop` again to clean up /etc/hosts"
        )
    code = EXIT_OK
    if result.state is StopState.INVALID_PID_FILE:
        fix = ("give --pid-file the file twistd wrote" if args.pid_file is not None
               else f"if cmm is not running, move it away (mv {pid_file} {pid_file}.old)")
        code = ctx.fail(f"{pid_file} {result.reason}, so it names no process to stop; {fix}")
    else:
        ctx.say({
            StopState.NO_PID_FILE: f"cmm is not running (no pid file at {pid_file}).",
            StopState.NOT_RUNNING: f"cmm is not running (stale pid file {pid_file} named pid {pid}).",
            StopState.REUSED: f"cmm is not running (pid {pid} from {pid_file} is now another process; left alone).",
            StopState.NOT_CMM: f"cmm is not running: pid {pid} from {pid_file} is not cmm, so it was left alone "
                               f"and the stale pid file removed.",
            StopState.STOPPED: f"Stopped cmm (pid {pid}).",
        }[result.state])
    if remove_stale_state(config_dir, None if pid is None or result.state is StopState.INVALID_PID_FILE else pid,
                          ctx.environ):
        ctx.say(f"Removed the state file the previous run left in {config_dir}.")
    hosts_file: Path = args.hosts_file
    try:
        changed = hosts.restore(hosts_file)
    except FileNotFoundError:
        ctx.say(f"{hosts_file} does not exist; nothing to restore.")
        return code
    except PermissionError:
        return ctx.fail(f"permission denied editing {hosts_file}; use `sudo cmm stop`")
    if changed:
        ctx.say(f"Removed the leftover cmm block from {hosts_file}.")
        ctx.flush_dns()
    else:
        ctx.say(f"{hosts_file} has no cmm block.")
    return code


# --- cmm uninstall ------------------------------------------------------------------------------


def _uninstall(args: argparse.Namespace, ctx: _Context) -> int:
    """Everything cmm set up, in the order that leaves nothing half done: the running instance
    and /etc/hosts first, then trust, and only then the folder holding the CA."""
    from cmm.machine import certs, trust

    from cmm.cli import service as unit

    directory = _config_dir(args, ctx)
    manager = unit.manager_for(sys.platform, args.unit_dir)
    if manager is not None and manager.path.exists():  # else the service manager would start cmm again
        return ctx.fail(f"cmm runs as a boot service ({manager.path}): remove it first with "
                        f"`sudo cmm service uninstall`; nothing was removed")
    if _stop(args, ctx) != EXIT_OK:
        return ctx.fail("nothing else was removed")
    machine = _machine(ctx)
    report = trust.uninstall_trust(certs.certificate_paths(directory).ca_cert, machine)
    _say_report(ctx, report)
    if report.failed:
        return ctx.fail(f"{directory} was kept; fix the above and run `cmm uninstall` again")
    try:
        folder = trust.remove_config_dir(paths.user_dir(directory, ctx.environ, create=False))
    except FileNotFoundError:
        folder = trust.RemovedFolder((), (), False)
    except OSError as error:
        return ctx.fail(f"cannot remove {error.filename or directory}: {error.strerror or error}")
    if folder.folder_removed:
        ctx.say(f"Removed {directory} ({len(folder.removed)} files).")
    elif folder.left:
        names = ", ".join(entry.name for entry in folder.left)
        ctx.say(f"Removed cmm's {len(folder.removed)} files from {directory}.")
        ctx.err.write(f"cmm: kept {directory}: it also holds {names}, which cmm did not make\n")
    else:
        ctx.say(f"{directory} does not exist.")
    syntax = trust.syntax_of(machine.shell)
    ctx.say()
    ctx.say(f"cmm is uninstalled. Open a new terminal, or run `{trust.unset_line(syntax)}` in this one.")
    return EXIT_OK


# --- cmm map: the mappings file -----------------------------------------------------------------


def _add_map_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser, parser_class: Callable[..., _ArgumentParser]
) -> None:
    map_ = commands.add_parser("map", parents=[common], help="show or change mappings in <config dir>/mappings.toml")
    actions = map_.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    actions.add_parser("list", parents=[common], help="every mapping with its upstream and (masked) key")
    add = actions.add_parser("add", parents=[common], help="add a mapping, or replace the one with the same source")
    add.add_argument("source", metavar="SOURCE", help="model prefix to intercept, e.g. claude-haiku-4-5")
    add.add_argument("target", metavar="TARGET", help="model the upstream is asked for, e.g. gemini-2.5-flash")
    add.add_argument("--url", default=None, metavar="URL", help="upstream for this mapping (default: PROXY_URL)")
    add.add_argument("--api-key", default=None, metavar="KEY", help="key for that upstream (default: PROXY_API_KEY)")
    remove = actions.add_parser("remove", parents=[common], help="remove the mapping with this source")
    remove.add_argument("source", metavar="SOURCE")


def _env_pair(folder: UserDir | None) -> tuple[str, str] | None:
    """The .env DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL pair, which applies next to the mappings
    file unless the file maps the same source; None when unset or unreadable."""
    if folder is None:
        return None
    try:
        values = envfile.parse_env(envfile.load_from(folder))
    except OSError:
        return None
    source, target = values.get("DEFAULT_SOURCE_MODEL", ""), values.get("DEFAULT_TARGET_MODEL", "")
    return (source, target) if source and target else None


def _lines(message: str) -> str:
    """Each line of a multi-problem message gets the ``cmm:`` prefix, as a single one would."""
    return message.replace("\n", "\ncmm: ")


def _map(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm.config import mappings  # imported here: the other commands do not need it

    folder = _existing_user_dir(args, ctx)
    directory = folder.path if folder is not None else _config_dir(args, ctx)
    path = mappings.mappings_file(directory)
    try:
        specs = mappings.load_from(folder) if folder is not None else ()
    except mappings.MappingsError as error:
        return ctx.fail(_lines(f"{error}\nfix {path} by hand; it was left unchanged"), EXIT_USAGE)
    except OSError as error:
        return ctx.fail(f"cannot read {path}: {error.strerror or error}")

    def url(spec: mappings.MappingSpec) -> str:
        return spec.url or "(PROXY_URL)"

    def key(spec: mappings.MappingSpec) -> str:
        return "(PROXY_API_KEY)" if spec.api_key is None else _mask(spec.api_key) if spec.api_key else "(no key)"

    pair = _env_pair(folder)
    if args.action == "list":
        if not specs:
            ctx.say(f"No mappings in {path}; add one with `cmm map add SOURCE TARGET`.")
        rows = [(spec.source, spec.target, url(spec), key(spec)) for spec in specs]
        widths = [max(map(len, column)) for column in zip(*rows)]
        for source, target, upstream, api_key in rows:
            ctx.say(f"{source:<{widths[0]}} → {target:<{widths[1]}}  {upstream:<{widths[2]}}  key {api_key}")
        if pair is not None and all(spec.source != pair[0] for spec in specs):
            ctx.say(f"and from .env (DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL): {pair[0]} → {pair[1]}")
        return EXIT_OK

    try:
        if args.action == "add":
            spec = mappings.MappingSpec(args.source, args.target, args.url, args.api_key)
            verb = "Replaced" if any(s.source == spec.source for s in specs) else "Added"
            new_specs = mappings.add_mapping(specs, spec)
            message = f"{verb} {spec.source} → {spec.target} via {url(spec)} (key {key(spec)}) in {path}"
            if pair is not None and pair[0] == spec.source:
                message += f"; it replaces the .env pair {pair[0]} → {pair[1]}"
        else:  # remove
            new_specs = mappings.remove_mapping(specs, args.source)
            message = f"Removed the mapping for {args.source} from {path}"
    except mappings.MappingsError as error:
        return ctx.fail(_lines(str(error)), EXIT_USAGE)
    try:
        mappings.save(folder or _user_dir(args, ctx), new_specs)
    except OSError as error:
        return ctx.fail(f"cannot write {path}: {error.strerror or error}")
    ctx.say(message)
    ctx.say(mappings.reload_hint(directory))
    return EXIT_OK


# --- cmm status, test, doctor and service: thin shells over their modules ------------------------


def _add_check_parsers(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[common], help="is cmm running, with what; exit 1 when not")
    status.add_argument("--hosts-file", type=Path, default=paths.HOSTS_FILE, metavar="PATH")
    status.add_argument("--timeout", type=float, default=3.0, metavar="S", help="for the target probe (default: 3)")

    test = commands.add_parser("test", parents=[common], help="end-to-end self-test: one intercepted, one passthrough")
    test.add_argument("--temporary", action="store_true", help="test a temporary cmm even when one is running")
    test.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per request (default: 60)")
    temporary = test.add_argument_group("temporary cmm (when none runs, or --temporary)")
    temporary.add_argument("--port", type=int, default=None, help="default: a free high port")
    temporary.add_argument("--source", default=None, metavar="MODEL")
    temporary.add_argument("--target", default=None, metavar="MODEL")
    temporary.add_argument("--proxy-url", default=None, metavar="URL")
    temporary.add_argument("--anthropic-ip", default=None, metavar="IP[,IP]")
    temporary.add_argument("--anthropic-port", type=int, default=None, metavar="PORT")

    doctor = commands.add_parser("doctor", parents=[common], help="check every prerequisite and say how to fix it")
    doctor.add_argument("--hosts-file", type=Path, default=paths.HOSTS_FILE, metavar="PATH")
    doctor.add_argument("--port", type=int, default=443, help="the port cmm serves on (default: 443)")
    doctor.add_argument("--timeout", type=float, default=3.0, metavar="S", help="for the target probe (default: 3)")
    doctor.add_argument("--dns-server", type=_dns_servers, default=(), metavar="IP[:PORT][,...]",
                        help="name servers to ask for api.anthropic.com (default: those in resolv.conf)")

    service = commands.add_parser(
        "service", parents=[common], help="run cmm at boot (systemd on Linux, launchd on macOS)",
        description="install [--print] [--unit-dir DIR] [twistd cmm options, e.g. --source M --target M] | "
                    "uninstall | start | stop | restart | status",
    )
    service.add_argument("action", choices=("install", "uninstall", "start", "stop", "restart", "status"))
    service.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help=argparse.SUPPRESS)


def _status(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm.cli import status

    return status.run(_config_dir(args, ctx), environ=ctx.environ, hosts_file=args.hosts_file, timeout=args.timeout,
                      write=ctx.out.write)


def _test(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm.cli import selftest

    options = selftest.Options(temporary=args.temporary, timeout=args.timeout, port=args.port, source=args.source,
                               target=args.target, proxy_url=args.proxy_url, anthropic_ip=args.anthropic_ip,
                               anthropic_port=args.anthropic_port)
    return selftest.run(_config_dir(args, ctx), options, environ=ctx.environ, write=ctx.out.write)


def _doctor(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm.cli import doctor

    return doctor.run(_config_dir(args, ctx), environ=ctx.environ, hosts_file=args.hosts_file, port=args.port,
                      timeout=args.timeout, write=ctx.out.write, dns_servers=args.dns_server)


def _dns_servers(text: str) -> tuple[tuple[str, int], ...]:
    from cmm.core import values

    try:
        return values.parse_servers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _service(args: argparse.Namespace, ctx: _Context) -> int:
    from cmm.cli import service as unit

    return unit.run(args.action, args.rest, config_dir=getattr(args, "config_dir", None), environ=ctx.environ,
                    out=ctx.out, err=ctx.err)


_COMMANDS: Mapping[str, Callable[[argparse.Namespace, _Context], int]] = {
    "setup": _setup,
    "config": _config,
    "stop": _stop,
    "uninstall": _uninstall,
    "map": _map,
    "status": _status,
    "test": _test,
    "doctor": _doctor,
    "service": _service,
}


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    machine: Machine | None = None,
    flush_dns: Callable[[], object] | None = None,
) -> int:
    """Run one ``cmm`` command; returns the exit code (the console script passes it to sys.exit).

    ``machine`` replaces the real computer for setup and uninstall (profiles, trust store);
    ``flush_dns`` the OS DNS cache flush after the hosts file changed.
    """
    ctx = _Context(
        environ=os.environ if environ is None else environ,
        out=sys.stdout if stdout is None else stdout,
        err=sys.stderr if stderr is None else stderr,
        machine=machine,
        flush_dns=flush_dns or dnsflush.flush,
    )
    parser = _build_parser(ctx.out, ctx.err)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _Exit as done:
        return done.status
    try:
        return _COMMANDS[args.command](args, ctx)
    except UnsafeDirectory as error:
        return ctx.fail(str(error))


if __name__ == "__main__":  # ``python -m cmm.cli.main``; ``python -m cmm.cli`` runs cli/__main__.py
    sys.exit(main())
