"""Read-only queries on the usage store (the table of :mod:`cmm.usage.schema`) for the dashboard.

The dashboard never writes: it opens the file with ``mode=ro`` and ``query_only``, so a bug here
cannot damage what the recorder keeps. A store that is missing, locked or corrupt raises
:class:`StoreUnavailable` with a sentence for the page; the next call tries again, so the
dashboard recovers by itself once the recorder has made the file.
"""

from __future__ import annotations

import math
import sqlite3
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs

from cmm.usage.schema import COLUMNS

FIELDS = ("id", *(name for name, _ in COLUMNS))
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
FAILED = "(status IS NULL OR status >= 400 OR error IS NOT NULL)"
MAX_ROWS = 1000


class StoreUnavailable(Exception):
    """The store cannot be read now; the message says why, for a person."""


@attrs.frozen
class Range:
    """A period the charts cover, cut into ``buckets`` intervals of ``width`` seconds."""

    name: str
    width: int
    buckets: int

    @property
    def seconds(self) -> int:
        return self.width * self.buckets

    def window(self, now: float) -> tuple[float, float]:
        """(start, end): buckets aligned to their width, the last one holding ``now``."""
        end = (math.floor(now / self.width) + 1) * self.width
        return end - self.seconds, end


RANGES = {
    "hour": Range("hour", 60, 60),
    "day": Range("day", 1800, 48),
    "week": Range("week", 3 * 3600, 56),
}


def parse_range(text: str) -> Range:
    try:
        return RANGES[text]
    except KeyError:
        raise ValueError(f"unknown range {text!r}: use one of {', '.join(RANGES)}") from None


@attrs.frozen
class Bucket:
    start: float
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of values already sorted; None for none."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def connect(path: Path) -> sqlite3.Connection:
    """The store, read-only; StoreUnavailable when there is none (yet) or it is not a database."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise StoreUnavailable(f"{path} is not a file")
    except FileNotFoundError:
        raise StoreUnavailable(f"no usage recorded yet ({path} does not exist)") from None
    except OSError as error:
        raise StoreUnavailable(f"cannot read {path}: {error.strerror}") from None
    try:
        connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=0.5,
                                     check_same_thread=False)
        connection.execute("PRAGMA query_only = ON")
        connection.execute("SELECT 1 FROM requests LIMIT 1")
    except sqlite3.Error as error:
        raise StoreUnavailable(f"cannot read {path}: {error}") from None
    return connection


def _row(values: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(FIELDS, values))


_SELECT = f"SELECT {', '.join(FIELDS)} FROM requests"


def latest(db: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` requests, oldest first (the order a feed shows them in)."""
    rows = db.execute(f"{_SELECT} ORDER BY id DESC LIMIT ?", (min(limit, MAX_ROWS),)).fetchall()
    return [_row(r) for r in reversed(rows)]


def after(db: sqlite3.Connection, last_id: int, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """Requests recorded after the one with id ``last_id``, oldest first."""
    rows = db.execute(f"{_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (last_id, min(limit, MAX_ROWS))).fetchall()
    return [_row(r) for r in rows]


def since(db: sqlite3.Connection, start: float, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """Requests that started at or after ``start``, oldest first."""
    rows = db.execute(f"{_SELECT} WHERE time >= ? ORDER BY time, id LIMIT ?", (start, min(limit, MAX_ROWS))).fetchall()
    return [_row(r) for r in rows]


def summary(db: sqlite3.Connection, start: float, end: float) -> dict[str, Any]:
    """Totals between ``start`` and ``end``, overall and per route and rule (a mapping's label)."""
    sums = ", ".join(f"COALESCE(SUM({name}), 0)" for name in TOKEN_FIELDS)
    rows = db.execute(
        f"SELECT route, rule, COUNT(*), SUM({FAILED}), {sums}, SUM(bytes_in), SUM(bytes_out) FROM requests "
        "WHERE time >= ? AND time < ? GROUP BY route, rule ORDER BY COUNT(*) DESC, route, rule",
        (start, end)).fetchall()
    routes = []
    for route, rule, requests, errors, *rest in rows:
        tokens = dict(zip(TOKEN_FIELDS, rest[:4]))
        routes.append({"route": route, "rule": rule, "requests": requests, "errors": errors or 0, **tokens,
                       "bytes_in": rest[4] or 0, "bytes_out": rest[5] or 0})
    total = {key: sum(r[key] for r in routes) for key in ("requests", "errors", *TOKEN_FIELDS, "bytes_in", "bytes_out")}
    prompt = total["input_tokens"] + total["cache_creation_input_tokens"] + total["cache_read_input_tokens"]
    durations = [d for (d,) in db.execute("SELECT duration FROM requests WHERE time >= ? AND time < ? ORDER BY duration",
                                          (start, end))]
    p50, p99 = percentile(durations, 0.5), percentile(durations, 0.99)
    return {
        "start": start,
        "end": end,
        **total,
        "cache_hit_rate": round(total["cache_read_input_tokens"] / prompt, 4) if prompt else None,
        "p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "routes": routes,
    }


def series(db: sqlite3.Connection, period: Range, now: float) -> list[Bucket]:
    """One bucket per interval of ``period`` up to ``now``, empty ones included."""
    start, end = period.window(now)
    sums = ", ".join(f"COALESCE(SUM({name}), 0)" for name in TOKEN_FIELDS)
    index = "CAST((time - ?) / ? AS INTEGER)"
    counted = {row[0]: row[1:] for row in db.execute(
        f"SELECT {index} AS b, COUNT(*), SUM({FAILED}), {sums} FROM requests "
        "WHERE time >= ? AND time < ? GROUP BY b", (start, period.width, start, end))}
    durations: dict[int, list[float]] = {}
    for bucket, duration in db.execute(f"SELECT {index}, duration FROM requests WHERE time >= ? AND time < ? "
                                       "ORDER BY duration", (start, period.width, start, end)):
        durations.setdefault(bucket, []).append(duration)
    found = []
    for i in range(period.buckets):
        if i not in counted:
            found.append(Bucket(start + i * period.width))
            continue
        requests, errors, input_tokens, output_tokens, cache_creation, cache_read = counted[i]
        values = durations.get(i, [])
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        found.append(Bucket(start + i * period.width, requests, errors or 0, input_tokens, output_tokens,
                            cache_creation, cache_read, p50_ms=None if p50 is None else round(p50 * 1000, 1),
                            p95_ms=None if p95 is None else round(p95 * 1000, 1)))
    return found
