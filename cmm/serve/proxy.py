"""The serving protocol: read a request head, find the model if it matters, splice to an upstream.

One ``ClientConnection`` per accepted (TLS) connection, one ``Exchange`` per request on it. The
pure cores decide (``http_head``, ``framing``, ``model_finder``, ``router``, and ``exchange``: the
connection's states, the route, the bytes that go upstream, the response's mode, reuse, retry and
replay); this module only moves bytes between transports and runs timers, with backpressure in
both directions and a deadline for every wait. What is held is bounded and small in practice:
the request head, the body bytes up to the model, the thinking block being examined
(``cmm.core.thinking_edits``), a signed body's tail from its ``cch`` placeholder on, a compressed
passthrough body that may need editing, and a target's error or JSON message that gets rewritten.
Everything else flows through as it arrives.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionDone, DNSLookupError, TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmm.core.decoding import BodyDecoder
from cmm.core.errors import HttpError, error_response
from cmm.core.exchange import (Body, BodyPart, ClientState, ClientTimeout, Discarded, Dispose, HeldError, HeldMessage,
                               Interim, Lost, MarkedStream, ModelSniffer, RequestBody, ResponseMode, ResponseReader,
                               ResponseState, SizeHold, Sniffed, Splice, Switched, UpstreamRequest, body_size,
                               can_answer_error, dispose_for, edits_for, keep_for_retry, on_client_timeout,
                               on_upstream_lost, plan_request, response_mode, retry_decision, reuse_after, route)
from cmm.core.failover import (FALLBACK_HEADER, UNREACHABLE, Cooldown, CooldownTable, Failover, KeptBody,
                               cooldown_for, keepable, next_cause, resend, ruled, with_fallback_header)
from cmm.serve.flow import Deadline, Valve
from cmm.core.framing import LAST_CHUNK, BodyTracker, CloseBody, encode_chunk
from cmm.core.http_head import HeadCollector, RequestHead, ResponseHead, parse_request_head
from cmm.core.model_finder import Found
from cmm.core.records import RequestRecord, escaped
from cmm.core.router import (PROVIDER_HEADER, Endpoint, Mapping, redacted_head, with_connection_close, with_content_length,
                        with_provider_header)
from cmm.core.router import Pending, request_class_of, rule_label
from cmm.core.target_errors import MAX_ERROR_BODY, error_response as error_response_for_target, retry_after
from cmm.core.thinking_marks import MAX_SSE_EVENT, SseMarker, mark_message
from cmm.core.upgrade import asks_upgrade, intercepted_upgrade_refusal, switch_refusal
from cmm.core.usage import NO_USAGE, UsageReader, UsageState, usage_fed, usage_of, usage_reader
from cmm.core.values import MiB, Destination, ProxySettings
from cmm.serve.tls import connected
from cmm.serve.tunnel import Tunnel
from cmm.serve.upstream import Pool, UpstreamConnection, tune

log = Logger()

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PROVIDER_NAME, _PROVIDER_VALUE = PROVIDER_HEADER.rstrip(b"\r\n").split(b": ", 1)
PROVIDER_HEADER_FIELD: tuple[bytes, bytes] = (_PROVIDER_NAME, _PROVIDER_VALUE)
CONTENT_LOG_BYTES = 4096
# Passthrough bodies up to this size are checked for the target's thinking blocks; the cch
# re-signing keeps the body's pieces for the hash, so larger ones (far beyond any Claude Code
# session) pass as they came.
NEUTRALISE_MAX = 8 * MiB
# A target's JSON message is held whole to mark its thinking signatures; one declaring more than
# this (far beyond any message) passes as it comes, unmarked.
MAX_HELD_MESSAGE = 16 * MiB


@attrs.define
class ProxyContext:
    """Shared by every connection of a serving unit."""

    settings: ProxySettings
    pool: Pool
    clock: IReactorTime
    record: Callable[[RequestRecord], None]
    # Where an exchange's record may be handed over as its builder, to be made later with others
    # (``cmm.serve.record_batch``); None: made at the exchange's end and given to ``record``.
    record_later: Callable[[Callable[[], RequestRecord]], None] | None = None
    wall_clock: Callable[[], float] = time.time
    connections: set[ClientConnection] = attrs.field(factory=set)
    draining: bool = False
    # Client connections the open-file limit has room for (see ``fit_open_files``); None: no bound.
    connection_budget: int | None = None
    refused: int = 0  # connections refused because every one at the cap was busy
    evicted_idle: int = 0  # idle keep-alive connections closed to make room for a new one
    _drained: list[defer.Deferred[None]] = attrs.field(factory=list)
    _refusal_logged: float | None = None
    # Fallback rules' cool-downs, as this process knows them; ``report_cooldown`` tells the master,
    # which tells every worker (and so this one's table again: extending it twice changes nothing).
    cooldowns: CooldownTable = attrs.field(
        default=attrs.Factory(lambda self: CooldownTable(self.wall_clock), takes_self=True))
    report_cooldown: Callable[[Cooldown], None] = lambda cooldown: None
    unkept: int = 0  # requests of a failover rule whose body was too large to keep (not failed over)

    @property
    def max_connections(self) -> int:
        limit = self.settings.max_connections
        return limit if self.connection_budget is None else min(limit, self.connection_budget)

    def admit(self, connection: ClientConnection) -> bool:
        """Take a new client connection if there is room, making room by closing the connection
        that has been idle between requests longest; refuse it only when every other one is busy.

        Idle keep-alive connections cost a descriptor each and nothing else; a flood of them (or of
        connections that never send a byte) must not lock Claude Code out, while a request in
        flight is never cut to make room. Connections still closing are not counted: they go
        within the TLS close timeout.
        """
        limit = self.max_connections
        if len(self.connections) >= limit:
            open_now = [c for c in self.connections if c.state != ClientState.CLOSED]
            if len(open_now) >= limit:
                idle = [c for c in open_now if c.idle]
                if not idle:
                    self._refuse_one(limit)
                    return False
                min(idle, key=lambda c: c.idle_since).close()
                self.evicted_idle += 1
        self.connections.add(connection)
        return True

    def _refuse_one(self, limit: int) -> None:
        self.refused += 1
        now = self.clock.seconds()
        if self._refusal_logged is None or now - self._refusal_logged >= 60:
            self._refusal_logged = now
            log.warn("{limit} client connections are busy (--max-connections); refusing new ones "
                     "({refused} so far)", limit=limit, refused=self.refused)

    def drain(self) -> defer.Deferred[None]:
        """Finish what is in flight, take no new requests; fires once every connection is gone.

        Idle keep-alive connections close at once; a connection with a request in flight closes
        when its response has been sent.
        """
        self.draining = True
        done: defer.Deferred[None] = defer.Deferred()
        self._drained.append(done)
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        self.check_drained()
        return done

    def check_drained(self) -> None:
        if self.draining and not self.connections:
            waiting, self._drained = self._drained, []
            for done in waiting:
                done.callback(None)

    def gauges(self) -> dict[str, int]:
        return {
            "connections": len(self.connections),
            "in_flight": sum(1 for c in self.connections if c.exchange is not None),
            "upstream_idle": self.pool.idle_count(),
            "upstream_opened": self.pool.opened,
            "refused": self.refused,
            "evicted_idle": self.evicted_idle,
            "tunnels": sum(1 for c in self.connections if c.tunnel is not None),
            **({"fallback_unkept": self.unkept} if self.unkept else {}),  # shown only when it happened
        }


# Descriptors kept beside two per client connection (its own and its upstream's): the listening
# sockets, idle pooled upstream connections, logs, pipes, DNS.
FD_RESERVE = 256


def fit_open_files(connections: int, limits: Any = None) -> int:
    """Raise the soft open-file limit toward the hard one so that ``connections`` client
    connections fit, each with an upstream connection; return how many fit after all.

    The usual soft limit (1024) would otherwise run out before the connection cap, and accept()
    failing with EMFILE refuses everyone alike, Claude Code included. ``limits`` is the
    ``resource`` module (injected by tests).
    """
    if limits is None:
        import resource as limits
    wanted = 2 * connections + FD_RESERVE
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    if soft != limits.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == limits.RLIM_INFINITY else min(wanted, hard)
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass  # e.g. macOS refuses more than OPEN_MAX: keep what there is
    if soft == limits.RLIM_INFINITY:
        return connections
    return max(1, min(connections, int(soft - FD_RESERVE) // 2))


@attrs.define
class RequestInProgress:
    """One request on a client connection, from its parsed head to its log record. A keep-alive
    connection's next request starts from a fresh one, so nothing of the last request (its
    content, its counts, its decoder) can leak into the next one's decisions or record."""

    head: RequestHead
    started: float  # wall clock, for the record
    started_clock: float  # reactor clock, for the duration
    bytes_in: int
    body: RequestBody
    endpoint: Endpoint | None = None
    decoder: BodyDecoder | None = None
    sniffer: ModelSniffer | None = None
    held: SizeHold | None = None  # the body read on past its model, while its size decides the rule
    rule: Mapping | None = None  # the rule that chose the route (None: no rule, Anthropic)
    forward: UpstreamRequest | None = None
    content: str | None = None  # what is logged of the request, when the settings ask for it
    routing_deadline: Any = None  # the delayed call that ends a too-slow routing read
    failover: Failover | None = None  # kept to be sent a second time; None once it cannot be any more

    def routing_read_over(self) -> None:
        if self.routing_deadline is not None:
            if self.routing_deadline.active():
                self.routing_deadline.cancel()
            self.routing_deadline = None

    def record(self, now: float, status: int | None, error: str | None, bytes_out: int = 0,
               model: str | None = None, mapping: Mapping | None = None,
               answer: dict[str, Any] | None = None) -> RequestRecord:
        """``answer``: the record's fields that the exchange's answer filled (route, usage, ...)."""
        return RequestRecord(
            started=self.started,
            method=self.head.method.decode("ascii", "replace"),
            path=self.head.path.decode("ascii", "replace"),
            model=model,
            intercepted=mapping is not None,
            target=mapping.target if mapping else None,
            status=status,
            duration=now - self.started_clock,
            bytes_in=self.bytes_in,
            bytes_out=bytes_out,
            error=error,
            mapping=mapping.source if mapping else None,
            content=self.content,
            rule=rule_label(self.rule) if self.rule else None,
            request_class=request_class_of(self.head),
            **(answer or {}),
        )


class ClientConnection(Protocol):
    """One client connection: a sequence of requests, each routed on its own. It keeps what
    lasts across requests; each request's own state is its ``RequestInProgress``."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.settings = context.settings
        self.exchange: Exchange | None = None
        self.state: ClientState = ClientState.HEAD  # written by this connection only
        self.pending = b""  # bytes read ahead of the current state (next body part, next request)
        self.served = 0
        self.request: RequestInProgress | None = None  # from a parsed head to the request's end
        self.tunnel: Tunnel | None = None  # after a switch (101): every byte read is the tunnel's

    # Twisted interface

    def connectionMade(self) -> None:
        tune(self.transport)
        self.valve = Valve(connected(self))
        self.deadline = Deadline(self.context.clock, self._timed_out)
        if not self.context.admit(self):
            self.state = ClientState.CLOSED
            connected(self).abortConnection()  # before the TLS handshake: nothing to answer with
            return
        self._await_head()
        if self.context.draining:
            self.close()

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.state != ClientState.HEAD:  # a head's deadline is total time, from its first byte
            self.deadline.touch()
        if self.state in (ClientState.CONNECTING, ClientState.RESPONSE):
            self.pending += data  # read ahead: more body while connecting, or a pipelined request
            if self.state == ClientState.RESPONSE:
                self.valve.pause("pipelined")
            return
        if self.state == ClientState.CLOSED:
            return
        try:
            if self.state == ClientState.HEAD:
                self._head_bytes(data)
            elif self.state == ClientState.SNIFF:
                self._sniff_bytes(data)
            elif self.state == ClientState.BODY:
                self._body_bytes(data)
        except HttpError as error:
            self.fail(error)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.state = ClientState.CLOSED
        self.deadline.cancel()
        self._routing_read_over()
        if self.exchange is not None:
            self.exchange.client_lost()
        if self.tunnel is not None:
            self.tunnel.client_lost(reason)
        self.context.connections.discard(self)
        self.context.check_drained()

    @property
    def idle(self) -> bool:
        """Between requests with nothing read yet: safe to close when draining or short of room."""
        return self.state == ClientState.HEAD and self.collector.pending == 0 and not self.pending

    # Reading the request

    def _await_head(self) -> None:
        """Wait for the next request: ``idle_timeout`` until its first byte, then ``head_timeout``
        from that byte to the head's end, neither extended by what trickles in (a byte every few
        seconds must not hold a connection for ever). Stray empty lines are not a first byte."""
        self.state = ClientState.HEAD
        self.collector = HeadCollector()
        self.request = None
        self.idle_since = self.context.clock.seconds()
        self.deadline.start(self.settings.idle_timeout)

    def _head_bytes(self, data: bytes) -> None:
        first_bytes = self.collector.pending == 0
        done = self.collector.feed(data)
        if done is None:
            if first_bytes and self.collector.pending:
                self.deadline.start(self.settings.head_timeout)
            return
        raw, rest = done
        self.settings = self.context.settings  # a reload applies from the next request on
        head = parse_request_head(raw)
        request = self.request = RequestInProgress(head, self.context.wall_clock(), self.context.clock.seconds(),
                                                    len(raw), RequestBody(head, self.settings.body_limit))
        self.deadline.start(self.settings.idle_timeout)
        plan = plan_request(head, self.settings.body_limit)
        request.endpoint = plan.endpoint
        if plan.unreadable:
            log.warn("Cannot read a {codings} body to find its model; passing it through",
                     codings=escaped(", ".join(plan.unreadable)))
        elif plan.codings:
            request.decoder = BodyDecoder(list(plan.codings), self.settings.body_limit)
        if plan.sniff:
            if head.expects_continue:
                connected(self).write(CONTINUE)
            self.state = ClientState.SNIFF
            request.sniffer = ModelSniffer(request.decoder)
            if rest:
                self._sniff_bytes(rest)
            if self.state == ClientState.SNIFF and self.request is request:  # the body is still to come
                request.routing_deadline = self.context.clock.callLater(self.settings.head_timeout,
                                                                        self._routing_timed_out)
            return
        self._dispatch(None, Sniffed(None, b"", b""), rest, body_done=head.framing.kind == "none")

    def _track(self, data: bytes) -> BodyPart:
        """Split ``data`` into this body's raw bytes, payload and what follows; enforce the limit."""
        assert self.request is not None
        part = self.request.body.feed(data)
        self.request.bytes_in += len(part.raw)
        self.request.body.check_limit()
        return part

    def _sniff_bytes(self, data: bytes) -> None:
        part = self._track(data)
        request = self.request
        assert request is not None and request.sniffer is not None
        held = request.held
        if held is None:
            sniffed = request.sniffer.feed(part)
            if sniffed is None:
                return
            held = SizeHold(sniffed, request.decoder)
        else:
            held.feed(part)
        choice = route(held.result, self.settings.router, request.head,
                       body_size(request.head, request.decoder is not None, held.size, part.done))
        if choice is Pending.SIZE:  # a rule's size condition decides: read on
            request.held = held
            return
        request.held = None
        self._dispatch(choice, held.sniffed(), part.rest, body_done=part.done)

    def _dispatch(self, mapping: Mapping | None, sniffed: Sniffed, rest: bytes, body_done: bool) -> None:
        """Route decided: borrow an upstream connection and send what is in hand."""
        request = self.request
        assert request is not None
        request.routing_read_over()
        request.rule = mapping
        rule, cooled = mapping, None
        if mapping is not None and (mapping.mode == "fallback" or mapping.on_target_error == "anthropic"):
            mapping, cooled = self._plan_failover(mapping, sniffed)
        result = sniffed.result
        model = result.model if isinstance(result, Found) else None
        refusal = intercepted_upgrade_refusal(request.head, mapping)
        if refusal is not None:
            raise refusal
        edits = edits_for(request.endpoint, mapping is not None, request.head.framing, NEUTRALISE_MAX,
                          sniffed.payload if body_done else None)
        request.forward = UpstreamRequest(request.head, edits, request.decoder, mapping, NEUTRALISE_MAX,
                                          keep_billing_line=self.settings.keep_billing_line)
        first = request.forward.first(sniffed, request.endpoint, body_done)
        if mapping is not None:
            destination = Destination(mapping.upstream.scheme, mapping.upstream.host, mapping.upstream.port)
        else:
            destination = self.settings.anthropic
        if self.settings.log_content:
            body = sniffed.payload[:CONTENT_LOG_BYTES].decode("utf-8", "replace")
            request.content = redacted_head(request.head) + ("\n\n" + body if body else "")
        self.pending = rest + self.pending
        self.state = ClientState.CONNECTING
        self.exchange = Exchange(self, destination, model, mapping, first, body_done)
        self.exchange.rule, self.exchange.fallback = rule, cooled
        self.exchange.start()
        if self.state == ClientState.CONNECTING:  # no pooled connection at hand: hold the client back meanwhile
            self.valve.pause("connecting")

    def _plan_failover(self, rule: Mapping, sniffed: Sniffed) -> tuple[Mapping | None, str | None]:
        """Where a failover rule's request goes first, and the cool-down it goes there for (if any);
        keeps its body for a second send when it is small enough."""
        request = self.request
        assert request is not None
        first: Mapping | None = None if rule.mode == "fallback" else rule
        if rule.mode == "fallback":
            cooling = self.context.cooldowns.active(rule_label(rule))
            if cooling is not None:
                return rule, f"{cooling.cause} cool-down"
        limit = self.settings.fallback_body_max
        kept = KeptBody(limit)
        if keepable(request.head, limit) and kept.add(sniffed.raw):
            codings = plan_request(request.head, self.settings.body_limit).codings
            request.failover = Failover(rule, rule.mode == "fallback", codings, kept)
        else:
            self._not_kept(rule)
        return first, None

    def _keep(self, raw: bytes) -> None:
        request = self.request
        if request is not None and request.failover is not None and not request.failover.kept.add(raw):
            rule, request.failover = request.failover.rule, None
            self._not_kept(rule)

    def _not_kept(self, rule: Mapping) -> None:
        self.context.unkept += 1
        log.warn("A request for {rule} is larger than --fallback-body-max ({limit} bytes): it is not kept, so it "
                 "cannot fail over", rule=rule_label(rule), limit=self.settings.fallback_body_max)

    def upstream_ready(self, body_done: bool) -> None:
        """The exchange sent the start of the request; go on reading the client."""
        self.state = ClientState.RESPONSE if body_done else ClientState.BODY
        if self.state == ClientState.RESPONSE and self.pending:
            self.valve.pause("pipelined")
        self.valve.resume("connecting")
        if self.state == ClientState.BODY:
            self._drain_pending()

    def _body_bytes(self, data: bytes) -> None:
        assert self.exchange is not None
        part = self._track(data)
        done, rest = part.done, part.rest
        assert self.request is not None and self.request.forward is not None
        self._keep(part.raw)
        out = self.request.forward.feed(part)
        if out:
            self.exchange.send(out)
        if done:
            self.state = ClientState.RESPONSE
            self.exchange.request_complete()
            if rest:
                self.pending = rest + self.pending
                self.valve.pause("pipelined")

    def _drain_pending(self) -> None:
        if self.pending:
            data, self.pending = self.pending, b""
            self.dataReceived(data)

    def tunnel_started(self, tunnel: Tunnel) -> bytes:
        """The request switched protocols: every byte read from now on is the tunnel's. Returns
        what the client sent after its request (the new protocol's first bytes), still paused."""
        self.exchange, self.tunnel, self.state = None, tunnel, ClientState.TUNNEL
        self.deadline.cancel()
        pending, self.pending = self.pending, b""
        return pending

    # The end of an exchange

    def exchange_done(self, reusable: bool) -> None:
        self.exchange = None
        self.served += 1
        if not reusable or self.state == ClientState.CLOSED or self.context.draining:
            self.close()
            return
        self._await_head()
        self.valve.resume("pipelined")
        self._drain_pending()

    def exchange_ended(self, abort: bool, reusable: bool) -> None:
        """The exchange is over (this connection alone writes its state and its exchange): read
        the next request, or close, or cut the connection when its response broke off."""
        if self.state == ClientState.CLOSED:
            self.exchange = None
        elif abort:
            self._exchange_aborted()
        else:
            self.exchange_done(reusable)

    def _exchange_aborted(self) -> None:
        """The exchange failed after its response began: nothing can be answered, cut the client."""
        self.exchange = None
        self.state = ClientState.CLOSED
        self.deadline.cancel()
        connected(self).abortConnection()

    def close(self) -> None:
        self._routing_read_over()
        if self.state != ClientState.CLOSED:
            self.state = ClientState.CLOSED
            self.deadline.cancel()
            self.valve.open()
            connected(self).loseConnection()

    def fail(self, error: HttpError) -> None:
        """Answer in Anthropic's error format if no response has begun; else cut the connection."""
        if self.exchange is not None:
            self.exchange.fail(error)
            return
        if self.state == ClientState.CLOSED:
            return
        head_only = self.request is not None and self.request.head.method == b"HEAD"
        connected(self).write(error_response(error.status, error.message, head_only=head_only))
        if self.request is not None:
            self.context.record(self.request.record(self.context.clock.seconds(), error.status, error.message))
        else:
            log.info("Refused a request from {peer}: {status} {message}", peer=str(connected(self).getPeer()),
                     status=error.status, message=escaped(error.message))
        self.close()

    def _routing_read_over(self) -> None:
        if self.request is not None:
            self.request.routing_read_over()

    def _routing_timed_out(self) -> None:
        """The body up to its model is read against ``head_timeout`` from the body's start, as a
        head is: else a byte every few seconds (each under the silence timeout) holds a
        connection and its buffer for ever. Once routed, the body is spliced and only needs to
        keep moving (``idle_timeout``)."""
        if self.request is not None:
            self.request.routing_deadline = None
        if self.state == ClientState.SNIFF:
            upto = "as far as its size decides its route" if self.request and self.request.held else "up to its model"
            self.fail(HttpError(408, f"Timed out waiting for the client to send the request body {upto} "
                                     f"({self.settings.head_timeout:g} seconds)"))

    def _timed_out(self) -> None:
        action = on_client_timeout(self.state, head_begun=self.collector.pending > 0)
        if action is ClientTimeout.CLOSE:
            self.close()
        elif action is ClientTimeout.REFUSE:
            self.fail(HttpError(408, "Timed out waiting for the client to send the request"))


class Exchange:
    """One request/response pair over a borrowed upstream connection."""

    # One per request in flight, thousands when streams are open: slots, not a __dict__ each.
    __slots__ = ("_corked", "body_done", "bytes_out", "client", "connecting", "connection", "context", "deadline",
                 "destination", "failover_waiting", "fallback", "finished", "first", "kept", "kept_size", "mapping",
                 "mode", "model", "reader", "received", "replayable", "request", "response_started", "retried",
                 "reused", "rule", "tries", "ttfb", "unmarked_warned", "usage", "valve", "waiting")

    def __init__(self, client: ClientConnection, destination: Destination, model: str | None,
                 mapping: Mapping | None, first: bytes, body_done: bool) -> None:
        self.client = client
        assert client.request is not None
        self.request = client.request  # this request's record, whatever the connection reads next
        self.context = client.context
        self.destination = destination
        self.model = model
        self.mapping = mapping
        self.first = first
        self.body_done = body_done
        self.replayable = body_done  # ``first`` holds the whole request: safe to send again
        self.connection: UpstreamConnection | None = None
        self.connecting: defer.Deferred | None = None
        self.response_started = False  # a byte of the final response reached the client
        self.bytes_out = 0
        self.finished = False
        self.retried = False
        self.reused = False
        self.deadline = Deadline(self.context.clock, self._timed_out)
        settings = client.settings
        # Intercepted requests small enough to keep can be sent again after a 429: what was sent
        # is kept by reference, so a body is not copied for a retry that seldom comes.
        self.kept: list[bytes] | None = [first] if keep_for_retry(
            mapping is not None, settings.retries, len(first), settings.retry_body_cap) else None
        self.kept_size = len(first)
        self.tries = 1
        self.waiting: Any = None  # the delayed call of a retry
        self.rule: Mapping | None = mapping  # the rule that routed it (a fallback rule's Anthropic leg too)
        self.fallback: str | None = None  # why the upstream answering is not the rule's first choice
        self.failover_waiting: str | None = None  # refused while the body still came: failing over at its end
        # What goes to the client while one upstream read is handled, written once at its end (see
        # ``upstream_data``); None: outside one, writes go at once.
        self._corked: list[bytes] | None = None
        self._reset_response()

    def _reset_response(self) -> None:
        """Forget everything about the upstream's answer: before the first try, and before a
        request is sent again (a 429 retried, a stale pooled connection replayed), so that no
        half-read head or held body of one try leaks into the next."""
        self.received = 0  # bytes of this try's answer read from the upstream, interim ones included
        self.reader = ResponseReader(self.request.head.method, upgrade=asks_upgrade(self.request.head))
        self.mode: ResponseState = Splice()
        self.unmarked_warned = False
        self.usage: UsageState | None = None  # reads a messages answer's token counts as it passes
        self.ttfb: float | None = None

    @property
    def response(self) -> ResponseHead | None:
        return self.reader.response

    @property
    def tracker(self) -> BodyTracker | None:
        return self.reader.tracker

    def start(self, fresh: bool = False) -> None:
        self.deadline.start(self.client.settings.upstream_timeout)
        self.connecting = self.context.pool.acquire(self.destination, fresh=fresh)
        self.connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, result: tuple[UpstreamConnection, bool]) -> None:
        self.connecting = None
        connection, self.reused = result
        if self.finished:  # the client went away while we connected
            connected(connection).loseConnection()
            return
        self.connection = connection
        connection.handler = self
        self.valve = Valve(connected(connection))
        connected(connection).registerProducer(self.client.valve, True)
        connected(self.client).registerProducer(self.valve, True)
        connected(connection).write(self.first)
        self.deadline.touch()
        self.client.upstream_ready(self.body_done)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.finished:
            return
        why = self._failover_cause(None)
        if why is not None:
            self._fail_over(why, Dispose.CLOSE)
            return
        if failure.check(ConnectTimeout, defer.TimeoutError):
            self.fail(HttpError(504, f"Timed out connecting to {self.destination.label}"))
        else:
            self.fail(HttpError(502, f"Cannot reach {self.destination.label}: {_reason(failure)}"))

    def send(self, data: bytes) -> None:
        if self.kept is not None:
            self.kept.append(data)
            self.kept_size += len(data)
            if self.kept_size > self.client.settings.retry_body_cap:
                self.kept = None
        if self.connection is not None and not self.finished:
            connected(self.connection).write(data)
            self.deadline.touch()

    def request_complete(self) -> None:
        self.body_done = True
        if self.failover_waiting is not None:  # refused before the body was all in: it is now
            why, self.failover_waiting = self.failover_waiting, None
            self._fail_over(why, Dispose.CLOSE)

    # Upstream events

    def upstream_data(self, data: bytes) -> None:
        """Handle one read of the answer. What it sends the client (a head and the body that came
        with it, say) leaves in one write: one TLS record and one send, not one per piece."""
        self.deadline.touch()
        if not self.received:
            self.ttfb = self.context.clock.seconds() - self.request.started_clock
        self.received += len(data)
        if self.finished:
            return
        self._corked = []
        try:
            self._upstream_events(data)
        finally:
            self._uncork()

    def _upstream_events(self, data: bytes) -> None:
        body: Body | None = None
        try:
            for event in self.reader.feed(data):
                if isinstance(event, Interim):
                    self._to_client(event.raw)
                elif isinstance(event, Body):
                    body = event
                elif isinstance(event, Switched):
                    self._switch(event)
                    return
                else:
                    self._response_head(event.response, event.raw)
        except HttpError as error:
            self.fail(HttpError(502, error.message) if error.status != 502 else error)
            return
        if body is not None:
            self._response_body(body)

    def _switch(self, switched: Switched) -> None:
        """A ``101``: hand both connections to a tunnel, which records the request when it ends."""
        self._uncork()  # an interim head before it goes first
        refusal = switch_refusal(self.request.head, self.mapping is not None,
                                 self.client.state == ClientState.RESPONSE)
        if refusal is not None:
            self.fail(refusal)
            return
        self.finished = self.response_started = True
        self.deadline.cancel()
        connection, self.connection = self.connection, None
        assert connection is not None
        Tunnel(self.client, connection, self.valve, self.request, self.bytes_out).start(switched.raw, switched.rest)

    def _response_head(self, response: ResponseHead, raw: bytes) -> None:
        if self._refused(response):
            return
        mode = response_mode(response, self.mapping is not None, self.request.endpoint, MAX_ERROR_BODY,
                             MAX_HELD_MESSAGE)
        if self.request.endpoint == "messages":
            self.usage = usage_reader(response)
        if mode is ResponseMode.HOLD_ERROR:
            self.mode = HeldError(bytearray(raw))  # held: it may be rewritten, or retried
        elif mode is ResponseMode.HOLD_MESSAGE:
            self.mode = HeldMessage(self._intercepted_head(raw))
        elif mode is ResponseMode.MARK_STREAM:
            self.mode = MarkedStream()
            self.response_started = True
            self._to_client(self._intercepted_head(raw))
        else:
            self.response_started = True
            self._to_client(self._intercepted_head(raw) if self.mapping is not None else self._passthrough_head(raw))
        if self.response_started:
            self.first = b""  # never sent again once the answer flows: a stream must not hold the request
        if response.status != 429:
            self.kept = None  # no retry to come: let the request go while the answer streams

    def _response_body(self, body: Body) -> None:
        progress, mode = body.progress, self.mode
        if isinstance(mode, Discarded):
            self._discard(mode, body)
            return
        usage = self.usage  # read on the side, whatever the mode
        if isinstance(usage, UsageReader):  # a stream's every event: its reader fed straight, no call between
            usage.feed(progress.payload, progress.consumed)
        elif usage is not None:
            self.usage = usage_fed(usage, progress.payload, progress.consumed)
        if isinstance(mode, HeldError):
            self._hold_error(mode, body.raw, progress.payload)
        elif isinstance(mode, MarkedStream):
            out = encode_chunk(mode.marker.feed(b"".join(progress.payload)))  # one chunk for what came at once
            if progress.done:
                out += encode_chunk(mode.marker.finish()) + LAST_CHUNK
            self._warn_if_unmarked(mode.marker)
            if out:
                self._to_client(out)
        elif isinstance(mode, HeldMessage):
            for piece in progress.payload:
                mode.body += piece
            if progress.done:
                assert self.response is not None
                message = bytes(mode.body)
                if b"event-stream" in (self.response.headers.get(b"content-type") or b""):
                    marker = SseMarker()  # a stream with a Content-Length: held whole, marked alike
                    message = marker.feed(message) + marker.finish()
                    self._warn_if_unmarked(marker)
                else:
                    message = mark_message(message)
                self.response_started = True
                self._to_client(with_content_length(mode.head, len(message)) + message)
        elif body.raw:
            self._to_client(body.raw)
        if progress.done:
            if isinstance(self.mode, HeldError):
                self._error_complete(extra=body.extra)
            else:
                self._finish(extra=body.extra)

    def _answer_fields(self, complete: bool) -> dict[str, Any]:
        """What the record says of the route and the answer: who answered, how soon, at what cost."""
        usage = NO_USAGE
        if self.usage is not None and self.response is not None:
            try:
                usage = usage_of(self.usage, self.response, complete)
            except Exception:  # a side channel: a flaw in reading it must cost neither the answer nor its record
                log.failure("Could not read the token usage of an answer from {upstream}", upstream=self.destination.label)
        served = usage.model
        if served is None and self.response is not None and self.response.status < 300:
            served = self.mapping.target if self.mapping is not None else self.model
        upstream = "anthropic"
        if self.mapping is not None:
            host = self.mapping.upstream.host
            upstream = f"[{host}]:{self.mapping.upstream.port}" if ":" in host else f"{host}:{self.mapping.upstream.port}"
        return {
            "route": "intercepted" if self.mapping is not None else "passthrough",
            "served_model": served,
            "upstream": upstream,
            "ttfb": self.ttfb,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
        }

    def _intercepted_head(self, raw: bytes) -> bytes:
        """The target's response head as the client gets it: marked as intercepted, and saying
        ``Connection: close`` when the client asked for that (the target, which cmm keeps
        pooled, was not told to close)."""
        head = with_provider_header(raw)
        if not self.request.head.keep_alive:
            head = with_connection_close(head)
        return head if self.fallback is None else with_fallback_header(head, self.fallback)

    def _passthrough_head(self, raw: bytes) -> bytes:
        return raw if self.fallback is None else with_fallback_header(raw, self.fallback)

    def _warn_if_unmarked(self, marker: SseMarker) -> None:
        """Say once per response that an event went out unmarked: a signature in it (if any)
        would not be recognised as the target's later, and Anthropic would refuse it."""
        if marker.passed_unmarked and not self.unmarked_warned:
            self.unmarked_warned = True
            log.warn("{target} streamed an event larger than {limit} MiB: it went to the client as it came, "
                     "so the thinking signatures in it were not marked as the target's (cmm holds at most "
                     "{limit} MiB of one event to mark it)",
                     target=self.mapping.upstream.url if self.mapping else self.destination.label,
                     limit=MAX_SSE_EVENT // MiB)

    def _hold_error(self, held_error: HeldError, raw: bytes, payload: tuple[bytes, ...]) -> None:
        held_error.raw += raw
        for piece in payload:
            held_error.body += piece
        if len(held_error.body) > MAX_ERROR_BODY:  # not an error document any more: pass it on as it is
            held, self.mode = held_error.raw, Splice()
            self.response_started = True
            head_end = held.index(b"\r\n\r\n") + 4
            self._to_client(self._intercepted_head(bytes(held[:head_end])) + bytes(held[head_end:]))

    def _error_complete(self, extra: bool = False, close: bool = False) -> None:
        """A whole intercepted error: retry a 429 if allowed, else answer in Anthropic's format."""
        held_error = self.mode
        assert self.response is not None and self.mapping is not None and isinstance(held_error, HeldError)
        body = bytes(held_error.body)
        delay = retry_after(self.response.headers, body) if self.response.status == 429 else None
        settings = self.client.settings
        retry = retry_decision(self.response.status, delay, self.tries, settings.retries, self.kept is not None,
                               self.body_done, self.client.state == ClientState.RESPONSE,
                               settings.retry_max_delay, self.response.keep_alive, extra, close)
        if retry is not None:
            self._retry_later(retry.delay, reusable=retry.reusable)
            return
        why = self._failover_cause(self.response.status)
        if why is not None:  # the target's last word: Anthropic answers instead
            reusable = self.response.keep_alive and not (extra or close)
            self._fail_over(why, Dispose.RELEASE if reusable else Dispose.CLOSE)
            return
        status_line = bytes(held_error.raw[: held_error.raw.index(b"\r\n")])
        self.mode = Splice()
        self.response_started = True
        headers: list[tuple[bytes, bytes]] = [PROVIDER_HEADER_FIELD]
        if self.fallback is not None:
            headers.append((FALLBACK_HEADER, self.fallback.encode()))
        if not self.request.head.keep_alive:
            headers.append((b"Connection", b"close"))
        assert self.mapping is not None  # a held error is the target's, so the request was routed
        self._to_client(error_response_for_target(status_line, self.response.status, self.response.headers, body,
                                                  self.mapping.upstream.url, headers))
        self._finish(extra=extra, close=close)

    def _retry_later(self, delay: float, reusable: bool) -> None:
        assert self.mapping is not None  # only a target's 429 is tried again
        log.info("{target} answered 429 (try {tries} of {limit}); trying again in {delay:g}s",
                 target=self.mapping.upstream.url, tries=self.tries, limit=self.client.settings.retries, delay=delay)
        self._detach(Dispose.RELEASE if reusable else Dispose.CLOSE)
        self.tries += 1
        self._reset_response()
        self.first = b"".join(self.kept or ())
        self.waiting = self.context.clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self.waiting = None
        if not self.finished:
            self.start()

    def upstream_lost(self, reason: Failure) -> None:
        self.connection = None
        if self.finished:
            return
        outcome = on_upstream_lost(self.received, self.reused, self.replayable, self.retried,
                                   close_delimited=isinstance(self.tracker, CloseBody),
                                   response_started=self.response_started)
        if outcome is Lost.REPLAY:
            # A pooled connection closed under us before a single byte of answer: the server never
            # took the request up, and the whole of it is in hand.
            self.retried = True
            self._detach(Dispose.CLOSE)  # the connection is gone already: this undoes the client side
            self._reset_response()
            self.start(fresh=True)
            return
        why = self._failover_cause(None, "closed") if outcome is Lost.REFUSE else None
        if isinstance(self.mode, Discarded) or why is not None:
            self._fail_over(self.mode.why if isinstance(self.mode, Discarded) else str(why), Dispose.CLOSE)
            return
        if outcome is Lost.COMPLETE:
            if isinstance(self.mode, HeldError):
                self._error_complete(close=True)
            else:
                self._finish(close=True)
        elif outcome is Lost.REFUSE:
            self.fail(HttpError(502, f"{self.destination.label} closed the connection before responding: {_reason(reason)}"))
        else:
            self._end(status=self.response.status if self.response else None,
                      error=f"upstream closed mid-response: {_reason(reason)}", abort=True)

    # Client events

    def client_lost(self) -> None:
        if self.finished:
            return
        if self.waiting is not None and self.waiting.active():
            self.waiting.cancel()
        if self.connecting is not None:
            self.finished = True
            self.connecting.cancel()
        self._end(status=self.response.status if self.response else None, error="client closed the connection",
                  abort=True)

    # Endings

    def _to_client(self, data: bytes) -> None:
        self.request.failover = None  # a byte went out: no second answer can follow, so nothing is kept
        self.bytes_out += len(data)
        if self._corked is not None:
            self._corked.append(data)
        else:
            connected(self.client).write(data)

    def _uncork(self) -> None:
        """Write what ``_to_client`` held during an upstream read: before anything else is written
        to the client (an error answer, a tunnel's bytes) or the exchange ends, and at the read's end."""
        corked, self._corked = self._corked, None
        if corked:
            connected(self.client).write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _finish(self, extra: bool = False, close: bool = False) -> None:
        """The response is complete. Reuse both connections where both sides allow it.

        An upstream that answered before the whole request body was sent (an early error) leaves
        the rest of that body unframed on both connections, so both are closed then.
        """
        assert self.response is not None
        reuse = reuse_after(self.client.state == ClientState.RESPONSE, close, self.response.keep_alive, extra,
                            self.request.head.keep_alive)
        self._end(status=self.response.status, error=None, abort=False, upstream_reusable=reuse.upstream,
                  client_reusable=reuse.client)

    def fail(self, error: HttpError) -> None:
        if self.finished:
            return
        self._uncork()
        if can_answer_error(self.response_started, self.client.state):
            connected(self.client).write(error_response(error.status, error.message,
                                                        head_only=self.request.head.method == b"HEAD"))
            self._end(status=error.status, error=error.message, abort=False)
        else:
            self._end(status=self.response.status if self.response else None, error=error.message, abort=True)

    def _end(self, status: int | None, error: str | None, abort: bool, upstream_reusable: bool = False,
             client_reusable: bool = False) -> None:
        self._uncork()
        self.finished = True
        self.deadline.cancel()
        self._detach(dispose_for(upstream_reusable, abort))
        build = partial(self._record, self.context.clock.seconds(), status, error)
        if self.context.record_later is not None:
            self.context.record_later(build)
        else:
            self.context.record(build())
        self.client.exchange_ended(abort, reusable=client_reusable and error is None)

    def _record(self, now: float, status: int | None, error: str | None) -> RequestRecord:
        """The exchange's record, from what it saw up to its end (nothing changes it after)."""
        return self._ruled(self.request.record(now, status, error, self.bytes_out, self.model, self.mapping,
                                               self._answer_fields(complete=error is None)))

    def _detach(self, dispose: Dispose) -> None:
        """Undo what ``_connected`` joined (handler, producers both ways, backpressure pauses)
        and dispose of the upstream connection: back to the pool, closed or aborted."""
        connection, self.connection = self.connection, None
        self.client.valve.resume("backpressure")
        if self.client.state != ClientState.CLOSED:
            connected(self.client).unregisterProducer()
        if connection is None:
            return
        connection.handler = None
        connected(connection).unregisterProducer()
        self.valve.resume("backpressure")
        if dispose is Dispose.RELEASE:
            self.context.pool.release(connection)
        elif dispose is Dispose.ABORT:
            connected(connection).abortConnection()
        else:
            connected(connection).loseConnection()

    def _timed_out(self) -> None:
        why = self._failover_cause(None, "timeout") if self.connection is not None and self.response is None else None
        if why is not None:
            self._fail_over(why, Dispose.ABORT)
            return
        connecting, self.connecting = self.connecting, None
        self.fail(HttpError(504, f"{self.destination.label} sent nothing for {self.client.settings.upstream_timeout:g} seconds"))
        if connecting is not None:
            connecting.cancel()

    # Failover: the request sent a second way (see cmm.core.failover)

    def _failover_cause(self, status: int | None, why: str = UNREACHABLE) -> str | None:
        """Why this leg's failure (``status``; None: no answer) sends the request the other way, or
        None: nothing kept, a byte already sent to the client, or a failure the rule does not fail
        over on."""
        failover = self.request.failover
        if failover is None or self.bytes_out or self.client.state is ClientState.CLOSED:
            return None
        return next_cause(failover.to_target, failover.rule.fallback_on, status, why)

    def _refused(self, response: ResponseHead) -> bool:
        """A response head that sends the request the other way: its body is read and dropped."""
        rule = self.rule
        if self.mapping is None and rule is not None and rule.mode == "fallback":
            self._cool_down(rule, response)
        if self.mapping is not None and response.status == 429:
            return False  # the target's 429 is retried first (``_error_complete``)
        why = self._failover_cause(response.status)
        if why is None:
            return False
        self.mode = Discarded(why)
        return True

    def _cool_down(self, rule: Mapping, response: ResponseHead) -> None:
        """Anthropic's 429 or 529 with ``retry-after``: the rule skips Anthropic until then, in
        every worker."""
        now = self.context.wall_clock()
        cooldown = cooldown_for(rule, response.status, response.headers.get(b"retry-after"), now)
        if cooldown is not None and self.context.cooldowns.extend(cooldown):
            log.warn("Anthropic answered {status} with retry-after {seconds:.0f}s: {rule} goes straight to its "
                     "target until then", status=response.status, seconds=cooldown.until - now, rule=cooldown.rule)
            self.context.report_cooldown(cooldown)

    def _discard(self, mode: Discarded, body: Body) -> None:
        mode.size += len(body.raw)
        if body.progress.done:
            assert self.response is not None
            reusable = self.response.keep_alive and not body.extra
            self._fail_over(mode.why, Dispose.RELEASE if reusable else Dispose.CLOSE)
        elif mode.size > MAX_ERROR_BODY:  # not worth reading on: drop the connection
            self._fail_over(mode.why, Dispose.ABORT)

    def _fail_over(self, why: str, dispose: Dispose) -> None:
        """Send the request the other way, from its kept bytes, on a fresh exchange state; once its
        body is all in (an upstream may answer before that), which it is kept for meanwhile."""
        if self.client.state is ClientState.BODY:
            # The rest of the body was never framed on that connection: it is not reused. The
            # client's own idle deadline covers a body that stops coming meanwhile.
            self._detach(Dispose.ABORT if dispose is Dispose.ABORT else Dispose.CLOSE)
            self._reset_response()
            self.deadline.cancel()
            self.failover_waiting = why
            return
        failover, self.request.failover = self.request.failover, None  # once per request
        if failover is None:  # it outgrew --fallback-body-max meanwhile: the refusal is gone, say why
            self.fail(HttpError(502, f"{why} before the request was all sent, and the request is larger than "
                                     f"--fallback-body-max, so it cannot fail over"))
            return
        to = failover.rule if failover.to_target else None
        settings = self.client.settings
        try:
            again = resend(self.request.head, failover.kept.raw, self.request.endpoint, failover.codings, to,
                           settings.body_limit, NEUTRALISE_MAX)
        except (HttpError, ValueError) as error:  # cannot happen to bytes that were sent once; say so if it does
            self.fail(HttpError(502, f"Cannot fail over ({why}): {error}"))
            return
        log.info("{why}: {rule} fails over to {other}", why=why, rule=rule_label(failover.rule),
                 other=to.upstream.url if to is not None else "Anthropic")
        self._detach(dispose)
        self._reset_response()
        self.request.forward = again.forward  # the body parts still to come go the new way too
        self.mapping, self.fallback = to, why
        self.destination = (Destination(to.upstream.scheme, to.upstream.host, to.upstream.port) if to is not None
                            else settings.anthropic)
        self.first, self.replayable, self.retried, self.tries = again.first, again.done, False, 1
        self.kept = [again.first] if keep_for_retry(to is not None, settings.retries, len(again.first),
                                                    settings.retry_body_cap) else None
        self.kept_size = len(again.first)
        self.start()

    def _ruled(self, record: RequestRecord) -> RequestRecord:
        """The record with the rule that routed it and, after a failover, who answered and why."""
        if self.rule is None:
            return record
        return ruled(record, self.rule, self.fallback, self.mapping.upstream if self.mapping is not None else None)


def _reason(failure: Failure) -> str:
    """A short human reason for a connection failure (no tracebacks reach users)."""
    value = failure.value
    if isinstance(value, DNSLookupError):
        return "DNS lookup failed"
    if isinstance(value, ConnectionDone):
        return "connection closed"
    if isinstance(value, ConnectError) and isinstance(value.osError, int):
        return os.strerror(value.osError)  # "Connection refused", not "111"
    text = str(value).strip() or type(value).__name__
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate verification failed"
    if "VerificationError" in type(value).__name__ or "DNSMismatch" in text:
        return "TLS certificate does not match the host name"
    return text.splitlines()[0][:200]


class ProxyFactory(Factory):
    """Builds client connections that share one context (settings, pool, log)."""

    noisy = False

    def __init__(self, context: ProxyContext) -> None:
        self.context = context

    def buildProtocol(self, addr: object) -> ClientConnection:
        return ClientConnection(self.context)
