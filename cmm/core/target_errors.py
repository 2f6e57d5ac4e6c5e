"""Sans-IO handling of a target's error responses: Anthropic's format, and rate-limit delays.

Claude Code shows ``error.message`` and decides on retries by status and ``retry-after``. A
target that answers in another shape (plain text, a crashed proxy's HTML, an empty body) would
leave the user with "API Error" and nothing else, and a 429 without ``retry-after`` makes the
SDK guess. So an intercepted error keeps its status, its text is quoted in an Anthropic-format
body, and a delay the target only wrote in prose ("reset after 46s") becomes a header.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from cmm.core.errors import error_body
from cmm.core.http_head import Headers

# Larger "errors" (declared, or found so while reading) are passed through as they are: an error
# document is a few hundred bytes, and holding a 10 GB one would hold 10 GB.
MAX_ERROR_BODY = 64 * 1024
QUOTE_CHARS = 500

_DURATION = re.compile(
    r"(?:retry|reset|try again|wait)[a-z ]{0,20}?(?:after|in)\s+"
    r"(?:(?P<h>\d+(?:\.\d+)?)\s*h(?:ours?|rs?)?\s*)?"
    r"(?:(?P<m>\d+(?:\.\d+)?)\s*m(?:in(?:ute)?s?)?(?![a-z])\s*)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)\s*s(?:ec(?:ond)?s?)?)?",
    re.IGNORECASE,
)
# A tag holds no "<": each try stops at the next one, so a page of "<" costs linear time.
_TAG = re.compile(r"<[^<>]{0,200}+>")
_DROPPED = frozenset({b"content-length", b"content-type", b"transfer-encoding", b"content-encoding"})


def delay_from_text(text: str) -> float | None:
    """Seconds from phrases like "reset after 46s", "retry after 30 seconds", "try again in 1m30s"."""
    for match in _DURATION.finditer(text):
        hours, minutes, seconds = (float(match.group(g)) if match.group(g) else 0.0 for g in ("h", "m", "s"))
        total = hours * 3600 + minutes * 60 + seconds
        if total > 0:
            return total
    return None


def retry_after(headers: Headers, body: bytes) -> float | None:
    """The upstream's ``retry-after`` (delta-seconds), else a delay stated in the body's text."""
    value = headers.get(b"retry-after")
    if value is not None:
        try:
            return max(0.0, float(value.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError):
            pass  # an HTTP date: rare from these servers; fall back to the body
    return delay_from_text(body.decode("utf-8", "replace"))


def is_anthropic_error(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # nested too deeply to parse: quoted like any other text
        return False
    return (isinstance(document, dict) and document.get("type") == "error" and isinstance(document.get("error"), dict)
            and isinstance(document["error"].get("message"), str))


def _quoted(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    text = _TAG.sub(" ", text) if "<html" in text.lower() or "<body" in text.lower() else text
    text = " ".join(text.split())
    return text[:QUOTE_CHARS] + ("…" if len(text) > QUOTE_CHARS else "")


def error_response(status_line: bytes, status: int, headers: Headers, body: bytes, target: str,
                   extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The whole response to send the client for a target's error (status >= 400).

    Anthropic-format bodies pass unchanged; anything else is wrapped with the upstream text quoted.
    ``retry-after`` is added for a 429 whose delay was only stated in the body.
    """
    if not is_anthropic_error(body):
        quoted = _quoted(body)
        message = f"{target} answered {status}" + (f": {quoted}" if quoted else " with an empty body")
        body = error_body(status, message)
    lines = [status_line]
    lines += [name + b": " + value for name, value in headers.fields if name.lower() not in _DROPPED]
    lines += [name + b": " + value for name, value in extra_headers]
    if status == 429 and headers.get(b"retry-after") is None:
        delay = retry_after(headers, body)
        if delay is not None:
            lines.append(b"retry-after: %d" % max(1, round(delay)))
    lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body

