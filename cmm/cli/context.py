"""What every ``cmm`` command gets: the environment, the output streams, the config dir."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import attrs

from cmm.config import paths
from cmm.config.userfiles import UserDir
from cmm.machine import dnsflush

if TYPE_CHECKING:  # cmm.machine.trust loads cryptography: only setup and uninstall import it, when run
    from cmm.machine.commands import Machine
    from cmm.machine.trust import Report

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@attrs.frozen
class Context:
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


def config_dir(args: argparse.Namespace, ctx: Context) -> Path:
    given = getattr(args, "config_dir", None)
    return given if given is not None else paths.config_dir(ctx.environ)


def user_dir(args: argparse.Namespace, ctx: Context) -> UserDir:
    """The config dir, checked (UnsafeDirectory: :func:`cmm.cli.main.main` says what to fix) and created as the
    user when missing; whatever a command does in it runs as its owner."""
    return paths.user_dir(config_dir(args, ctx), ctx.environ)


def existing_user_dir(args: argparse.Namespace, ctx: Context) -> UserDir | None:
    """As :func:`user_dir` for commands that only read: None (nothing made) when it is missing."""
    try:
        return paths.user_dir(config_dir(args, ctx), ctx.environ, create=False)
    except FileNotFoundError:
        return None


def machine_of(ctx: Context) -> Machine:
    from cmm.machine import commands

    return ctx.machine if ctx.machine is not None else commands.Machine.from_environ(ctx.environ)


def say_report(ctx: Context, report: Report, indent: str = "") -> None:
    for line in report.lines:
        ctx.say(f"{indent}{line}")
    for warning in report.warnings:
        ctx.err.write(f"cmm: {warning}\n")

