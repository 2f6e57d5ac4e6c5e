"""Protocol upgrades (WebSocket) on passthrough: when a request may switch, and what a tunnel records.

A passthrough request that asks to upgrade and that Anthropic answers ``101`` stops being HTTP:
from the end of that head on, the connection carries another protocol both ways (Claude Code's
voice dictation speaks WebSocket on ``/api/ws/...``). cmm cannot read it and need not: it becomes
a raw two-way tunnel. These are the decisions around it, from values only; ``cmm.serve.tunnel``
moves the bytes.
"""

from __future__ import annotations

import enum

import attrs

from cmm.core.errors import HttpError
from cmm.core.http_head import RequestHead
from cmm.core.records import RequestRecord
from cmm.core.router import Mapping

TUNNEL_ROUTE = "tunnel"


def upgrade_protocols(head: RequestHead) -> tuple[bytes, ...]:
    """The protocols a request asks to switch to (``Upgrade``, lower-cased), or none.

    An ``Upgrade`` field counts only when ``Connection`` names it (RFC 9110 section 7.8): a
    stray one is a plain header, and HTTP/1.0 cannot upgrade at all.
    """
    if head.version != b"HTTP/1.1" or b"upgrade" not in head.headers.tokens(b"connection"):
        return ()
    return tuple(head.headers.tokens(b"upgrade"))


def asks_upgrade(head: RequestHead) -> bool:
    return bool(upgrade_protocols(head))


def intercepted_upgrade_refusal(head: RequestHead, mapping: Mapping | None) -> HttpError | None:
    """An upgrade on a request routed to a target cannot be carried: the target speaks only
    HTTP to cmm (the hop-by-hop ``Upgrade`` would be dropped on the way, and the client would
    wait for a switch that never comes). Say so plainly instead."""
    if mapping is None:
        return None
    protocols = upgrade_protocols(head)
    if not protocols:
        return None
    asked = ", ".join(p.decode("latin-1") for p in protocols)
    return HttpError(400, f"cmm cannot switch protocols ({asked}) on a request it routes to another server "
                          f"(model mapping {mapping.source}* → {mapping.target}); only requests passed through "
                          f"to Anthropic can be upgraded")


def switch_refusal(head: RequestHead, intercepted: bool, body_sent: bool) -> HttpError | None:
    """Whether a ``101`` from the upstream can become a tunnel; the 502 to answer if not.

    Only a passthrough request that asked to upgrade may be switched, and only once its whole
    body went upstream: after the ``101`` every byte from the client is the new protocol's, so
    a body still on its way could no longer be told apart from it.
    """
    if intercepted or not asks_upgrade(head):
        return HttpError(502, "Upstream switched protocols without being asked to; cmm proxies HTTP/1.1 only")
    if not body_sent:
        return HttpError(502, "Upstream switched protocols before the request body was sent")
    return None


class Side(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"


class Ending(enum.Enum):
    """Why a tunnel ended, as its record says."""

    CLIENT_CLOSED = "client closed"
    UPSTREAM_CLOSED = "upstream closed"
    IDLE = "idle"
    DRAINED = "drained"


@attrs.define
class TunnelTally:
    """What one tunnel carried, for its single record when it ends.

    ``bytes_in`` counts from the client (the request that asked for the switch included),
    ``bytes_out`` to the client (the ``101`` head included).
    """

    bytes_in: int
    bytes_out: int
    ended: Ending | None = None

    def carried(self, side: Side, size: int) -> None:
        """``size`` bytes came from ``side`` (and went to the other)."""
        if side is Side.CLIENT:
            self.bytes_in += size
        else:
            self.bytes_out += size

    def end(self, why: Ending) -> bool:
        """Note why the tunnel ended; True only the first time, so it is recorded once."""
        if self.ended is not None:
            return False
        self.ended = why
        return True


def end_error(ending: Ending, idle_timeout: float) -> str | None:
    """The record's error: none when either side closed (how a tunnel normally ends)."""
    if ending is Ending.IDLE:
        return f"tunnel silent both ways for {idle_timeout:g} seconds (--tunnel-idle-timeout)"
    if ending is Ending.DRAINED:
        return "cut at the end of the grace period (--grace)"
    return None


def tunnel_record(record: RequestRecord, tally: TunnelTally, idle_timeout: float) -> RequestRecord:
    """The request's record turned into its tunnel's: ``101``, the tunnel's bytes, and why it ended."""
    assert tally.ended is not None
    return attrs.evolve(record, status=101, bytes_in=tally.bytes_in, bytes_out=tally.bytes_out,
                        error=end_error(tally.ended, idle_timeout), route=TUNNEL_ROUTE, upstream="anthropic")
