"""Thinking blocks across providers, the request side: neutralise, unmark, turn thinking off.

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
* **Thinking off** (:func:`thinking_off_if`) for a passthrough request whose final tool-use turn
  lost its thinking block.

Both transforms are :class:`~cmm.core.thinking_scan.Scanner` walks: incremental, and the same
output however the body is split.
"""

from __future__ import annotations

import re

import attrs

from cmm.core.thinking_scan import BLANK, COMMA, MARK, PASS, PEND, Scanner, count_solid, run_whole

OMITTED = b'{"type":"text","text":"[thinking from another model omitted]"}'
OMITTED_SHORT = b'{"type":"text","text":"."}'  # Anthropic rejects empty text blocks


def _replacement(size: int, solid: int) -> bytes:
    """A text block padded to ``size`` bytes, standing in for a turn that was all foreign.

    The choice goes by ``solid``, the block's length without whitespace between tokens, so that
    the same block gets the same text however it is spaced.
    """
    for block in (OMITTED, OMITTED_SHORT):
        if solid >= len(block):
            return block + b" " * (size - len(block))
    return b" " * size  # unreachable: a marked block is at least 39 bytes long


@attrs.frozen
class Removed:
    """A blanked block: its message's index in ``messages`` and its index in that ``content``."""

    message: int
    block: int


class Neutraliser(Scanner):
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
        self._solid = (0, False, False)  # its solid length so far: see count_solid

    def _on_content_start(self) -> None:
        self._kept = self._foreign_pending = False

    def _on_element(self, pos: int) -> None:
        if self._type == b"tool_use":
            self.tool_use_messages.add(self._message_index)
        self._release(pos)
        self._kept = True

    def _on_block_start(self, pos: int) -> None:
        if self._sink == PASS:  # else the comma before it is held already
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
            self._sink = BLANK
        else:  # blank "block," unless it turns out to be the last of an all-foreign array
            self._pending += len(self._held)
            self._solid = count_solid(self._held, 0, len(self._held), (0, False, False), len(OMITTED))
            self._sink, self._foreign_pending = PEND, True
        self._held.clear()

    def _flush(self, pos: int) -> None:
        if self._sink == PEND and self._solid[0] < len(OMITTED):
            self._solid = count_solid(self._data, self._mark, pos, self._solid, len(OMITTED))
        super()._flush(pos)

    def _on_block_end(self, pos: int) -> None:
        if self._sink == BLANK:
            self._switch(pos, PASS)
        elif self._sink == PEND:
            self._flush(pos)
            self._block_len = self._pending

    def _on_comma(self, pos: int) -> None:
        if self._foreign_pending:
            self._switch(pos + 1, PASS)  # the comma goes with the marked block before it
            self._out.append(b" " * self._pending)
            self._pending, self._foreign_pending = 0, False
        elif self._kept:
            self._hold(pos)  # the comma goes with the next block if that one is marked

    def _on_content_end(self, pos: int) -> None:
        if self._foreign_pending:  # every element was marked: the last becomes a text block
            self._switch(pos, PASS)
            replacement = _replacement(self._block_len, self._solid[0])
            self._out.append(replacement + b" " * (self._pending - self._block_len))
            self._pending, self._foreign_pending = 0, False


class Unmarker(Scanner):
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


def neutralise(body: bytes) -> bytes:
    """One-shot :class:`Neutraliser` (tests, whole bodies)."""
    return run_whole(Neutraliser(), body)


def unmark(body: bytes) -> bytes:
    """One-shot :class:`Unmarker`."""
    return run_whole(Unmarker(), body)


_ESCAPED_MARK_CHAR = re.compile(rb"\\u00(?:63|6[dD]|31|2[eE])")  # c, m, 1 or . spelled as an escape


def cannot_hold_a_mark(body: bytes) -> bool:
    """True when no signature in ``body`` can carry :data:`MARK`: then every request transform
    here is the identity, and a whole body in hand need not be scanned at all."""
    return MARK not in body and _ESCAPED_MARK_CHAR.search(body) is None


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
    if tail[end - 1] != COMMA:  # the last member: its comma goes before it
        comma = tail.rfind(b",", 0, start)
        start = comma if comma >= 0 and not tail[comma + 1 : start].strip() else start
    return tail[:start] + b" " * (end - start) + tail[end:]
