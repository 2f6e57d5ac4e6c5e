"""The usage store and its recorder core: rows in batches (one transaction each), retention, the
file's modes, and what a locked, unwritable, linked or corrupt database does (never raises)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path

import attrs
import pytest

from cmm.core.records import RequestRecord
from cmm.usage import schema
from cmm.usage.store import Recorder, UsageStore, row_of

DAY = 86400.0
NAMES = [name for name, _ in schema.COLUMNS]


def record(started: float = 1_000_000.0, **changes: object) -> RequestRecord:
    base = RequestRecord(started, "POST", "/v1/messages", "claude-haiku-4-5", True, "gemini", 200, 0.5, 100, 200,
                         input_tokens=10, output_tokens=20)
    return attrs.evolve(base, **changes)


@attrs.define
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@attrs.define
class Harness:
    path: Path
    clock: Clock
    logs: list[str]
    statements: list[str]
    recorder: Recorder

    def rows(self) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.path)) as connection:
            return connection.execute("SELECT time, route, model FROM requests ORDER BY id").fetchall()


def harness(tmp_path: Path, busy_timeout: float = 0.05, **options: object) -> Harness:
    clock, logs, statements = Clock(), [], []

    def open_store(path: Path) -> UsageStore:
        store = UsageStore(path, busy_timeout=busy_timeout)
        store.connection.set_trace_callback(statements.append)
        return store

    path = tmp_path / "usage.sqlite3"
    recorder = Recorder(path, 90.0, logs.append, clock=clock, open_store=open_store, **options)  # type: ignore[arg-type]
    return Harness(path, clock, logs, statements, recorder)


def test_a_record_becomes_a_row_in_the_schemas_order_with_the_route_from_intercepted() -> None:
    row = dict(zip(NAMES, row_of(record(rule="haiku", upstream="127.0.0.1:8317", ttfb=0.1))))
    assert row["route"] == "intercepted" and row["rule"] == "haiku" and row["upstream"] == "127.0.0.1:8317"
    assert row["time"] == 1_000_000.0 and row["ttfb"] == 0.1 and row["input_tokens"] == 10
    assert dict(zip(NAMES, row_of(record(intercepted=False))))["route"] == "passthrough"
    assert dict(zip(NAMES, row_of(record(route="fallback"))))["route"] == "fallback"


def test_rows_wait_for_the_flush_interval_then_go_in_one_transaction(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.recorder.tick()  # opens the file (and prunes)
    h.statements.clear()
    h.recorder.add(row_of(record(started=1_000_000.0 + n)) for n in range(300))
    assert 0.99 <= (h.recorder.due() or 0) <= 1.0
    h.clock.now += 0.5
    h.recorder.tick()
    assert h.rows() == [] and h.statements == []
    h.clock.now += 0.5
    h.recorder.tick()
    assert len(h.rows()) == 300
    assert [s for s in h.statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert h.recorder.due() == pytest.approx(3599.0)  # only the next pruning (an hour after the first) is left


def test_a_full_batch_is_written_at_once(tmp_path: Path) -> None:
    h = harness(tmp_path, batch_rows=50)
    h.recorder.tick()
    h.recorder.add(row_of(record()) for _ in range(49))
    assert h.recorder.due() == pytest.approx(1.0)
    h.recorder.add([row_of(record())])
    assert h.recorder.due() == 0.0
    h.recorder.tick()
    assert len(h.rows()) == 50


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.recorder.add([row_of(record())])
    h.recorder.close()
    assert not Path(f"{h.path}-wal").exists()  # closed cleanly: checkpointed
    assert h.rows() == [(1_000_000.0, "intercepted", "claude-haiku-4-5")]


def test_rows_past_the_retention_are_deleted_at_start_and_then_periodically(tmp_path: Path) -> None:
    h = harness(tmp_path, prune_interval=3600.0)
    now = h.clock.now
    UsageStore(h.path).write([row_of(record(started=now - 91 * DAY)), row_of(record(started=now - 89 * DAY))])
    h.recorder.tick()
    assert [row[0] for row in h.rows()] == [now - 89 * DAY]
    h.clock.now += 1.5 * DAY  # the 89-day row is past 90 days now, but not yet pruned...
    h.recorder.tick()
    assert [row[0] for row in h.rows()] == []  # ...the hourly pruning took it
    h.recorder.add([row_of(record(started=h.clock.now))])
    h.clock.now += 1
    h.recorder.tick()
    assert len(h.rows()) == 1


def test_the_database_and_its_wal_and_shm_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        store = UsageStore(tmp_path / "usage.sqlite3")
        store.write([row_of(record())])
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
        store.close()
    finally:
        os.umask(old)
    assert modes == {"usage.sqlite3": 0o600, "usage.sqlite3-wal": 0o600, "usage.sqlite3-shm": 0o600}


def test_a_looser_existing_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    UsageStore(path).close()
    path.chmod(0o644)
    UsageStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_locked_database_holds_the_rows_says_so_once_and_writes_them_when_freed(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.recorder.tick()
    holder = sqlite3.connect(h.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program's write lock
    h.recorder.add(row_of(record()) for _ in range(3))
    for _ in range(3):
        h.clock.now += 1
        h.recorder.tick()
    assert len(h.recorder.pending) == 3
    assert len(h.logs) == 1 and "database is locked" in h.logs[0] and "close it" in h.logs[0]
    holder.execute("ROLLBACK")
    holder.close()
    h.clock.now += 1
    h.recorder.tick()
    assert len(h.rows()) == 3 and h.recorder.pending == []
    assert h.logs[1].endswith("is writable again")


def test_rows_beyond_the_cap_are_dropped_and_counted_while_it_cannot_write(tmp_path: Path) -> None:
    h = harness(tmp_path, max_held=10)
    h.recorder.tick()
    holder = sqlite3.connect(h.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    h.recorder.add(row_of(record(started=1_000_000.0 + n)) for n in range(25))
    h.clock.now += 1
    h.recorder.tick()
    holder.execute("ROLLBACK")
    holder.close()
    h.clock.now += 1
    h.recorder.tick()
    assert [row[0] for row in h.rows()] == [1_000_000.0 + n for n in range(15, 25)]  # the newest kept
    assert h.logs[-1].endswith("15 rows were dropped meanwhile")


def test_a_corrupt_file_is_moved_aside_reported_and_a_new_one_started(tmp_path: Path) -> None:
    h = harness(tmp_path)
    garbage = b"this is not a database, " * 100
    h.path.write_bytes(garbage)
    h.recorder.add([row_of(record())])
    h.clock.now += 1
    h.recorder.tick()
    [moved] = tmp_path.glob("usage.sqlite3.corrupt-*")
    assert moved.read_bytes() == garbage
    assert len(h.rows()) == 1
    assert len(h.logs) == 1 and "is damaged" in h.logs[0] and f"moved it to {moved}" in h.logs[0]
    assert ".recover" in h.logs[0]


def test_a_database_with_a_foreign_requests_table_is_moved_aside_too(tmp_path: Path) -> None:
    h = harness(tmp_path)
    with contextlib.closing(sqlite3.connect(h.path)) as connection:
        connection.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, time REAL)")
        connection.commit()
    h.recorder.add([row_of(record())])
    h.recorder.flush()
    assert len(list(tmp_path.glob("usage.sqlite3.corrupt-*"))) == 1 and len(h.rows()) == 1
    assert "lacks route" in h.logs[0]


def test_a_symbolic_link_in_place_of_the_database_is_not_followed(tmp_path: Path) -> None:
    h = harness(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep me")
    h.path.symlink_to(elsewhere)
    h.recorder.add([row_of(record())])
    assert h.recorder.flush() is False
    assert elsewhere.read_bytes() == b"keep me" and h.recorder.pending
    assert len(h.logs) == 1 and "Cannot write the usage database" in h.logs[0]


def test_uninstall_knows_the_database_its_side_files_and_those_moved_aside(tmp_path: Path) -> None:
    from cmm.config.removal import is_own_file

    h = harness(tmp_path)
    h.path.write_bytes(b"garbage " * 512)
    (tmp_path / "usage.sqlite3-wal").write_bytes(b"")
    h.recorder.add([row_of(record())])
    h.recorder.flush()  # moved aside, a new one made and left open (-wal, -shm)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert len(names) == 5 and all(is_own_file(name) for name in names), names
    assert not is_own_file("usage.sqlite3.bak") and not is_own_file("usage.sqlite3-journal.txt")
