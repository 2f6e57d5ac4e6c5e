"""The usage recorder: the one process that writes the usage database, as the config dir's owner.

Started by the master as ``python -m cmm.daemon.recorder --database PATH [--user UID:GID]``. A
root master must never open a file the user can write with SQLite (a crafted database attacks the
parser, and the ``-wal`` and ``-shm`` it creates would be root's): this process drops to the user
first, then opens it. Its stdin carries the master's ``request`` messages (``cmm.daemon.wire``),
its stdout takes ``log`` lines back. When stdin closes it writes what it holds and exits, so the
records of the last requests are kept; SIGTERM does the same.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from cmm.core.records import escaped
from cmm.daemon import wire
from cmm.daemon.privileges import drop_privileges, parse_user
from cmm.usage.store import Recorder, row_of

READ_SIZE = 1 << 16
DRAIN_READS = 64  # after SIGTERM: up to 4 MiB of records already in the pipe
# A line is a batch of records (recording.BATCH_RECORDS, a few hundred bytes each, each path under
# http_head.MAX_HEAD_BYTES): a longer one is not the master's.
MAX_LINE = 32 << 20


class Feed:
    """Bytes from the master in, rows out: whole lines decoded, anything else reported."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.buffer = b""

    def rows(self, data: bytes) -> list[Any]:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LINE:
            self.log(f"Dropped {len(self.buffer)} bytes from the master without a line end")
            self.buffer = b""
        rows: list[Any] = []
        for line in lines:
            if not line:
                continue
            try:
                message = wire.decode(line)
                if message["type"] == "records":
                    rows.extend(row_of(record) for record in wire.records_from_message(message))
                elif message["type"] == "request":  # one record a line: a master from before batches
                    rows.append(row_of(wire.record_from_message(message)))
            except Exception as error:  # one bad line costs that line only
                self.log(f"Ignoring a message from the master: {escaped(repr(error))[:200]}")
        return rows


def run(recorder: Recorder, source: int, wakeup: int, log: Callable[[str], None]) -> None:
    """Read ``source`` until it ends or ``wakeup`` (a signal's) becomes readable, writing batches
    as they fall due; the last batch is written before returning."""
    feed = Feed(log)
    try:
        while True:
            recorder.tick()
            ready, _, _ = select.select([source, wakeup], [], [], recorder.due())
            if wakeup in ready:
                _read_what_was_sent(recorder, feed, source)
                break
            if source in ready:
                data = os.read(source, READ_SIZE)
                if not data:
                    break
                recorder.add(feed.rows(data))
    finally:
        recorder.close()


def _read_what_was_sent(recorder: Recorder, feed: Feed, source: int) -> None:
    """Records the master sent before the signal are owed a row too, though the loop had not
    read them yet; what comes after is not waited for (at most ``DRAIN_READS`` reads)."""
    for _ in range(DRAIN_READS):
        if not select.select([source], [], [], 0)[0]:
            return
        data = os.read(source, READ_SIZE)
        if not data:
            return
        recorder.add(feed.rows(data))


def master_log(out: BinaryIO, level: str = "error") -> Callable[[str], None]:
    """Lines for the master's log (it owns the log files), as the workers send theirs."""
    def log(text: str) -> None:
        try:
            out.write(wire.encode({"type": "log", "level": level, "text": text}))
            out.flush()
        except OSError:
            pass  # the master is gone: nobody to tell
    return log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmm.daemon.recorder",
                                     description="cmm's usage recorder; started by the master.")
    parser.add_argument("--database", type=Path, required=True, help="the usage database file")
    parser.add_argument("--retention-days", type=float, default=90.0, help="rows older than this are deleted")
    parser.add_argument("--user", type=parse_user, default=None, help="UID:GID to run as before opening anything")
    args = parser.parse_args(argv)
    import sqlite3  # noqa: F401  (imported while the interpreter's files are still readable)

    if args.user is not None:
        drop_privileges(*args.user)
    os.umask(0o077)  # the database's -wal and -shm: the user's alone
    log = master_log(sys.stdout.buffer)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the wake-up pipe ends the loop
    for ignored in (signal.SIGINT, signal.SIGHUP):  # the master decides when the recorder stops
        signal.signal(ignored, signal.SIG_IGN)
    recorder = Recorder(args.database, args.retention_days, log, notice=master_log(sys.stdout.buffer, "info"))
    run(recorder, sys.stdin.fileno(), read_end, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
