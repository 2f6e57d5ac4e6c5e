"""The usage recorder: the process (fed JSON lines, flushing on EOF and SIGTERM, surviving a kill
-9 with what it committed, dropping root before it opens anything) and the master's side of it
(batches down the pipe, records held while it restarts, stopped last)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from cmm.core.records import RequestRecord
from cmm.daemon import recording, wire
from cmm.daemon.recording import UsageRecorder
from support import process_env


def record(n: int = 0) -> RequestRecord:
    return RequestRecord(time.time() + n * 1e-3, "POST", "/v1/messages", f"model-{n}", n % 2 == 0, None, 200, 0.25,
                         10, 20, input_tokens=n)


def lines(*numbers: int) -> bytes:
    return b"".join(wire.encode(wire.request_message(record(n))) for n in numbers)


def count(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def start(database: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cmm.daemon.recorder", "--database", str(database), *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=process_env(), cwd="/")


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError("timed out")


# --- the process ---------------------------------------------------------------------------------


def test_it_writes_what_it_is_fed_and_everything_held_when_stdin_closes(tmp_path: Path) -> None:
    database = tmp_path / "usage.sqlite3"
    process = start(database)
    out, err = process.communicate(lines(*range(120)) + b"not json\n", timeout=30)
    assert process.returncode == 0, err
    assert count(database) == 120
    assert b"Ignoring a message from the master" in out  # one bad line costs that line only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage.sqlite3"]  # closed cleanly: no -wal left


def test_it_writes_batches_one_line_each_and_the_old_one_record_lines(tmp_path: Path) -> None:
    """The master sends a batch a line; a master from before batches (still running while a
    new install starts the recorder) sent one record a line."""
    database = tmp_path / "usage.sqlite3"
    process = start(database)
    batches = b"".join(wire.encode(wire.records_message([record(n) for n in range(at, at + 50)]))
                       for at in range(0, 200, 50))
    out, err = process.communicate(batches + lines(200, 201), timeout=30)
    assert process.returncode == 0, err
    assert count(database) == 202


def test_sigterm_writes_the_last_batch_then_exits(tmp_path: Path) -> None:
    database = tmp_path / "usage.sqlite3"
    process = start(database)
    assert process.stdin is not None
    process.stdin.write(lines(1, 2, 3))
    process.stdin.flush()
    time.sleep(0.3)  # read, not yet written (the batch waits a second)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert count(database) == 3


def test_records_sent_before_sigterm_are_written_though_not_yet_read(tmp_path: Path) -> None:
    """The signal and the records are both waiting when the loop first looks: the records win."""
    from cmm.daemon.recorder import run
    from cmm.usage.store import Recorder

    database, logs = tmp_path / "usage.sqlite3", []
    source_read, source_write = os.pipe()
    wakeup_read, wakeup_write = os.pipe()
    os.write(source_write, lines(*range(5)))  # the master's pipe stays open: only the signal ends the loop
    os.write(wakeup_write, b"\x0f")
    try:
        run(Recorder(database, 90.0, logs.append), source_read, wakeup_read, logs.append)
    finally:
        for end in (source_read, source_write, wakeup_read, wakeup_write):
            os.close(end)
    assert count(database) == 5
    assert logs == []


def test_sigint_and_sighup_leave_it_running(tmp_path: Path) -> None:
    process = start(tmp_path / "usage.sqlite3")
    assert process.stdin is not None
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert process.poll() is None
    process.stdin.close()
    assert process.wait(timeout=10) == 0


def test_kill_9_keeps_every_committed_row_and_a_sound_file(tmp_path: Path) -> None:
    database = tmp_path / "usage.sqlite3"
    process = start(database)
    assert process.stdin is not None
    process.stdin.write(lines(*range(200)))
    process.stdin.flush()
    wait_for(lambda: database.exists() and count(database) == 200)  # committed
    process.stdin.write(lines(*range(200, 260)))
    process.stdin.flush()
    process.kill()
    process.wait(timeout=10)
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert count(database) in (200, 260)  # the last batch whole, or not at all
    again = start(database)  # and it is written to again
    again.communicate(lines(999), timeout=30)
    assert count(database) in (201, 261)


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    directory = Path(tempfile.mkdtemp(prefix="cmm-recorder-", dir="/tmp"))
    os.chown(directory, 65534, 65534)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_started_by_root_it_becomes_the_user_before_opening_the_database(nobodys_dir: Path) -> None:
    database = nobodys_dir / "usage.sqlite3"
    process = start(database, "--user", "65534:65534")
    assert process.stdin is not None
    process.stdin.write(lines(1))
    process.stdin.flush()
    wait_for(lambda: Path(f"{database}-wal").exists())
    status = Path(f"/proc/{process.pid}/status").read_text()
    assert "Uid:\t65534\t65534\t65534\t65534" in status
    files = {path.name: (path.stat().st_uid, path.stat().st_mode & 0o777) for path in nobodys_dir.iterdir()}
    assert files == {"usage.sqlite3": (65534, 0o600), "usage.sqlite3-wal": (65534, 0o600),
                     "usage.sqlite3-shm": (65534, 0o600)}
    process.stdin.close()
    assert process.wait(timeout=10) == 0 and count(database) == 1


def test_a_database_root_owns_in_the_users_dir_is_not_opened_by_it(nobodys_dir: Path) -> None:
    """The recorder is the user: a file only root may write stays untouched, and it says so."""
    database = nobodys_dir / "usage.sqlite3"
    database.write_bytes(b"")
    database.chmod(0o600)  # root's
    process = start(database, "--user", "65534:65534")
    out, _ = process.communicate(lines(1), timeout=30)
    assert database.read_bytes() == b""
    assert b"Cannot write the usage database" in out and b"Permission denied" in out


# --- the master's side ---------------------------------------------------------------------------


@attrs.define
class FakeTransport:
    pid: int = 4321
    written: list[bytes] = attrs.field(factory=list)
    stdin_closed: bool = False
    signals: list[str] = attrs.field(factory=list)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


@attrs.define
class Spawner:
    transports: list[FakeTransport] = attrs.field(factory=list)
    calls: list[tuple[list[str], str]] = attrs.field(factory=list)

    def __call__(self, protocol: Any, executable: str, args: list[str], env: dict[str, str], path: str) -> None:
        self.calls.append((args, path))
        self.transports.append(FakeTransport(pid=4321 + len(self.transports)))
        protocol.makeConnection(self.transports[-1])


def master_side(tmp_path: Path, **more: Any) -> tuple[UsageRecorder, MemoryReactorClock, Spawner]:
    reactor, spawner = MemoryReactorClock(), Spawner()
    recorder = UsageRecorder(reactor, tmp_path / "usage.sqlite3", 30.0, spawn=spawner, **more)
    recorder.start()
    return recorder, reactor, spawner


def test_the_command_runs_the_recorder_as_the_user_with_the_retention(tmp_path: Path) -> None:
    _, _, spawner = master_side(tmp_path, uid=1000, gid=100)
    [(args, cwd)] = spawner.calls
    assert args[1:] == ["-m", "cmm.daemon.recorder", "--database", str(tmp_path / "usage.sqlite3"),
                        "--retention-days", "30.0", "--user", "1000:100"]
    assert cwd == "/"


def test_records_go_down_the_pipe_in_batches(tmp_path: Path) -> None:
    recorder, reactor, spawner = master_side(tmp_path)
    for n in range(3):
        recorder.add(record(n))
    assert spawner.transports[0].written == []
    reactor.advance(recording.BATCH_DELAY)
    [batch] = spawner.transports[0].written  # one write, one line for the three
    [message] = [wire.decode(line) for line in batch.splitlines()]
    assert [r.model for r in wire.records_from_message(message)] == ["model-0", "model-1", "model-2"]
    for n in range(recording.BATCH_RECORDS):
        recorder.add(record(n))
    assert len(spawner.transports[0].written) == 2  # a full batch goes at once


def test_request_content_is_not_sent_to_the_recorder(tmp_path: Path) -> None:
    """The store keeps no request content; a logged body would only swell the batch line."""
    recorder, reactor, spawner = master_side(tmp_path)
    plain = record(1)
    recorder.add(attrs.evolve(plain, content='{"model":"m","messages":[]}' * 1000))
    reactor.advance(recording.BATCH_DELAY)
    [line] = spawner.transports[0].written[0].splitlines()
    [sent] = wire.records_from_message(wire.decode(line))
    assert sent == plain and len(line) < 2000


def test_a_dead_recorder_is_started_again_with_the_records_held_meanwhile(tmp_path: Path) -> None:
    recorder, reactor, spawner = master_side(tmp_path)
    process = recorder.process
    assert process is not None
    with capturedLogs() as events:
        process.processEnded(Failure(ProcessTerminated(signal=9)))
    assert any("starting it again in 0.5s" in formatEvent(e) for e in events)
    recorder.add(record(1))
    recorder.add(record(2))
    reactor.advance(recording.BATCH_DELAY)
    assert recorder.process is None and len(recorder.held) == 2
    reactor.advance(0.5)
    [line] = spawner.transports[1].written[0].splitlines()
    assert len(spawner.transports) == 2 and len(wire.records_from_message(wire.decode(line))) == 2
    assert recorder.status() == {"pid": 4322, "database": str(tmp_path / "usage.sqlite3"), "restarts": 1,
                                 "dropped": 0}


def test_held_records_are_capped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording, "MAX_HELD", 5)
    recorder, reactor, _ = master_side(tmp_path)
    assert recorder.process is not None
    recorder.process.processEnded(Failure(ProcessTerminated(signal=9)))
    for n in range(8):
        recorder.add(record(n))
    assert len(recorder.held) == 5 and recorder.dropped == 3


def test_stop_hands_over_what_is_held_closes_stdin_and_waits(tmp_path: Path) -> None:
    recorder, reactor, spawner = master_side(tmp_path)
    recorder.add(record(1))
    stopped = recorder.stop()
    transport = spawner.transports[0]
    assert transport.written[0].count(b"\n") == 1 and transport.stdin_closed and not stopped.called
    assert recorder.process is not None
    recorder.process.processEnded(Failure(ProcessDone(0)))
    assert stopped.called and len(spawner.transports) == 1  # not started again
    assert reactor.getDelayedCalls() == []


def test_a_recorder_that_does_not_finish_is_killed(tmp_path: Path) -> None:
    recorder, reactor, spawner = master_side(tmp_path)
    recorder.stop()
    reactor.advance(recording.STOP_TIMEOUT)
    assert spawner.transports[0].signals == ["KILL"]


def test_a_new_retention_restarts_it_with_the_new_value(tmp_path: Path) -> None:
    recorder, reactor, spawner = master_side(tmp_path)
    recorder.reload(7.0)
    assert spawner.transports[0].stdin_closed
    assert recorder.process is not None
    recorder.process.processEnded(Failure(ProcessDone(0)))
    assert "7.0" in spawner.calls[1][0] and recorder.restarts == 0


def test_a_recorder_that_cannot_start_is_reported_and_serving_goes_on(tmp_path: Path) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("no such interpreter")

    recorder = UsageRecorder(MemoryReactorClock(), tmp_path / "usage.sqlite3", 30.0, spawn=broken)
    with capturedLogs() as events:
        recorder.start()
    assert any("Cannot start the usage recorder (no such interpreter)" in formatEvent(e) for e in events)
    recorder.add(record(1))  # held, not raised
    assert recorder.stop().called
