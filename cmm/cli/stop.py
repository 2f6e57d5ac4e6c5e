"""``cmm stop``: end the running cmm named in the pid file, and put /etc/hosts back."""

from __future__ import annotations

import argparse
import enum
import errno
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from cmm.cli.context import EXIT_OK, Context, config_dir
from cmm.cli.processes import is_cmm_process, process_alive, process_start_time
from cmm.config import paths
from cmm.config.userfiles import UnsafeDirectory, UserDir
from cmm.machine import hosts

STOP_TIMEOUT = 10.0


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


def run(args: argparse.Namespace, ctx: Context, timeout: float = STOP_TIMEOUT) -> int:
    directory = config_dir(args, ctx)
    if args.pid_file is not None:  # named by whoever runs cmm (e.g. /var/run, a link to /run): its folder is resolved
        pid_file = Path(os.path.realpath(args.pid_file.parent)) / args.pid_file.name
    else:
        pid_file = paths.pid_file(directory)
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
    if remove_stale_state(directory, None if pid is None or result.state is StopState.INVALID_PID_FILE else pid,
                          ctx.environ):
        ctx.say(f"Removed the state file the previous run left in {directory}.")
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

