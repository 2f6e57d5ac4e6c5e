"""Claude Code's body hash: the ``cch=`` value in the first system block.

Claude Code 2.1.3xx signs each messages body (tests/vectors holds bodies it signed): xxHash64 with a fixed
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
_KEYS = rb"(?:model|max_tokens|fallbacks|fallback_credit_token)"
# From ``pos`` to just past the colon (and spaces) of the next key that matters, stepping over
# everything else in C: runs without quotes, and whole strings that are not such a key. Each
# part is possessive and the parts cannot overlap, so nothing backtracks. ``.`` does not match
# a line feed, as in JSON a raw one cannot follow a backslash.
_TO_KEY = re.compile(
    rb'(?:[^"]++|"(?!' + _KEYS + rb'"[ \t\r\n]*:)(?:[^"\\]++|\\.)*+")*+"(' + _KEYS + rb')"[ \t\r\n]*:[ \t\r\n]*'
)
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_SCALAR = re.compile(rb'[^ \t\r\n{}\[\],:"]++')
_RUN = re.compile(rb'[^"\[\]{}]*+')
_COMMA_AFTER = re.compile(rb"[ \t\r\n]*,")
_WS = b" \t\r\n"


def _edits(body: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, replacement) spans for the model and unsigned-member edits, in body order.

    Only the keys that matter are looked at, found by one pattern that steps over the rest in
    C (a walk token by token cost some 20 times as much on a body of small tokens). A string
    ``model`` value is emptied; an unsigned member goes whole, with the comma before it (or,
    the first member, the one after it), and nothing inside it is looked at: each byte is
    looked at once. A body that ends inside an unsigned member is not JSON: the edits before
    it are kept.
    """
    edits: list[tuple[int, int, bytes]] = []
    pos = 0
    while (found := _TO_KEY.match(body, pos)) is not None:
        value = found.end()
        if found.group(1) == b"model":
            string = _STRING.match(body, value)
            if string is not None:
                edits.append((value, string.end(), b'""'))
            pos = value if string is None else string.end()  # any other value is walked into
            continue
        end = _value_end(body, value)
        if end < 0:
            break  # the body ends inside the member: not JSON, nothing more to understand
        key = found.start(1) - 1
        before = key - 1
        while before >= 0 and body[before] in _WS:
            before -= 1
        if before >= 0 and body[before] == 0x2C:  # ,"max_tokens":32000 — drop it with the comma before it
            edits.append((before, end, b""))
        else:  # the first member: drop it with the comma after it
            after = _COMMA_AFTER.match(body, end)
            edits.append((key, after.end() if after else end, b""))
        pos = end
    return edits


def _value_end(body: bytes, pos: int) -> int:
    """Just past the JSON value at ``pos``; -1 if it does not end in ``body``."""
    first = body[pos : pos + 1]
    if first == b'"':
        string = _STRING.match(body, pos)
        return string.end() if string else -1
    if first not in (b"{", b"["):
        scalar = _SCALAR.match(body, pos)
        return scalar.end() if scalar else -1
    depth, size = 0, len(body)
    while True:
        pos = _RUN.match(body, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty string
        if pos >= size:
            return -1
        if body[pos] == 0x22:
            string = _STRING.match(body, pos)
            if string is None:
                return -1
            pos = string.end()
            continue
        depth += 1 if body[pos] in b"{[" else -1
        pos += 1
        if depth == 0:
            return pos


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
