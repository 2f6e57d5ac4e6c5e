"""Sans-IO HTTP/1.1 message heads: collect the bytes, parse them, and decide the body framing.

cmm forwards passthrough heads byte for byte, so whatever it accepts here the real API must read
the same way. Ambiguity is therefore refused rather than repaired: bare LF line endings, obsolete
line folding, header names that are not RFC 9110 tokens (non-ASCII included), whitespace before
the colon, and any doubt about where the body ends (Content-Length together with
Transfer-Encoding, several Content-Lengths, a transfer coding other than ``chunked``).
"""

from __future__ import annotations

import re
from typing import Literal

import attrs

from cmm.core.errors import HttpError

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # one tchar (RFC 9110 section 5.6.2), for building patterns
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # what a field value may not hold
_TOKEN = re.compile(TOKEN + rb"+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_NOT_TCHAR = re.compile(b"[^" + TOKEN[1:-1] + b"]")
_NOT_TARGET = re.compile(rb"[^\x21-\x7e]")
_RESPONSE_START = b"HTTP/1."
_DIGIT = frozenset(b"0123456789")
_VERSION_SHAPE = (*({c} for c in b"HTTP/"), _DIGIT, {ord(".")}, _DIGIT, {ord("\r")})
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?\Z")
# A field section with nothing to refuse, checked and split in C; anything else goes line by
# line, which says what is wrong.
_PLAIN_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
# The value starts and ends with a visible byte, so no run of spaces can be matched two ways
# (a lazy value before optional spaces took quadratic time on a long run of them).
_PLAIN_FIELD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x20\x7f](?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)?)[ \t]*\r\n")

FramingKind = Literal["none", "length", "chunked", "close"]


@attrs.frozen
class Framing:
    """Where a message body ends: nowhere (no body), after ``length`` bytes, at the last chunk,
    or when the connection closes (responses only)."""

    kind: FramingKind
    length: int = 0


NO_BODY = Framing("none")


# Lower-cased header names, shared by every head: the same few dozen names come with every
# request and response, and a stream holds its heads as long as it is open. Bounded, so that
# invented names cannot grow it: beyond the bound, names are lowered per head.
_LOWER_NAMES: dict[bytes, bytes] = {}
_LOWER_NAMES_MAX = 1024


def _lower_name(name: bytes) -> bytes:
    lowered = _LOWER_NAMES.get(name)
    if lowered is None:
        lowered = name.lower()
        if len(_LOWER_NAMES) < _LOWER_NAMES_MAX:
            _LOWER_NAMES[name] = lowered
    return lowered


@attrs.frozen
class Headers:
    """Header fields in arrival order, names as sent; look-ups ignore case."""

    fields: tuple[tuple[bytes, bytes], ...]
    # Lower-cased name -> its value, or its values in order (a tuple) when the name repeats: a
    # request's head is looked up a dozen times on its way, and held while its answer streams.
    _by_name: dict[bytes, bytes | tuple[bytes, ...]] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        by_name: dict[bytes, bytes | tuple[bytes, ...]] = {}
        for key, value in self.fields:
            name = _lower_name(key)
            known = by_name.get(name)
            if known is None:
                by_name[name] = value
            else:  # a repeated name: its values in order
                by_name[name] = (*known, value) if isinstance(known, tuple) else (known, value)
        object.__setattr__(self, "_by_name", by_name)

    def get_all(self, name: bytes) -> list[bytes]:
        values = self._by_name.get(_lower_name(name))
        if values is None:
            return []
        return list(values) if isinstance(values, tuple) else [values]

    def get(self, name: bytes) -> bytes | None:
        values = self._by_name.get(_lower_name(name))
        return values[-1] if isinstance(values, tuple) else values

    def tokens(self, name: bytes) -> list[bytes]:
        """Comma-separated list values (Connection, Transfer-Encoding), lower-cased."""
        return [
            part.strip().lower()
            for value in self.get_all(name)
            for part in value.split(b",")
            if part.strip()
        ]


@attrs.frozen
class RequestHead:
    raw: bytes
    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    framing: Framing

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def query(self) -> bytes:
        """The query string with its ``?``, or empty."""
        index = self.target.find(b"?")
        return b"" if index < 0 else self.target[index:]

    @property
    def keep_alive(self) -> bool:
        return _keep_alive(self.version, self.headers)

    @property
    def expects_continue(self) -> bool:
        return any(v.strip().lower() == b"100-continue" for v in self.headers.get_all(b"expect"))


@attrs.frozen
class ResponseHead:
    raw: bytes
    version: bytes
    status: int
    headers: Headers
    framing: Framing

    @property
    def interim(self) -> bool:
        """1xx (other than 101): another head follows for the same request."""
        return 100 <= self.status < 200 and self.status != 101

    @property
    def keep_alive(self) -> bool:
        return self.framing.kind != "close" and _keep_alive(self.version, self.headers)


def _keep_alive(version: bytes, headers: Headers) -> bool:
    tokens = headers.tokens(b"connection")
    if version == b"HTTP/1.0":
        return b"keep-alive" in tokens
    return b"close" not in tokens


class HeadCollector:
    """Gathers bytes up to the blank line that ends a head, within the size limit.

    Leading empty lines are skipped (RFC 9112 section 2.2) since some clients send a stray CRLF
    after a body; bare LF fails at once instead of waiting for a CRLFCRLF that never comes. So do
    bytes that cannot begin a start line (a request's ``method SP target SP``, a response's
    ``HTTP/1.``): a TLS ClientHello sent inside TLS, or any binary, is refused at its first byte
    rather than held until the head deadline.
    """

    def __init__(self, limit: int = MAX_HEAD_BYTES, what: str = "request", response: bool = False) -> None:
        self._limit = limit
        self._what = what
        self._buffer = bytearray()
        self._request = not response
        self._start_ok = False  # the start line's beginning was checked and is plausible
        self._part = "method"  # of the request line, being checked
        self._part_from = 0  # where that part starts in the buffer
        self._checked = 0  # bytes of the buffer found plausible so far

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Return ``(head, rest)`` once the head is complete, else None; raise HttpError."""
        searched_from = max(0, len(self._buffer) - 3)
        self._buffer += data
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
            searched_from = 0
        end = self._buffer.find(b"\r\n\r\n", searched_from)
        head_end = len(self._buffer) if end < 0 else end + 4
        if _has_bare_lf(self._buffer, max(0, searched_from - 1), head_end):
            raise self._refuse(400, f"Malformed {self._what} head: bare LF line ending (CRLF required)")
        if not self._start_ok:
            self._check_start()
        if end < 0:
            if len(self._buffer) > self._limit:
                raise self._refuse(431, f"{self._what.capitalize()} head exceeds {self._limit} bytes")
            return None
        end += 4
        if end > self._limit:
            raise self._refuse(431, f"{self._what.capitalize()} head exceeds {self._limit} bytes")
        head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end:])
        self._buffer.clear()
        return head, rest

    def _refuse(self, status: int, message: str) -> HttpError:
        """A client's mistake has its own status; whatever an upstream gets wrong is a 502."""
        return HttpError(status if self._request else 502, message)

    def _check_start(self) -> None:
        """Refuse as soon as the bytes seen cannot be the beginning of a start line; linear in
        what arrives, however it is split."""
        buffer = self._buffer
        if not self._request:
            seen = bytes(buffer[: len(_RESPONSE_START)])
            if not _RESPONSE_START.startswith(seen) and seen != b"\r":
                raise HttpError(502, "Upstream sent a malformed status line (not HTTP/1.x)")
            self._start_ok = len(seen) == len(_RESPONSE_START)
            return
        if buffer == b"\r":  # maybe the first half of an empty line
            return
        while not self._start_ok:
            if self._part == "version":  # HTTP/ DIGIT . DIGIT CR; which version is parse_request_head's call
                shape = buffer[self._part_from : self._part_from + len(_VERSION_SHAPE)]
                for offset, (byte, allowed) in enumerate(zip(shape, _VERSION_SHAPE)):
                    if byte not in allowed:
                        raise self._bad_start(self._part_from + offset)
                self._start_ok = len(shape) == len(_VERSION_SHAPE)
                return
            pattern = _NOT_TCHAR if self._part == "method" else _NOT_TARGET
            bad = pattern.search(buffer, self._checked)
            if bad is None:
                self._checked = len(buffer)
                return
            at = bad.start()
            if buffer[at] != 0x20 or at == self._part_from:  # not a SP, or an empty method or target
                raise self._bad_start(at)
            self._part = "target" if self._part == "method" else "version"
            self._part_from = self._checked = at + 1

    def _bad_start(self, at: int) -> HttpError:
        shown = bytes(self._buffer[at : at + 1])
        return HttpError(400, f"Malformed request line: byte {shown!r} in the {self._part} (not an HTTP/1.1 request)")


def _has_bare_lf(data: bytearray, start: int, end: int) -> bool:
    """A LF in ``data[start:end]`` without its CR: every LF counted against every CRLF, in C."""
    return data.count(b"\n", start, end) > data.count(b"\r\n", max(0, start - 1), end)


def _parse_fields(raw: bytes, max_headers: int, what: str) -> Headers:
    """The fields of a complete head (start line included in ``raw``)."""
    section = raw[raw.index(b"\r\n") + 2 : -2]  # every field line with its CRLF
    if _PLAIN_FIELDS.fullmatch(section) is not None:
        fields = _PLAIN_FIELD.findall(section)
        if len(fields) > max_headers:
            raise HttpError(431, f"Too many header fields in {what} head (limit {max_headers})")
        return Headers(tuple(fields))
    lines = raw[:-4].split(b"\r\n")[1:]
    if len(lines) > max_headers:
        raise HttpError(431, f"Too many header fields in {what} head (limit {max_headers})")
    fields = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, f"Malformed {what} head: obsolete line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.match(name) is None:
            shown = name[:40].decode("ascii", "backslashreplace")
            raise HttpError(400, f"Malformed {what} head: invalid header name {shown!r}")
        value = value.strip(b" \t")
        if BAD_VALUE.search(value):
            raise HttpError(400, f"Malformed {what} head: control character in header {name.decode()}")
        fields.append((name, value))
    return Headers(tuple(fields))


def _start_line(raw: bytes) -> bytes:
    return raw[: raw.index(b"\r\n")]


def _content_length(headers: Headers, what: str) -> int | None:
    values = headers.get_all(b"content-length")
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, f"Ambiguous {what} framing: several Content-Length headers")
    if _DIGITS.match(values[0]) is None:
        raise HttpError(400, f"Invalid Content-Length in {what}: {values[0][:30]!r}")
    return int(values[0])


def parse_request_head(raw: bytes, max_headers: int = MAX_HEADERS) -> RequestHead:
    """Parse a complete head from HeadCollector; raise HttpError for anything ambiguous."""
    parts = _start_line(raw).split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "Malformed request line")
    method, target, version = parts
    if _TOKEN.match(method) is None or _TARGET.match(target) is None:
        raise HttpError(400, "Malformed request line")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(400, f"Unsupported HTTP version {version[:20]!r}: HTTP/1.1 only")
    headers = _parse_fields(raw, max_headers, "request")
    length = _content_length(headers, "request")
    codings = headers.tokens(b"transfer-encoding")
    if headers.get_all(b"transfer-encoding"):
        if length is not None:
            raise HttpError(400, "Ambiguous request framing: Content-Length with Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding is not allowed in HTTP/1.0 requests")
        if codings != [b"chunked"]:
            raise HttpError(501, "Unsupported Transfer-Encoding: only 'chunked' is accepted")
        framing = Framing("chunked")
    elif length is not None:
        framing = Framing("length", length) if length else NO_BODY
    else:
        framing = NO_BODY
    return RequestHead(raw, method, target, version, headers, framing)


def parse_response_head(raw: bytes, request_method: bytes, max_headers: int = MAX_HEADERS) -> ResponseHead:
    """Parse an upstream's head; HttpError(502) for anything cmm cannot frame safely."""
    match = _STATUS_LINE.match(_start_line(raw))
    if match is None:
        raise HttpError(502, "Upstream sent a malformed status line")
    version = b"HTTP/1." + match.group(1)
    status = int(match.group(2))
    try:
        headers = _parse_fields(raw, max_headers, "upstream response")
        length = _content_length(headers, "upstream response")
    except HttpError as error:
        raise HttpError(502, error.message) from None
    codings = headers.tokens(b"transfer-encoding")
    if request_method == b"HEAD" or 100 <= status < 200 or status in (204, 304):
        framing = NO_BODY
    elif codings:
        framing = Framing("chunked") if codings[-1] == b"chunked" else Framing("close")
    elif length is not None:
        framing = Framing("length", length) if length else NO_BODY
    else:
        framing = Framing("close")
    return ResponseHead(raw, version, status, headers, framing)
