"""Sans-IO body framing: where a spliced body ends, and its payload bytes.

cmm forwards raw bytes but must know exactly where each message ends, both to keep HTTP
keep-alive connections in step and to hand the model finder the payload without the chunk
framing. A tracker is fed raw bytes and says how many of them belong to the body, which payload
bytes they carried, and whether the body is complete.
"""

from __future__ import annotations

import re

import attrs

from cmm.errors import HttpError
from cmm.http_head import Framing

MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 64 * 1024
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_PLAIN_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")  # no extension, no whitespace


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
                digits = line.split(b";", 1)[0].rstrip(b" \t")
                if _HEX.match(digits) is None:
                    raise self._fail(f"bad chunk size {digits[:20]!r}")
                self._remaining = int(digits, 16)
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
                elif line[:1] in (b" ", b"\t") or b":" not in line:
                    raise self._fail("malformed trailer field")
        return Progress(pos, tuple(payload), self.done)


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
