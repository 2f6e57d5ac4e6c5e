"""Sans-IO search for the top-level ``"model"`` string of a JSON request body.

Routing must not cost a parse of an 88 KB (or 32 MB) body. The finder walks the JSON structure
only as far as the top-level ``model`` member: Claude Code sends it first, so a few dozen bytes
usually decide. A ``"model"`` key nested in messages, tools or metadata is skipped with the rest
of its value. Escapes in keys and values are decoded exactly as ``json.loads`` does, whitespace
and key order are free. Skipping uses regular expressions that jump to the next byte that matters,
so a late ``model`` in a large body stays cheap.

Duplicate top-level ``model`` keys: the first one decides (``json.loads`` would keep the last);
reading a whole body to rule out a duplicate would defeat the design, and no client sends one.
"""

from __future__ import annotations

import json
import re

import attrs

MAX_KEY_BYTES = 64  # the longest spelling of "model" is 30 bytes (\u006d\u006f...)
MAX_MODEL_BYTES = 4096

_WS = re.compile(rb"[ \t\r\n]*")
_STRING_STOP = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'["\[\]{}]')
_SCALAR_END = re.compile(rb"[,}\] \t\r\n]")
# Claude Code's spelling: the body opens with a model name needing no escapes.
_MODEL_FIRST = re.compile(rb'\{"model":"([\x20\x21\x23-\x5b\x5d-\x7e]{0,%d})"' % MAX_MODEL_BYTES)


@attrs.frozen
class Found:
    """The model, and where its JSON string token (quotes included) sits in the body."""

    model: str
    start: int
    end: int


@attrs.frozen
class NotFound:
    reason: str


Result = Found | NotFound


class ModelFinder:
    """Feed body payload bytes in any split; ``feed`` returns a result once one is known."""

    def __init__(self) -> None:
        self.consumed = 0
        self.result: Result | None = None
        self._state = "start"
        self._token = bytearray()  # raw bytes of the key or model string being read
        self._token_start = 0
        self._escape = False  # the previous byte, possibly in an earlier feed, was a backslash
        self._in_string = False  # while skipping a value
        self._depth = 0
        self._key_is_model = False

    def finish(self) -> Result:
        """The body ended; whatever is undecided is not a routable model."""
        if self.result is None:
            self.result = NotFound("body ended before a top-level model")
        return self.result

    def feed(self, data: bytes) -> Result | None:
        if self.result is not None:
            return self.result
        if self.consumed == 0 and (first := _MODEL_FIRST.match(data)) is not None:  # decided at once
            self.consumed = len(data)
            return self._decide(Found(first.group(1).decode("ascii"), first.start(1) - 1, first.end(1) + 1))
        base = self.consumed
        self.consumed += len(data)
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state in ("start", "key-or-end", "key", "colon", "value", "after-value"):
                pos = _WS.match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
                if pos >= size:
                    break
                byte = data[pos]
                pos += 1
                if state == "start":
                    if byte != 0x7B:  # {
                        return self._decide(NotFound("body is not a JSON object"))
                    self._state = "key-or-end"
                elif state in ("key-or-end", "key"):
                    if byte == 0x22:  # "
                        self._state, self._escape = "key-string", False
                        self._token.clear()
                    elif byte == 0x7D and state == "key-or-end":  # }
                        return self._decide(NotFound("no top-level model"))
                    else:
                        return self._decide(NotFound("body is not valid JSON"))
                elif state == "colon":
                    if byte != 0x3A:  # :
                        return self._decide(NotFound("body is not valid JSON"))
                    self._state = "value"
                elif state == "value":
                    if self._key_is_model:
                        if byte != 0x22:
                            return self._decide(NotFound("model is not a string"))
                        self._state, self._escape = "model-string", False
                        self._token.clear()
                        self._token_start = base + pos - 1
                    elif byte == 0x22:
                        self._state, self._in_string, self._depth, self._escape = "skip", True, 0, False
                    elif byte in (0x7B, 0x5B):  # { [
                        self._state, self._in_string, self._depth = "skip", False, 1
                    else:
                        self._state = "skip-scalar"
                else:  # after-value
                    if byte == 0x2C:  # ,
                        self._state = "key"
                    elif byte == 0x7D:
                        return self._decide(NotFound("no top-level model"))
                    else:
                        return self._decide(NotFound("body is not valid JSON"))
            elif state in ("key-string", "model-string"):
                pos, closed = self._read_string(data, pos, state)
                if not closed:
                    if state == "model-string" and len(self._token) > MAX_MODEL_BYTES:
                        return self._decide(NotFound("model value too long"))
                    continue
                if state == "key-string" and len(self._token) > MAX_KEY_BYTES:
                    self._key_is_model, self._state = False, "colon"
                    continue
                try:
                    text = json.loads(b'"' + bytes(self._token) + b'"')
                except ValueError:
                    return self._decide(NotFound("body is not valid JSON"))
                if state == "model-string":
                    return self._decide(Found(text, self._token_start, base + pos))
                self._key_is_model = text == "model"
                self._state = "colon"
            elif state == "skip":
                pos = self._skip(data, pos)
            else:  # skip-scalar: numbers, true, false, null
                match = _SCALAR_END.search(data, pos)
                if match is None:
                    pos = size
                else:
                    pos, self._state = match.start(), "after-value"
        return None

    def _decide(self, result: Result) -> Result:
        self.result = result
        return result

    def _read_string(self, data: bytes, pos: int, state: str) -> tuple[int, bool]:
        """Advance through a string's raw bytes; True once its closing quote is consumed."""
        keep = state == "model-string" or len(self._token) <= MAX_KEY_BYTES
        while True:
            if self._escape:
                if pos >= len(data):
                    return pos, False
                if keep:
                    self._token += data[pos : pos + 1]
                pos += 1
                self._escape = False
            match = _STRING_STOP.search(data, pos)
            stop = len(data) if match is None else match.start()
            if keep:
                self._token += data[pos:stop]
            if match is None:
                return len(data), False
            if data[stop] == 0x22:
                return stop + 1, True
            if keep:
                self._token += b"\\"
            self._escape = True
            pos = stop + 1

    def _skip(self, data: bytes, pos: int) -> int:
        """Skip a string, object or array value (tracking nesting), until its end."""
        size = len(data)
        while pos < size:
            if self._in_string:
                if self._escape:
                    pos += 1
                    self._escape = False
                    continue
                match = _STRING_STOP.search(data, pos)
                if match is None:
                    return size
                pos = match.end()
                if data[pos - 1] == 0x5C:  # backslash
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 0:
                        self._state = "after-value"
                        return pos
            else:
                match = _STRUCTURE.search(data, pos)
                if match is None:
                    return size
                pos = match.end()
                byte = data[pos - 1]
                if byte == 0x22:
                    self._in_string = True
                elif byte in (0x7B, 0x5B):
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._state = "after-value"
                        return pos
        return pos


def find_model(body: bytes) -> Result:
    """One-shot form for whole bodies (tests, the CLI)."""
    finder = ModelFinder()
    return finder.feed(body) or finder.finish()
