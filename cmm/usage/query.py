"""Questions asked of the usage database: plain SQL over an open connection, shared by
``cmm usage`` and the dashboard. Times are seconds since the epoch; durations seconds.

A request counts as an error when no response reached the client, the status was 400 or more,
or it ended with an error. Percentiles are nearest-rank over the request durations.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Mapping, Sequence
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
_SUMS = ", ".join(f"COALESCE(SUM({name}), 0)" for name in _TOKENS)
_WINDOW = "time >= :since AND time < :until"
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
    bytes_in: int = 0
    bytes_out: int = 0
    keys: tuple[str | None, ...] = ()  # the group's value for each name grouped by (``key`` is the first)

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
    p50: float | None  # seconds
    p95: float | None = None

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
           by: str | Sequence[str] | None = None, latency: bool = True) -> list[Totals]:
    """Requests from ``since`` up to ``until`` (None: now and after), one :class:`Totals` per
    value of ``by`` (a :data:`GROUPINGS` name, or several: one per combination; busiest first,
    days in order), or a single one. ``latency=False`` leaves p50/p99 out and skips their sort."""
    names = (by,) if isinstance(by, str) else tuple(by or ())
    for name in names:
        if name not in GROUPINGS:
            raise ValueError(f"cannot group by {name!r}; choose one of {', '.join(GROUPINGS)}")
    keys = [f"{GROUPINGS[name]} AS k{i}" for i, name in enumerate(names)] or ["NULL AS k0"]
    labels = ", ".join(f"k{i}" for i in range(len(keys)))
    order = labels if names == ("day",) else f"COUNT(*) DESC, {labels}"
    window = {"since": since, "until": _until(until)}
    rows = connection.execute(
        f"SELECT {', '.join(keys)}, COUNT(*), SUM({_ERROR}), {_SUMS}, COALESCE(SUM(bytes_in), 0), "
        f"COALESCE(SUM(bytes_out), 0) FROM requests WHERE {_WINDOW} GROUP BY {labels} ORDER BY {order}",
        window).fetchall()
    width = len(keys)
    ranks: Mapping[tuple[Any, ...], tuple[float | None, ...]] = {}
    if latency and names:
        ranks = _nearest_ranks(connection, keys, window, {tuple(row[:width]): row[width] for row in rows}, (0.5, 0.99))
    elif latency and rows:  # one group: picked from each end, no numbering of every row
        ranks = {tuple(rows[0][:width]): tuple(_nearest_rank(connection, window, rows[0][width], q) for q in (0.5, 0.99))}
    found = []
    for row in rows:
        group = tuple(None if value is None else str(value) for value in row[:width])
        requests, errors, input_tokens, output_tokens, cache_creation, cache_read, bytes_in, bytes_out = row[width:]
        p50, p99 = ranks.get(tuple(row[:width]), (None, None))
        found.append(Totals(group[0] if names else None, requests, errors, input_tokens, output_tokens,
                            cache_creation, cache_read, p50, p99, bytes_in, bytes_out, group if names else ()))
    if not found and not names:
        return [Totals(None, 0, 0, 0, 0, 0, 0, None, None)]
    return found


def series(connection: sqlite3.Connection, since: float, until: float, bucket: float) -> list[Bucket]:
    """Requests, errors, tokens and the median and 95th percentile duration per ``bucket`` seconds
    from ``since`` to ``until``; every bucket is there, the empty ones with zeros.

    Asked a bucket at a time: each is a range of the time index, summed on its own and its
    percentiles picked from its own rows, so nothing is grouped or sorted across the whole window
    (a week of rows sorted at once is what made the long ranges slow)."""
    found = []
    for start, end in _edges(since, until, bucket):
        window = {"since": start, "until": end}
        requests, errors, input_tokens, output_tokens, cache_creation, cache_read = connection.execute(
            f"SELECT COUNT(*), COALESCE(SUM({_ERROR}), 0), {_SUMS} FROM requests WHERE {_WINDOW}", window).fetchone()
        p50, p95 = (_nearest_rank(connection, window, requests, q) for q in (0.5, 0.95))
        found.append(Bucket(start, requests, errors, input_tokens, output_tokens, cache_creation, cache_read, p50, p95))
    return found


def fingerprints(connection: sqlite3.Connection, since: float, until: float, bucket: float) -> list[tuple[int, int]]:
    """Each bucket of :func:`series` → its row count and the sum of its row ids: read from the time
    index alone (it holds the ids), so far cheaper than the series, and a row added to or removed
    from a bucket changes its pair."""
    return [connection.execute(f"SELECT COUNT(*), COALESCE(SUM(id), 0) FROM requests WHERE {_WINDOW}",
                               {"since": start, "until": end}).fetchone() for start, end in _edges(since, until, bucket)]


def _edges(since: float, until: float, bucket: float) -> list[tuple[float, float]]:
    """The (start, end) of each ``bucket`` from ``since``; the last one ends at ``until``."""
    if bucket <= 0 or until <= since:
        raise ValueError("a series needs a positive bucket and until after since")
    count = int(-(-(until - since) // bucket))
    return [(since + i * bucket, min(since + (i + 1) * bucket, until)) for i in range(count)]


def _nearest_rank(connection: sqlite3.Connection, window: Mapping[str, float], count: int, q: float) -> float | None:
    """The nearest-rank ``q`` percentile of the ``count`` durations in ``window``: the one at rank
    ceil(q × count), counted from whichever end is nearer, so SQLite keeps the fewest rows in the
    sorter its LIMIT bounds (the 95th percentile of a bucket holds back 5 % of its rows)."""
    if not count:
        return None
    rank = max(math.ceil(q * count), 1)
    order, skip = ("", rank - 1) if rank - 1 <= count - rank else (" DESC", count - rank)
    found = connection.execute(f"SELECT duration FROM requests WHERE {_WINDOW} ORDER BY duration{order} LIMIT 1 "
                               f"OFFSET :skip", {**window, "skip": skip}).fetchone()
    return None if found is None else float(found[0])


def percentiles(connection: sqlite3.Connection, since: float, until: float | None = None,
                quantiles: Sequence[float] = (0.5, 0.99)) -> tuple[float | None, ...]:
    """The nearest-rank ``quantiles`` of every request's duration from ``since`` to ``until``, for a
    caller that has its sums already (counted from the time index alone, then picked)."""
    window = {"since": since, "until": _until(until)}
    [(count,)] = connection.execute(f"SELECT COUNT(*) FROM requests WHERE {_WINDOW}", window).fetchall()
    return tuple(_nearest_rank(connection, window, count, q) for q in quantiles)


def _nearest_ranks(connection: sqlite3.Connection, keys: Sequence[str], window: Mapping[str, float],
                   counts: Mapping[tuple[Any, ...], int], quantiles: Sequence[float]
                   ) -> dict[tuple[Any, ...], tuple[float | None, ...]]:
    """Nearest-rank percentiles (the duration at rank ceil(q × count), at least 1) of the requests
    in ``window``, per combination of ``keys`` (``<expression> AS k<i>``) whose ``counts`` the
    caller has summed already. Knowing the ranks, SQLite numbers each group's durations in order
    (ROW_NUMBER, the cheapest window function; only keys and durations enter its sort) and hands
    back just the rows at those ranks."""
    wanted = {key: [max(math.ceil(q * count), 1) for q in quantiles] for key, count in counts.items()}
    if not wanted:
        return {}
    labels = ", ".join(f"k{i}" for i in range(len(keys)))
    sql = f"""
        WITH timed AS (SELECT {", ".join(keys)}, duration FROM requests WHERE {_WINDOW}),
        ranked AS (SELECT {labels}, duration, ROW_NUMBER() OVER (PARTITION BY {labels} ORDER BY duration) AS n
                   FROM timed)
        SELECT {labels}, n, duration FROM ranked WHERE n IN (SELECT value FROM json_each(:ranks))"""
    ranks = sorted({rank for found in wanted.values() for rank in found})
    at: dict[tuple[Any, ...], float] = {}
    for *key, rank, duration in connection.execute(sql, {**window, "ranks": json.dumps(ranks)}):
        at[(*key, rank)] = duration  # other groups' ranks come along too; only the wanted ones are read
    return {key: tuple(at.get((*key, rank)) for rank in found) for key, found in wanted.items()}


def _until(until: float | None) -> float:
    return float("inf") if until is None else until
