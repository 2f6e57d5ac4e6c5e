"""Sans-IO reading of the token usage in a messages answer, beside the bytes, never in their way.

An Anthropic-format answer says what it cost: a stream in its ``message_start`` event
(``message.usage`` and ``message.model``) and its ``message_delta`` event (the final
``output_tokens``; newer servers put the final input and cache counts there too, and those win),
a JSON answer in its top-level ``usage`` and ``model``. The reader is fed the body's payload
pieces as they pass to the client (the bytes themselves are never changed, held or delayed) and
keeps only what it needs, bounded: the current SSE line while it may be one of those two events,
or a JSON answer's first and last few KiB. A compressed answer is decoded on the side with
cmm's own body decoder; the client still gets it compressed, as it came.

The stream is most of the traffic, so its common case is cheap: a piece is searched (in C) for
``"message_``, which every other event's line lacks, and only a ``data:`` line that names
``message_start`` or ``message_delta`` is parsed.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any, Callable

import attrs

from cmm.core.decoding import BodyDecoder, unsupported
from cmm.core.errors import HttpError
from cmm.core.http_head import ResponseHead

# The longest SSE line held to be read: a message_start or message_delta event is well under
# 1 KiB; a longer line is let go of (and its usage, if any, is not read).
MAX_EVENT_LINE = 64 * 1024
# A JSON answer up to this size is parsed whole; of a larger one, its first HEAD_BYTES are kept
# for its model (near the start) and its last TAIL_BYTES for its usage (near the end).
TAIL_BYTES = 64 * 1024
HEAD_BYTES = 4 * 1024
# What a compressed answer may decode to before the reader gives up on it (the answer passes on).
MAX_DECODED = 1 << 30

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_NEEDLE = b'"message_'  # in the data line of message_start and message_delta, not in other events'
_EVENTS = (b'"message_start"', b'"message_delta"')
_USAGE_KEY = b'"usage"'
_COLON = re.compile(rb"\s*:\s*")
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')


@attrs.frozen
class Usage:
    """What an answer said it cost, and the model that gave it; None: not said (or not read)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    model: str | None = None

    @property
    def known(self) -> bool:
        return any(getattr(self, name) is not None for name in TOKEN_FIELDS)


class _Found:
    """What was read so far; a later count for the same field replaces an earlier one."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.model: str | None = None

    def take(self, usage: object, model: object = None) -> None:
        if isinstance(usage, dict):
            for name in TOKEN_FIELDS:
                value = usage.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    self.counts[name] = value
        if isinstance(model, str) and model:
            self.model = model

    def usage(self) -> Usage:
        return Usage(model=self.model, **self.counts)


def _loads(data: bytes | str) -> Any:
    """JSON, or None for anything that is not (bad syntax, bad UTF-8, nesting too deep)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


class SseScanner:
    """Finds the two events that carry usage in an SSE stream, whatever the pieces' split.

    ``_line`` is the start of the line the last piece ended in (None: longer than
    ``MAX_EVENT_LINE``, skipped to its end); a complete line is looked at only if it holds
    ``"message_``.
    """

    def __init__(self, found: _Found) -> None:
        self._found = found
        self._line: bytes | None = b""

    def feed(self, data: bytes) -> None:
        first = data.find(b"\n")
        if first < 0:
            if self._line is not None:
                self._line = self._line + data if len(self._line) + len(data) <= MAX_EVENT_LINE else None
            return
        if self._line is not None and len(self._line) + first <= MAX_EVENT_LINE:
            line = self._line + data[:first] if self._line else data[:first]
            if _NEEDLE in line:
                self._read_line(line)
        start = first + 1
        at = data.find(_NEEDLE, start)
        while at >= 0:
            end = data.find(b"\n", at)
            if end < 0:
                break  # the line goes on in the next piece: it is kept below
            begin = data.rfind(b"\n", start, at) + 1 or start
            self._read_line(data[begin:end])
            start = end + 1
            at = data.find(_NEEDLE, start)
        last = data.rfind(b"\n")
        self._line = data[last + 1 :] if len(data) - last - 1 <= MAX_EVENT_LINE else None

    def finish(self) -> None:
        """The stream ended: a last line without its newline still counts."""
        line, self._line = self._line, b""
        if line and _NEEDLE in line:
            self._read_line(line)

    def _read_line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or not (_EVENTS[0] in line or _EVENTS[1] in line):
            return
        event = _loads(line[5:])
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._found.take(event["message"].get("usage"), event["message"].get("model"))
        elif kind == "message_delta":
            self._found.take(event.get("usage"))


class JsonScanner:
    """Keeps a JSON answer's first and last few KiB, and reads them once it is whole.

    An answer that fits is parsed whole, so its top-level fields are read exactly. Of a larger
    one, the last ``"usage"`` object in the tail is taken (Anthropic's format ends with it, after
    the content that could hold another) and the first ``"model"`` in the head (it comes before
    the content).
    """

    def __init__(self, found: _Found) -> None:
        self._found = found
        self._head = bytearray()
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self._size = 0

    def feed(self, data: bytes) -> None:
        self._size += len(data)
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        if len(data) > TAIL_BYTES:
            data = data[-TAIL_BYTES:]
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    def finish(self) -> None:
        tail = b"".join(self._tail)
        self._tail.clear()
        if self._size <= TAIL_BYTES:
            answer = _loads(tail)
            if isinstance(answer, dict):
                self._found.take(answer.get("usage"), answer.get("model"))
            return
        self._found.take(_last_usage(tail), _first_model(bytes(self._head)))


def _last_usage(tail: bytes) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    at = len(tail)
    while (at := tail.rfind(_USAGE_KEY, 0, at)) >= 0:
        colon = _COLON.match(tail, at + len(_USAGE_KEY))
        if colon is not None:
            try:
                value, _ = decoder.raw_decode(tail[colon.end() :].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict) and any(name in value for name in TOKEN_FIELDS):
                return value
    return None


def _first_model(head: bytes) -> str | None:
    match = _MODEL.search(head)
    model = _loads(match.group(1)) if match else None
    return model if isinstance(model, str) else None


class UsageReader:
    """Feed it each payload piece of the answer's body (de-chunked, still content-encoded) as it
    passes, then ``finish`` when the body is complete; ``usage`` is what was read so far."""

    feed: Callable[[bytes], None]

    def __init__(self, kind: str, codings: tuple[str, ...] = ()) -> None:
        self._found = _Found()
        self._scanner: SseScanner | JsonScanner = SseScanner(self._found) if kind == "sse" else JsonScanner(self._found)
        self._decoder: BodyDecoder | None = None
        self._failed = False
        if any(c != "identity" for c in codings):
            self._decoder = BodyDecoder(list(codings), MAX_DECODED, sink=self._scanner.feed)
            self.feed = self._decode
        else:
            self.feed = self._scanner.feed  # the plain path: no call in between

    def _decode(self, data: bytes) -> None:
        if self._decoder is None:
            return
        try:
            self._decoder.feed(data)
        except HttpError:
            self._decoder, self._failed = None, True  # not decodable after all: the rest stays unread

    def finish(self) -> None:
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            try:
                decoder.finish()
            except HttpError:
                self._failed = True  # cut short: what it decoded to may end anywhere
        if not self._failed:
            self._scanner.finish()

    @property
    def usage(self) -> Usage:
        return self._found.usage()


def usage_reader(response: ResponseHead) -> UsageReader | None:
    """A reader for a successful messages answer whose usage cmm can read: an SSE stream or a
    JSON document, plain or in content codings cmm decodes; None for anything else."""
    if not 200 <= response.status < 300:
        return None
    content_type = (response.headers.get(b"content-type") or b"").split(b";")[0].strip().lower()
    kind = {b"text/event-stream": "sse", b"application/json": "json"}.get(content_type)
    if kind is None:
        return None
    codings = [c.decode("latin-1") for c in response.headers.tokens(b"content-encoding")]
    if unsupported(codings):
        return None
    try:
        return UsageReader(kind, tuple(codings))
    except HttpError:
        return None  # more codings stacked than cmm decodes
