"""Which processes are running, and which of them are cmm: for ``cmm stop`` and ``cmm status``.

/proc where there is one, ``ps`` where not (macOS); unknowable answers count as "no".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path


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


def command_line(pid: int) -> list[str] | None:
    """The arguments ``pid`` was started with; None where that cannot be known."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self/cmdline").exists():
            return []  # a /proc without this pid: it is gone
    except OSError:
        return None
    else:
        return [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0") if part]
    import subprocess  # no /proc (macOS): ask ps

    try:
        found = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                               timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.split()


def is_cmm_command(argv: Sequence[str]) -> bool:
    """Whether a command line runs cmm's twistd plugin: ``[python] .../twistd [opts] cmm ...`` or
    :mod:`cmm.testing.checkout`'s ``python -c '...twistd...run()' [opts] cmm ...``."""
    for index, arg in enumerate(argv):
        twistd = Path(arg).name.startswith("twistd") or (index > 0 and argv[index - 1] == "-c" and "twistd" in arg)
        if twistd:
            return "cmm" in argv[index + 1:]
    return False


def is_cmm_process(pid: int, command: Callable[[int], list[str] | None] = command_line) -> bool:
    """Whether ``pid`` is a cmm master (or a worker's twistd); unknowable counts as no."""
    argv = command(pid)
    return argv is not None and is_cmm_command(argv)


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
