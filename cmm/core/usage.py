"""Sans-IO reading of the token usage in a messages answer, beside the bytes, never in their way.

An Anthropic-format answer says what it cost: a stream in its ``message_start`` event
(``message.usage`` and ``message.model``) and its ``message_delta`` event (the final
``output_tokens``; newer servers put the final input and cache counts there too, and those win),
a JSON answer in its top-level ``usage`` and ``model``. The reader is fed the body's payload
as it passes to the client (the bytes themselves are never changed, held or delayed). A
compressed answer is decoded on the side with cmm's own body decoder; the client still gets it
compressed, as it came.

Where those fields are is known: ``message_start`` is a stream's first event and
``message_delta`` its last but one; a JSON answer names its model before its content and ends
with its usage. So the reader keeps only the body's first and last few KiB (the pieces
themselves, by reference: nothing is copied on the way) and reads them once the body ends,
searching from the start for the first and from the end for the others. Searching the whole
body, even in C, would cost more than the rest of cmm's work on a passed-through answer.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any, Callable, Sequence

import attrs

from cmm.core.decoding import BodyDecoder, unsupported
from cmm.core.errors import HttpError
from cmm.core.http_head import ResponseHead

# What is kept of a body's start and of its end. A message_start or message_delta event, or a
# JSON answer's model and usage, are a few hundred bytes from their end of the body.
HEAD_BYTES = 16 * 1024
TAIL_BYTES = 16 * 1024
# What a compressed answer may decode to before the reader gives up on it (the answer passes on).
MAX_DECODED = 1 << 30
# Compressed bytes gathered (by reference) before they are decoded together: a stream flushed
# event by event would otherwise cost a pass through the decoder's layers per event.
DECODE_BATCH = 64 * 1024
# How many candidates for an event or a usage object are tried before giving up.
MAX_TRIES = 8

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Inside a JSON string a quote is escaped, so text that merely mentions an event cannot match these.
_START = b'"message_start"'
_DELTA = b'"message_delta"'
_USAGE_KEY = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{((?:[^{}]++|\{[^{}]*+\})*+)\}')  # possessive: no backtracking
_NESTED = re.compile(rb"\{[^{}]*\}")
# At most 18 digits: int() refuses a string of thousands, and no answer counts that many tokens.
_FIELD = re.compile(rb'"(%s)"\s*:\s*(\d{1,18})(?![\d.eE])' % "|".join(TOKEN_FIELDS).encode())
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]++|\\.)*+)"')


@attrs.frozen
class Usage:
    """What an answer said it cost, and the model that gave it; None: not said (or not read)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    model: str | None = None


NO_USAGE = Usage()


class _Found:
    """What was read so far; a later count for the same field replaces an earlier one."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.model: str | None = None

    def take(self, counts: dict[str, int] | None, model: str | None = None) -> None:
        if counts:
            self.counts.update(counts)
        if model:
            self.model = model

    def usage(self) -> Usage:
        return Usage(model=self.model, **self.counts)


def _loads(data: bytes | str) -> Any:
    """JSON, or None for anything that is not (bad syntax, bad UTF-8, nesting too deep)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


class BodyEnds:
    """A body's first ``HEAD_BYTES`` and last ``TAIL_BYTES`` (at least), whatever its pieces.

    The tail is a queue of the fed sequences of pieces with the size each was fed with (at least
    its payload: a chunked body's framing may be counted too, so that nothing is summed per
    piece). It is cut back to ``TAIL_BYTES`` only once it holds twice that: a feed, often one
    small SSE event, costs an append and an addition.
    """

    __slots__ = ("_head", "_head_room", "_tail", "_tail_size", "_trim_at", "_dropped")

    def __init__(self) -> None:
        self._head: list[bytes] = []
        self._head_room = HEAD_BYTES
        self._tail: collections.deque[tuple[Sequence[bytes], int]] = collections.deque()
        self._tail_size = 0
        self._trim_at = 2 * TAIL_BYTES
        self._dropped = 0

    def feed(self, pieces: Sequence[bytes], size: int) -> None:
        if self._head_room > 0:
            self._keep_head(pieces)
        self._tail.append((pieces, size))
        self._tail_size += size
        if self._tail_size >= self._trim_at:
            self._trim()

    def _keep_head(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            if self._head_room <= 0:
                return
            self._head.append(piece[: self._head_room])
            self._head_room -= len(piece)

    def _trim(self) -> None:
        tail = self._tail
        while self._tail_size - tail[0][1] >= TAIL_BYTES:
            size = tail.popleft()[1]
            self._tail_size -= size
            self._dropped += size

    @property
    def size(self) -> int:
        return self._dropped + self._tail_size

    def head(self) -> bytes:
        return b"".join(self._head)

    def tail(self) -> bytes:
        return b"".join(piece for pieces, _ in self._tail for piece in pieces)


def _line_at(data: bytes, at: int) -> bytes | None:
    """The whole line of ``data`` around ``at``, or None if it runs past either end of ``data``
    (where a kept head or tail cuts it, or where a cut stream stops)."""
    begin = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    if end < 0 or (begin == 0 and not data.startswith(b"data:")):
        return None
    return data[begin:end]


def _counts(data: bytes, key: int) -> dict[str, int] | None:
    """The token counts of the usage object whose key starts at ``key``: its own fields only,
    not those of an object nested in it (one level deep at most, as Anthropic's are), and none
    past its end. Regular expressions only: this runs once an answer, on code nothing else warms."""
    match = _USAGE_OBJECT.match(data, key)
    if match is None:
        return None
    fields = match.group(1)
    if b"{" in fields:
        fields = _NESTED.sub(b"", fields)
    counts = {name.decode("ascii"): int(value) for name, value in reversed(_FIELD.findall(fields))}  # the first wins
    return counts or None


def read_stream(ends: BodyEnds, found: _Found) -> None:
    """message_start from the start of the stream, then message_delta from its end. Each is the
    ``data:`` line that names it (a quoted name: a string's text cannot hold one) and ends its
    JSON; its first ``"usage"`` object is the event's (message_start's content is empty)."""
    head = ends.head()
    at = head.find(_START)
    line = _event_line(head, at) if at >= 0 else None
    if line is not None:
        found.take(_event_counts(line), _first_model(line))
    tail = ends.tail()
    at = len(tail)
    for _ in range(MAX_TRIES):
        at = tail.rfind(_DELTA, 0, at)
        if at < 0:
            return
        line = _event_line(tail, at)
        if line is not None:
            found.take(_event_counts(line))
            return


def _event_line(data: bytes, at: int) -> bytes | None:
    """The whole ``data:`` line naming an event at ``at`` whose JSON ends on it; None otherwise."""
    line = _line_at(data, at)
    return line if line is not None and line.startswith(b"data:") and line.rstrip().endswith(b"}") else None


def _event_counts(line: bytes) -> dict[str, int] | None:
    """The counts of an event's first ``"usage"`` object."""
    key = line.find(_USAGE_KEY)
    return _counts(line, key) if key >= 0 else None


def read_json(ends: BodyEnds, found: _Found) -> None:
    """The first ``"model"`` in the head (it comes before the content) and the last ``"usage"``
    object in the tail (Anthropic's format ends with it, after the content that could hold
    another). Nothing is parsed as JSON: a whole answer, even a small one, would cost more than
    everything else the reader does."""
    tail = ends.tail()
    at = len(tail)
    for _ in range(MAX_TRIES):
        at = tail.rfind(_USAGE_KEY, 0, at)
        if at < 0:
            break
        counts = _counts(tail, at)
        if counts is not None:
            found.take(counts)
            break
    found.take(None, _first_model(ends.head()))


def _first_model(data: bytes) -> str | None:
    match = _MODEL.search(data)
    if match is None:
        return None
    text = match.group(1)
    model = _loads(b'"%s"' % text) if b"\\" in text else text.decode("utf-8", "replace")
    return model if isinstance(model, str) else None


class _SideDecoder:
    """A compressed answer's bytes, gathered by reference and decoded in batches into ``ends``."""

    def __init__(self, codings: tuple[str, ...], ends: BodyEnds) -> None:
        self._ends = ends
        self._decoder: BodyDecoder | None = BodyDecoder(list(codings), MAX_DECODED, sink=self._decoded)
        self._batch: list[Sequence[bytes]] = []
        self._batch_size = 0
        self.failed = False

    def _decoded(self, piece: bytes) -> None:
        self._ends.feed((piece,), len(piece))

    def feed(self, pieces: Sequence[bytes], size: int) -> None:
        self._batch.append(pieces)
        self._batch_size += size
        if self._batch_size >= DECODE_BATCH:
            self._decode()

    def _decode(self) -> None:
        batch, self._batch, self._batch_size = self._batch, [], 0
        if self._decoder is None:
            return
        try:
            self._decoder.feed(b"".join(piece for pieces in batch for piece in pieces))
        except HttpError:
            self._decoder, self.failed = None, True  # not decodable after all: nothing is read

    def finish(self, complete: bool) -> None:
        self._decode()
        decoder, self._decoder = self._decoder, None
        if decoder is not None and complete:
            try:
                decoder.finish()
            except HttpError:
                self.failed = True  # cut short or trailed by junk: the decoded end is not the answer's


class UsageReader:
    """Feed it the answer's payload (de-chunked, still content-encoded) as it passes: each time a
    sequence of pieces and their size (or more, such as the raw bytes they came in); then
    ``finish`` once the body ended, complete or not, for what it said."""

    __slots__ = ("_kind", "_ends", "_side", "_usage", "feed")
    feed: Callable[[Sequence[bytes], int], None]

    def __init__(self, kind: str, codings: tuple[str, ...] = ()) -> None:
        self._kind = kind
        self._ends = BodyEnds()
        self._usage: Usage | None = None
        self._side: _SideDecoder | None = None
        if any(c != "identity" for c in codings):
            self._side = _SideDecoder(codings, self._ends)
            self.feed = self._side.feed
        else:
            self.feed = self._ends.feed  # the plain path: no call in between

    def finish(self, complete: bool = True) -> Usage:
        """Read what was kept, once; a JSON answer only when ``complete``."""
        if self._usage is None:
            self._usage = self._read(complete)
        return self._usage

    def _read(self, complete: bool) -> Usage:
        side, self._side = self._side, None
        if side is not None:
            side.finish(complete)
            if side.failed:
                return NO_USAGE
        if self._kind == "json" and not complete:
            return NO_USAGE
        found = _Found()
        (read_stream if self._kind == "sse" else read_json)(self._ends, found)
        return found.usage()


_KINDS = {b"text/event-stream": "sse", b"application/json": "json"}


def usage_reader(response: ResponseHead) -> UsageReader | None:
    """A reader for a successful messages answer whose usage cmm can read: an SSE stream or a
    JSON document, plain or in content codings cmm decodes; None for anything else."""
    if not 200 <= response.status < 300:
        return None
    content_type = response.headers.get(b"content-type") or b""
    kind = _KINDS.get(content_type) or _KINDS.get(content_type.split(b";")[0].strip().lower())
    if kind is None:
        return None
    if response.headers.get(b"content-encoding") is None:
        return UsageReader(kind)
    codings = [c.decode("latin-1") for c in response.headers.tokens(b"content-encoding")]
    if unsupported(codings):
        return None
    try:
        return UsageReader(kind, tuple(codings))
    except HttpError:
        return None  # more codings stacked than cmm decodes
