"""The usage database: one row a request, written in batches by a single process (the recorder,
running as the user who owns the config dir), and what that process does when the file fails it.

Policy when the database cannot be written (serving never depends on it; the recorder is its own
process and the master only forwards records to it):

- **locked or busy** (another program holds a write lock), disk full, I/O error: the rows are
  held and the write retried at the next flush; past :data:`MAX_HELD` rows the oldest are dropped
  and counted. Reported once when it starts failing, once when it writes again.
- **corrupt** (not a database, malformed, or a ``requests`` table without our columns): the file
  (with its ``-wal`` and ``-shm``) is moved aside to ``usage.sqlite3.corrupt-<UTC time>``, where
  ``sqlite3 … .recover`` may still save its rows, and a new database is started. Reported once.

Everything here is stdlib (``sqlite3``) and blocking: the recorder has nothing else to do.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from cmm.core.records import RequestRecord
from cmm.usage import schema

FILE_MODE = 0o600
FLUSH_INTERVAL = 1.0  # seconds a row waits at most before its batch is written
BATCH_ROWS = 500  # a batch this large is written at once
MAX_HELD = 50_000  # rows kept while the database cannot be written; older ones are dropped beyond
PRUNE_INTERVAL = 3600.0  # seconds between deletions of rows past the retention
BUSY_TIMEOUT = 1.0  # seconds a write waits for another connection's lock before giving up (for now)
DAY = 86400.0
SIDE_FILES = ("-wal", "-shm", "-journal")

_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_NAMES = tuple(name for name, _ in schema.COLUMNS)
_INSERT = f"INSERT INTO requests ({', '.join(_NAMES)}) VALUES ({', '.join('?' for _ in _NAMES)})"

Row = tuple[Any, ...]


class Incompatible(sqlite3.DatabaseError):
    """A database that opens but is not ours (a ``requests`` table with other columns)."""


def row_of(record: RequestRecord) -> Row:
    """A record as the table's row, in :data:`schema.COLUMNS` order; a record without a route
    says it by ``intercepted``."""
    route = record.route or ("intercepted" if record.intercepted else "passthrough")
    values = {
        "time": record.started, "route": route, "rule": record.rule, "model": record.model,
        "served_model": record.served_model, "upstream": record.upstream, "request_class": record.request_class,
        "method": record.method, "path": record.path, "status": record.status, "error": record.error,
        "fallback": record.fallback, "duration": record.duration, "ttfb": record.ttfb,
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out, "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens, "cache_creation_input_tokens": record.cache_creation_input_tokens,
        "cache_read_input_tokens": record.cache_read_input_tokens,
    }
    return tuple(values[name] for name in _NAMES)


def is_corrupt(error: sqlite3.Error) -> bool:
    """Whether ``error`` says the file itself is bad (as opposed to locked, full or unreadable)."""
    if isinstance(error, Incompatible):
        return True
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPT_CODES


def _private(path: Path) -> None:
    """Create ``path`` 0600 if missing (before SQLite would, with the umask's mode) and take
    group and other bits away from it; never through a final link. Only before SQLite opens it
    in this process: closing any descriptor of the file drops SQLite's POSIX locks on it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise sqlite3.DatabaseError(f"{path} is not a regular file")
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    _private_side_files(path)


def _private_side_files(path: Path) -> None:
    """The ``-wal``, ``-shm`` (SQLite gives them the database's mode, less the umask) 0600 too;
    by name, never opened, for the reason above."""
    for suffix in SIDE_FILES:
        side = Path(f"{path}{suffix}")
        with contextlib.suppress(OSError):
            info = side.lstat()
            if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != FILE_MODE:
                os.chmod(side, FILE_MODE)


class UsageStore:
    """The open database (WAL, created 0600); :meth:`write` is one transaction per batch."""

    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        _private(path)
        self.connection = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                                          check_same_thread=False)
        try:
            self.connection.execute("PRAGMA journal_mode=WAL").fetchone()
            self.connection.execute("PRAGMA synchronous=NORMAL")
            with self.transaction():
                for statement in schema.CREATE:
                    self.connection.execute(statement)
                if not self.connection.execute("PRAGMA user_version").fetchone()[0]:
                    self.connection.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION}")
            have = {row[1] for row in self.connection.execute("PRAGMA table_info(requests)")}
            missing = [name for name in _NAMES if name not in have]
            if missing:
                raise Incompatible(f"its requests table lacks {', '.join(missing)}")
            _private_side_files(path)  # the -wal and -shm SQLite just made
        except BaseException:
            self.connection.close()
            raise

    @contextlib.contextmanager
    def transaction(self) -> Any:
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def write(self, rows: Sequence[Row]) -> None:
        with self.transaction():
            self.connection.executemany(_INSERT, rows)

    def prune(self, before: float) -> int:
        """Delete the rows that started before ``before``; how many went."""
        with self.transaction():
            return self.connection.execute("DELETE FROM requests WHERE time < ?", (before,)).rowcount

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.connection.close()


def move_aside(path: Path, now: float) -> Path:
    """Rename the database and its side files to ``<name>.corrupt-<UTC time>``; the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", *SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
    return target


@attrs.define(eq=False)
class Recorder:
    """Rows in, batches out: when to write, when to prune, and what to do when the file fails.

    ``open_store`` opens (and creates) the database; ``log`` takes one finished sentence about a
    problem, ``notice`` (``log`` unless given) the news that it is over.
    """

    path: Path
    retention_days: float
    log: Callable[[str], None]
    clock: Callable[[], float] = time.time
    open_store: Callable[[Path], UsageStore] = UsageStore
    notice: Callable[[str], None] | None = None
    flush_interval: float = FLUSH_INTERVAL
    batch_rows: int = BATCH_ROWS
    max_held: int = MAX_HELD
    prune_interval: float = PRUNE_INTERVAL
    store: UsageStore | None = None
    pending: list[Row] = attrs.field(factory=list)
    first_pending: float | None = None  # when the oldest pending row arrived
    next_prune: float = 0.0  # at once, then every prune_interval
    written: int = 0
    dropped: int = 0  # since the database last failed
    failing: str | None = None  # what the last write failed with, until one succeeds

    def add(self, rows: Iterable[Row]) -> None:
        rows = list(rows)
        if rows and self.first_pending is None:
            self.first_pending = self.clock()
        self.pending += rows
        if len(self.pending) > self.max_held:
            excess = len(self.pending) - self.max_held
            del self.pending[:excess]
            self.dropped += excess

    def due(self) -> float | None:
        """Seconds until :meth:`tick` has work (0: now); None: nothing until more rows come."""
        now = self.clock()
        waits = [max(0.0, self.next_prune - now)]
        if self.pending:
            assert self.first_pending is not None
            full = len(self.pending) >= self.batch_rows and self.failing is None
            waits.append(0.0 if full else max(0.0, self.first_pending + self.flush_interval - now))
        return min(waits)

    def tick(self) -> None:
        """Write the batch if it is due, prune if that is due."""
        now = self.clock()
        if self.pending and self.first_pending is not None and (
                now >= self.first_pending + self.flush_interval
                or (len(self.pending) >= self.batch_rows and self.failing is None)):
            self.flush()
        if now >= self.next_prune:
            self.next_prune = now + self.prune_interval
            self.prune()

    def flush(self) -> bool:
        """Write every pending row in one transaction; False when they are still held."""
        if not self.pending:
            return True
        rows = self.pending
        if not self._attempt(lambda store: store.write(rows)):
            self.first_pending = self.clock()  # retried a flush interval from now
            return False
        self.pending = []
        self.first_pending = None
        self.written += len(rows)
        return True

    def prune(self) -> None:
        before = self.clock() - self.retention_days * DAY
        self._attempt(lambda store: store.prune(before))

    def close(self) -> None:
        """The last flush (the master's final records), then the file closed (WAL checkpointed)."""
        self.flush()
        if self.pending:
            self.log(f"Usage database {self.path}: {len(self.pending)} rows could not be written before exit "
                     f"({self.failing}); they are lost")
        if self.store is not None:
            self.store.close()
            self.store = None

    def _attempt(self, work: Callable[[UsageStore], object]) -> bool:
        for _ in range(2):  # once more on a fresh file after moving a corrupt one aside
            try:
                if self.store is None:
                    self.store = self.open_store(self.path)
                work(self.store)
            except (sqlite3.Error, OSError) as error:
                if isinstance(error, sqlite3.Error) and is_corrupt(error):
                    self._set_aside(error)
                    continue
                self._failed(error)
                return False
            self._recovered()
            return True
        return False

    def _set_aside(self, error: sqlite3.Error) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        try:
            moved = move_aside(self.path, self.clock())
        except OSError as problem:
            self._failed(problem)
            return
        self.log(f"Usage database {self.path} is damaged ({error}); moved it to {moved} and started a new "
                 f"one. Its rows may be saved with: sqlite3 {moved} .recover | sqlite3 {self.path}")

    def _failed(self, error: BaseException) -> None:
        why = str(error) or type(error).__name__
        if self.store is not None and not isinstance(error, sqlite3.OperationalError):
            self.store.close()  # an unexpected state: open afresh next time
            self.store = None
        if self.failing is None:
            self.log(f"Cannot write the usage database {self.path} ({why}). Serving goes on; request rows are "
                     f"held (up to {self.max_held}) and written when it works again. If another program has it "
                     f"open (an sqlite3 shell in a transaction, a backup), close it; if the disk is full, free "
                     f"space")
        self.failing = why

    def _recovered(self) -> None:
        if self.failing is None:
            return
        lost = f"; {self.dropped} rows were dropped meanwhile" if self.dropped else ""
        (self.notice or self.log)(f"Usage database {self.path} is writable again{lost}")
        self.failing = None
        self.dropped = 0
