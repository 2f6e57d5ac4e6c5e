"""The usage queries' nearest-rank percentiles and groupings, computed by SQLite, against the
same rule worked out by hand in Python."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cmm.usage import query
from store_rows import create_store, insert, request_row

NOW = 1_800_000_000.0


def nearest_rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    found = tmp_path / "usage.sqlite3"
    create_store(found)
    return found


@pytest.fixture
def db(path: Path) -> Iterator[sqlite3.Connection]:
    connection = query.connect_readonly(path)
    yield connection
    connection.close()


@pytest.mark.parametrize("durations, expected", [
    ([1.0], (1.0, 1.0, 1.0)), ([2.0, 1.0], (1.0, 2.0, 2.0)), ([4.0, 3.0, 2.0, 1.0], (2.0, 4.0, 4.0)),
    ([float(i) for i in range(1, 101)], (50.0, 95.0, 99.0))])
def test_percentiles_are_the_nearest_rank(path: Path, db: sqlite3.Connection, durations: list[float],
                                          expected: tuple[float, float, float]) -> None:
    insert(path, *(request_row(time=NOW + i % 60, duration=d) for i, d in enumerate(durations)))
    [whole] = query.totals(db, NOW, NOW + 60)
    [bucket] = query.series(db, NOW, NOW + 60, 60)
    assert (whole.p50, bucket.p95, whole.p99) == expected and bucket.p50 == expected[0]
    assert query.percentiles(db, NOW, NOW + 60, (0.5, 0.95, 0.99)) == expected
    assert query.percentiles(db, NOW + 60) == (None, None)  # no requests then


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0.001, 100.0)), min_size=1, max_size=40))
def test_each_bucket_s_percentiles_are_its_own(tmp_path_factory: pytest.TempPathFactory,
                                               rows: list[tuple[int, float]]) -> None:
    path = tmp_path_factory.mktemp("q") / "usage.sqlite3"
    create_store(path)
    insert(path, *(request_row(time=NOW + slot * 10 + 1, duration=d) for slot, d in rows))
    db = query.connect_readonly(path)
    try:
        buckets = query.series(db, NOW, NOW + 40, 10)
    finally:
        db.close()
    for slot, bucket in enumerate(buckets):
        mine = [d for s, d in rows if s == slot]
        assert (bucket.requests, bucket.p50, bucket.p95) == (len(mine), nearest_rank(mine, 0.5),
                                                             nearest_rank(mine, 0.95))


def test_grouping_by_route_and_mapping_gives_both_keys_and_bytes(path: Path, db: sqlite3.Connection) -> None:
    insert(path, request_row(time=NOW, bytes_in=5, bytes_out=7), request_row(time=NOW + 1, bytes_in=1, bytes_out=2),
           request_row(time=NOW + 2, route="passthrough", rule=None, bytes_in=100, bytes_out=200, duration=3.0))
    groups = query.totals(db, NOW, NOW + 60, by=("route", "mapping"), latency=False)
    assert [(g.keys, g.key, g.requests, g.bytes_in, g.bytes_out) for g in groups] == [
        (("intercepted", "haiku"), "intercepted", 2, 6, 9), (("passthrough", None), "passthrough", 1, 100, 200)]
    assert all(g.p50 is None and g.p99 is None for g in groups)  # not asked for
    [by_route] = query.totals(db, NOW, NOW + 60, by="mapping")[1:]
    assert (by_route.keys, by_route.p50, by_route.p99) == ((None,), 3.0, 3.0)


def test_an_unknown_grouping_among_several_is_refused(db: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        query.totals(db, NOW, NOW + 60, by=("route", "colour"))
