"""``cmm usage``: requests, errors, tokens and latency from the usage database, as a table, JSON
or CSV. The database is read-only here (the recorder writes it), so this works whether cmm runs
or not. It is the user's file: under sudo it is read by a child that has become that user for
good, never by root (a crafted database would be an attack on root's SQLite).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from cmm.cli.context import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Context, config_dir, existing_user_dir
from cmm.config import paths
from cmm.usage import query
from cmm.usage.query import Totals

FIELDS = ("requests", "errors", "input_tokens", "output_tokens", "cache_creation_input_tokens",
          "cache_read_input_tokens")


@attrs.frozen
class Outcome:
    """What the command prints and returns; crosses a pipe from the child under sudo."""

    code: int
    out: str = ""
    err: str = ""


def add_parser(commands: Any, common: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser]) -> None:
    usage = commands.add_parser("usage", parents=[common], help="requests, tokens and latency recorded by cmm",
                                description="Totals from the usage database (<config dir>/usage.sqlite3).")
    usage.add_argument("--since", default="24h", metavar="WHEN",
                       help="a span back from now (30m, 24h, 7d, 2w) or a local date (2026-11-01); default 24h")
    usage.add_argument("--by", choices=tuple(query.GROUPINGS), default="model",
                       help="group by the model asked for, the mapping rule, the upstream, the (local) day, "
                            "Claude Code's request class or the route; default model")
    formats = usage.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="one JSON document")
    formats.add_argument("--csv", action="store_true", help="CSV with a header line")


def run(args: argparse.Namespace, ctx: Context) -> int:
    now = time.time()
    try:
        since = query.parse_since(args.since, now)
    except ValueError as error:
        return ctx.fail(f"--since: {error}", EXIT_USAGE)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    directory = existing_user_dir(args, ctx)
    database = (directory.path if directory else config_dir(args, ctx)) / paths.USAGE_FILE_NAME
    work = lambda: report(database, since, now, args.by, fmt, args.since)  # noqa: E731
    if directory is not None and os.geteuid() == 0 and directory.owner.uid != 0:
        outcome = as_user(directory.owner.uid, directory.owner.gid, work)
    else:
        outcome = work()
    ctx.out.write(outcome.out)
    ctx.err.write(outcome.err)
    return outcome.code


def as_user(uid: int, gid: int, work: Callable[[], Outcome]) -> Outcome:
    """``work()`` in a child that became ``uid``/``gid`` for good; its outcome comes back as JSON."""
    from cmm.daemon.privileges import drop_privileges

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its result is checked through the parent
        code = 1
        try:
            os.close(read_end)
            drop_privileges(uid, gid)
            data = json.dumps(attrs.asdict(work())).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return Outcome(EXIT_FAILURE, err=f"cmm: could not read the usage database as uid {uid}\n")
    return Outcome(**json.loads(data))


def report(database: Path, since: float, now: float, by: str, fmt: str, since_text: str) -> Outcome:
    """The whole command's output for ``database``: a missing or unreadable file says so."""
    try:
        connection = query.connect_readonly(database)
    except FileNotFoundError:
        return Outcome(EXIT_FAILURE, err=f"cmm: no usage recorded yet: {database} does not exist. A running cmm "
                                         f"(sudo twistd cmm) records every request there.\n")
    except sqlite3.Error as error:
        return Outcome(EXIT_FAILURE, err=f"cmm: cannot open {database}: {error}\n")
    try:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchall():
            return Outcome(EXIT_FAILURE, err=f"cmm: no usage recorded yet in {database}.\n")
        groups = query.totals(connection, since, now, by)
        [total] = query.totals(connection, since, now)
    except sqlite3.Error as error:
        return Outcome(EXIT_FAILURE, err=f"cmm: cannot read {database}: {error}. If it is damaged, the running "
                                         f"cmm moves it aside by itself and starts a new one.\n")
    finally:
        connection.close()
    if fmt == "json":
        return Outcome(EXIT_OK, as_json(database, since, now, by, groups, total))
    if fmt == "csv":
        return Outcome(EXIT_OK, as_csv(by, groups))
    return Outcome(EXIT_OK, as_table(since, since_text, by, groups, total))


def _fields(totals: Totals) -> dict[str, Any]:
    values: dict[str, Any] = {name: getattr(totals, name) for name in FIELDS}
    values["cache_hit_rate"] = totals.cache_hit_rate
    values["p50_seconds"] = totals.p50
    values["p99_seconds"] = totals.p99
    return values


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def as_json(database: Path, since: float, until: float, by: str, groups: list[Totals], total: Totals) -> str:
    document = {
        "database": str(database), "since": _iso(since), "until": _iso(until), "by": by,
        "groups": [{"key": group.key, **_fields(group)} for group in groups], "total": _fields(total),
    }
    return json.dumps(document, indent=2) + "\n"


def as_csv(by: str, groups: list[Totals]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([by, *FIELDS, "cache_hit_rate", "p50_seconds", "p99_seconds"])
    for group in groups:
        writer.writerow(["" if group.key is None else group.key,
                         *("" if value is None else value for value in _fields(group).values())])
    return buffer.getvalue()


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


HEADINGS = ("REQUESTS", "ERRORS", "INPUT", "OUTPUT", "CACHE WRITE", "CACHE READ", "CACHE HIT", "P50", "P99")


def _cells(totals: Totals) -> list[str]:
    counts = [f"{getattr(totals, name):,}" for name in FIELDS]
    return [*counts, _rate(totals.cache_hit_rate), _seconds(totals.p50), _seconds(totals.p99)]


def as_table(since: float, since_text: str, by: str, groups: list[Totals], total: Totals) -> str:
    from cmm.core.records import escaped

    title = f"Requests since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))} ({since_text}), by {by}\n"
    if not total.requests:
        return title + "No requests in that time.\n"
    rows = [[escaped(group.key) if group.key is not None else "(none)", *_cells(group)] for group in groups]
    rows.append(["TOTAL", *_cells(total)])
    header = [by.upper(), *HEADINGS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(cells[1:], widths[1:]))])

    body = [line(header), *(line(row) for row in rows[:-1]), "-" * len(line(header)), line(rows[-1])]
    return title + "".join(text.rstrip() + "\n" for text in body)
