"""Sans-IO body framing: where a spliced body ends, and its payload bytes.

cmm forwards raw bytes but must know exactly where each message ends, both to keep HTTP
keep-alive connections in step and to hand the model finder the payload without the chunk
framing. A tracker is fed raw bytes and says how many of them belong to the body, which payload
bytes they carried, and whether the body is complete.

Chunk extensions and trailer fields are checked against RFC 9112's grammar and a body that
breaks it is refused, in both directions. A passthrough body is forwarded byte for byte, so
whatever cmm accepts the next parser must read the same way: a NUL or a bare CR in an extension
was passed on and read differently upstream, and two parsers that disagree on where a body ends
on a pooled connection is how requests are smuggled. Dropping extensions by re-chunking would also
settle it, but would change passthrough bytes and copy every body for the sake of a field no
client cmm serves sends; refusing keeps valid bodies untouched and costs nothing on the plain
path (a size line without an extension takes the fast path unchanged).
"""

from __future__ import annotations

import re
from typing import Callable

import attrs

from cmm.core.errors import HttpError
from cmm.core.http_head import BAD_VALUE, TOKEN, Framing

MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 64 * 1024
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_PLAIN_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")  # no extension, no whitespace
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ), a value being a
# token or a quoted-string (RFC 9112 section 7.1.1, RFC 9110 section 5.6): no control byte but
# HTAB anywhere, so the line's CRLF is the only place it can end.
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*%s+(?:[ \t]*=[ \t]*(?:%s+|%s))?)*)\Z" % (TOKEN, TOKEN, _QUOTED))
_FIELD_NAME = re.compile(TOKEN + rb"+\Z")


@attrs.frozen
class Progress:
    """``consumed`` bytes of the fed data belong to the body; ``payload`` is what they carried."""

    consumed: int
    payload: tuple[bytes, ...]
    done: bool


class BodyTracker:
    """Interface: feed raw bytes, learn how far the body goes."""

    def feed(self, data: bytes) -> Progress:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> bool:
        """The connection closed; True if that completes the body normally."""
        return False


class NoBody(BodyTracker):
    def feed(self, data: bytes) -> Progress:
        return Progress(0, (), True)


class LengthBody(BodyTracker):
    def __init__(self, length: int) -> None:
        self.remaining = length

    def feed(self, data: bytes) -> Progress:
        take = min(self.remaining, len(data))
        self.remaining -= take
        payload = (data if take == len(data) else data[:take],) if take else ()
        return Progress(take, payload, self.remaining == 0)


class CloseBody(BodyTracker):
    """Response bodies delimited by the connection closing."""

    def feed(self, data: bytes) -> Progress:
        return Progress(len(data), (data,) if data else (), False)

    def finish(self) -> bool:
        return True


class ChunkedBody(BodyTracker):
    """Chunked transfer coding (RFC 9112 section 7.1), strict about sizes and line endings."""

    def __init__(self, what: str = "request") -> None:
        self._what = what
        self._state = "size"
        self._line = bytearray()
        self._remaining = 0
        self._trailer_bytes = 0
        self.done = False

    def _fail(self, message: str) -> HttpError:
        return HttpError(400, f"Invalid chunked {self._what} body: {message}")

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """Gather one CRLF-terminated line across feeds; None until it is complete."""
        end = data.find(b"\n", pos)
        if end < 0:
            self._line += data[pos:]
            if len(self._line) > MAX_CHUNK_LINE:
                raise self._fail("chunk line too long")
            return None, len(data)
        self._line += data[pos : end + 1]
        if len(self._line) > MAX_CHUNK_LINE:
            raise self._fail("chunk line too long")
        line = bytes(self._line)
        self._line.clear()
        if not line.endswith(b"\r\n"):
            raise self._fail("bare LF line ending")
        return line[:-2], end + 1

    def feed(self, data: bytes) -> Progress:
        pos = 0
        payload: list[bytes] = []
        size = len(data)
        while pos < size and not self.done:
            if self._state == "size" and not self._line:
                # A whole chunk in hand with a plain size line (an SSE event per chunk, as
                # servers send them) is taken in one step; anything else goes the long way.
                head = _PLAIN_SIZE_LINE.match(data, pos)
                if head is not None:
                    start = head.end()
                    end = start + int(head.group(1), 16)
                    if start < end and data[end : end + 2] == b"\r\n":
                        payload.append(data[start:end])
                        pos = end + 2
                        continue
            if self._state == "data":
                take = min(self._remaining, size - pos)
                payload.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data-end"
                continue
            line, pos = self._take_line(data, pos)
            if line is None:
                break
            if self._state == "size":
                sized = _SIZE_LINE.match(line)
                if sized is None:
                    digits = line.split(b";", 1)[0].rstrip(b" \t")
                    if _HEX.match(digits) is None:
                        raise self._fail(f"bad chunk size {digits[:20]!r}")
                    raise self._fail(f"malformed chunk extension {line[len(digits):][:40]!r}")
                self._remaining = int(sized.group(1), 16)
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "data-end":
                if line:
                    raise self._fail("chunk data longer than its size")
                self._state = "size"
            else:  # trailer fields, ended by an empty line
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    raise self._fail("trailer section too large")
                if not line:
                    self.done = True
                else:
                    _check_trailer_field(line, self._fail)
        return Progress(pos, tuple(payload), self.done)


def _check_trailer_field(line: bytes, fail: Callable[[str], HttpError]) -> None:
    """field-name ":" OWS field-value OWS, as in a head: a token name, no control byte but HTAB in
    the value (so no bare CR), no obsolete folding."""
    name, colon, value = line.partition(b":")
    if not colon or _FIELD_NAME.match(name) is None:
        raise fail(f"malformed trailer field {name[:40]!r}")
    if BAD_VALUE.search(value) is not None:
        raise fail(f"control character in trailer field {name.decode('ascii')}")


def tracker_for(framing: Framing, what: str = "request") -> BodyTracker:
    if framing.kind == "length":
        return LengthBody(framing.length)
    if framing.kind == "chunked":
        return ChunkedBody(what)
    if framing.kind == "close":
        return CloseBody()
    return NoBody()


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"
