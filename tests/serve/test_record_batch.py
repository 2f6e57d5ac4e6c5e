"""Records and their builders leave together, built in order when the batch goes; a builder that
fails costs its own record only."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from cmm.core.records import RequestRecord
from cmm.serve.record_batch import RECORD_BATCH, RECORD_DELAY, RecordBatch


def record(number: int) -> RequestRecord:
    return RequestRecord(started=1_700_000_000.0 + number, method="POST", path="/v1/messages", model="m",
                         intercepted=False, target=None, status=200, duration=0.1, bytes_in=number, bytes_out=0)


def batch(size: int = RECORD_BATCH) -> tuple[RecordBatch, Clock, list[list[RequestRecord]], list[int]]:
    clock, sent, built = Clock(), [], []
    return RecordBatch(clock, sent.append, size=size), clock, sent, built


def builder(number: int, built: list[int]) -> Any:
    def build() -> RequestRecord:
        built.append(number)
        return record(number)
    return build


def test_builders_are_built_when_the_batch_goes_in_order_with_records() -> None:
    records, clock, sent, built = batch()
    records.add(builder(0, built))
    records.add(record(1))
    records.add(builder(2, built))
    clock.advance(RECORD_DELAY / 2)
    assert sent == [] and built == []  # nothing built before the batch goes
    clock.advance(RECORD_DELAY / 2)
    assert sent == [[record(0), record(1), record(2)]] and built == [0, 2]
    clock.advance(1.0)
    assert len(sent) == 1  # no empty batch


def test_a_full_batch_goes_at_once_and_its_timer_with_it() -> None:
    records, clock, sent, built = batch(size=3)
    for number in range(4):
        records.add(builder(number, built))
    assert sent == [[record(0), record(1), record(2)]]
    clock.advance(RECORD_DELAY)
    assert sent[1:] == [[record(3)]]
    assert clock.getDelayedCalls() == []


def test_a_failing_builder_costs_its_record_only() -> None:
    records, clock, sent, built = batch()

    def broken() -> RequestRecord:
        raise ValueError("no such thing")

    with capturedLogs() as events:
        records.add(builder(0, built))
        records.add(broken)
        records.add(builder(2, built))
        records.flush()
    assert sent == [[record(0), record(2)]]
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [ValueError]


def test_nothing_to_send_sends_nothing() -> None:
    records, clock, sent, _ = batch()

    def broken() -> RequestRecord:
        raise ValueError("no such thing")

    with capturedLogs():
        records.add(broken)
        records.flush()
    records.flush()
    assert sent == []
