"""A switched connection (``101``, e.g. WebSocket) carried as a raw two-way tunnel.

After the switch neither side speaks HTTP any more, so cmm only moves bytes: each side's reads
are written to the other as they come, each side's transport producing into the other's (a
reader that falls behind pauses the writer on the far side, both ways). There is no deadline on
a tunnel's life, only on its silence both ways (``tunnel_idle_timeout``; WebSocket pings count).
When either side goes, the other gets what is still owed to it and is closed: TLS has no
half-close in Twisted, so a side that closes can no longer be written to. The tunnel is one
request in flight for draining (its client connection is busy), and gets one record when it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from cmm.core.upgrade import Ending, Side, TunnelTally, tunnel_record
from cmm.serve.flow import Deadline, Valve
from cmm.serve.tls import connected
from cmm.serve.upstream import UpstreamConnection

if TYPE_CHECKING:
    from cmm.serve.proxy import ClientConnection, RequestInProgress


class Tunnel:
    """Joins a client connection and the upstream connection that answered ``101``.

    The two valves are the ones the exchange registered as each other's producers; the tunnel
    keeps them, so backpressure set up for the request carries on unchanged.
    """

    def __init__(self, client: ClientConnection, upstream: UpstreamConnection, upstream_valve: Valve,
                 request: RequestInProgress, bytes_out: int) -> None:
        self.client = client
        self.upstream = upstream
        self.upstream_valve = upstream_valve
        self.request = request
        self.context = client.context
        self.idle_timeout = client.settings.tunnel_idle_timeout  # a reload applies to later tunnels
        self.tally = TunnelTally(bytes_in=request.bytes_in, bytes_out=bytes_out)
        self.deadline = Deadline(self.context.clock, self._idle)

    def start(self, head: bytes, first: bytes) -> None:
        """Pass the ``101`` head (and the new protocol's ``first`` bytes, read with it) to the
        client, and what the client sent after its request to the upstream."""
        self.upstream.handler = self
        pending = self.client.tunnel_started(self)
        self.tally.bytes_out += len(head) + len(first)
        connected(self.client).write(head + first)
        if pending:
            self._carry(Side.CLIENT, pending)
        self.client.valve.resume("pipelined")
        self.deadline.start(self.idle_timeout)

    @property
    def open(self) -> bool:
        return self.tally.ended is None

    def _carry(self, side: Side, data: bytes) -> None:
        self.deadline.touch()
        self.tally.carried(side, len(data))
        connected(self.upstream if side is Side.CLIENT else self.client).write(data)

    # Both sides' events

    def from_client(self, data: bytes) -> None:
        if self.open:
            self._carry(Side.CLIENT, data)

    def upstream_data(self, data: bytes) -> None:
        if self.open:
            self._carry(Side.UPSTREAM, data)

    def upstream_lost(self, reason: Failure) -> None:
        self._end(Ending.UPSTREAM_CLOSED)

    def client_lost(self, reason: Failure | None) -> None:
        # Cut while draining, not closed cleanly: the grace ran out (a client's own close is clean).
        drained = self.context.draining and reason is not None and reason.check(ConnectionDone) is None
        self._end(Ending.DRAINED if drained else Ending.CLIENT_CLOSED)

    def _idle(self) -> None:
        self._end(Ending.IDLE)

    # The end

    def _end(self, why: Ending) -> None:
        """Record the tunnel once, then close both sides; each gets what is still buffered for it
        first (``loseConnection`` writes it out before closing)."""
        if not self.tally.end(why):
            return
        self.deadline.cancel()
        self.upstream.handler = None
        self.client.tunnel = None
        client, upstream = connected(self.client), connected(self.upstream)
        client.unregisterProducer()
        upstream.unregisterProducer()
        self.upstream_valve.open()  # a closing TLS connection must read its peer's close
        self.client.close()
        upstream.loseConnection()
        now = self.context.clock.seconds()
        self.context.record(tunnel_record(self.request.record(now, 101, None), self.tally, self.idle_timeout))
