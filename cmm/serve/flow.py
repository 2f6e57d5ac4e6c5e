"""Flow-control helpers shared by both sides of a splice: pausable reading and cheap deadlines."""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


@implementer(IPushProducer)
class Valve:
    """Pauses a transport's reading for any number of independent reasons.

    A splice pauses a side for backpressure (the other side's buffer is full), while an upstream
    connects, or to hold back a pipelined request; a plain ``pauseProducing`` from one reason
    must not be undone by another's ``resumeProducing``.
    """

    __slots__ = ("_transport", "_reasons")  # two per connection that is open: no __dict__ each

    def __init__(self, transport: IPushProducer) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self._transport.resumeProducing()

    def open(self) -> None:
        """Read again whatever the reasons: a closing TLS connection must read the peer's
        close_notify (or EOF), or it lingers until something aborts it."""
        if self._reasons:
            self._reasons.clear()
            self._transport.resumeProducing()

    # IPushProducer, for registering with the other side's transport as its producer.
    def pauseProducing(self) -> None:
        self.pause("backpressure")

    def resumeProducing(self) -> None:
        self.resume("backpressure")

    def stopProducing(self) -> None:
        """The consumer went away; its own connectionLost handling tears the splice down."""


class Deadline:
    """A timeout that is extended on every byte without touching the reactor each time.

    ``touch`` only records the time; the single delayed call, when it fires early, re-arms
    itself for the remaining interval. Thousands of open streams then cost one timer each.
    """

    __slots__ = ("_clock", "_on_expiry", "_timeout", "_last", "_call")

    def __init__(self, clock: IReactorTime, on_expiry: Callable[[], None]) -> None:
        self._clock = clock
        self._on_expiry = on_expiry
        self._timeout: float | None = None
        self._last = 0.0
        self._call: IDelayedCall | None = None

    def start(self, timeout: float) -> None:
        """(Re)start with a new interval, counted from now."""
        self._timeout = timeout
        self._last = self._clock.seconds()
        if self._call is None or not self._call.active():
            self._call = self._clock.callLater(timeout, self._fire)
        elif self._call.getTime() > self._last + timeout:
            self._call.reset(timeout)

    def touch(self) -> None:
        self._last = self._clock.seconds()

    def cancel(self) -> None:
        self._timeout = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        if self._timeout is None:
            return
        remaining = self._last + self._timeout - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._fire)
            return
        self._timeout = None
        self._on_expiry()
