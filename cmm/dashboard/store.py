"""The dashboard's side of the usage store (the table of :mod:`cmm.usage.schema`): its connection,
the feed's rows by id, and the ranges its charts cover. The totals and series are
:mod:`cmm.usage.query`'s, shared with ``cmm usage``; here they take the shapes of the JSON
endpoints and charts (durations in ms), and the charts keep what they drew (:class:`SeriesCache`).

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

from cmm.usage import query
from cmm.usage.schema import COLUMNS

FIELDS = ("id", *(name for name, _ in COLUMNS))
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
MAX_ROWS = 1000
_SUMMED = ("requests", "errors", *TOKEN_FIELDS, "bytes_in", "bytes_out")


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
    """One point of a chart and of ``/api/series``: a :class:`cmm.usage.query.Bucket` in ms."""

    start: float
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


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


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summary(db: sqlite3.Connection, start: float, end: float) -> dict[str, Any]:
    """Totals between ``start`` and ``end``, overall and per route and rule (a mapping's label),
    as ``/api/summary`` shows them: the sums per route and rule are :func:`cmm.usage.query.totals`
    (their total is added up here rather than scanned again), the latency
    :func:`cmm.usage.query.percentiles`."""
    groups = query.totals(db, start, end, by=("route", "mapping"), latency=False)
    sums = {name: sum(getattr(group, name) for group in groups) for name in _SUMMED}
    whole = query.Totals(None, **sums, p50=None, p99=None)
    p50, p99 = query.percentiles(db, start, end, (0.5, 0.99))
    routes = [{"route": group.keys[0], "rule": group.keys[1], "requests": group.requests, "errors": group.errors,
               **{name: getattr(group, name) for name in _SUMMED[2:]}}
              for group in groups]
    rate = whole.cache_hit_rate
    return {
        "start": start,
        "end": end,
        **sums,
        "cache_hit_rate": None if rate is None else round(rate, 4),
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "routes": routes,
    }


def _bucket(found: query.Bucket) -> Bucket:
    return Bucket(found.start, found.requests, found.errors, found.input_tokens, found.output_tokens,
                  found.cache_creation_input_tokens, found.cache_read_input_tokens, p50_ms=_ms(found.p50),
                  p95_ms=_ms(found.p95))


@attrs.define
class SeriesCache:
    """The buckets last drawn for each bucket width, with their fingerprints
    (:func:`cmm.usage.query.fingerprints`). Only buckets from the first whose fingerprint changed
    are asked again: a live week chart redrawn every half minute recomputes its last bucket or
    two, not a week of durations sorted afresh. Exact, since any row added or removed (a long
    request recorded late, rows pruned) changes its bucket's fingerprint."""

    kept: dict[int, tuple[dict[float, tuple[int, int]], dict[float, Bucket]]] = attrs.field(factory=dict)


def series(db: sqlite3.Connection, period: Range, now: float, cache: SeriesCache | None = None) -> list[Bucket]:
    """One bucket per interval of ``period`` up to ``now``, empty ones included, from
    :func:`cmm.usage.query.series` with its durations in ms; ``cache`` spares the buckets that
    have not changed since it last saw them."""
    start, end = period.window(now)
    if cache is None:
        return [_bucket(found) for found in query.series(db, start, end, period.width)]
    starts = [start + i * period.width for i in range(period.buckets)]
    # fingerprints first: a row recorded between the two reads is counted now and seen as new next time
    marks = dict(zip(starts, query.fingerprints(db, start, end, period.width)))
    old_marks, old_buckets = cache.kept.get(period.width, ({}, {}))
    first = next((i for i, at in enumerate(starts) if at not in old_buckets or marks.get(at) != old_marks.get(at)),
                 period.buckets)
    fresh = [_bucket(found) for found in query.series(db, starts[first], end, period.width)] if first < period.buckets else []
    buckets = [old_buckets[at] for at in starts[:first]] + fresh
    cache.kept[period.width] = (marks, {bucket.start: bucket for bucket in buckets})
    return buckets
