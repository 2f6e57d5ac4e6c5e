"""The billing line of an intercepted request, as Claude Code writes it for a gateway.

Claude Code opens ``system`` with a text block ``x-anthropic-billing-header: cc_version=<build>;
cc_entrypoint=<entrypoint>;``. When it believes it talks to Anthropic itself, as it does through
cmm, it appends per-request fields: the body hash ``cch``, the previous request's id, a prompt
id, prompt and turn counters and more. A target's prompt cache is keyed on the prompt from its
first byte, so with those fields in the first block no turn ever hits it there. On intercepted
routes :class:`BillingLine` rewrites the line to the gateway form, the line Claude Code sends
when ``ANTHROPIC_BASE_URL`` points elsewhere.

The rule is a keep-list: :data:`STABLE_FIELDS` (``cc_version``, ``cc_entrypoint``) stay, every
other field goes. Those two make up the gateway form and are the same on every turn of a
conversation (the build, with a fingerprint of the conversation's first prompt, and how Claude
Code was started); the others are added only for Anthropic and new ones come with new releases
(``cc_workload``, ``cc_is_subagent``...). A drop-list would let the next such field break the
target's cache without anyone noticing; a keep-list cannot.

Only the line is touched, and only where Claude Code puts it: the ``text`` of the first element
of the top-level ``system`` array, starting with :data:`PREFIX`, in the plain ``name=value;``
form (no escapes). Anything else, in ``system`` or elsewhere (a message quoting such a line),
passes as it is. The walk is incremental and holds back only the line itself: the output does
not depend on how the body is split. Past the first system block it stops looking and passes
the rest at no cost.
"""

from __future__ import annotations

import json
import re

from cmm.core.json_walk import ValueSkipper

PREFIX = b"x-anthropic-billing-header:"
STABLE_FIELDS = frozenset({b"cc_version", b"cc_entrypoint"})
LINE_MAX = 4096  # a longer first block is not a billing line: it passes as it is

_FIELD = re.compile(rb" *+([A-Za-z0-9_]++)=([^;\"\\]*+);")
_TRAILING = re.compile(rb" *+")
_WS = re.compile(rb"[ \t\r\n]*+")
_SCALAR_END = re.compile(rb"[,}\] \t\r\n]")
_SCALAR_START = frozenset(b"-0123456789tfn")
_WS_BYTES = frozenset(b" \t\r\n")
_KEY_MAX = 32

_ROOT, _SYSTEM, _BLOCK = range(3)
_QUOTE, _COMMA, _COLON = 0x22, 0x2C, 0x3A
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = 0x7B, 0x7D, 0x5B, 0x5D


def gateway_form(line: bytes) -> bytes:
    """The billing line (a JSON string's raw content) with only :data:`STABLE_FIELDS`; any other
    content, or a line not in the plain ``name=value;`` form, is returned as it is."""
    if not line.startswith(PREFIX):
        return line
    fields, pos = [], len(PREFIX)
    while (found := _FIELD.match(line, pos)) is not None:
        fields.append((found.group(1), found.group(2)))
        pos = found.end()
    if _TRAILING.match(line, pos).end() != len(line):  # type: ignore[union-attr]  # matches the empty string
        return line  # not the form Claude Code writes: nothing here is known to be per request
    if all(name in STABLE_FIELDS for name, _ in fields):
        return line  # the gateway form already, kept byte for byte
    return PREFIX + b"".join(b" %s=%s;" % (name, value) for name, value in fields if name in STABLE_FIELDS)


class BillingLine(ValueSkipper):
    """A streaming stage (``feed``/``finish``): the body with its billing line in gateway form.

    The body keeps its length, so its framing: the bytes the line loses come back as spaces
    after its closing quote, whitespace between JSON tokens that no parser passes on (the
    target reads the same system text on every turn). ``changed`` tells whether the line was
    rewritten.
    """

    def __init__(self) -> None:
        super().__init__()
        self.changed = False
        self._state = "value"
        self._stack: list[int] = []
        self._member = b""  # the current member's key, decoded
        self._key = bytearray()  # raw bytes of the key being read (capped)
        self._key_len = 0
        self._held: bytearray | None = None  # the line's raw content, while it is read
        self._out: list[bytes] = []
        self._mark = 0  # the first byte of the piece not yet given out (or held)

    def feed(self, data: bytes) -> bytes:
        if self._state == "done":
            return data
        data = bytes(data)
        self._out, self._mark = [], 0
        pos, size = 0, len(data)
        while pos < size and self._state != "done":
            state = self._state
            if state == "skip":
                pos = self._skip(data, pos)
            elif state == "text":
                pos = self._text(data, pos)
            elif state == "key-string":
                pos = self._key_string(data, pos)
            elif state == "scalar":
                found = _SCALAR_END.search(data, pos)
                pos, self._state = (size, state) if found is None else (found.start(), "after")
            else:
                pos = _WS.match(data, pos).end()  # type: ignore[union-attr]  # matches the empty string
                if pos < size:
                    pos = self._token(data, pos, state)
        self._out.append(data[self._mark :])
        out, self._out = self._out, []
        return b"".join(out)

    def finish(self) -> bytes:
        """The body ended: a line still held (a truncated body) goes as it came."""
        held, self._held, self._state = self._held, None, "done"
        return bytes(held) if held is not None else b""

    # -- structure: the root object, its system array and that array's first block ----------------

    def _token(self, data: bytes, pos: int, state: str) -> int:
        byte = data[pos]
        if state == "value":
            return self._value(data, pos, byte)
        if state == "elem-or-end":
            if byte == _RBRACKET:
                return self._done(pos)
            return self._value(data, pos, byte)
        if state in ("key-or-end", "key"):
            if byte == _QUOTE:
                self._state, self._key_len, self._escape = "key-string", 0, False
                self._key.clear()
                return pos + 1
            return self._done(pos)  # "}" ends the object (nothing more to look for) or not JSON
        if state == "colon":
            if byte != _COLON:
                return self._done(pos)
            self._state = "value"
            return pos + 1
        # "after" a value: only the root and the first block have further members to look at
        if byte == _COMMA and self._stack[-1] != _SYSTEM:
            self._state = "key"
            return pos + 1
        return self._done(pos)

    def _value(self, data: bytes, pos: int, byte: int) -> int:
        stack = self._stack
        if not stack:
            if byte != _LBRACE:
                return self._done(pos)
            stack.append(_ROOT)
            self._state = "key-or-end"
            return pos + 1
        kind = stack[-1]
        if kind == _ROOT and self._member == b"system" and byte == _LBRACKET:
            stack.append(_SYSTEM)
            self._state = "elem-or-end"
            return pos + 1
        if kind == _SYSTEM:  # its first element: a block, or nothing to look for
            if byte != _LBRACE:
                return self._done(pos)
            stack.append(_BLOCK)
            self._state = "key-or-end"
            return pos + 1
        if kind == _BLOCK and self._member == b"text" and byte == _QUOTE:
            self._out.append(data[self._mark : pos + 1])
            self._mark, self._held, self._state, self._escape = pos + 1, bytearray(), "text", False
            return pos + 1
        if self._begin_skip(byte):
            self._state = "skip"
            return pos + 1
        if byte in _SCALAR_START:
            self._state = "scalar"
            return pos
        return self._done(pos)

    def _done(self, pos: int) -> int:
        """Nothing more to look for (or not JSON past here): the rest passes as it is."""
        self._state = "done"
        return pos

    # -- strings and skipping -------------------------------------------------------------------

    def _key_string(self, data: bytes, pos: int) -> int:
        start = pos
        pos, closed = self._string_end(data, pos)
        stop = pos - 1 if closed else pos
        room = _KEY_MAX - len(self._key)
        if room > 0:
            self._key += data[start : min(stop, start + room)]
        self._key_len += stop - start
        if closed:
            self._member, self._state = self._decoded_key(), "colon"
        return pos

    def _decoded_key(self) -> bytes:
        raw = bytes(self._key)
        if self._key_len > _KEY_MAX or b"\\" not in raw:
            return raw if self._key_len <= _KEY_MAX else b""
        try:
            return str(json.loads(b'"' + raw + b'"')).encode("utf-8", "surrogatepass")
        except ValueError:
            return b""

    def _skip(self, data: bytes, pos: int) -> int:
        """Skip a value, tracking nesting and strings; the long runs go by in C."""
        pos, done = self._skip_value(data, pos)
        if done:
            self._state = "after"
        return pos

    def _text(self, data: bytes, pos: int) -> int:
        """The first block's text: held while it may be the billing line, rewritten once whole."""
        held = self._held
        assert held is not None
        start = pos
        pos, closed = self._string_end(data, pos)
        held += data[start : pos - 1 if closed else pos]
        self._mark = pos
        if closed:
            line = gateway_form(bytes(held)) if len(held) <= LINE_MAX else bytes(held)
            self.changed = len(line) != len(held)
            self._out.append(line + b'"' + b" " * (len(held) - len(line)))
            self._held = None
            return self._done(pos)
        if not (held.startswith(PREFIX) or PREFIX.startswith(held)) or len(held) > LINE_MAX:
            self._out.append(bytes(held))  # not the billing line: it goes as it came
            self._held = None
            return self._done(pos)
        return pos


def to_gateway_form(body: bytes) -> bytes:
    """One-shot :class:`BillingLine` over a whole body."""
    stage = BillingLine()
    return stage.feed(body) + stage.finish()
