"""Claude Code's body hash: the ``cch=`` value in the first system block.

Claude Code 2.1.3xx signs each messages body (see CLAUDE_CODE_TRAFFIC.md): xxHash64 with a fixed
seed over the body's raw bytes after three edits — the 5 hex digits after the first ``cch=``
zeroed, every string value of a ``"model"`` key (at any depth) emptied, and the members
``max_tokens``, ``fallbacks`` and ``fallback_credit_token`` removed with their comma — and the
low 20 bits, as 5 lowercase hex digits, replace the placeholder. Rewriting ``model`` therefore
keeps the hash valid; any other change cmm makes to a body bound for api.anthropic.com must
re-sign it with :func:`resign`, or the request is no longer what Claude Code would have sent.
"""

from __future__ import annotations

import re
from typing import Callable

import xxhash

SEED = 0x4D659218E32A3268
UNSIGNED_MEMBERS = frozenset({b"max_tokens", b"fallbacks", b"fallback_credit_token"})
_MARK = b"cch="
_HASH = re.compile(rb"cch=([0-9a-f]{5})")
_TOKEN = re.compile(rb'[ \t\r\n]*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([{}\[\],:])|([^ \t\r\n{}\[\],:"]+))')
_COMMA_AFTER = re.compile(rb"[ \t\r\n]*,")


def _edits(body: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, replacement) spans for the model and unsigned-member edits, in order."""
    edits: list[tuple[int, int, bytes]] = []
    # Each open container: [is_object, expecting_key, current_key, member_start, comma_before]
    stack: list[list] = []
    pos = 0
    size = len(body)
    while pos < size:
        match = _TOKEN.match(body, pos)
        if match is None or match.end() == pos:
            break  # not JSON past here: sign what was understood, as the raw-byte edits would
        start = match.start(match.lastindex)
        pos = match.end()
        string, punct, _scalar = match.groups()
        top = stack[-1] if stack else None
        if punct in (b"{", b"["):
            stack.append([punct == b"{", True, None, None, None])
            continue
        if punct in (b"}", b"]"):
            stack.pop() if stack else None
            value_end = pos
            top = stack[-1] if stack else None
            if top is not None and top[0] and not top[1]:
                _member_done(body, top, value_end, edits)
            continue
        if punct == b",":
            if top is not None and top[0]:
                top[1], top[4] = True, start
            continue
        if punct == b":":
            continue
        if top is not None and top[0] and top[1]:  # a key
            top[1], top[2], top[3] = False, string[1:-1] if string else None, start
            continue
        if top is not None and top[0]:  # a scalar or string value of a member
            if top[2] == b"model" and string is not None:
                edits.append((start, pos, b'""'))
            _member_done(body, top, pos, edits)
    return edits


def _member_done(body: bytes, top: list, value_end: int, edits: list[tuple[int, int, bytes]]) -> None:
    """An unsigned member is removed whole: the edits inside it go.

    Edits are made in body order and none starts past ``value_end`` yet, so the ones inside the
    member are the last in the list: popped, never a rebuild of the list per member (which took
    quadratic time on a body with many of them).
    """
    key, member_start, comma = top[2], top[3], top[4]
    if key in UNSIGNED_MEMBERS and member_start is not None:
        if comma is not None:  # ,"max_tokens":32000 — drop it with the comma before it
            start, end = comma, value_end
        else:  # the first member: drop it with the comma after it
            after = _COMMA_AFTER.match(body, value_end)
            start, end = member_start, after.end() if after else value_end
        while edits and edits[-1][0] >= start:
            edits.pop()
        edits.append((start, end, b""))
    top[2], top[3], top[4] = None, None, None


def signing_form(body: bytes) -> bytes:
    """The bytes the hash is taken over."""
    zeroed = _HASH.sub(b"cch=00000", body, count=1)
    out = bytearray()
    last = 0
    for start, end, replacement in sorted(_edits(zeroed)):
        if start < last:
            continue
        out += zeroed[last:start] + replacement
        last = end
    out += zeroed[last:]
    return bytes(out)


def compute(body: bytes) -> str:
    return "%05x" % (xxhash.xxh64_intdigest(signing_form(body), seed=SEED) & 0xFFFFF)


def current(body: bytes) -> str | None:
    match = _HASH.search(body)
    return match.group(1).decode() if match else None


def is_valid(body: bytes) -> bool:
    value = current(body)
    return value is not None and value == compute(body)


def resign(body: bytes) -> bytes:
    """The body with its ``cch`` recomputed (same length); unsigned bodies are returned as they are."""
    match = _HASH.search(body)
    if match is None:
        return body
    return body[: match.start(1)] + compute(body).encode() + body[match.end(1) :]


class Resigner:
    """A streaming stage that re-signs a body changed by an earlier stage, in the same pass.

    The hash covers the whole body, but the ``cch=`` placeholder sits in the first system block,
    after the messages in Claude Code's key order: everything before the first ``cch=`` goes out
    at once, everything from it on is held until the body ends, and is re-signed then if
    ``changed()`` says an earlier stage edited the body. What went out is kept for the hash, by
    reference: the pieces pass through uncopied, so a body that needs no re-signing costs a
    ``find`` per piece. Bodies without ``cch=`` are held back not at all.
    """

    def __init__(self, changed: Callable[[], bool], edit_held: Callable[[bytes], bytes] | None = None) -> None:
        """``edit_held`` may change the held tail (same length) before it is signed."""
        self._changed = changed
        self._edit_held = edit_held
        self._sent: list[bytes] = []  # what went out, for the hash
        self._held: list[bytes] | None = None  # from the first ``cch=`` on
        self._carry = b""  # the end of what came that may begin a ``cch=`` split across pieces

    def feed(self, data: bytes) -> bytes:
        if self._held is not None:
            self._held.append(bytes(data))
            return b""
        text = self._carry + data if self._carry else bytes(data)
        found = text.find(_MARK)
        if found >= 0:
            self._carry, self._held = b"", [text[found:]]
            out = text[:found]
        else:
            keep = next((k for k in range(len(_MARK) - 1, 0, -1) if text.endswith(_MARK[:k])), 0)
            self._carry, out = (text[-keep:], text[:-keep]) if keep else (b"", text)
        self._sent.append(out)
        return out

    def finish(self) -> bytes:
        """The rest, re-signed if need be; the pieces kept for the hash are let go (the stage
        lives on with its connection while a long answer streams back)."""
        sent, self._sent = self._sent, []
        if self._held is None:
            out, self._carry = self._carry, b""
            return out
        tail = b"".join(self._held)
        if self._edit_held is not None:
            tail = self._edit_held(tail)
        if self._changed():
            prefix = b"".join(sent)
            tail = resign(prefix + tail)[len(prefix) :]
        self._held = []
        return tail
