"""The request's decisions, away from the transports: states, response modes, reuse and retry.

The serving protocol (``cmm.serve.proxy``) carries bytes and timers; what it does with them at
each turn is decided here, from values only, so that the decisions can be tested without sockets
and without caring how the bytes were split on the way. ``ResponseReader`` turns an upstream's
bytes into events (interim heads, the final head, body progress) whatever their split.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from typing import Protocol

import attrs

from cmm.core.billing_line import PREFIX as BILLING_PREFIX, BillingLine
from cmm.core.cch import Resigner
from cmm.core.decoding import BodyDecoder, unsupported
from cmm.core.errors import HttpError
from cmm.core.framing import LAST_CHUNK, BodyTracker, Progress, encode_chunk, tracker_for
from cmm.core.http_head import Framing, HeadCollector, RequestHead, ResponseHead, parse_response_head
from cmm.core.model_finder import Found, ModelFinder, Result
from cmm.core.router import (BodySize, Endpoint, Mapping, Pending, Router, candidate_endpoint, decoded_head,
                             intercepted_head, rewrite_model)
from cmm.core.thinking_edits import Neutraliser, Unmarker, cannot_hold_a_mark, thinking_off_if
from cmm.core.thinking_marks import SseMarker


class ClientState(enum.StrEnum):
    """Where a client connection is in its current request; only the connection writes it."""

    HEAD = "head"  # reading a request head (or idle between requests)
    SNIFF = "sniff"  # reading the body up to its top-level model, to route it
    CONNECTING = "connecting"  # routed; waiting for an upstream connection
    BODY = "body"  # splicing the rest of the request body upstream
    RESPONSE = "response"  # the request is sent; the answer is coming
    TUNNEL = "tunnel"  # switched protocols (101): a raw tunnel, see cmm.serve.tunnel
    CLOSED = "closed"


class Dispose(enum.Enum):
    """What becomes of an upstream connection once an exchange lets go of it."""

    RELEASE = "release"  # back to the pool for the next request
    CLOSE = "close"
    ABORT = "abort"


class ResponseMode(enum.Enum):
    """How a final response head and its body reach the client."""

    SPLICE = "splice"  # as it comes (intercepted: with the provider header)
    HOLD_ERROR = "hold-error"  # a target's error, held to be rewritten in Anthropic's format or retried
    MARK_STREAM = "mark-stream"  # a target's SSE stream, its thinking signatures marked event by event
    HOLD_MESSAGE = "hold-message"  # a target's JSON message, held whole to mark its signatures


def holdable(response: ResponseHead, limit: int) -> bool:
    """Whether a response may be held whole: a declared length beyond ``limit`` is passed on as
    it comes instead, so that a Content-Length of 10 GB never turns into a buffer."""
    return response.framing.kind != "length" or response.framing.length <= limit


def response_mode(response: ResponseHead, intercepted: bool, endpoint: Endpoint | None,
                  max_error: int, max_message: int) -> ResponseMode:
    """Choose the mode for a final response head.

    Only a target's answers are touched, and only plain (not content-encoded) ones: errors are
    rewritten so Claude Code reads them, messages get their thinking signatures marked so that
    cmm knows them as the target's later. Anything too large to hold passes as it comes.
    """
    if not intercepted:
        return ResponseMode.SPLICE
    plain = response.headers.get(b"content-encoding") in (None, b"identity")
    if response.status >= 400 and plain and holdable(response, max_error):
        return ResponseMode.HOLD_ERROR
    if response.status < 300 and plain and endpoint == "messages" and \
            response.framing.kind in ("length", "chunked") and holdable(response, max_message):
        return ResponseMode.HOLD_MESSAGE if response.framing.kind == "length" else ResponseMode.MARK_STREAM
    return ResponseMode.SPLICE


# The state of each response mode: one of these, never several nullable fields at once.

@attrs.define
class Splice:
    pass


@attrs.define
class HeldError:
    raw: bytearray  # head and body as they came, for passing on unchanged if it grows too large
    body: bytearray = attrs.field(factory=bytearray)


@attrs.define
class MarkedStream:
    marker: SseMarker = attrs.field(factory=SseMarker)


@attrs.define
class HeldMessage:
    head: bytes  # the head as the client gets it
    body: bytearray = attrs.field(factory=bytearray)


@attrs.define
class Discarded:
    """An answer that sends the request elsewhere (a failover): read to its end, never passed on."""

    why: str  # the failover's cause, e.g. "anthropic 429"
    size: int = 0


ResponseState = Splice | HeldError | MarkedStream | HeldMessage | Discarded


class Edits(enum.Enum):
    """What a messages body gets on its way, all keeping its length (so its framing). Besides
    these, an intercepted body's billing line loses its per-request fields (``billing_line``)."""

    NONE = "none"
    UNMARK = "unmark"  # to the target: its own thinking signatures back, unmarked
    NEUTRALISE = "neutralise"  # to Anthropic: the target's thinking blocks blanked, the cch re-signed


def edits_for(endpoint: Endpoint | None, intercepted: bool, framing: Framing, neutralise_max: int,
              whole: bytes | None) -> Edits:
    """Choose the body's edits. A passthrough body is checked only with a declared length up to
    ``neutralise_max`` (re-signing keeps its pieces for the hash; a chunked one goes as it came, and
    Claude Code sends none). ``whole`` is the whole body when it is already in hand: one in which no
    signature can carry cmm's mark needs no scan at all."""
    if endpoint is None:
        edits = Edits.NONE
    elif intercepted:
        edits = Edits.UNMARK
    elif framing.kind == "length" and framing.length <= neutralise_max:
        edits = Edits.NEUTRALISE
    else:
        edits = Edits.NONE
    if edits is not Edits.NONE and whole is not None and cannot_hold_a_mark(whole):
        return Edits.NONE
    return edits


class Start(enum.Enum):
    """How the start of a routed request (head and the body read so far) is sent."""

    INTERCEPT = "intercept"  # to the target: head rewritten, model replaced, body edited
    HOLD_DECODED = "hold-decoded"  # compressed passthrough with edits: held whole until it is known whether it changes
    EDIT = "edit"  # to Anthropic, the body edited as it goes
    PASS = "pass"  # to Anthropic, byte for byte


def start_for(intercepted: bool, edits: Edits, decoding: bool) -> Start:
    if intercepted:
        return Start.INTERCEPT
    if edits is Edits.NONE:
        return Start.PASS
    return Start.HOLD_DECODED if decoding else Start.EDIT


class ClientTimeout(enum.Enum):
    CLOSE = "close"  # idle between requests: nothing to answer
    REFUSE = "refuse"  # 408: the request stopped coming
    IGNORE = "ignore"  # the request is sent; the exchange keeps its own deadline


def on_client_timeout(state: ClientState, head_begun: bool) -> ClientTimeout:
    if state is ClientState.HEAD and not head_begun:
        return ClientTimeout.CLOSE
    if state in (ClientState.HEAD, ClientState.SNIFF, ClientState.BODY):
        return ClientTimeout.REFUSE
    return ClientTimeout.IGNORE


def can_answer_error(response_started: bool, client_state: ClientState) -> bool:
    """An error can still be answered in Anthropic's format only before any of the response went
    out; after that the client connection is cut, so that a truncated answer is never taken whole."""
    return not response_started and client_state is not ClientState.CLOSED


class Lost(enum.Enum):
    """What an upstream connection closing under an exchange means."""

    REPLAY = "replay"  # a stale pooled connection: send the whole request again on a fresh one
    COMPLETE = "complete"  # the end of a close-delimited body
    REFUSE = "refuse"  # 502: nothing of the response went out yet
    ABORT = "abort"  # cut mid-response: cut the client too


def on_upstream_lost(received: int, reused: bool, replayable: bool, retried: bool, close_delimited: bool,
                     response_started: bool) -> Lost:
    if replay_on_fresh(received, reused, replayable, retried):
        return Lost.REPLAY
    if close_delimited:
        return Lost.COMPLETE
    return Lost.ABORT if response_started else Lost.REFUSE


def needs_rechunk(intercepted: bool, decoded: bool, request_chunked: bool) -> bool:
    """Whether the request body goes to the target as chunks cmm writes: its model rewrite changes
    its length, so a body whose length is not known up front (chunked, or decoded from a
    Content-Encoding) is re-framed."""
    return intercepted and (decoded or request_chunked)


def keep_for_retry(intercepted: bool, retries: int, first_size: int, cap: int) -> bool:
    """Whether what is sent is kept to be sent again after a 429: intercepted requests only, when
    more than one try is allowed, and only small ones."""
    return intercepted and retries > 1 and first_size <= cap


@attrs.frozen
class RetryLater:
    delay: float
    reusable: bool  # the connection the 429 came on can go back to the pool


def retry_decision(status: int, delay: float | None, tries: int, retries: int, kept: bool, body_done: bool,
                   awaiting_response: bool, max_delay: float, keep_alive: bool, extra: bool,
                   close: bool) -> RetryLater | None:
    """After a whole held error: send the request again later, or answer with the error (None).

    Only a 429, only while tries are left, only when the whole request was sent and kept, the
    client waits for the answer, and the server asks for no longer a wait than allowed.
    """
    if (status == 429 and tries < retries and kept and body_done and awaiting_response
            and (delay is None or delay <= max_delay)):
        return RetryLater(1.0 if delay is None else delay, reusable=not (extra or close) and keep_alive)
    return None


def replay_on_fresh(received: int, reused: bool, replayable: bool, retried: bool) -> bool:
    """A pooled connection closed under an exchange: send the request again on a fresh one?

    Only before a single byte of answer came (a partial head or an interim 100 means the server
    may have acted on it), only once, and only when the whole request is in hand.
    """
    return not received and reused and replayable and not retried


@attrs.frozen
class Reuse:
    upstream: bool
    client: bool


def reuse_after(awaiting_response: bool, close: bool, response_keep_alive: bool, extra: bool,
                client_keep_alive: bool) -> Reuse:
    """Which connections serve another request after a complete response.

    An upstream that answered before the whole request body was sent leaves the rest of that
    body unframed on both connections, so neither is reused then; an upstream that sent more
    than its response (``extra``) is out of step and is not reused either.
    """
    reusable = awaiting_response and not close and response_keep_alive
    return Reuse(upstream=reusable and not extra, client=reusable and client_keep_alive)


def dispose_for(upstream_reusable: bool, abort: bool) -> Dispose:
    return Dispose.RELEASE if upstream_reusable else Dispose.ABORT if abort else Dispose.CLOSE


# Reading a request

@attrs.frozen
class RequestPlan:
    """What a request head says about reading its body."""

    endpoint: Endpoint | None  # None: passed through at once, whatever its body holds
    codings: tuple[str, ...]  # the body's Content-Encoding, to decode to find the model (none: plain)
    unreadable: tuple[str, ...]  # a candidate's codings cmm cannot decode: it passes through
    sniff: bool  # read the body up to its model before routing


def plan_request(head: RequestHead, body_limit: int) -> RequestPlan:
    """Decide from a request head alone: refuse a declared body over the limit (413), pass
    through all but message and token-count POSTs, and read the others up to their model."""
    if head.framing.kind == "length" and head.framing.length > body_limit:
        raise HttpError(413, f"Request body of {head.framing.length} bytes exceeds the {body_limit}-byte limit")
    endpoint = candidate_endpoint(head)
    codings = tuple(c.decode("latin-1") for c in head.headers.tokens(b"content-encoding"))
    if endpoint is not None and unsupported(list(codings)):
        return RequestPlan(None, (), codings, sniff=False)
    decode = endpoint is not None and any(c != "identity" for c in codings)
    return RequestPlan(endpoint, codings if decode else (), (),
                       sniff=endpoint is not None and head.framing.kind != "none")


@attrs.frozen
class BodyPart:
    """What of the fed data belongs to the body (``raw``), its payload, and what follows it."""

    raw: bytes
    payload: tuple[bytes, ...]
    done: bool
    rest: bytes


class RequestBody:
    """A request body's framing and its size limit, counted on the payload."""

    def __init__(self, head: RequestHead, limit: int) -> None:
        self._tracker = tracker_for(head.framing)
        self._limit = limit
        self.payload_size = 0

    def feed(self, data: bytes) -> BodyPart:
        """Split ``data``; HttpError on bad framing. Check ``check_limit`` after counting it."""
        progress = self._tracker.feed(data)
        raw = data if progress.consumed == len(data) else data[: progress.consumed]
        self.payload_size += sum(len(piece) for piece in progress.payload)
        return BodyPart(raw, progress.payload, progress.done, data[progress.consumed :])

    def check_limit(self) -> None:
        if self.payload_size > self._limit:
            raise HttpError(413, f"Request body exceeds the {self._limit}-byte limit")


def decoded(decoder: BodyDecoder | None, payload: tuple[bytes, ...], done: bool) -> list[bytes] | tuple[bytes, ...]:
    """The body as JSON: through the Content-Encoding decoder when there is one."""
    if decoder is None:
        return payload
    pieces = [out for piece in payload for out in decoder.feed(piece)]
    if done:
        decoder.finish()
    return pieces


@attrs.frozen
class Sniffed:
    """The body up to where its model was decided: as it came, and as JSON."""

    result: Result | None  # None: not read for a model (not a candidate, or no body)
    raw: bytes
    payload: bytes


class ModelSniffer:
    """Collects a candidate body until the model finder decides; what it read is sent on after."""

    def __init__(self, decoder: BodyDecoder | None) -> None:
        self._decoder = decoder
        self._finder = ModelFinder()
        self._raw: list[bytes] = []
        self._payload: list[bytes] = []

    def feed(self, part: BodyPart) -> Sniffed | None:
        self._raw.append(part.raw)
        result = None
        for piece in decoded(self._decoder, part.payload, part.done):
            self._payload.append(piece)
            result = self._finder.feed(piece)
        if result is None and part.done:
            result = self._finder.finish()
        if result is None:
            return None
        raw, payload, self._raw, self._payload = self._raw, self._payload, [], []  # held no longer than needed
        return Sniffed(result, b"".join(raw), b"".join(payload))


def route(result: Result | None, router: Router, head: RequestHead, size: BodySize) -> Mapping | None | Pending:
    """The mapping a request goes to, None for Anthropic, or ``Pending.SIZE``: read on (see ``SizeHold``)."""
    return router.choose(result.model, head, size) if isinstance(result, Found) else None


def body_size(head: RequestHead, decoding: bool, decoded_so_far: int, done: bool) -> BodySize:
    """The decoded body's size as far as known: a plain body's Content-Length says it at once;
    a chunked or compressed one's is what has been read (and decoded) so far."""
    if not decoding and head.framing.kind == "length":
        return BodySize(head.framing.length, complete=True)
    return BodySize(decoded_so_far, complete=done)


class SizeHold:
    """A body read on past its model because a rule's size condition decides its route; it is
    held (within the body limit, like any body) until the decoded size decides."""

    def __init__(self, sniffed: Sniffed, decoder: BodyDecoder | None) -> None:
        self.result = sniffed.result
        self._decoder = decoder
        self._raw = [sniffed.raw]
        self._payload = [sniffed.payload]
        self.size = len(sniffed.payload)

    def feed(self, part: BodyPart) -> None:
        self._raw.append(part.raw)
        for piece in decoded(self._decoder, part.payload, part.done):
            self._payload.append(piece)
            self.size += len(piece)

    def sniffed(self) -> Sniffed:
        """All of it, as the model sniffer would have given it had the model come last."""
        return Sniffed(self.result, b"".join(self._raw), b"".join(self._payload))


# Reading an upstream's response

@attrs.frozen
class Interim:
    """A 1xx head (not 101), passed to the client as it came."""

    raw: bytes


@attrs.frozen
class Head:
    """The final response head."""

    response: ResponseHead
    raw: bytes


@attrs.frozen
class Body:
    """Body progress: ``raw`` is what of the fed data belongs to the body; ``extra`` says bytes
    came after its end."""

    raw: bytes
    progress: Progress
    extra: bool


@attrs.frozen
class Switched:
    """A ``101`` to a request that asked to upgrade: ``rest`` is the new protocol's first bytes."""

    response: ResponseHead
    raw: bytes
    rest: bytes


class ResponseReader:
    """Feed an upstream's bytes, get the response's events; one reader per try of a request.
    ``upgrade``: the request asked to switch protocols, so a ``101`` ends the reading."""

    def __init__(self, method: bytes, upgrade: bool = False) -> None:
        self._method = method
        self._upgrade = upgrade
        self._collector = HeadCollector(what="upstream response", response=True)
        self.response: ResponseHead | None = None
        self.tracker: BodyTracker | None = None

    def feed(self, data: bytes) -> Iterator[Interim | Head | Body | Switched]:
        """Yield events as they are found (so those before a bad byte are acted on); raise
        HttpError on a bad response. Once the head is known, each call yields one ``Body``."""
        while data and self.tracker is None:
            done = self._collector.feed(data)
            if done is None:
                return
            raw, data = done
            response = parse_response_head(raw, self._method)
            if response.status == 101 and self._upgrade:
                yield Switched(response, raw, data)
                return
            if response.status == 101:
                raise HttpError(502, "Upstream switched protocols; cmm proxies HTTP/1.1 only")
            if response.interim:
                yield Interim(raw)
                self._collector = HeadCollector(what="upstream response", response=True)
                continue
            self.response = response
            self.tracker = tracker_for(response.framing, "upstream response")
            yield Head(response, raw)
        if self.tracker is None:
            return
        progress = self.tracker.feed(data)
        raw = data if progress.consumed == len(data) else data[: progress.consumed]
        yield Body(raw, progress, extra=progress.consumed < len(data))


# Sending the request upstream

class _Stage(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class UpstreamRequest:
    """The request's bytes on their way upstream once routed: its start (the head and the body read
    to route it), then each later body part, edited, decoded and re-framed as the route needs.

    A compressed passthrough body with edits is held whole (Claude Code's are small) until it is
    known whether it changes: as it came if not (Anthropic takes plain bodies; re-compressing 2 MB
    would cost ~14 ms for nothing), else decoded. One that decodes past ``hold_max`` unchanged goes
    as it came, the rest as it comes.
    """

    def __init__(self, head: RequestHead, edits: Edits, decoder: BodyDecoder | None, mapping: Mapping | None,
                 hold_max: int, keep_billing_line: bool = False) -> None:
        self._head = head
        self._decoder = decoder
        self._mapping = mapping
        self._hold_max = hold_max
        self._neutraliser: Neutraliser | None = None
        self._stages = self._stages_for(edits)
        self._billing: BillingLine | None = None
        if mapping is not None and not keep_billing_line:  # the target's prompt cache needs a stable start
            self._billing = BillingLine()
            self._stages.append(self._billing)
        self.start = start_for(mapping is not None, edits, decoder is not None)
        self.rechunk = needs_rechunk(mapping is not None, decoder is not None, head.framing.kind == "chunked")
        self._held_raw: list[bytes] = []
        self._held_out = bytearray()

    @property
    def editing(self) -> bool:
        """Whether later body parts still go through edits (a held body past ``hold_max`` stops)."""
        return bool(self._stages)

    def _stages_for(self, edits: Edits) -> list[_Stage]:
        if edits is Edits.UNMARK:
            return [Unmarker()]
        if edits is Edits.NEUTRALISE:
            neutraliser = Neutraliser()
            self._neutraliser = neutraliser
            return [neutraliser, Resigner(lambda: neutraliser.changed, lambda tail: thinking_off_if(neutraliser, tail))]
        return []

    def first(self, sniffed: Sniffed, endpoint: Endpoint | None, done: bool) -> bytes:
        """The bytes that open the upstream request: what was read to route it, as it goes."""
        if self.start is Start.INTERCEPT:
            assert self._mapping is not None and isinstance(sniffed.result, Found) and endpoint is not None
            return self._intercepted_start(sniffed.result, self._mapping, endpoint, sniffed.payload, done)
        if self.start is Start.HOLD_DECODED:
            self._held_raw = [sniffed.raw]
            self._held_out = bytearray(self._staged(sniffed.payload, done))
            return self._release_held() if done else b""
        if self.start is Start.EDIT:
            return self._head.raw + self._staged(sniffed.payload, done)
        return self._head.raw + sniffed.raw

    def feed(self, part: BodyPart) -> bytes:
        """What to send upstream for a later part of the body (may be nothing yet)."""
        raw, payload, done = part.raw, part.payload, part.done
        if self._stages and self._decoder is not None and self._mapping is None:
            self._held_raw.append(raw)
            self._held_out += self._staged(b"".join(decoded(self._decoder, payload, done)), done)
            out = self._release_held() if done else b""
            assert self._neutraliser is not None
            if not done and len(self._held_out) > self._hold_max and not self._neutraliser.changed:
                # It decodes past what is checked: send what came as it came, the rest as it comes.
                out, self._stages = self._head.raw + b"".join(self._held_raw), []
                self._held_raw, self._held_out = [], bytearray()
            return out
        if self._stages:
            body = self._staged(b"".join(decoded(self._decoder, payload, done)), done)
            return encode_chunk(body) + (LAST_CHUNK if done else b"") if self.rechunk else body
        if self.rechunk:
            pieces = decoded(self._decoder, payload, done)
            return b"".join(encode_chunk(piece) for piece in pieces) + (LAST_CHUNK if done else b"")
        return raw

    def _release_held(self) -> bytes:
        held_raw, held_out, self._held_raw, self._held_out = self._held_raw, self._held_out, [], bytearray()
        if self._neutraliser is not None and self._neutraliser.changed:
            return decoded_head(self._head, len(held_out)) + bytes(held_out)
        return self._head.raw + b"".join(held_raw)

    def _staged(self, data: bytes, done: bool) -> bytes:
        for stage in self._stages:
            data = stage.feed(data) + (stage.finish() if done else b"")
        return data

    def _intercepted_start(self, found: Found, mapping: Mapping, endpoint: Endpoint, sniffed: bytes,
                           done: bool) -> bytes:
        payload = rewrite_model(sniffed, found.start, found.end, mapping.target)
        if done and self._billing is not None and BILLING_PREFIX not in payload:
            self._stages.remove(self._billing)  # a whole body without the line: it would pass as it is
            self._billing = None
        payload = self._staged(payload, done)
        if self._head.framing.kind == "length" and self._decoder is None:
            length = self._head.framing.length + len(json.dumps(mapping.target)) - (found.end - found.start)
            return intercepted_head(self._head, mapping.upstream, endpoint, length) + payload
        # Chunked, or decoded from a Content-Encoding (its length is unknown until the end).
        tail = LAST_CHUNK if done else b""
        return intercepted_head(self._head, mapping.upstream, endpoint, None, decoded=self._decoder is not None) + \
            encode_chunk(payload) + tail
