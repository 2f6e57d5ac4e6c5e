"""The ``cmm`` command: the argument parser and the dispatch to one module per command
(serving itself is ``twistd cmm``).

:func:`main` takes its argv, environment and output streams as arguments and returns an exit
code instead of exiting, so tests drive it like a user would without touching the real home,
``/etc/hosts`` or process table beyond what they create themselves.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from cmm.cli import config, dashboard, setup, stop, uninstall
from cmm.cli import map as map_command
from cmm.cli import usage as usage_command
from cmm.cli.context import EXIT_OK, EXIT_FAILURE, EXIT_USAGE, Context, config_dir
from cmm.cli.stop import STOP_TIMEOUT, StopResult, StopState, remove_stale_state, stop_process
from cmm.config import paths
from cmm.config.userfiles import UnsafeDirectory
from cmm.machine import dnsflush

if TYPE_CHECKING:  # for annotations only: commands that use the machine import it when run
    from cmm.machine.commands import Machine

# Named here too: callers and tests reach them as cmm.cli.main.<name>.
__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "STOP_TIMEOUT", "StopResult", "StopState", "main",
           "remove_stale_state", "stop_process"]


# --- argparse that writes to the injected streams and never calls sys.exit ---------------------


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _ArgumentParser(argparse.ArgumentParser):
    """Writes to ``_out`` and ``_err``, which :func:`_parser_class` binds: argparse builds the
    subcommands' parsers from a class, so the streams travel on the class."""

    _out: TextIO
    _err: TextIO

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            (self._err if file is sys.stderr else self._out).write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._err.write(message)
        raise _Exit(status)


def _parser_class(out: TextIO, err: TextIO) -> type[_ArgumentParser]:
    class StreamParser(_ArgumentParser):
        _out = out
        _err = err

    return StreamParser


def _build_parser(out: TextIO, err: TextIO) -> _ArgumentParser:
    parser_class = _parser_class(out, err)
    # SUPPRESS: the option may be given at any level without a lower level resetting it.
    common = parser_class(add_help=False)
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
    map_command.add_parser(commands, common, parser_class)
    usage_command.add_parser(commands, common, parser_class)
    _add_check_parsers(commands, common)
    dashboard.add_parser(commands, common)
    return parser


# --- stopping a running instance ---------------------------------------------------------------


# --- commands ----------------------------------------------------------------------------------


# --- cmm uninstall ------------------------------------------------------------------------------


# --- cmm map: the mappings file -----------------------------------------------------------------


# --- cmm status, test, doctor and service: thin shells over their modules ------------------------


def _add_check_parsers(commands: argparse._SubParsersAction[_ArgumentParser], common: _ArgumentParser) -> None:
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


def _status(args: argparse.Namespace, ctx: Context) -> int:
    from cmm.cli import status

    return status.run(config_dir(args, ctx), environ=ctx.environ, hosts_file=args.hosts_file, timeout=args.timeout,
                      write=ctx.out.write)


def _test(args: argparse.Namespace, ctx: Context) -> int:
    from cmm.cli import selftest

    options = selftest.Options(temporary=args.temporary, timeout=args.timeout, port=args.port, source=args.source,
                               target=args.target, proxy_url=args.proxy_url, anthropic_ip=args.anthropic_ip,
                               anthropic_port=args.anthropic_port)
    return selftest.run(config_dir(args, ctx), options, environ=ctx.environ, write=ctx.out.write)


def _doctor(args: argparse.Namespace, ctx: Context) -> int:
    from cmm.cli import doctor

    return doctor.run(config_dir(args, ctx), environ=ctx.environ, hosts_file=args.hosts_file, port=args.port,
                      timeout=args.timeout, write=ctx.out.write, dns_servers=args.dns_server)


def _dns_servers(text: str) -> tuple[tuple[str, int], ...]:
    from cmm.core import values

    try:
        return values.parse_servers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _service(args: argparse.Namespace, ctx: Context) -> int:
    from cmm.cli import service as unit

    return unit.run(args.action, args.rest, config_dir=getattr(args, "config_dir", None), environ=ctx.environ,
                    out=ctx.out, err=ctx.err)


_COMMANDS: Mapping[str, Callable[[argparse.Namespace, Context], int]] = {
    "setup": setup.run,
    "config": config.run,
    "stop": stop.run,
    "uninstall": uninstall.run,
    "map": map_command.run,
    "status": _status,
    "test": _test,
    "doctor": _doctor,
    "service": _service,
    "usage": usage_command.run,
    "dashboard": dashboard.run,
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
    ctx = Context(
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
