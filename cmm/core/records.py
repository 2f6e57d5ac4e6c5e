"""What cmm records of each request, and the log line it becomes (text or JSON).

The text line keeps the shape of the tool cmm replaces, so its users can read (and grep) it as before:
``[2026-02-28 18:01:45] claude-haiku-4-5-20251001           → INTERCEPTED → gemini-2.5-flash ✓``
with status, duration and byte counts after it. Request contents are never logged (unless
``--log-content``), and nothing a client or an upstream sent can break a line.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable

import attrs

COLUMN = 35


@attrs.frozen
class RequestRecord:
    started: float  # wall-clock seconds since the epoch
    method: str
    path: str
    model: str | None
    intercepted: bool
    target: str | None
    status: int | None  # None: no response reached the client
    duration: float
    bytes_in: int
    bytes_out: int
    error: str | None = None
    mapping: str | None = None  # the source prefix of the mapping that routed it
    content: str | None = None  # only with --log-content: head (credentials redacted) + body start
    route: str | None = None  # "intercepted", "passthrough", "fallback" or "tunnel"; None: from intercepted
    rule: str | None = None  # the label of the routing rule that chose the route
    request_class: str | None = None  # Claude Code's x-claude-code-request-class
    served_model: str | None = None  # the model that answered (the target's, or the one asked)
    upstream: str | None = None  # "anthropic", or the target's host:port
    fallback: str | None = None  # why another upstream answered, e.g. "anthropic 429", "target 503"
    ttfb: float | None = None  # seconds from the request's start to the response head's first byte
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


# What a client or upstream could use to forge or hide a log line: control characters (C0, DEL,
# C1, whose 0x9b starts a terminal escape too) and the separators that split lines. A
# surrogate (an undecodable byte or a lone \ud800 escape) cannot be written as UTF-8 at all.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]|[\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if "\ud800" <= char <= "\udfff":
        return "\ufffd"
    return _SHORT_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escaped(text: str) -> str:
    """``text`` on one line, safe for a terminal and for UTF-8: control characters, line
    separators and backslashes spelled as escapes, surrogates replaced by U+FFFD."""
    return _UNSAFE.sub(_escape_one, text)


def format_line(record: RequestRecord, localtime: Callable[[float], time.struct_time] = time.localtime) -> str:
    """The text line; whatever came from a client or an upstream is :func:`escaped`, so one
    record is one line (plus the indented content lines of ``--log-content``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", localtime(record.started))
    subject = escaped(record.model if record.model is not None else f"{record.method} {record.path}")
    route = f"INTERCEPTED → {escaped(str(record.target))}" if record.intercepted else \
        "TUNNEL" if record.route == "tunnel" else "PASSTHROUGH"
    if record.fallback:
        route += f" (fallback: {escaped(record.fallback)})"
    ok = record.status is not None and record.status < 400 and record.error is None
    mark = "✓" if ok else "✗"
    status = "-" if record.status is None else str(record.status)
    detail = f"{status} {record.duration * 1000:.0f}ms ↑{record.bytes_in} ↓{record.bytes_out}"
    detail += _tokens(record)
    if record.error:
        detail += f" ({escaped(record.error)})"
    if record.rule and record.rule != f"{record.mapping}* → {record.target}":  # a rule more than a model prefix
        detail += f" (rule {escaped(record.rule)})"
    line = f"[{stamp}] {subject:<{COLUMN}} → {route} {mark} {detail}"
    if record.content:
        line += "".join(f"\n    {escaped(part)}" for part in record.content.splitlines())
    return line


def _tokens(record: RequestRecord) -> str:
    """`` in=… out=… cache=r…/w…`` (cache tokens read / written), each part only when the answer said it."""
    parts = [f"{label}={value}" for label, value in (("in", record.input_tokens), ("out", record.output_tokens))
             if value is not None]
    read, written = record.cache_read_input_tokens, record.cache_creation_input_tokens
    if read is not None or written is not None:
        parts.append(f"cache=r{'-' if read is None else read}/w{'-' if written is None else written}")
    return "".join(" " + part for part in parts)


_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")  # json.dumps escapes the rest itself
_NO_SURROGATE = re.compile("[\ud800-\udfff]")


def format_json(record: RequestRecord) -> str:
    """One JSON object a line, for machines (``--log-format json``); surrogates become U+FFFD,
    and control characters and line separators are ``\\u`` escapes, so the line is valid UTF-8
    JSON that a terminal shows as it is."""
    fields = {
        key: _NO_SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value
        for key, value in attrs.asdict(record).items()
    }
    fields["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started))
    fields["route"] = record.route or ("intercepted" if record.intercepted else "passthrough")
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
