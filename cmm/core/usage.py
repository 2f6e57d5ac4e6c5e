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

import json
import re
from typing import Any, Callable, Sequence

import attrs

from cmm.core.decoding import BodyDecoder, unsupported
from cmm.core.errors import HttpError
from cmm.core.http_head import ResponseHead

# What is kept of a body's start and of its end (the tail: up to twice that). A message_start or
# message_delta event, or a JSON answer's model and usage, are a few hundred bytes from their end
# of the body; every open stream holds what is kept, so it is no more than a few times that.
HEAD_BYTES = 4 * 1024
TAIL_BYTES = 4 * 1024
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


def _loads(data: bytes | str) -> Any:
    """JSON, or None for anything that is not (bad syntax, bad UTF-8, nesting too deep)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


class BodyEnds:
    """A body's first ``HEAD_BYTES`` and last ``TAIL_BYTES`` (at least), whatever its pieces.

    Both are the fed pieces themselves, by reference (the head's last one cut to size). The tail is a
    list of the fed sequences of pieces with the size each was fed with (at least its payload: a
    chunked body's framing may be counted too, so that nothing is summed per piece). It is cut
    back to ``TAIL_BYTES`` only once it holds twice that: a feed, often one small SSE event, costs
    an append and an addition. This runs beside every answer, on code little else warms: it keeps
    to as few steps and objects as it can.
    """

    __slots__ = ("_head", "_head_room", "_tail", "_tail_size", "_dropped")

    def __init__(self) -> None:
        self._head: list[bytes] = []
        self._head_room = HEAD_BYTES
        self._tail: list[tuple[Sequence[bytes], int]] = []
        self._tail_size = 0
        self._dropped = 0

    def feed(self, pieces: Sequence[bytes], size: int) -> None:
        if self._head_room > 0:
            self._keep_head(pieces)
        self._tail.append((pieces, size))
        self._tail_size += size
        if self._tail_size >= 2 * TAIL_BYTES:
            self._trim()

    def _keep_head(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            room = self._head_room
            self._head.append(piece if len(piece) <= room else piece[:room])  # a whole read is not kept for 4 KiB
            self._head_room = room - len(piece)
            if self._head_room <= 0:
                return

    def _trim(self) -> None:
        tail, keep, dropped = self._tail, self._tail_size, 0
        while keep - tail[dropped][1] >= TAIL_BYTES:
            keep -= tail[dropped][1]
            dropped += 1
        self._dropped += self._tail_size - keep
        self._tail_size = keep
        del tail[:dropped]

    @property
    def size(self) -> int:
        return self._dropped + self._tail_size

    def head(self) -> bytes:
        head = self._head
        return head[0] if len(head) == 1 else b"".join(head)  # _keep_head kept no more than HEAD_BYTES

    def tail(self) -> bytes:
        tail = self._tail
        if len(tail) == 1 and len(tail[0][0]) == 1:
            return tail[0][0][0]  # a small answer, read at once: no copy
        return b"".join(piece for pieces, _ in tail for piece in pieces)


def _line_at(data: bytes, at: int) -> bytes | None:
    """The whole line of ``data`` around ``at``, or None if it runs past either end of ``data``
    (where a kept head or tail cuts it, or where a cut stream stops)."""
    begin = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    if end < 0 or (begin == 0 and not data.startswith(b"data:")):
        return None
    return data[begin:end]


# Anthropic's own usage object, compact, in its order: its four counts read by one match. The
# optional object is ``cache_creation``'s breakdown by TTL; whatever follows the output count is
# stepped over as _USAGE_OBJECT would (objects one level deep at most), so where this matches,
# the general reading finds the same counts (each is the first of its name: all four lead).
_ANTHROPIC_USAGE = re.compile(
    rb'"usage":\{"input_tokens":(\d{1,18}),"cache_creation_input_tokens":(\d{1,18}),"cache_read_input_tokens":'
    rb'(\d{1,18}),(?:"cache_creation":\{[^{}]*+\},)?"output_tokens":(\d{1,18})(?:,(?:[^{}]++|\{[^{}]*+\})*+)?\}')


def _counts(data: bytes, key: int) -> dict[str, int] | None:
    """The token counts of the usage object whose key starts at ``key``: its own fields only,
    not those of an object nested in it (one level deep at most, as Anthropic's are), and none
    past its end. Anthropic's own layout is read by one match; other compact JSON by
    ``bytes.find`` and one pattern over the object's own fields; anything else by the general
    patterns. This runs once an answer, on code nothing else warms: every distinct step costs
    cache misses, so the usual case takes the fewest."""
    anthropic = _ANTHROPIC_USAGE.match(data, key)
    if anthropic is not None:
        given, written, read, output = anthropic.groups()
        return {"input_tokens": int(given), "cache_creation_input_tokens": int(written),
                "cache_read_input_tokens": int(read), "output_tokens": int(output)}
    counts = _compact_counts(data, key)
    if counts is _UNDECIDED:
        counts = _pattern_counts(data, key)
    return counts or None


_UNDECIDED: dict[str, int] = {}  # _compact_counts: not its case, ask the patterns
_USAGE_OPEN = b'"usage":{'
MAX_NESTED = 8  # objects nested in a usage object that the compact reading steps over
# Every mention of a count's name, with its count where it is compact (a plain number right after
# the colon, then a comma or the end): if all are, the first of each is what _FIELD finds first.
_MENTION = re.compile(rb'"(%s)"(?::(\d{1,18})(?=,|\Z))?' % "|".join(TOKEN_FIELDS).encode())
_NAMES = {name.encode(): name for name in TOKEN_FIELDS}


def _compact_counts(data: bytes, key: int) -> dict[str, int]:
    """``_pattern_counts``'s answer where the object is compact (no space around ``:``, counts
    followed by ``,`` or its end); ``_UNDECIDED`` wherever the two could differ."""
    if not data.startswith(_USAGE_OPEN, key):
        return _UNDECIDED
    at = key + len(_USAGE_OPEN)
    close = data.find(b"}", at)
    if close < 0:
        return _UNDECIDED
    # A flat object, the usual one, read here: going through _own_fields cost 0.4-0.6 µs more an answer.
    fields = data[at:close] if data.find(b"{", at, close) < 0 else _own_fields(data, at)
    if fields is None:
        return _UNDECIDED
    counts: dict[str, int] = {}
    for mention, value in _MENTION.findall(fields):
        if not value:
            return _UNDECIDED
        name = _NAMES[mention]
        if name not in counts:
            counts[name] = int(value)
    return counts


def _own_fields(data: bytes, at: int) -> bytes | None:
    """The text of an object's own fields from ``at`` (inside it) to its end, without the objects
    nested in it; None if one is nested deeper, or the object does not end."""
    own: list[bytes] = []
    for _ in range(MAX_NESTED + 1):
        close = data.find(b"}", at)
        if close < 0:
            return None
        nested = data.find(b"{", at, close)
        if nested < 0:
            own.append(data[at:close])
            return b"".join(own)
        if data.find(b"{", nested + 1, close) >= 0:
            return None  # nested deeper than one level
        own.append(data[at:nested])
        at = close + 1
    return None


def _pattern_counts(data: bytes, key: int) -> dict[str, int]:
    match = _USAGE_OBJECT.match(data, key)
    if match is None:
        return {}
    fields = match.group(1)
    if b"{" in fields:
        fields = _NESTED.sub(b"", fields)
    return {name.decode("ascii"): int(value) for name, value in reversed(_FIELD.findall(fields))}  # the first wins


def read_stream(head: bytes, tail: bytes) -> Usage:
    """message_start from the start of the stream, then message_delta from its end. Each is the
    ``data:`` line that names it (a quoted name: a string's text cannot hold one) and ends its
    JSON; its first ``"usage"`` object is the event's (message_start's content is empty). The
    delta's counts win: newer servers put the final input and cache counts there too."""
    counts: dict[str, int] = {}
    model = None
    at = head.find(_START)
    line = _event_line(head, at) if at >= 0 else None
    if line is not None:
        counts.update(_event_counts(line) or ())
        model = _first_model(line)
    at = len(tail)
    for _ in range(MAX_TRIES):
        at = tail.rfind(_DELTA, 0, at)
        if at < 0:
            break
        line = _event_line(tail, at)
        if line is not None:
            counts.update(_event_counts(line) or ())
            break
    return Usage(model=model, **counts)


def _event_line(data: bytes, at: int) -> bytes | None:
    """The whole ``data:`` line naming an event at ``at`` whose JSON ends on it; None otherwise."""
    line = _line_at(data, at)
    return line if line is not None and line.startswith(b"data:") and line.rstrip().endswith(b"}") else None


def _event_counts(line: bytes) -> dict[str, int] | None:
    """The counts of an event's first ``"usage"`` object."""
    key = line.find(_USAGE_KEY)
    return _counts(line, key) if key >= 0 else None


def read_json(head: bytes, tail: bytes) -> Usage:
    """The first ``"model"`` in the head (it comes before the content) and the last ``"usage"``
    object in the tail (Anthropic's format ends with it, after the content that could hold
    another). Nothing is parsed as JSON: a whole answer, even a small one, would cost more than
    everything else the reader does."""
    counts = None
    at = tail.rfind(_USAGE_KEY)
    anthropic = _ANTHROPIC_USAGE.match(tail, at) if at >= 0 else None
    if anthropic is not None:  # the usual answer: its Usage made at once, without a dict between
        given, written, read, output = anthropic.groups()
        return Usage(int(given), int(output), int(written), int(read), _first_model(head))
    at = len(tail)
    for _ in range(MAX_TRIES):
        at = tail.rfind(_USAGE_KEY, 0, at)
        if at < 0:
            break
        counts = _counts(tail, at)
        if counts is not None:
            break
    return Usage(model=_first_model(head), **(counts or {}))


_MODEL_OPEN = b'"model":"'


def _first_model(data: bytes) -> str | None:
    """The first ``"model"`` string: by ``bytes.find`` where it is compact and unescaped, else
    by the pattern."""
    key = data.find(b'"model"')
    if key < 0:
        return None
    if data.startswith(_MODEL_OPEN, key):
        begin = key + len(_MODEL_OPEN)
        end = data.find(b'"', begin)
        if end >= 0 and data.find(b"\\", begin, end) < 0:
            return data[begin:end].decode("utf-8", "replace")
    match = _MODEL.search(data, key)
    if match is None:
        return None
    text = match.group(1)
    model = _loads(b'"%s"' % text) if b"\\" in text else text.decode("utf-8", "replace")
    return model if isinstance(model, str) else None


class _SideDecoder:
    """A compressed answer's bytes, gathered by reference and decoded in batches into ``keep``."""

    def __init__(self, codings: tuple[str, ...], keep: Callable[[bytes], None]) -> None:
        self._decoder: BodyDecoder | None = BodyDecoder(list(codings), MAX_DECODED, sink=keep)
        self._batch: list[Sequence[bytes]] = []
        self._batch_size = 0
        self.failed = False

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


class UsageReader(BodyEnds):
    """Feed it the answer's payload (de-chunked, still content-encoded) as it passes: each time a
    sequence of pieces and their size (or more, such as the raw bytes they came in); then
    ``finish`` once the body ended, complete or not, for what it said. ``reader_for`` gives the
    one for an answer's content codings. A plain answer's kind may be left to ``finish`` to tell
    from its ``response`` head: it costs less there, with a batch of records."""

    __slots__ = ("_kind", "_usage")

    def __init__(self, kind: str | None) -> None:
        self._head: list[bytes] = []  # BodyEnds's, set here: one call less on every answer
        self._head_room = HEAD_BYTES
        self._tail: list[tuple[Sequence[bytes], int]] = []
        self._tail_size = 0
        self._dropped = 0
        self._kind = kind
        self._usage: Usage | None = None

    def finish(self, complete: bool = True, response: ResponseHead | None = None) -> Usage:
        """Read what was kept, once; a JSON answer only when ``complete``. ``response`` tells the
        kind of an answer whose reader was made without it."""
        if self._usage is None:
            kind = self._kind or (kind_of(response) if response is not None else None)
            self._usage = self._read(complete, kind)
        return self._usage

    def _read(self, complete: bool, kind: str | None) -> Usage:
        return read_answer(kind, self.head(), self.tail(), complete)


def read_answer(kind: str | None, head: bytes, tail: bytes, complete: bool) -> Usage:
    """What an answer of ``kind`` said, from its first bytes and its last (a JSON answer's only
    when ``complete``)."""
    if kind == "sse":
        return read_stream(head, tail)
    return read_json(head, tail) if complete and kind == "json" else NO_USAGE


class DecodingUsageReader(UsageReader):
    """The reader of a compressed answer: what is fed is decoded on the side, and its decoded
    pieces kept."""

    __slots__ = ("_side",)

    def __init__(self, kind: str, codings: tuple[str, ...]) -> None:
        UsageReader.__init__(self, kind)
        self._side: _SideDecoder | None = _SideDecoder(codings, self._keep)

    def _keep(self, piece: bytes) -> None:
        BodyEnds.feed(self, (piece,), len(piece))

    def feed(self, pieces: Sequence[bytes], size: int) -> None:
        if self._side is not None:
            self._side.feed(pieces, size)

    def _read(self, complete: bool, kind: str | None) -> Usage:
        side, self._side = self._side, None
        if side is not None:
            side.finish(complete)
            if side.failed:
                return NO_USAGE
        return UsageReader._read(self, complete, kind)


def reader_for(kind: str, codings: tuple[str, ...] = ()) -> UsageReader:
    """The reader of an answer of ``kind`` (``sse`` or ``json``) in ``codings``; raises
    ``HttpError`` for codings stacked deeper than cmm decodes."""
    if any(c != "identity" for c in codings):
        return DecodingUsageReader(kind, codings)
    return UsageReader(kind)


_KINDS = {b"text/event-stream": "sse", b"application/json": "json"}


def kind_of(response: ResponseHead) -> str | None:
    """``sse`` or ``json`` for an answer whose usage cmm reads, by its content type; None else."""
    content_type = response.headers.get(b"content-type") or b""
    return _KINDS.get(content_type) or _KINDS.get(content_type.split(b";")[0].strip().lower())


class _Unread:
    """A plain answer's usage before its body came (see ``UsageState``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD = _Unread()
OneRead = tuple[Sequence[bytes], int]  # a plain answer's one read so far: its pieces and size, as fed
# What is known of an answer's usage as its body passes. A plain answer's body most often comes
# in one read (every small answer does): it is kept as it came, and a reader is made only if a
# second read comes. Such an answer then costs no object and no call on its way, only the
# reading at its end, with a batch of records: this runs beside every answer.
UsageState = UsageReader | OneRead | _Unread


def usage_reader(response: ResponseHead) -> UsageState | None:
    """How a successful messages answer's usage is read: an SSE stream or a JSON document, plain
    or in content codings cmm decodes; None where that is known to be impossible now (a plain
    answer's content type is read once it ended). Fed by ``usage_fed``, read by ``usage_of``."""
    if not 200 <= response.status < 300:
        return None
    if response.headers.get(b"content-encoding") is None:
        return UNREAD
    kind = kind_of(response)
    if kind is None:
        return None
    codings = [c.decode("latin-1") for c in response.headers.tokens(b"content-encoding")]
    if unsupported(codings):
        return None
    try:
        return reader_for(kind, tuple(codings))
    except HttpError:
        return None  # more codings stacked than cmm decodes


def usage_fed(state: UsageState, pieces: Sequence[bytes], size: int) -> UsageState:
    """``state`` after a read of the answer's payload: its pieces and their size, as ``BodyEnds.feed``."""
    if state is UNREAD:
        return (pieces, size)
    if isinstance(state, tuple):
        reader = UsageReader(None)
        reader.feed(*state)
        state = reader
    assert isinstance(state, UsageReader)
    state.feed(pieces, size)
    return state


def usage_of(state: UsageState, response: ResponseHead, complete: bool) -> Usage:
    """What the answer with ``response`` said it cost, once its body (complete or not) was fed to
    ``state``. An answer read once is read as a ``UsageReader`` fed it once reads it: its head
    is its first ``HEAD_BYTES``, its tail all of it."""
    if isinstance(state, UsageReader):
        return state.finish(complete, response)
    if not isinstance(state, tuple):
        return NO_USAGE  # UNREAD: no body came
    pieces = state[0]
    body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    return read_answer(kind_of(response), body[:HEAD_BYTES], body, complete)  # a short body's slice is itself
