"""Workers sharing one listening socket take one connection per turn of their loop, so that a
client's connections opened together spread over the workers instead of all landing on the
first one awake."""

from __future__ import annotations

from twisted.internet.task import Clock

from cmm.daemon.worker import accept_one_at_a_time


class FakePort:
    """What accept_one_at_a_time uses of Twisted's tcp.Port: doRead's batch size, and reading."""

    def __init__(self) -> None:
        self.numberAccepts = 100
        self.connected = True
        self.reading = True
        self.batches: list[int] = []

    def doRead(self) -> None:
        self.batches.append(self.numberAccepts)
        self.numberAccepts += 20  # as Twisted's port learns to accept more after a full batch

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_one_connection_per_turn_then_the_socket_is_left_to_the_others() -> None:
    port, clock = FakePort(), Clock()
    accept_one_at_a_time(port, clock)
    port.doRead()
    assert port.batches == [1] and not port.reading  # this turn taken: the next one is another's
    clock.advance(0)
    assert port.reading
    port.doRead()
    assert port.batches == [1, 1]


def test_a_port_that_stopped_listening_is_not_read_again() -> None:
    port, clock = FakePort(), Clock()
    accept_one_at_a_time(port, clock)
    port.doRead()
    port.connected = False  # stopListening meanwhile (the worker is draining)
    clock.advance(0)
    assert not port.reading
