"""Walking JSON bytes piece by piece without parsing them: where a string closes, and how a
value is stepped over. Shared by the streaming stages that look for a few things in a body
(:mod:`cmm.core.thinking_scan`, :mod:`cmm.core.billing_line`) and pass the rest at C speed.
"""

from __future__ import annotations

import re

_QUOTE, _LBRACE, _LBRACKET = 0x22, 0x7B, 0x5B
# Runs without brackets, short strings without escapes included; longer strings go to find().
SKIP_RUN = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]{0,256}+")*+')
_WINDOW, _WINDOW_MAX = 1024, 256 * 1024
# A quote not behind exactly one backslash: the search jumps from quote to quote in C.
_QUOTE_CANDIDATE = re.compile(rb'"(?<![^\\]\\")')


def closing_quote(data: bytes, pos: int) -> int:
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
    """:func:`closing_quote` at any escape density: growing windows are flattened (escaped
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


def value_end(data: bytes, pos: int) -> int:
    """Just past the bracket that closes the container open at ``pos``; -1 if not in ``data``.

    The same walk as :meth:`ValueSkipper._skip_value`, for a value that is whole in the piece.
    """
    size, depth = len(data), 1
    while True:
        pos = SKIP_RUN.match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
        if pos >= size:
            return -1
        byte = data[pos]
        if byte == _QUOTE:
            pos = closing_quote(data, pos + 1)
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


class ValueSkipper:
    """The state of a string or value being stepped over across pieces, for a streaming stage."""

    def __init__(self) -> None:
        self._escape = False  # the piece ended inside an escape of the string being read
        self._in_string = False
        self._depth = 0

    def _begin_skip(self, byte: int) -> bool:
        """Start stepping over the value whose first byte is ``byte`` (a string or a container);
        False for anything else, which the caller reads itself (a scalar) or gives up on."""
        self._escape = False
        if byte == _QUOTE:
            self._in_string, self._depth = True, 0
        elif byte in (_LBRACE, _LBRACKET):
            self._in_string, self._depth = False, 1
        else:
            return False
        return True

    def _string_end(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Advance through a string's raw content; True once its closing quote is consumed."""
        size = len(data)
        if self._escape:
            if pos >= size:
                return pos, False
            pos += 1
            self._escape = False
        end = closing_quote(data, pos)
        if end >= 0:
            return end, True
        back = size
        while back > pos and data[back - 1] == 0x5C:
            back -= 1
        self._escape = (size - back) % 2 == 1  # the piece ends inside an escape
        return size, False

    def _skip_value(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Step over a value (a string when ``_in_string`` with ``_depth`` 0, else a container
        ``_depth`` deep), tracking nesting and strings; True once it has ended."""
        size = len(data)
        while pos < size:
            if self._in_string:
                pos, closed = self._string_end(data, pos)
                if not closed:
                    return pos, False
                self._in_string = False
                if self._depth == 0:
                    return pos, True
                continue
            pos = SKIP_RUN.match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
            if pos >= size:
                return pos, False
            byte = data[pos]
            pos += 1
            if byte == _QUOTE:
                self._in_string = True
            elif byte in (_LBRACE, _LBRACKET):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return pos, True
        return pos, False
