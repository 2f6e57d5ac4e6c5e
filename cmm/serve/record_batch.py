"""Request records handed on a batch at a time, and built a batch at a time.

A record is made at the end of its exchange from what the exchange saw, its answer's token
counts included (read from the kept ends of the body, ``cmm.core.usage``). Made there, one at a
time between other connections' reads and writes, that code runs cold on every request: the
usage reader alone cost about 25 µs a request so, and under 5 µs when records are made one
after another. So the worker's exchanges hand over a builder, and the batch builds them all when
it goes: at most ``RECORD_DELAY`` after the first, or once it holds ``RECORD_BATCH``.
"""

from __future__ import annotations

from typing import Any, Callable, Union

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cmm.core.records import RequestRecord

log = Logger()

# One JSON line and one pipe write to the master for up to RECORD_BATCH records, at most
# RECORD_DELAY seconds after the first (the log and `cmm status` hardly notice).
RECORD_BATCH = 100
RECORD_DELAY = 0.005

Builder = Callable[[], RequestRecord]
Item = Union[RequestRecord, Builder]


class RecordBatch:
    """Records, or builders of records, gathered in order and sent on together as records."""

    def __init__(self, clock: IReactorTime, send: Callable[[list[RequestRecord]], None],
                 size: int = RECORD_BATCH, delay: float = RECORD_DELAY) -> None:
        self._clock = clock
        self._send = send
        self._size = size
        self._delay = delay
        self._items: list[Item] = []
        self._call: Any = None

    def add(self, item: Item) -> None:
        self._items.append(item)
        if len(self._items) >= self._size:
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(self._delay, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        items, self._items = self._items, []
        records = [record for record in map(_built, items) if record is not None]
        if records:
            self._send(records)


def _built(item: Item) -> RequestRecord | None:
    if isinstance(item, RequestRecord):
        return item
    try:
        return item()
    except Exception:  # one record's flaw costs that record, not the batch
        log.failure("Could not make the record of a request")
        return None
