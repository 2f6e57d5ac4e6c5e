"""The upstream pool: which idle connection is lent, how many are kept, and when they close."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cmm.core.values import Destination
from cmm.serve.upstream import MAX_IDLE, Pool, UpstreamConnection

ANTHROPIC = Destination("https", "api.anthropic.com", 443, anthropic=True)
TARGET = Destination("http", "localhost", 8317)
TIMEOUT = 20.0


def made(destination: Destination) -> UpstreamConnection:
    connection = UpstreamConnection(destination)
    connection.makeConnection(StringTransport())
    return connection


def closed(connection: UpstreamConnection) -> bool:
    transport = connection.transport
    assert isinstance(transport, StringTransport)
    return transport.disconnecting


class Opened:
    def __init__(self) -> None:
        self.connections: list[UpstreamConnection] = []

    def __call__(self, destination: Destination) -> defer.Deferred[UpstreamConnection]:
        self.connections.append(made(destination))
        return defer.succeed(self.connections[-1])


def lend(pool: Pool, destination: Destination = ANTHROPIC) -> tuple[UpstreamConnection, bool]:
    got: list[tuple[UpstreamConnection, bool]] = []
    pool.acquire(destination).addCallback(got.append)
    return got[0]


def test_the_connection_released_last_is_lent_first_and_a_new_one_only_when_none_is_idle() -> None:
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock, TIMEOUT)
    first, second = lend(pool)[0], lend(pool)[0]
    pool.release(first)
    clock.advance(1)
    pool.release(second)
    assert lend(pool) == (second, True) and lend(pool) == (first, True)
    assert lend(pool)[1] is False and len(opened.connections) == 3 and pool.opened == 3


def test_idle_connections_close_after_the_timeout_each_from_its_own_release() -> None:
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock, TIMEOUT)
    first, second, third = (lend(pool)[0] for _ in range(3))
    pool.release(first)
    clock.advance(5)
    pool.release(second)
    clock.advance(5)
    pool.release(third)
    assert lend(pool) == (third, True)  # lent, then back: idle again from now (t=10)
    pool.release(third)
    assert len(clock.getDelayedCalls()) == 1  # one timer for the whole pool, not one a release
    clock.advance(TIMEOUT - 10 - 0.001)
    assert not any(map(closed, (first, second, third)))
    clock.advance(0.001)  # t=20: the first's time
    assert closed(first) and not closed(second) and pool.idle_count() == 2
    clock.advance(5)  # t=25: the second's
    assert closed(second) and not closed(third)
    clock.advance(5)  # t=30: the third's
    assert closed(third) and pool.idle_count() == 0 and clock.getDelayedCalls() == []


def test_a_connection_lent_before_its_time_is_not_closed_by_the_timer() -> None:
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock, TIMEOUT)
    connection = lend(pool)[0]
    pool.release(connection)
    clock.advance(TIMEOUT - 1)
    assert lend(pool) == (connection, True)
    clock.advance(5)
    assert not closed(connection) and clock.getDelayedCalls() == []


def test_at_most_max_idle_are_kept_per_destination() -> None:
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock, TIMEOUT, max_idle=2)
    connections = [lend(pool)[0] for _ in range(3)] + [lend(pool, TARGET)[0]]
    for connection in connections:
        pool.release(connection)
    assert [closed(c) for c in connections] == [False, False, True, False]
    assert pool.idle_count() == 3


def test_the_default_keeps_a_busy_worker_s_connections() -> None:
    assert MAX_IDLE >= 64  # 64 client connections over 2 workers must not churn upstream connections
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock)
    connections = [lend(pool)[0] for _ in range(64)]
    for connection in connections:
        pool.release(connection)
    assert pool.idle_count() == 64 and not any(map(closed, connections))


def test_a_connection_lost_while_idle_is_forgotten_and_one_lent_is_not_the_pool_s_concern() -> None:
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock, TIMEOUT)
    gone, kept = lend(pool)[0], lend(pool)[0]
    pool.release(kept)
    pool.release(gone)
    gone.connectionLost()
    assert pool.idle_count() == 1 and lend(pool) == (kept, True)
    assert kept.on_lost is None  # lent: its loss is its exchange's to handle


def test_close_idle_closes_them_all_and_stops_the_timer() -> None:
    opened, clock = Opened(), Clock()
    pool = Pool(opened, clock, TIMEOUT)
    connections = [lend(pool)[0], lend(pool, TARGET)[0]]
    for connection in connections:
        pool.release(connection)
    pool.close_idle()
    assert all(map(closed, connections)) and pool.idle_count() == 0 and clock.getDelayedCalls() == []
