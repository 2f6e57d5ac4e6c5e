"""Failover between Anthropic and a rule's target, decided from values only.

A rule with ``mode = "fallback"`` sends its requests to Anthropic first and to its target only
when Anthropic refuses; a rule with ``on_target_error = "anthropic"`` hands a request its target
failed back to Anthropic. Either way the request is sent a second time, so its bytes as received
are kept (up to a bound) until the first answer is known, and the second request is built from
them by the same ``UpstreamRequest`` every routed request goes through. After a 429 or 529 with
``retry-after`` a fallback rule skips Anthropic until the time is up (the cool-down table, which
the master shares with every worker).
"""

from __future__ import annotations

import email.utils
import math
from typing import Callable

import attrs

from cmm.core.decoding import BodyDecoder
from cmm.core.exchange import RequestBody, Sniffed, ModelSniffer, UpstreamRequest, edits_for
from cmm.core.http_head import RequestHead
from cmm.core.records import RequestRecord
from cmm.core.router import Endpoint, Mapping, Upstream, rule_label

UNREACHABLE = "unreachable"
# What a fallback rule fails over on when its file does not say.
DEFAULT_FALLBACK_ON: tuple[int | str, ...] = (429, 529, 500, 502, 503, 504, UNREACHABLE)
# Statuses whose retry-after starts a cool-down: Anthropic's rate limit and its overload.
COOLDOWN_STATUSES = frozenset({429, 529})
# A longer retry-after than this (a day) is taken as this: a typo'd date must not park a rule for years.
MAX_COOLDOWN = 24 * 3600.0
FALLBACK_HEADER = b"x-cmm-fallback"


def fails_over(status: int | None, fallback_on: tuple[int | str, ...]) -> bool:
    """Whether Anthropic's answer (a status; None: unreachable, closed or silent before its head)
    sends the request to the target."""
    return (UNREACHABLE if status is None else status) in (fallback_on or DEFAULT_FALLBACK_ON)


def target_failed(status: int | None) -> bool:
    """Whether a target's final answer hands the request back to Anthropic (``on_target_error``):
    unreachable (None), any 5xx, or a 429 the retries did not get past."""
    return status is None or status == 429 or status >= 500


def cause(side: str, status: int | None, why: str = UNREACHABLE) -> str:
    """The ``x-cmm-fallback`` value: which upstream failed, and how (``anthropic 429``)."""
    return f"{side} {why if status is None else status}"


def next_cause(to_target: bool, fallback_on: tuple[int | str, ...], status: int | None,
               why: str = UNREACHABLE) -> str | None:
    """Why a leg's failure (``status``; None: no answer, for ``why``) sends the request the other
    way, or None. ``to_target``: the leg was Anthropic's, for a fallback rule; else the target's,
    for a rule that hands failures back to Anthropic."""
    if to_target:
        return cause("anthropic", status, why) if fails_over(status, fallback_on) else None
    return cause("target", status, why) if target_failed(status) else None


def cooldown_for(rule: Mapping, status: int, retry_after: bytes | None, now: float) -> Cooldown | None:
    """The cool-down Anthropic's answer starts for a fallback rule: a 429 or 529 the rule fails
    over on, with a ``retry-after`` in the future."""
    if status not in COOLDOWN_STATUSES or not fails_over(status, rule.fallback_on):
        return None
    seconds = retry_after_seconds(retry_after, now)
    return Cooldown(rule_label(rule), now + seconds, cause("anthropic", status)) if seconds else None


def ruled(record: RequestRecord, rule: Mapping, fallback: str | None, target: Upstream | None) -> RequestRecord:
    """A failover rule's record: the rule that routed it and, after a failover, who answered
    (``target``, or Anthropic when None) and why."""
    if fallback is None:
        # A plain rule's record names its source already: evolve (costly, per request) only to change it.
        return record if record.mapping == rule.source else attrs.evolve(record, mapping=rule.source)
    return attrs.evolve(record, mapping=rule.source, target=rule.target, route="fallback", fallback=fallback,
                        upstream=f"{target.host}:{target.port}" if target is not None else "anthropic")


def retry_after_seconds(value: bytes | None, now: float) -> float | None:
    """``retry-after`` as seconds from ``now``: delta-seconds or an HTTP-date; None when absent or
    unreadable. Bounded to ``MAX_COOLDOWN``; a date in the past is 0."""
    if value is None:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if text.isdigit() or text.replace(".", "", 1).isdigit():
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None  # an HTTP-date is GMT; a zone-less one is not one
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_COOLDOWN)


@attrs.frozen
class Cooldown:
    """A fallback rule sends straight to its target until ``until`` (wall-clock seconds)."""

    rule: str
    until: float
    cause: str

    def __attrs_post_init__(self) -> None:
        if not self.rule or not math.isfinite(self.until) or not self.cause:
            raise ValueError(f"not a cool-down: {self.rule!r} until {self.until!r} ({self.cause!r})")


@attrs.define
class CooldownTable:
    """Cool-downs by rule. ``extend`` only ever lengthens one, so that reports reaching a process in
    any order leave the same table; expired ones are dropped when looked at."""

    clock: Callable[[], float]
    entries: dict[str, Cooldown] = attrs.field(factory=dict)

    def extend(self, cooldown: Cooldown) -> bool:
        """Take ``cooldown`` in; True when it changed the table (so it is worth telling others)."""
        known = self.entries.get(cooldown.rule)
        if cooldown.until <= self.clock() or known is not None and known.until >= cooldown.until:
            return False
        self.entries[cooldown.rule] = cooldown
        return True

    def active(self, rule: str) -> Cooldown | None:
        found = self.entries.get(rule)
        if found is not None and found.until <= self.clock():
            del self.entries[rule]
            return None
        return found

    def current(self) -> list[Cooldown]:
        """The cool-downs still running, by rule."""
        return [c for c in (self.active(rule) for rule in sorted(self.entries)) if c is not None]


@attrs.define
class KeptBody:
    """A request body as it came (framing included), for sending the request a second time; it
    lets go of everything once it grows past ``limit`` (that request is then not failed over)."""

    limit: int
    pieces: list[bytes] = attrs.field(factory=list)
    size: int = 0
    over: bool = False

    def add(self, raw: bytes) -> bool:
        """Keep ``raw``; False once the body is too large to keep (nothing is kept then)."""
        if self.over:
            return False
        self.size += len(raw)
        if self.size > self.limit:
            self.over, self.pieces = True, []
            return False
        if raw:
            self.pieces.append(raw)  # by reference: the bytes the connection read anyway
        return True

    @property
    def raw(self) -> bytes:
        return b"".join(self.pieces)


@attrs.define
class Failover:
    """A request that may go a second way: its rule, which way first, and its body as received."""

    rule: Mapping
    to_target: bool  # Anthropic first, the target when it refuses; else the target first, Anthropic on failure
    codings: tuple[str, ...]  # the body's Content-Encoding, decoded again for the second send
    kept: KeptBody


def keepable(head: RequestHead, limit: int) -> bool:
    """A body that declares more than ``limit`` is not kept from its first byte."""
    return head.framing.kind != "length" or head.framing.length <= limit


@attrs.frozen
class Resend:
    """A request re-routed: its ``UpstreamRequest`` for the body parts still to come, and the
    bytes that open it (the whole request when ``done``)."""

    forward: UpstreamRequest
    first: bytes
    done: bool


def resend(head: RequestHead, raw_body: bytes, endpoint: Endpoint | None, codings: tuple[str, ...],
           mapping: Mapping | None, body_limit: int, neutralise_max: int) -> Resend:
    """The request once more, from its head and the body bytes received so far, to ``mapping``'s
    target (intercepted: model rewritten, credentials replaced, thinking marks undone) or, with
    None, to Anthropic as a passthrough. It goes through the very pipeline of a first send (body
    framing, decoding, model finder, edits), fed everything at once."""
    body = RequestBody(head, body_limit)
    part = body.feed(raw_body)
    decoder = BodyDecoder(list(codings), body_limit) if codings else None
    sniffed = ModelSniffer(decoder).feed(part) if head.framing.kind != "none" else Sniffed(None, b"", b"")
    if sniffed is None:
        raise ValueError("the kept body no longer shows its model")  # the first send found it in these bytes
    edits = edits_for(endpoint, mapping is not None, head.framing, neutralise_max,
                      sniffed.payload if part.done else None)
    forward = UpstreamRequest(head, edits, decoder, mapping, neutralise_max)
    done = part.done or head.framing.kind == "none"
    return Resend(forward, forward.first(sniffed, endpoint, done), done)


def with_fallback_header(response_head: bytes, why: str) -> bytes:
    """The response head as the client gets it after a failover: saying who failed, and how."""
    return response_head[:-2] + FALLBACK_HEADER + b": " + why.encode("ascii", "replace") + b"\r\n\r\n"
