"""Thinking blocks across providers, the response side: mark what the target signs.

Every signature (and ``redacted_thinking`` ``data``) the target makes gets the prefix
:data:`~cmm.core.thinking_scan.MARK` — in SSE (:class:`SseMarker`) and in JSON message responses
(:func:`mark_message`, empty signatures included: a block the target left unsigned is still not
Anthropic's). Responses grow by ``len(MARK)`` per mark; the caller re-frames them. The SSE marker
parses only events that can carry a signature, and holds at most :data:`MAX_SSE_EVENT` bytes of
one: a larger event passes unmarked.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cmm.core.thinking_scan import MARK, Scanner, run_whole


def is_marked(value: str | bytes) -> bool:
    """Whether a decoded signature (or redacted ``data``) was marked by cmm."""
    return (value.encode() if isinstance(value, str) else value).startswith(MARK)


class _Marker(Scanner):
    """JSON message responses: prefix every thinking signature and redacted data with the mark."""

    _response = True

    def _on_decided(self, pos: int, field: tuple[int, int] | None) -> None:
        if field is None:
            self._release(pos)
            return
        self._flush(pos)
        at = field[0] - self._held_at + 1
        self._held[at:at] = MARK
        self.changed = True
        self._release(pos)


def mark_message(body: bytes) -> bytes:
    """A complete JSON message response with the target's signatures marked (longer by the marks).

    A message without thinking blocks is returned as it is without a scan: both block types
    spell "thinking" in their type, unless written with ``\\u`` escapes.
    """
    if b"thinking" not in body and b"\\u" not in body:
        return body
    return run_whole(_Marker(), body)


# -- SSE ---------------------------------------------------------------------------------------------

MAX_SSE_EVENT = 1024 * 1024  # the most of one event held to mark it; see SseMarker
_MAY_OVERLAP = len(b"redacted_thinking") - 1  # a word _may_mark looks for, cut by a feed
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_DATA_LINE = re.compile(rb"^data:[ ]?([^\r\n]*)", re.MULTILINE)


def _field_pattern(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb'"' + name + rb'"[ \t\r\n]*:[ \t\r\n]*"')


_FIELD_PATTERNS = {b"signature": _field_pattern(b"signature"), b"data": _field_pattern(b"data")}


def _may_mark(data: bytes | bytearray) -> bool:
    """Cheap test: could these bytes hold an event to mark (a key spelled with escapes included)?"""
    return b"signature" in data or b"redacted_thinking" in data or b"\\u" in data


def _target(event: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The object and key of the signature an SSE event carries, if it is one to mark."""
    kind = event.get("type")
    if kind == "content_block_delta":
        delta = event.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "signature_delta":
            if isinstance(delta.get("signature"), str):
                return delta, "signature"
    elif kind == "content_block_start":
        block = event.get("content_block")
        if isinstance(block, dict):
            signature = block.get("signature")
            if block.get("type") == "thinking" and isinstance(signature, str) and signature:
                return block, "signature"  # an empty one is filled in by a signature_delta
            if block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
                return block, "data"
    return None


def mark_event(event: bytes) -> bytes:
    """One complete SSE event (terminator included), with its signature marked if it has one.

    The mark is inserted into the raw data line when that can be verified; otherwise the data
    is re-serialised on one line. Other events come back as the same object, and so does one
    nested too deeply for the JSON parser: it holds no signature a client would send back.
    """
    if not _may_mark(event):
        return event
    try:
        return _marked_event(event)
    except RecursionError:
        return event


def _marked_event(event: bytes) -> bytes:
    lines = list(_DATA_LINE.finditer(event))
    if not lines:
        return event
    try:
        parsed = json.loads(b"\n".join(line.group(1) for line in lines))
    except ValueError:
        return event
    found = _target(parsed) if isinstance(parsed, dict) else None
    if found is None:
        return event
    holder, key = found
    holder[key] = MARK.decode() + holder[key]
    if len(lines) == 1:
        line = lines[0]
        value = line.group(1)
        hits = list(_FIELD_PATTERNS[key.encode()].finditer(value))
        if len(hits) == 1:
            edited = value[: hits[0].end()] + MARK + value[hits[0].end() :]
            try:
                if json.loads(edited) == parsed:
                    return event[: line.start(1)] + edited + event[line.end(1) :]
            except ValueError:
                pass
    data = b"data: " + json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
    out, first = [], True
    for piece in event.splitlines(keepends=True):
        if piece.startswith(b"data:"):
            if first:  # one data line in place of the first; the later ones go
                out.append(data + piece[len(piece.rstrip(b"\r\n")) :])
            first = False
        else:
            out.append(piece)
    return b"".join(out)


class SseMarker:
    """Intercepted SSE responses: mark every signature the target streams, event by event.

    Events end at a blank line (LF or CRLF line endings). Each goes out as soon as its blank line
    arrived, whatever the split; events without a signature come back untouched. ``marked``
    counts the marks made.

    An event is held until it ends, but never beyond ``max_event`` bytes: an event that
    grows past that (a stream that never sends a blank line, say) goes out unmarked as it is,
    the rest of it passes at once up to its blank line, and marking resumes with the next
    event. ``passed_unmarked`` counts such events. Signatures are a few kilobytes; an event that
    large carries none worth holding a stream for. Each byte is looked at a bounded number of
    times, whatever the split.
    """

    def __init__(self, max_event: int = MAX_SSE_EVENT) -> None:
        self.marked = 0
        self.passed_unmarked = 0
        self._max_event = max_event
        self._buf = bytearray()  # the start of an event whose blank line has not arrived
        self._may = False  # whether the held start could hold a signature (see _may_mark)
        self._passing = False  # inside an oversized event: its bytes pass until its blank line
        self._tail = b""  # the last bytes passed, where a blank line may begin

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._passing:
            return self._pass(data)
        held = len(self._buf)
        search = max(0, held - 3)  # a blank line may straddle the feeds
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = bytes(data)
        out: list[bytes] = []
        begin = 0
        may = self._may or _may_mark(buf[max(0, held - _MAY_OVERLAP) :])
        if not may:  # the usual text and thinking deltas: every complete event at once
            lf, crlf = buf.rfind(b"\n\n", search), buf.rfind(b"\n\r\n", search)
            begin = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
            if begin:
                out.append(bytes(buf[:begin]))
                search = begin
        while (match := _EVENT_END.search(buf, search)) is not None:
            event = bytes(buf[begin : match.end()])
            marked = mark_event(event)
            if marked is not event:
                self.marked += 1
            out.append(marked)
            begin = search = match.end()
        if begin:
            may = may and _may_mark(buf[begin:])
        if buf is self._buf:
            del self._buf[:begin]
        else:
            self._buf += buf[begin:]
        self._may = may
        if len(self._buf) > self._max_event:
            out.append(bytes(self._buf))
            self._tail = bytes(self._buf[-3:])
            self._buf.clear()
            self._passing, self._may = True, False
            self.passed_unmarked += 1
        return b"".join(out)

    def _pass(self, data: bytes) -> bytes:
        """An oversized event goes on: as it is up to its blank line, events after it as usual."""
        window = self._tail + data[:3]
        match = _EVENT_END.search(window)
        if match is None:
            match = _EVENT_END.search(data)
            end = -1 if match is None else match.end()
        else:
            end = match.end() - len(self._tail)
        if end < 0:
            self._tail = (self._tail + data)[-3:]
            return data
        self._passing, self._tail = False, b""
        return data[:end] + self.feed(data[end:])

    def finish(self) -> bytes:
        """The stream ended: an unterminated last event goes out as it is."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._may = self._passing = False
        return rest
