"""A worker's batch of records reaches the master's log at once: its lines in one write to the
console and one to the file, the same lines as one record at a time."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from cmm.core.records import RequestRecord
from cmm.daemon import wire
from cmm.daemon.master import Supervisor, Worker
from cmm.serve.request_log import RequestLog


def record(number: int) -> RequestRecord:
    return RequestRecord(started=1_700_000_000.5 + number, method="POST", path="/v1/messages", model=f"model-{number}",
                         intercepted=False, target=None, status=200, duration=0.25, bytes_in=100 + number, bytes_out=200)


class CountingConsole(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_batch_is_logged_in_one_write_with_the_lines_one_by_one_would_give(tmp_path: Path) -> None:
    batch = [record(n) for n in range(5)]
    singly, batched = CountingConsole(), CountingConsole()
    one_by_one = RequestLog.to_file(tmp_path / "one" / "cmm.log", console=singly)
    at_once = RequestLog.to_file(tmp_path / "all" / "cmm.log", console=batched)
    for each in batch:
        one_by_one(each)
    at_once.write_all(batch)
    one_by_one.close()
    at_once.close()
    assert batched.getvalue() == singly.getvalue() and singly.getvalue().count("\n") == 5
    assert (batched.writes, singly.writes) == (1, 5)
    assert (tmp_path / "all" / "cmm.log").read_text() == (tmp_path / "one" / "cmm.log").read_text() == singly.getvalue()
    at_once.write_all([])
    assert batched.writes == 1  # nothing to say: nothing written


def test_the_master_hands_a_worker_s_batch_on_whole_when_it_can() -> None:
    batches: list[tuple[list[RequestRecord], str]] = []
    singles: list[Any] = []
    supervisor = Supervisor(reactor=Clock(), sockets=[[]], count=1, record=lambda r, w: singles.append((r, w)),
                            record_batch=lambda rs, w: batches.append((rs, w)))
    line = wire.encode(wire.records_message([record(n) for n in range(3)]))
    Worker(supervisor, "worker-1").outReceived(line + wire.encode(wire.request_message(record(9))))
    assert batches == [([record(n) for n in range(3)], "worker-1")]
    assert singles == [(record(9), "worker-1")]  # the one-record message: one record
