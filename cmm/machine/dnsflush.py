"""Flush the operating system's DNS cache after the hosts file changes.

A cached answer for api.anthropic.com would keep sending Claude Code to the real API after cmm
starts (or to 127.0.0.1 after it stops) until the entry expires. Which caches exist is detected,
not guessed: macOS always has mDNSResponder; on Linux, systemd-resolved and nscd only when they
run. Failures are reported, never fatal: the hosts file is already right.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from shutil import which as default_which
from typing import Callable

from twisted.logger import Logger

log = Logger()

Run = Callable[[list[str]], int]


def flush_commands(platform: str = sys.platform, which: Callable[[str], str | None] = default_which,
                   exists: Callable[[str], bool] = lambda path: Path(path).exists()) -> list[list[str]]:
    """The commands that flush the caches present on this system, in order."""
    if platform == "darwin":
        return [["dscacheutil", "-flushcache"], ["killall", "-HUP", "mDNSResponder"]]
    commands = []
    if exists("/run/systemd/resolve") and which("resolvectl"):
        commands.append(["resolvectl", "flush-caches"])
    if (exists("/var/run/nscd/socket") or exists("/run/nscd/socket")) and which("nscd"):
        commands.append(["nscd", "--invalidate=hosts"])
    return commands


def _run(command: list[str]) -> int:
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode


def flush(commands: list[list[str]] | None = None, run: Run = _run) -> list[str]:
    """Run the flush commands; return a note for each that failed."""
    problems = []
    for command in flush_commands() if commands is None else commands:
        try:
            code = run(command)
        except (OSError, subprocess.SubprocessError) as error:
            problems.append(f"{' '.join(command)}: {error}")
            continue
        if code != 0:
            problems.append(f"{' '.join(command)} exited with {code}")
    for problem in problems:
        log.warn("DNS cache not flushed: {problem}", problem=problem)
    return problems
