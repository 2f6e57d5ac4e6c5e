"""Questions asked of the usage database: plain SQL over an open connection, shared by
``cmm usage`` and the dashboard. Times are seconds since the epoch; durations seconds.

A request counts as an error when no response reached the client, the status was 400 or more,
or it ended with an error. Percentiles are nearest-rank over the request durations.
"""

from __future__ import annotations

import datetime
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

import attrs

#: what ``--by`` groups on: the name a user gives, the column (or expression) it means
GROUPINGS: dict[str, str] = {
    "model": "model",
    "mapping": "rule",
    "upstream": "upstream",
    "day": "strftime('%Y-%m-%d', time, 'unixepoch', 'localtime')",
    "class": "request_class",
    "route": "route",
}
_ERROR = "(status IS NULL OR status >= 400 OR error IS NOT NULL)"
_TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@attrs.frozen
class Totals:
    """One group's (or everything's) requests over a time window."""

    key: str | None  # the group's value (None: requests without one, or no grouping)
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    p50: float | None  # seconds
    p99: float | None

    @property
    def cache_hit_rate(self) -> float | None:
        """Cache reads among all input read: cache_read / (input + cache_read + cache_creation)."""
        whole = self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens
        return self.cache_read_input_tokens / whole if whole else None


@attrs.frozen
class Bucket:
    """One time slice of a series."""

    start: float
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    p50: float | None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


def connect_readonly(path: Path) -> sqlite3.Connection:
    """The database opened read-only (it is the recorder's to write); FileNotFoundError if missing."""
    if not path.is_file():
        raise FileNotFoundError(str(path))
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=5.0)


def parse_since(text: str, now: float) -> float:
    """``24h``, ``30m``, ``7d``, ``2w`` (back from ``now``) or a local date or time
    (``2026-11-01``, ``2026-11-01T08:00``); ValueError says what is accepted."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a span (30m, 24h, 7d, 2w) nor a date (2026-11-01 or "
                         f"2026-11-01T08:00)") from None
    if moment.tzinfo is not None:
        return moment.timestamp()
    return time.mktime((*moment.timetuple()[:8], -1)) + moment.microsecond / 1e6


def totals(connection: sqlite3.Connection, since: float, until: float | None = None,
           by: str | None = None) -> list[Totals]:
    """Requests from ``since`` up to ``until`` (None: now and after), one :class:`Totals` per
    value of ``by`` (a :data:`GROUPINGS` name; busiest first, days in order), or a single one."""
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPINGS)}")
    key = GROUPINGS[by] if by else "NULL"
    order = "key" if by == "day" else "COUNT(*) DESC, key"
    sums = ", ".join(f"COALESCE(SUM({name}), 0)" for name in _TOKENS)
    sql = f"""
        WITH ranked AS (
            SELECT {key} AS key, status, error, duration, {", ".join(_TOKENS)},
                   ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY duration) AS n,
                   COUNT(*) OVER (PARTITION BY {key}) AS c
            FROM requests WHERE time >= ? AND time < ?)
        SELECT key, COUNT(*), SUM({_ERROR}), {sums},
               MIN(CASE WHEN n >= 0.5 * c THEN duration END), MIN(CASE WHEN n >= 0.99 * c THEN duration END)
        FROM ranked GROUP BY key ORDER BY {order}"""
    rows = connection.execute(sql, (since, _until(until))).fetchall()
    if not rows and by is None:
        return [Totals(None, 0, 0, 0, 0, 0, 0, None, None)]
    return [Totals(None if row[0] is None else str(row[0]), *row[1:]) for row in rows]


def series(connection: sqlite3.Connection, since: float, until: float, bucket: float) -> list[Bucket]:
    """Requests, errors, tokens and median duration per ``bucket`` seconds from ``since`` to
    ``until``; every bucket is there, the empty ones with zeros."""
    if bucket <= 0 or until <= since:
        raise ValueError("a series needs a positive bucket and until after since")
    sums = ", ".join(f"COALESCE(SUM({name}), 0)" for name in _TOKENS)
    index = "CAST((time - :since) / :bucket AS INTEGER)"
    sql = f"""
        WITH ranked AS (
            SELECT {index} AS slot, status, error, duration, {", ".join(_TOKENS)},
                   ROW_NUMBER() OVER (PARTITION BY {index} ORDER BY duration) AS n,
                   COUNT(*) OVER (PARTITION BY {index}) AS c
            FROM requests WHERE time >= :since AND time < :until)
        SELECT slot, COUNT(*), SUM({_ERROR}), {sums}, MIN(CASE WHEN n >= 0.5 * c THEN duration END)
        FROM ranked GROUP BY slot"""
    found = {row[0]: row[1:] for row in connection.execute(sql, {"since": since, "until": until, "bucket": bucket})}
    count = int(-(-(until - since) // bucket))
    empty = (0, 0, 0, 0, 0, 0, None)
    return [Bucket(since + slot * bucket, *found.get(slot, empty)) for slot in range(count)]


def recent(connection: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The latest ``limit`` rows, newest first, as column → value."""
    cursor = connection.execute("SELECT * FROM requests ORDER BY time DESC, id DESC LIMIT ?", (limit,))
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _until(until: float | None) -> float:
    return float("inf") if until is None else until
