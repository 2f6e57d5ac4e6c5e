"""Request records reach the master in batches: one line and one pipe write for many, each record
arriving whole and in order; the old one-record message is still read."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cmm.core.records import RequestRecord
from cmm.daemon import wire
from cmm.daemon.master import Supervisor, Worker
from cmm.daemon.worker import OUTPUT_FLUSH_TIMEOUT, WorkerControl
from cmm.serve.record_batch import RECORD_BATCH, RECORD_DELAY


def record(number: int, **changes: Any) -> RequestRecord:
    fields: dict[str, Any] = dict(started=1_700_000_000.5 + number, method="POST", path="/v1/messages",
                                  model="claude-opus-4-6", intercepted=False, target=None, status=200,
                                  duration=0.25, bytes_in=100 + number, bytes_out=200)
    return RequestRecord(**(fields | changes))


texts = st.none() | st.text(max_size=20)
records = st.builds(
    RequestRecord, started=st.floats(0, 2e9), method=st.text(max_size=8), path=st.text(max_size=20), model=texts,
    intercepted=st.booleans(), target=texts, status=st.none() | st.integers(100, 599), duration=st.floats(0, 1e4),
    bytes_in=st.integers(0, 2**40), bytes_out=st.integers(0, 2**40), error=texts, mapping=texts, route=texts,
    ttfb=st.none() | st.floats(0, 100), input_tokens=st.none() | st.integers(0, 10**7))


@given(st.lists(records, max_size=5))
def test_a_batch_round_trips_through_one_line(batch: list[RequestRecord]) -> None:
    line = wire.encode(wire.records_message(batch))
    assert line.count(b"\n") == 1
    assert wire.records_from_message(wire.decode(line)) == batch


@given(st.lists(records, min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_a_batch_whose_fields_come_in_another_order_reads_the_same(batch: list[RequestRecord],
                                                                  random: Any) -> None:
    """A sender of another version may name the fields in its own order: they are read by name."""
    message = wire.records_message(batch)
    order = list(range(len(message["fields"])))
    random.shuffle(order)
    shuffled = {"type": "records", "fields": [message["fields"][i] for i in order],
                "rows": [[row[i] for i in order] for row in message["rows"]]}
    assert wire.records_from_message(wire.decode(wire.encode(shuffled))) == batch


@pytest.mark.parametrize("message", [
    {"type": "records", "fields": ["method"], "rows": [["POST", "extra"]]},
    {"type": "records", "fields": list(wire.RECORD_FIELDS), "rows": [["POST"]]},
    {"type": "records", "fields": ["method"], "rows": "POST"},
    {"type": "records", "fields": ["no_such_field"], "rows": [["x"]]},
])
def test_a_malformed_batch_is_refused(message: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        wire.records_from_message(message)


def master_hearing() -> tuple[Worker, list[tuple[RequestRecord, str]]]:
    heard: list[tuple[RequestRecord, str]] = []
    supervisor = Supervisor(reactor=Clock(), sockets=[[]], count=1, record=lambda r, w: heard.append((r, w)))
    return Worker(supervisor, "worker-1"), heard


def worker_control() -> tuple[WorkerControl, Clock, StringTransport]:
    clock = Clock()
    control = WorkerControl(clock, [], grace=1.0)
    control.transport = StringTransport()
    return control, clock, control.transport


def test_records_wait_a_few_ms_then_leave_in_one_write() -> None:
    control, clock, transport = worker_control()
    for number in range(3):
        control.send_record(record(number))
    assert transport.value() == b""
    clock.advance(RECORD_DELAY)
    lines = transport.value().splitlines()
    assert len(lines) == 1
    worker, heard = master_hearing()
    worker.outReceived(transport.value())
    assert heard == [(record(n), "worker-1") for n in range(3)]


def test_a_full_batch_leaves_at_once() -> None:
    control, clock, transport = worker_control()
    for number in range(RECORD_BATCH + 1):
        control.send_record(record(number))
    assert len(transport.value().splitlines()) == 1  # the first RECORD_BATCH, without waiting
    clock.advance(RECORD_DELAY)
    worker, heard = master_hearing()
    worker.outReceived(transport.value())
    assert [r for r, _ in heard] == [record(n) for n in range(RECORD_BATCH + 1)]
    assert not clock.getDelayedCalls()


def test_the_master_still_reads_a_single_record() -> None:
    worker, heard = master_hearing()
    worker.outReceived(wire.encode({"type": "request", "record": {
        "started": 1.0, "method": "GET", "path": "/v1/models", "model": None, "intercepted": False, "target": None,
        "status": 200, "duration": 0.1, "bytes_in": 1, "bytes_out": 2}}))
    assert heard == [(RequestRecord(1.0, "GET", "/v1/models", None, False, None, 200, 0.1, 1, 2), "worker-1")]


def test_records_still_waiting_leave_when_the_worker_shuts_down() -> None:
    control, clock, transport = worker_control()
    control.send_record(record(1))
    clock.running = False  # type: ignore[attr-defined]  # shut_down stops a running reactor only
    stopped = control.shut_down()
    assert stopped.called and stopped.result is None
    worker, heard = master_hearing()
    worker.outReceived(transport.value())
    assert heard == [(record(1), "worker-1")]


class PipeToMaster(StringTransport):
    """The worker's stdout: loseWriteConnection writes what is buffered, then closes."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def loseWriteConnection(self) -> None:
        self.closing = True


def stopping_worker() -> tuple[WorkerControl, Clock, PipeToMaster, list[str]]:
    control, clock, _ = worker_control()
    pipe = PipeToMaster()
    control.transport = pipe
    stops: list[str] = []
    clock.running = True  # type: ignore[attr-defined]
    clock.stop = lambda: stops.append("stopped")  # type: ignore[attr-defined]
    return control, clock, pipe, stops


def test_a_stopping_worker_waits_until_its_last_records_have_left() -> None:
    """A stopping reactor drops what it has not written: the reactor stops only once the pipe
    has taken the last batch."""
    control, clock, pipe, stops = stopping_worker()
    control.send_record(record(1))
    stopped = control.shut_down()
    assert pipe.closing and not stopped.called and stops == []
    control.writeConnectionLost()  # the buffered output is written, stdout closed
    assert stopped.called and stops == ["stopped"]
    worker, heard = master_hearing()
    worker.outReceived(pipe.value())
    assert heard == [(record(1), "worker-1")]


def test_a_master_that_no_longer_reads_does_not_keep_a_worker_from_stopping() -> None:
    control, clock, pipe, stops = stopping_worker()
    control.send_record(record(1))
    control.shut_down()
    assert stops == []
    clock.advance(OUTPUT_FLUSH_TIMEOUT)
    assert stops == ["stopped"]
