"""Thinking blocks across providers, part one: the JSON walk down to content blocks, sans-IO.

A session can send one conversation to Anthropic and to the target. Anthropic rejects thinking
blocks whose signature it did not make ("Invalid `signature` in `thinking` block") and wants its
own back byte for byte; the target may want its own back too. Workers share no state, so the
signature itself records where a block came from: responses from the target get the prefix
:data:`MARK` (:mod:`cmm.core.thinking_marks`), passthrough requests lose the marked blocks and
intercepted requests lose the mark (:mod:`cmm.core.thinking_edits`). Each of them is a
:class:`Scanner` that decides what to do with each block.

The walk is incremental: it holds back only the content block whose fate is not known yet (with
the comma before it, which may go with it), and the blanks of a marked block with no kept block
before it until the next ``,`` or ``]``; everything else goes out at once. The output depends on
the body only, never on how it was split, so the same history is edited the same way on every
turn (Anthropic binds thinking blocks to the conversation before them). Blocks may have any key
order, whitespace and string escapes; Claude Code's form
(``{"type":"thinking","thinking":"...","signature":"..."}``) is decided after its first member
or at its signature. Duplicate keys in a block: the first ``type``, ``signature`` or ``data``
counts. Skipping runs in C: a regular expression jumps over runs between brackets (short strings
included), another from quote to quote in long strings; Claude Code's spelling of messages,
blocks and keys is matched in one step, and a block in that spelling that ends in the piece at
hand is decided whole, without the general walk. No pattern here has nested or overlapping
unbounded runs: whatever a client or a target sends is scanned in linear time, and JSON nested
past the parser's limit passes as it is.
"""

from __future__ import annotations

import json
import re

from cmm.core.json_walk import ValueSkipper, closing_quote, value_end

MARK = b"cmm1."  # "cmm", version 1: signatures made by the target, as cmm relayed them

_MARK_RAW_MAX = 6 * len(MARK)  # each character of the mark is at most a \uXXXX escape
_KEY_MAX = 64
_TYPE_MAX = 64
_FIELD_FOR = {b"thinking": b"signature", b"redacted_thinking": b"data"}
_CAPTURED = (b"type", b"signature", b"data")

_WS_BYTES = frozenset(b" \t\r\n")
_SCALAR_START = frozenset(b"-0123456789tfn")
_WS = re.compile(rb"[ \t\r\n]*")
# Claude Code's spelling of a message and of a block's first member: decided in one step.
_FAST_MESSAGE = re.compile(rb'\{"role":"[a-z]{1,16}","content":\[')
_FAST_TYPE = re.compile(rb'\{"type":"([a-z_]{1,32})"')
_FAST_KEY = re.compile(rb'"([A-Za-z_]{1,32})":')
_SCALAR_END = re.compile(rb"[,}\] \t\r\n]")
_ESCAPES = {  # the byte an escape letter stands for, \uXXXX aside
    0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09,
}

_QUOTE, COMMA, _COLON = 0x22, 0x2C, 0x3A
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = 0x7B, 0x7D, 0x5B, 0x5D
_ROOT, _MESSAGES, _MESSAGE, _CONTENT, _BLOCK = range(5)
_OBJECTS = (_ROOT, _MESSAGE, _BLOCK)
PASS, HOLD, BLANK, PEND = range(4)  # where processed input goes: out, held, spaces, counted


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


def count_solid(
    data: bytes | bytearray, pos: int, stop: int, state: tuple[int, bool, bool], limit: int
) -> tuple[int, bool, bool]:
    """Count a block's bytes in ``data[pos:stop]`` that are not whitespace between tokens, up to
    ``limit``.

    ``state`` is (count, inside a string, after a backslash in it), carried across pieces. Only
    the first bytes are looked at and whitespace runs are jumped in C: the cost is bounded.
    """
    count, in_string, escape = state
    while count < limit and pos < stop:
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


class Scanner(ValueSkipper):
    """Walk a JSON body incrementally down to content blocks; subclasses decide what to do.

    Blocks are ``messages[*].content[*]`` in requests, ``content[*]`` in responses. Processed
    input goes to a sink: straight out, held (while a block is examined), out as spaces, or
    counted as spaces whose output waits (a marked block that may yet become the replacement).
    """

    _response = False

    def __init__(self) -> None:
        super().__init__()
        self.changed = False
        self._state = "value"
        self._stack: list[int] = []
        self._key: bytes | None = None
        self._token = bytearray()  # raw bytes of the key or captured value being read (capped)
        self._token_len = 0  # its full raw length
        self._token_at = 0  # absolute offset of the captured value's opening quote
        self._capture_key = b""
        self._skip_block = False  # the skip in progress ends with the current block
        self._type: bytes | None = None
        self._fields: dict[bytes, tuple[int, int]] = {}  # key -> (quote offset, raw mark length)
        self._decided = False
        self._message_index = -1
        self._element_index = -1
        self._sink = PASS
        self._held = bytearray()
        self._held_at = 0  # absolute offset of the first held byte
        self._hold_from = -1  # a hold begun here in this piece, its bytes not yet moved (see _hold)
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
        self._pending, self._sink, self._state = 0, PASS, "rest"
        return out

    # -- sinks -------------------------------------------------------------------------------------

    def _flush(self, pos: int) -> None:
        start = self._hold_from
        if start >= 0:  # a lazy hold: what came before it passes, what came since is held now
            self._hold_from = -1
            if start > self._mark:
                self._out.append(self._data[self._mark : start])
            self._mark = start
        if pos > self._mark:
            sink = self._sink
            if sink == PASS:
                self._out.append(self._data[self._mark : pos])
            elif sink == HOLD:
                self._held += self._data[self._mark : pos]
            elif sink == BLANK:
                self._out.append(b" " * (pos - self._mark))
            else:
                self._pending += pos - self._mark
            self._mark = pos

    def _switch(self, pos: int, sink: int) -> None:
        self._flush(pos)
        self._sink = sink

    def _hold(self, pos: int) -> None:
        """Hold from ``pos``. Coming from PASS, nothing moves yet: most holds (a comma, a block
        decided in the same piece) are released unedited, and the bytes before and after then
        go out as one slice; any flush moves them first."""
        if self._sink == PASS:
            self._sink, self._hold_from = HOLD, pos
        else:
            self._switch(pos, HOLD)
        self._held_at = self._consumed + pos

    def _release(self, pos: int) -> None:
        """Send what is held (edited or not) and pass from ``pos`` on."""
        if self._sink == HOLD:
            if not self._held:  # all held bytes are in this piece, unedited: they just pass
                self._sink, self._hold_from = PASS, -1
                return
            self._switch(pos, PASS)
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
        if byte == COMMA and state == "after":
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
        self._skip_block = False
        if self._begin_skip(byte):
            self._state = "skip"
            return pos + 1
        if byte in _SCALAR_START:
            self._state = "scalar"
            return pos
        return self._give_up(pos)

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
            text_end = closing_quote(data, start + 13)
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
            end = value_end(data, start)
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
        if self._sink == HOLD:
            self._out.append(bytes(self._held))
            self._held.clear()
        self._out.append(b" " * self._pending)
        self._pending, self._sink, self._state = 0, PASS, "rest"
        return len(self._data)

    # -- strings and skipping ----------------------------------------------------------------------

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
        pos, done = self._skip_value(data, pos)
        return self._skipped(pos) if done else pos

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


def run_whole(scanner: Scanner, body: bytes) -> bytes:
    """A whole body through a fresh scanner (one-shot transforms, tests)."""
    return scanner.feed(body) + scanner.finish()
