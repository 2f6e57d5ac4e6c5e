"""The dashboard's read-only queries on a usage store made with the recorder's schema."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cmm.dashboard import store
from cmm.dashboard.store import RANGES, StoreUnavailable
from store_rows import create_store, insert, request_row

NOW = 1_800_000_000.0  # a multiple of 60, 1800 and 3 h: bucket edges fall on it


@pytest.fixture
def path(tmp_path: Path) -> Path:
    found = tmp_path / "usage.sqlite3"
    create_store(found)
    return found


def test_a_missing_store_is_reported_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no usage recorded yet .*nothing.sqlite3"):
        store.connect(tmp_path / "nothing.sqlite3")


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b""])
def test_a_file_that_is_no_store_is_reported(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "usage.sqlite3"
    bad.write_bytes(content)
    with pytest.raises(StoreUnavailable, match="cannot read"):
        store.connect(bad)


def test_the_store_is_opened_read_only_and_left_unchanged(path: Path) -> None:
    insert(path, request_row())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    db = store.connect(path)
    try:
        assert store.latest(db, 10)[0]["model"] == "claude-haiku-4-5"
        with pytest.raises(sqlite3.OperationalError):
            db.execute("DELETE FROM requests")
    finally:
        db.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_latest_after_and_since_give_rows_oldest_first(path: Path) -> None:
    ids = insert(path, *(request_row(time=NOW + i, model=f"m{i}") for i in range(5)))
    db = store.connect(path)
    assert [r["model"] for r in store.latest(db, 2)] == ["m3", "m4"]
    assert [r["id"] for r in store.after(db, ids[1])] == ids[2:]
    assert store.after(db, ids[-1]) == []
    assert [r["model"] for r in store.since(db, NOW + 3)] == ["m3", "m4"]
    row = store.latest(db, 1)[0]
    assert set(row) == set(store.FIELDS) and row["id"] == ids[-1] and row["input_tokens"] == 10


def test_the_summary_counts_failures_tokens_and_latency_per_route(path: Path) -> None:
    insert(path,
           request_row(time=NOW - 10, duration=0.1, input_tokens=100, cache_read_input_tokens=300,
                       cache_creation_input_tokens=100),
           request_row(time=NOW - 20, status=502, duration=0.2),
           request_row(time=NOW - 30, status=None, error="client went away", duration=0.3),
           request_row(time=NOW - 40, route="passthrough", rule=None, model="claude-opus-4-5", duration=0.4,
                       input_tokens=None, output_tokens=None, cache_creation_input_tokens=None,
                       cache_read_input_tokens=None),
           request_row(time=NOW - 4000, duration=9.0))  # before the window
    db = store.connect(path)
    found = store.summary(db, NOW - 3600, NOW)
    assert found["requests"] == 4 and found["errors"] == 2
    assert found["input_tokens"] == 100 + 10 + 10 and found["output_tokens"] == 60
    assert found["cache_read_input_tokens"] == 300 + 40 + 40
    assert found["cache_hit_rate"] == round(380 / (120 + 380 + 160), 4)
    assert (found["p50_ms"], found["p99_ms"]) == (200.0, 400.0)
    assert [(r["route"], r["rule"], r["requests"], r["errors"]) for r in found["routes"]] == [
        ("intercepted", "haiku", 3, 2), ("passthrough", None, 1, 0)]
    assert found["routes"][1]["input_tokens"] == 0  # unknown counts add nothing


def test_an_empty_period_sums_to_zero(path: Path) -> None:
    found = store.summary(store.connect(path), NOW - 3600, NOW)
    assert found["requests"] == 0 and found["routes"] == [] and found["cache_hit_rate"] is None
    assert found["p50_ms"] is None


def test_series_puts_each_row_in_its_bucket(path: Path) -> None:
    hour = RANGES["hour"]
    insert(path, request_row(time=NOW + 5, duration=0.1), request_row(time=NOW + 59, duration=0.3, status=500),
           request_row(time=NOW - 1, duration=2.0), request_row(time=NOW - 3601, duration=5.0))
    buckets = store.series(store.connect(path), hour, NOW + 30)
    assert len(buckets) == 60 and buckets[-1].start == NOW and buckets[0].start == NOW + 60 - 3600
    last, before = buckets[-1], buckets[-2]
    assert (last.requests, last.errors, last.input_tokens, last.p50_ms, last.p95_ms) == (2, 1, 20, 100.0, 300.0)
    assert (before.requests, before.p50_ms) == (1, 2000.0)
    assert sum(b.requests for b in buckets) == 3  # the row an hour and more ago is outside
    assert buckets[0] == store.Bucket(NOW + 60 - 3600)


@given(st.sampled_from(sorted(RANGES)), st.floats(min_value=0, max_value=4e9))
def test_the_window_is_aligned_and_ends_in_the_bucket_holding_now(name: str, now: float) -> None:
    period = RANGES[name]
    start, end = period.window(now)
    assert end - start == period.seconds and start % period.width == 0
    assert end - period.width <= now < end


def test_an_unknown_range_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="hour, day, week"):
        store.parse_range("month")


def test_a_store_behind_a_folder_it_may_not_enter_is_reported(tmp_path: Path) -> None:
    class Closed(type(tmp_path)):  # type: ignore[misc]
        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            raise PermissionError(13, "Permission denied", str(self))

    with pytest.raises(StoreUnavailable, match="cannot read .*: Permission denied"):
        store.connect(Closed(tmp_path / "usage.sqlite3"))


def test_a_folder_in_the_store_s_place_is_reported(tmp_path: Path) -> None:
    (tmp_path / "usage.sqlite3").mkdir()
    with pytest.raises(StoreUnavailable, match="is not a file"):
        store.connect(tmp_path / "usage.sqlite3")


def test_a_locked_store_is_reported_not_waited_for(path: Path) -> None:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("DELETE FROM requests")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.connect(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_the_series_cache_answers_as_a_fresh_query_does_whatever_changes(path: Path) -> None:
    hour, cache = RANGES["hour"], store.SeriesCache()
    insert(path, *(request_row(time=NOW - 3000 + i * 37, duration=0.1 + i / 100) for i in range(80)))

    def both(now: float) -> None:
        db = store.connect(path)
        try:
            assert store.series(db, hour, now, cache) == store.series(db, hour, now)
        finally:
            db.close()

    both(NOW + 30)
    both(NOW + 30)  # nothing new: all from the cache
    insert(path, request_row(time=NOW + 10, duration=7.0))  # the current minute
    both(NOW + 30)
    insert(path, request_row(time=NOW - 1500, duration=9.0, status=500))  # a long request recorded late
    both(NOW + 30)
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM requests WHERE time < ?", (NOW - 2000,))  # retention
    db.close()
    both(NOW + 30)
    both(NOW + 95)  # the window moved on by a minute
    both(NOW + 7200)  # and past everything the cache holds


def test_the_series_cache_asks_only_from_the_first_changed_bucket(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hour, cache = RANGES["hour"], store.SeriesCache()
    insert(path, *(request_row(time=NOW - 3000 + i * 60) for i in range(50)))
    asked: list[float] = []
    real = store.query.series

    def spy(db: sqlite3.Connection, since: float, until: float, bucket: float) -> list[store.query.Bucket]:
        asked.append(since)
        return real(db, since, until, bucket)

    monkeypatch.setattr(store.query, "series", spy)
    db = store.connect(path)
    start, _ = hour.window(NOW + 30)
    store.series(db, hour, NOW + 30, cache)
    assert asked == [start]  # the first time, everything
    store.series(db, hour, NOW + 30, cache)
    assert asked == [start]  # nothing changed: no query
    insert(path, request_row(time=NOW - 600 + 5))
    store.series(db, hour, NOW + 30, cache)
    assert asked == [start, NOW - 600]  # from the bucket that changed to the end
    db.close()
