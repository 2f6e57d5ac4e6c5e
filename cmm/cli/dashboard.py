"""``cmm dashboard``: serve the dashboard (:mod:`cmm.dashboard`) on 127.0.0.1 until Ctrl-C.

It only reads (the usage store, the state file, the control socket), so it runs as the user:
started by root under sudo, it becomes the user who ran sudo before it opens anything; root
without sudo becomes whoever owns the config dir (root stays root only when that is root).
"""

from __future__ import annotations

import argparse
import os
import secrets
import webbrowser
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from cmm.cli.context import EXIT_OK, Context, config_dir
from cmm.config import paths

DEFAULT_PORT = 8399


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    dashboard = commands.add_parser("dashboard", parents=[common],
                                    help="a live page of cmm's requests, tokens and latency, on 127.0.0.1")
    dashboard.add_argument("--port", type=_port, default=DEFAULT_PORT,
                           help=f"on 127.0.0.1 (default: {DEFAULT_PORT}; 0: any free port)")
    dashboard.add_argument("--no-browser", action="store_true", help="only print the address, open no browser")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535)")
    return port


# --- whom to run as -------------------------------------------------------------------------------


@attrs.frozen
class RunAs:
    uid: int
    gid: int
    name: str


def run_as(euid: int, environ: Mapping[str, str], directory_owner: int | None) -> RunAs | None:
    """The user root should become before serving (None: stay who we are)."""
    if euid != 0:
        return None
    ids = paths.invoking_user(environ)
    if ids is not None and ids[0] != 0:
        return RunAs(ids[0], ids[1], environ.get("SUDO_USER", "") or str(ids[0]))
    if directory_owner:  # root without sudo: act as the config dir's owner, as cmm does everywhere
        import pwd

        try:
            entry = pwd.getpwuid(directory_owner)
        except KeyError:
            return RunAs(directory_owner, directory_owner, str(directory_owner))
        return RunAs(directory_owner, entry.pw_gid, entry.pw_name)
    return None


def drop_privileges(user: RunAs) -> None:
    """Become ``user`` for good (real, effective and saved ids, and their groups)."""
    try:
        groups = os.getgrouplist(user.name, user.gid)
    except (KeyError, OSError):
        groups = [user.gid]
    os.setgroups(groups)
    os.setgid(user.gid)
    os.setuid(user.uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("could not give up root")


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


# --- the live counters, from the control socket as `cmm status` reads them ------------------------


async def live_status(directory: Path, reactor: Any, *, find: Callable[[Path], Any] | None = None,
                      read: Callable[[Path], Awaitable[object | None]] | None = None) -> dict[str, Any]:
    """The running cmm and its counters per route and worker, as plain JSON values (``find`` and
    ``read``: `cmm status`'s own pid/state check and control-socket client unless given)."""
    from cmm.cli import status

    instance = (find or status.find_instance)(directory)
    if not instance.running:
        return {"running": False, "pid": None, "note": instance.note, "routes": [], "workers": []}
    state = instance.state
    base = state.config_dir if state is not None and state.config_dir is not None else directory
    socket_path = base / paths.CONTROL_SOCKET_NAME
    data = await (read(socket_path) if read is not None else status.read_live(socket_path, reactor=reactor))
    note = "" if data is not None else "its control socket did not answer"
    return {
        "running": True,
        "pid": instance.pid,
        "note": note,
        "started": state.started.isoformat() if state is not None and state.started else None,
        "mappings": [attrs.asdict(m) for m in state.mappings] if state is not None else [],
        "routes": [{**attrs.asdict(r), "by_status": dict(r.by_status)} for r in status.parse_live(data)],
        "workers": [attrs.asdict(w) for w in status.parse_workers(data)],
    }


def _log_errors_to(stream: Any) -> None:
    """Only errors reach the terminal: Twisted's start-up chatter stays out, a traceback does not."""
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                                textFileLogObserver)

    errors_only = LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(stream), [errors_only])],
                                     redirectStandardIO=False)


# --- the command ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, ctx: Context, *, reactor: Any = None,
        open_browser: Callable[[str], bool] = webbrowser.open, euid: Callable[[], int] = os.geteuid,
        become: Callable[[RunAs], None] = drop_privileges) -> int:
    # Everything it will need is imported first: the user it becomes may not be able to read
    # the Python that root runs.
    from twisted.internet import endpoints, error as net, protocol  # noqa: F401  (read_live's)

    from cmm.cli import status  # noqa: F401
    from cmm.dashboard import server

    if reactor is None:
        from twisted.internet import reactor

        _log_errors_to(ctx.err)
    directory = Path(os.path.abspath(config_dir(args, ctx)))
    user = run_as(euid(), ctx.environ, _owner(directory))
    if user is not None:
        try:
            become(user)
        except OSError as error:
            return ctx.fail(f"cannot run as {user.name} ({error}); run `cmm dashboard` as yourself, without sudo")
    dashboard = server.Dashboard(store_path=directory / paths.USAGE_FILE_NAME, token=secrets.token_urlsafe(32),
                                 live=lambda: live_status(directory, reactor), clock=reactor)
    try:
        port = reactor.listenTCP(args.port, server.site(dashboard), interface="127.0.0.1")
    except net.CannotListenError as error:
        return ctx.fail(f"cannot listen on 127.0.0.1:{args.port} ({error.socketError}): "
                        "pick another port with --port, or --port 0 for any free one")
    dashboard.port = port.getHost().port
    url = dashboard.url()
    ctx.say(f"cmm dashboard: {url}")
    ctx.say(f"reading {dashboard.store_path}" + (f" as {user.name}" if user is not None else "")
            + "; Ctrl-C stops it")
    ctx.out.flush()
    if not args.no_browser:
        try:
            opened = open_browser(url)
        except Exception:  # no browser is no reason to stop serving
            opened = False
        if not opened:
            ctx.say("no browser could be opened here: open the address above yourself")
    reactor.run()
    return EXIT_OK
