"""Thinking blocks across providers: mark, neutralise and unmark signatures, sans-IO.

A session can send one conversation to Anthropic and to the target. Anthropic rejects thinking
blocks whose signature it did not make ("Invalid `signature` in `thinking` block") and wants its
own back byte for byte; the target may want its own back too. Workers share no state, so the
signature itself records where a block came from:

* **Mark** intercepted responses: every signature (and ``redacted_thinking`` ``data``) the target
  makes gets the prefix :data:`MARK` — in SSE (:class:`SseMarker`) and in JSON message responses
  (:func:`mark_message`, empty signatures included: a block the target left unsigned is still
  not Anthropic's). Responses grow by ``len(MARK)`` per mark; the caller re-frames them.
* **Neutralise** passthrough requests (:class:`Neutraliser`): a marked block in
  ``messages[*].content[*]`` is replaced by spaces together with one adjacent comma, so the body
  keeps its length (JSON allows whitespace between tokens) and ``Content-Length`` stays right.
  Anthropic's own blocks pass byte for byte. A content array whose every block is marked would
  be empty, which Anthropic rejects: its last block becomes :data:`OMITTED` (or, if that does
  not fit, :data:`OMITTED_SHORT`), padded with spaces to the same length. What fits is judged
  by the block's length without whitespace between tokens: however it is spaced, a block gets
  the same text. The last block, not the first: whether a marked block stands alone is known
  at the ``,`` or ``]`` after it, so nothing beyond that block has to wait. (A marked block is
  at least 39 bytes long, so the short form always fits.)
* **Unmark** intercepted requests (:class:`Unmarker`): ``"signature":"cmm1.XYZ"`` becomes
  ``"signature":     "XYZ"`` — the opening quote moves right over the mark, same length.

The request transforms are incremental: they hold back only the content block whose fate is not
known yet (with the comma before it, which may go with it), and the blanks of a marked block
with no kept block before it until the next ``,`` or ``]``; everything else goes out at once.
The output depends on the body only, never on how it was split, so the same history is edited
the same way on every turn (Anthropic binds thinking blocks to the conversation before them).
Blocks may have any key order, whitespace and string escapes; Claude Code's form
(``{"type":"thinking","thinking":"...","signature":"..."}``) is decided after its first member
or at its signature. Duplicate keys in a block: the first ``type``, ``signature`` or ``data``
counts. Skipping runs in C: a regular expression jumps over runs between brackets (short strings
included), another from quote to quote in long strings; Claude Code's spelling of messages,
blocks and keys is matched in one step, and a block in that spelling that ends in the piece at
hand is decided whole, without the general walk. The SSE marker parses only events that can
carry a signature, and holds at most :data:`MAX_SSE_EVENT` bytes of one: a larger event passes
unmarked. No pattern here has nested or overlapping unbounded runs: whatever a client or a
target sends is scanned in linear time, and JSON nested past the parser's limit passes as it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

MARK = b"cmm1."  # "cmm", version 1: signatures made by the target, as cmm relayed them
OMITTED = b'{"type":"text","text":"[thinking from another model omitted]"}'
OMITTED_SHORT = b'{"type":"text","text":"."}'  # Anthropic rejects empty text blocks

_MARK_RAW_MAX = 6 * len(MARK)  # each character of the mark is at most a \uXXXX escape
_KEY_MAX = 64
_TYPE_MAX = 64
_FIELD_FOR = {b"thinking": b"signature", b"redacted_thinking": b"data"}
_CAPTURED = (b"type", b"signature", b"data")

_WS_BYTES = frozenset(b" \t\r\n")
_SCALAR_START = frozenset(b"-0123456789tfn")
_WS = re.compile(rb"[ \t\r\n]*")
# Runs without brackets, short strings without escapes included; longer strings go to find().
_SKIP_RUN = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]{0,256}+")*+')
# Claude Code's spelling of a message and of a block's first member: decided in one step.
_FAST_MESSAGE = re.compile(rb'\{"role":"[a-z]{1,16}","content":\[')
_FAST_TYPE = re.compile(rb'\{"type":"([a-z_]{1,32})"')
_FAST_KEY = re.compile(rb'"([A-Za-z_]{1,32})":')
_WINDOW, _WINDOW_MAX = 1024, 256 * 1024
# A quote not behind exactly one backslash: the search jumps from quote to quote in C.
_QUOTE_CANDIDATE = re.compile(rb'"(?<![^\\]\\")')
_SCALAR_END = re.compile(rb"[,}\] \t\r\n]")
_ESCAPES = {  # the byte an escape letter stands for, \uXXXX aside
    0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09,
}

_QUOTE, _COMMA, _COLON = 0x22, 0x2C, 0x3A
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = 0x7B, 0x7D, 0x5B, 0x5D
_ROOT, _MESSAGES, _MESSAGE, _CONTENT, _BLOCK = range(5)
_OBJECTS = (_ROOT, _MESSAGE, _BLOCK)
_PASS, _HOLD, _BLANK, _PEND = range(4)  # where processed input goes: out, held, spaces, counted


def is_marked(value: str | bytes) -> bool:
    """Whether a decoded signature (or redacted ``data``) was marked by cmm."""
    return (value.encode() if isinstance(value, str) else value).startswith(MARK)


def _mark_length(raw: bytes) -> int:
    """Raw length of the mark at the start of a string's raw content, escapes allowed; 0 if absent."""
    pos = 0
    for want in MARK:
        byte = raw[pos] if pos < len(raw) else -1
        if byte == 0x5C:
            escaped = raw[pos + 1] if pos + 1 < len(raw) else -1
            if escaped == 0x75:  # \uXXXX
                digits = raw[pos + 2 : pos + 6]
                if len(digits) < 4 or not all(c in b"0123456789abcdefABCDEF" for c in digits):
                    return 0
                byte, pos = int(digits, 16), pos + 6
            else:
                byte, pos = _ESCAPES.get(escaped, -1), pos + 2
        else:
            pos += 1
        if byte != want:
            return 0
    return pos


def _replacement(size: int, solid: int) -> bytes:
    """A text block padded to ``size`` bytes, standing in for a turn that was all foreign.

    The choice goes by ``solid``, the block's length without whitespace between tokens, so that
    the same block gets the same text however it is spaced.
    """
    for block in (OMITTED, OMITTED_SHORT):
        if solid >= len(block):
            return block + b" " * (size - len(block))
    return b" " * size  # unreachable: a marked block is at least 39 bytes long


def _count_solid(
    data: bytes | bytearray, pos: int, stop: int, state: tuple[int, bool, bool]
) -> tuple[int, bool, bool]:
    """Count a block's bytes in ``data[pos:stop]`` that are not whitespace between tokens, up to
    ``len(OMITTED)``.

    ``state`` is (count, inside a string, after a backslash in it), carried across pieces. Only
    the first bytes are looked at and whitespace runs are jumped in C: the cost is bounded.
    """
    count, in_string, escape = state
    want = len(OMITTED)
    while count < want and pos < stop:
        byte = data[pos]
        if in_string:
            if escape:
                escape = False
            elif byte == 0x5C:
                escape = True
            elif byte == _QUOTE:
                in_string = False
        elif byte in _WS_BYTES:
            pos = _WS.match(data, pos, stop).end()  # type: ignore[union-attr]  # the pattern matches the empty string
            continue
        elif byte == _QUOTE:
            in_string = True
        count += 1
        pos += 1
    return count, in_string, escape


def _closing_quote(data: bytes, pos: int) -> int:
    """Just past the closing quote of a string whose raw content goes on at ``pos`` (not inside
    an escape); -1 if it does not close in ``data``.

    A regular expression jumps (in C) to the next quote not behind exactly one backslash; behind
    a longer run of backslashes, a quote closes the string if the run is even. Where such runs
    are dense (JSON in a string in a string), :func:`_flattened_quote` takes over.
    """
    quote = data.find(b'"', pos)  # at memchr speed: often the closing quote already
    if quote < 0:
        return -1
    if quote == pos or data[quote - 1] != 0x5C:
        return quote + 1
    for _ in range(4):
        found = _QUOTE_CANDIDATE.search(data, quote)
        if found is None:
            return -1
        quote = back = found.start()
        while back > pos and data[back - 1] == 0x5C:  # a run never crosses a quote
            back -= 1
        if (quote - back) % 2 == 0:
            return quote + 1
        quote += 1
    return _flattened_quote(data, quote)


def _flattened_quote(data: bytes, pos: int) -> int:
    """:func:`_closing_quote` at any escape density: growing windows are flattened (escaped
    backslashes and quotes replaced, in C) so that the next quote left is the closing one."""
    size, width = len(data), _WINDOW
    while True:
        stop = min(size, pos + width)
        back = stop
        while back > pos and data[back - 1] == 0x5C:
            back -= 1
        if (stop - back) % 2 and stop < size:
            stop += 1  # never cut an escape in two
        quote = data[pos:stop].replace(b"\\\\", b"__").replace(b'\\"', b"__").find(b'"')
        if quote >= 0:
            return pos + quote + 1
        if stop == size:
            return -1
        pos, width = stop, min(2 * width, _WINDOW_MAX)


def _value_end(data: bytes, pos: int) -> int:
    """Just past the bracket that closes the container open at ``pos``; -1 if not in ``data``.

    The same walk as :meth:`_Scanner._skip`, for a value that is whole in the piece.
    """
    size, depth = len(data), 1
    while True:
        pos = _SKIP_RUN.match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
        if pos >= size:
            return -1
        byte = data[pos]
        if byte == _QUOTE:
            pos = _closing_quote(data, pos + 1)
            if pos < 0:
                return -1
            continue
        pos += 1
        if byte in (_LBRACE, _LBRACKET):
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos


@attrs.frozen
class Removed:
    """A blanked block: its message's index in ``messages`` and its index in that ``content``."""

    message: int
    block: int


class _Scanner:
    """Walk a JSON body incrementally down to content blocks; subclasses decide what to do.

    Blocks are ``messages[*].content[*]`` in requests, ``content[*]`` in responses. Processed
    input goes to a sink: straight out, held (while a block is examined), out as spaces, or
    counted as spaces whose output waits (a marked block that may yet become the replacement).
    """

    _response = False

    def __init__(self) -> None:
        self.changed = False
        self._state = "value"
        self._stack: list[int] = []
        self._key: bytes | None = None
        self._token = bytearray()  # raw bytes of the key or captured value being read (capped)
        self._token_len = 0  # its full raw length
        self._token_at = 0  # absolute offset of the captured value's opening quote
        self._capture_key = b""
        self._escape = False
        self._in_string = False
        self._depth = 0
        self._skip_block = False  # the skip in progress ends with the current block
        self._type: bytes | None = None
        self._fields: dict[bytes, tuple[int, int]] = {}  # key -> (quote offset, raw mark length)
        self._decided = False
        self._message_index = -1
        self._element_index = -1
        self._sink = _PASS
        self._held = bytearray()
        self._held_at = 0  # absolute offset of the first held byte
        self._pending = 0
        self._consumed = 0
        self._data = b""
        self._mark = 0  # the first byte of data not yet given to the sink
        self._out: list[bytes] = []

    # -- driving ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        data = bytes(data)
        self._data, self._mark, self._out = data, 0, []
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state == "skip":
                pos = self._skip(data, pos)
            elif state == "capture":
                pos = self._capture(data, pos)
            elif state == "key-string":
                pos = self._key_string(data, pos)
            elif state == "rest":
                break
            elif state == "scalar":
                match = _SCALAR_END.search(data, pos)
                if match is None:
                    break
                pos, self._state = match.start(), "after"
            else:
                if data[pos] in _WS_BYTES:
                    pos = _WS.match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
                    if pos >= size:
                        break
                pos = self._token_byte(data, pos, state)
        self._flush(size)
        self._consumed += size
        out, self._out, self._data = self._out, [], b""
        return b"".join(out)

    def finish(self) -> bytes:
        """The body ended; whatever is still held goes out (a truncated body keeps its length)."""
        out = bytes(self._held) + b" " * self._pending
        self._held.clear()
        self._pending, self._sink, self._state = 0, _PASS, "rest"
        return out

    # -- sinks -------------------------------------------------------------------------------------

    def _flush(self, pos: int) -> None:
        if pos > self._mark:
            sink = self._sink
            if sink == _PASS:
                self._out.append(self._data[self._mark : pos])
            elif sink == _HOLD:
                self._held += self._data[self._mark : pos]
            elif sink == _BLANK:
                self._out.append(b" " * (pos - self._mark))
            else:
                self._pending += pos - self._mark
            self._mark = pos

    def _switch(self, pos: int, sink: int) -> None:
        self._flush(pos)
        self._sink = sink

    def _hold(self, pos: int) -> None:
        self._switch(pos, _HOLD)
        self._held_at = self._consumed + pos

    def _release(self, pos: int) -> None:
        """Send what is held (edited or not) and pass from ``pos`` on."""
        if self._sink == _HOLD:
            if not self._held:  # all held bytes are in this piece, unedited: they just pass
                self._sink = _PASS
                return
            self._switch(pos, _PASS)
            self._out.append(bytes(self._held))
            self._held.clear()

    # -- structure ---------------------------------------------------------------------------------

    def _token_byte(self, data: bytes, pos: int, state: str) -> int:
        byte = data[pos]
        if state == "value" or (state == "elem-or-end" and byte != _RBRACKET):
            return self._start_value(data, pos, byte)
        if state in ("key-or-end", "key"):
            if byte == _QUOTE:
                fast = _FAST_KEY.match(data, pos)
                if fast is not None:
                    return self._member(data, fast)
                self._state, self._escape, self._token_len = "key-string", False, 0
                self._token.clear()
                return pos + 1
            if byte == _RBRACE and state == "key-or-end":
                return self._close(pos)
            return self._give_up(pos)
        if state == "colon":
            if byte != _COLON:
                return self._give_up(pos)
            self._state = "value"
            return pos + 1
        kind = self._stack[-1]  # after a value, or "elem-or-end" at "]"
        if byte == _COMMA and state == "after":
            if kind == _CONTENT:
                self._on_comma(pos)
            pos += 1
            if kind in _OBJECTS:
                fast = _FAST_KEY.match(data, pos)
                if fast is not None:
                    return self._member(data, fast)
                self._state = "key"
                return pos
            self._state = "value"
            if pos < len(data) and data[pos] == _LBRACE:
                return self._start_value(data, pos, _LBRACE)
            return pos
        if byte == (_RBRACE if kind in _OBJECTS else _RBRACKET):
            return self._close(pos)
        return self._give_up(pos)

    def _member(self, data: bytes, fast: re.Match[bytes]) -> int:
        """A plainly spelled key and its colon were read at once; start its value if it is there."""
        self._key, self._state, pos = fast.group(1), "value", fast.end()
        if pos < len(data) and data[pos] not in _WS_BYTES:
            return self._start_value(data, pos, data[pos])
        return pos

    def _start_value(self, data: bytes, pos: int, byte: int) -> int:
        stack = self._stack
        if not stack:
            if byte != _LBRACE:
                return self._give_up(pos)
            stack.append(_ROOT)
            self._state = "key-or-end"
            return pos + 1
        kind, key = stack[-1], self._key
        if kind == _CONTENT:
            if byte == _LBRACE:
                return self._blocks(data, pos)
            self._element_index += 1
            self._type = None
            self._on_element(pos)
        elif kind == _MESSAGES:
            fast = _FAST_MESSAGE.match(data, pos) if byte == _LBRACE else None
            if fast is not None:
                pos = self._open_message(fast)
                return self._blocks(data, pos) if data[pos : pos + 1] == b"{" else pos
            self._message_index += 1
            if byte == _LBRACE:
                stack.append(_MESSAGE)
                self._state = "key-or-end"
                return pos + 1
        elif byte == _LBRACKET and key == b"content" and (
            kind == _MESSAGE or (kind == _ROOT and self._response)
        ):
            stack.append(_CONTENT)
            self._element_index = -1
            self._on_content_start()
            self._state = "elem-or-end"
            return pos + 1
        elif byte == _LBRACKET and key == b"messages" and kind == _ROOT and not self._response:
            stack.append(_MESSAGES)
            self._message_index = -1
            self._state = "elem-or-end"
            return pos + 1
        elif byte == _QUOTE and kind == _BLOCK and key in _CAPTURED and (
            self._type is None if key == b"type" else key not in self._fields
        ):
            self._state, self._capture_key, self._escape, self._token_len = "capture", key, False, 0
            self._token.clear()
            self._token_at = self._consumed + pos
            return pos + 1
        # Anything else is skipped whole.
        self._skip_block, self._escape = False, False
        if byte == _QUOTE:
            self._state, self._in_string, self._depth = "skip", True, 0
        elif byte in (_LBRACE, _LBRACKET):
            self._state, self._in_string, self._depth = "skip", False, 1
        elif byte in _SCALAR_START:
            self._state = "scalar"
            return pos
        else:
            return self._give_up(pos)
        return pos + 1

    def _open_message(self, fast: re.Match[bytes]) -> int:
        """A message in Claude Code's spelling, read up to its content array at once."""
        self._message_index += 1
        self._stack += (_MESSAGE, _CONTENT)
        self._element_index = -1
        self._on_content_start()
        self._state = "elem-or-end"
        return fast.end()

    def _blocks(self, data: bytes, pos: int) -> int:
        """Content elements from the ``{`` at ``pos`` on, and on into the next messages.

        While each block is in Claude Code's spelling and ends in this piece, it is decided at
        once (:meth:`_whole_block`) and the walk steps over ``,`` and ``]},{"role":...[`` to the
        next one, calling the hooks as the general walk would; anything else is left to it.
        """
        while True:
            end = self._whole_block(data, pos)
            if end < 0:
                return self._open_block(data, pos)
            pos, ahead = end, data[end : end + 2]
            if ahead == b",{":
                self._on_comma(pos)
                pos += 1
                continue
            if ahead != b"]}":
                return pos
            pos = self._close(pos)  # the content array
            if self._stack[-1] != _MESSAGE:
                return pos
            pos = self._close(pos)  # its message
            fast = _FAST_MESSAGE.match(data, pos + 1) if data[pos : pos + 1] == b"," else None
            if fast is None:
                return pos
            pos = self._open_message(fast)
            if data[pos : pos + 1] != b"{":
                return pos

    def _whole_block(self, data: bytes, pos: int) -> int:
        """Decide a block in Claude Code's spelling that ends in this piece; -1 for any other.

        A thinking block ``{"type":"thinking","thinking":"...","signature":"..."}`` is judged by
        its signature (plain, without escapes); any other type is skipped to its end. The hooks
        get the same calls, at the same offsets, as the general walk would make.
        """
        fast = _FAST_TYPE.match(data, pos)
        if fast is None:
            return -1
        kind, start = fast.group(1), fast.end()
        if kind == b"thinking":
            if not data.startswith(b',"thinking":"', start):
                return -1
            text_end = _closing_quote(data, start + 13)
            if text_end < 0 or not data.startswith(b',"signature":"', text_end):
                return -1
            quote = text_end + 13  # the signature's opening quote
            close = data.find(b'"', quote + 1)
            if close < 0 or data[close + 1 : close + 2] != b"}" or data.find(b"\\", quote + 1, close) >= 0:
                return -1
            self._element_index += 1
            self._type, self._fields, self._decided = kind, {}, False
            self._on_block_start(pos)
            mark = len(MARK) if data.startswith(MARK, quote + 1, close) else 0
            self._fields[b"signature"] = (self._consumed + quote, mark)
            self._decide(close + 1)
            end = close + 2
        elif kind in _FIELD_FOR:
            return -1
        else:
            end = _value_end(data, start)
            if end < 0:
                return -1
            self._element_index += 1
            self._decided, self._type = True, kind
            self._on_element(pos)
        self._on_block_end(end)
        self._state = "after"
        return end

    def _open_block(self, data: bytes, pos: int) -> int:
        """A content block that :meth:`_whole_block` could not decide: walk into it."""
        self._element_index += 1
        self._stack.append(_BLOCK)
        fast = _FAST_TYPE.match(data, pos)
        if fast is not None and fast.group(1) not in _FIELD_FOR:  # text, tool_use, ...
            self._decided, self._type = True, fast.group(1)
            self._on_element(pos)
            self._state, self._in_string, self._depth, self._skip_block = "skip", False, 1, True
            return fast.end()
        self._type, self._fields, self._decided = None, {}, False
        self._on_block_start(pos)
        if fast is None:
            self._state = "key-or-end"
            return pos + 1
        self._type, self._state = fast.group(1), "after"
        return fast.end()

    def _close(self, pos: int) -> int:
        """A container of interest ends with the byte at ``pos``."""
        kind = self._stack[-1]
        if kind == _CONTENT:
            self._on_content_end(pos)
        pos += 1
        if kind == _BLOCK:
            return self._end_block(pos)
        self._stack.pop()
        self._state = "after" if self._stack else "rest"
        return pos

    def _end_block(self, pos: int) -> int:
        self._stack.pop()
        if not self._decided:
            self._decide(pos)
        self._on_block_end(pos)
        self._state = "after"
        return pos

    def _give_up(self, pos: int) -> int:
        """Not JSON past here: send everything as it is (what was decided stays decided)."""
        self._flush(pos)
        if self._sink == _HOLD:
            self._out.append(bytes(self._held))
            self._held.clear()
        self._out.append(b" " * self._pending)
        self._pending, self._sink, self._state = 0, _PASS, "rest"
        return len(self._data)

    # -- strings and skipping ----------------------------------------------------------------------

    def _string_end(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Advance through a string's raw content; True once its closing quote is consumed."""
        size = len(data)
        if self._escape:
            if pos >= size:
                return pos, False
            pos += 1
            self._escape = False
        end = _closing_quote(data, pos)
        if end >= 0:
            return end, True
        back = size
        while back > pos and data[back - 1] == 0x5C:
            back -= 1
        self._escape = (size - back) % 2 == 1  # the piece ends inside an escape
        return size, False

    def _keep(self, data: bytes, start: int, stop: int, limit: int) -> None:
        room = limit - len(self._token)
        if room > 0:
            self._token += data[start : min(stop, start + room)]
        self._token_len += stop - start

    def _decoded(self, limit: int) -> bytes | None:
        if self._token_len > limit:
            return None
        raw = bytes(self._token)
        if b"\\" not in raw:
            return raw
        try:
            text: str = json.loads(b'"' + raw + b'"')
            return text.encode("utf-8", "surrogatepass")
        except ValueError:
            return None

    def _key_string(self, data: bytes, pos: int) -> int:
        start = pos
        pos, closed = self._string_end(data, pos)
        self._keep(data, start, pos - 1 if closed else pos, _KEY_MAX)
        if closed:
            self._key, self._state = self._decoded(_KEY_MAX), "colon"
        return pos

    def _capture(self, data: bytes, pos: int) -> int:
        """Read a block's ``type``, ``signature`` or ``data`` string far enough to judge it."""
        start = pos
        pos, closed = self._string_end(data, pos)
        key = self._capture_key
        limit = _TYPE_MAX if key == b"type" else _MARK_RAW_MAX
        self._keep(data, start, pos - 1 if closed else pos, limit)
        if key == b"type":
            if not closed and self._token_len <= limit:
                return pos
            self._type = self._decoded(limit) or b""  # too long or undecodable: not thinking
        else:
            if not closed and self._token_len < limit:
                return pos
            self._fields[key] = (self._token_at, _mark_length(bytes(self._token)))
        if self._type is not None and (
            self._type not in _FIELD_FOR or _FIELD_FOR[self._type] in self._fields
        ):
            self._decide(pos)
            self._state, self._in_string, self._depth, self._skip_block = "skip", not closed, 1, True
        elif closed:
            self._state = "after"
        else:
            self._state, self._in_string, self._depth, self._skip_block = "skip", True, 0, False
        return pos

    def _skip(self, data: bytes, pos: int) -> int:
        """Skip a value (or the rest of a decided block), tracking nesting and strings."""
        size = len(data)
        while pos < size:
            if self._in_string:
                pos, closed = self._string_end(data, pos)
                if not closed:
                    return pos
                self._in_string = False
                if self._depth == 0:
                    return self._skipped(pos)
                continue
            pos = _SKIP_RUN.match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
            if pos >= size:
                return pos
            byte = data[pos]
            pos += 1
            if byte == _QUOTE:
                self._in_string = True
            elif byte in (_LBRACE, _LBRACKET):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._skipped(pos)
        return pos

    def _skipped(self, pos: int) -> int:
        if self._skip_block:
            self._skip_block = False
            return self._end_block(pos)
        self._state = "after"
        return pos

    # -- decisions -----------------------------------------------------------------------------------

    def _decide(self, pos: int) -> None:
        """The block's fate is known with the input before ``pos``."""
        self._decided = True
        name = _FIELD_FOR.get(self._type or b"")
        self._on_decided(pos, self._fields.get(name) if name else None)

    def _on_content_start(self) -> None:
        pass

    def _on_element(self, pos: int) -> None:
        """A content element that cannot be marked (not a thinking block) starts at ``pos``."""

    def _on_block_start(self, pos: int) -> None:
        self._hold(pos)

    def _on_decided(self, pos: int, field: tuple[int, int] | None) -> None:  # pragma: no cover
        """``field``: the signature (thinking) or data (redacted_thinking) as (offset, mark length)."""
        raise NotImplementedError

    def _on_block_end(self, pos: int) -> None:
        pass

    def _on_comma(self, pos: int) -> None:
        pass

    def _on_content_end(self, pos: int) -> None:
        pass


class Neutraliser(_Scanner):
    """Passthrough requests: blank the marked blocks, keep the length, keep Anthropic's blocks.

    ``changed`` tells whether anything was blanked (the ``cch`` hash then needs re-signing);
    ``removed`` lists the blanked blocks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[Removed] = []
        self.tool_use_messages: set[int] = set()  # messages with a tool_use block
        self._kept = False  # an element of the current content array stays
        self._foreign_pending = False  # the previous element was marked and nothing stays yet
        self._block_len = 0  # that element's length
        self._solid = (0, False, False)  # its solid length so far: see _count_solid

    def _on_content_start(self) -> None:
        self._kept = self._foreign_pending = False

    def _on_element(self, pos: int) -> None:
        if self._type == b"tool_use":
            self.tool_use_messages.add(self._message_index)
        self._release(pos)
        self._kept = True

    def _on_block_start(self, pos: int) -> None:
        if self._sink == _PASS:  # else the comma before it is held already
            self._hold(pos)

    @property
    def foreign_tool_turn(self) -> bool:
        """The final assistant turn uses a tool and lost its leading thinking block (it was the
        target's): with thinking on, Anthropic requires that turn to start with one."""
        last = self._message_index
        return any(Removed(m, 0) in self.removed for m in self.tool_use_messages if m >= last - 1)

    def _on_decided(self, pos: int, field: tuple[int, int] | None) -> None:
        if self._type == b"tool_use":
            self.tool_use_messages.add(self._message_index)
        if field is None or not field[1]:
            self._release(pos)
            self._kept = True
            return
        self.changed = True
        self.removed.append(Removed(self._message_index, self._element_index))
        self._flush(pos)
        if self._kept:  # blank ",block": spaces from here to the block's end
            self._out.append(b" " * len(self._held))
            self._sink = _BLANK
        else:  # blank "block," unless it turns out to be the last of an all-foreign array
            self._pending += len(self._held)
            self._solid = _count_solid(self._held, 0, len(self._held), (0, False, False))
            self._sink, self._foreign_pending = _PEND, True
        self._held.clear()

    def _flush(self, pos: int) -> None:
        if self._sink == _PEND and self._solid[0] < len(OMITTED):
            self._solid = _count_solid(self._data, self._mark, pos, self._solid)
        super()._flush(pos)

    def _on_block_end(self, pos: int) -> None:
        if self._sink == _BLANK:
            self._switch(pos, _PASS)
        elif self._sink == _PEND:
            self._flush(pos)
            self._block_len = self._pending

    def _on_comma(self, pos: int) -> None:
        if self._foreign_pending:
            self._switch(pos + 1, _PASS)  # the comma goes with the marked block before it
            self._out.append(b" " * self._pending)
            self._pending, self._foreign_pending = 0, False
        elif self._kept:
            self._hold(pos)  # the comma goes with the next block if that one is marked

    def _on_content_end(self, pos: int) -> None:
        if self._foreign_pending:  # every element was marked: the last becomes a text block
            self._switch(pos, _PASS)
            replacement = _replacement(self._block_len, self._solid[0])
            self._out.append(replacement + b" " * (self._pending - self._block_len))
            self._pending, self._foreign_pending = 0, False


class Unmarker(_Scanner):
    """Intercepted requests: strip the mark from the target's signatures, keep the length.

    Unmarked signatures (Anthropic's, sent to the target) are left alone.
    """

    def _on_decided(self, pos: int, field: tuple[int, int] | None) -> None:
        if field is None or not field[1]:
            self._release(pos)
            return
        self._flush(pos)
        held, (at, size) = self._held, field
        at -= self._held_at
        held[at : at + 1 + size] = b" " * size + b'"'
        self.changed = True
        self._release(pos)


class _Marker(_Scanner):
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


def _run(scanner: _Scanner, body: bytes) -> bytes:
    return scanner.feed(body) + scanner.finish()


def neutralise(body: bytes) -> bytes:
    """One-shot :class:`Neutraliser` (tests, whole bodies)."""
    return _run(Neutraliser(), body)


def unmark(body: bytes) -> bytes:
    """One-shot :class:`Unmarker`."""
    return _run(Unmarker(), body)


def mark_message(body: bytes) -> bytes:
    """A complete JSON message response with the target's signatures marked (longer by the marks).

    A message without thinking blocks is returned as it is without a scan: both block types
    spell "thinking" in their type, unless written with ``\\u`` escapes.
    """
    if b"thinking" not in body and b"\\u" not in body:
        return body
    return _run(_Marker(), body)


_ESCAPED_MARK_CHAR = re.compile(rb"\\u00(?:63|6[dD]|31|2[eE])")  # c, m, 1 or . spelled as an escape


def cannot_hold_a_mark(body: bytes) -> bool:
    """True when no signature in ``body`` can carry :data:`MARK`: then every request transform
    here is the identity, and a whole body in hand need not be scanned at all."""
    return MARK not in body and _ESCAPED_MARK_CHAR.search(body) is None


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


_THINKING_KEY = b'"thinking":{'
_THINKING_ON = (b'"type":"enabled"', b'"type":"adaptive"')
_BRACE = re.compile(rb"[{}]")


def _thinking_on(tail: bytes) -> tuple[int, int] | None:
    """Where the last ``"thinking":{...}`` member (no braces inside) that turns thinking on is,
    with the comma after it if there is one.

    Each candidate is looked at only up to its next brace, and those stretches do not overlap:
    linear time, where one pattern with two unbounded runs backtracked quadratically on a tail
    of ``"type":"enabled"`` without a closing brace.
    """
    end = len(tail)
    while (start := tail.rfind(_THINKING_KEY, 0, end)) >= 0:
        inner = start + len(_THINKING_KEY)
        brace = _BRACE.search(tail, inner)
        if brace is not None and brace.group() == b"}":
            close = brace.start()
            if any(tail.find(on, inner, close) >= 0 for on in _THINKING_ON):
                return start, close + 1 + (tail[close + 1 : close + 2] == b",")
        end = start
    return None


def thinking_off_if(neutraliser: Neutraliser, tail: bytes) -> bytes:
    """Turn thinking off for a request whose final tool-use turn was the target's: Anthropic
    would refuse it otherwise ("a final assistant message must start with a thinking block").
    The top-level ``thinking`` member (after the messages and the ``cch`` placeholder in Claude
    Code's order, so inside the held tail) is blanked, same length; the hash is re-signed."""
    if not neutraliser.foreign_tool_turn:
        return tail
    found = _thinking_on(tail)
    if found is None:
        return tail
    start, end = found
    if tail[end - 1] != _COMMA:  # the last member: its comma goes before it
        comma = tail.rfind(b",", 0, start)
        start = comma if comma >= 0 and not tail[comma + 1 : start].strip() else start
    return tail[:start] + b" " * (end - start) + tail[end:]
