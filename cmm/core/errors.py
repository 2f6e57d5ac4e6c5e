"""Errors cmm itself answers with, in Anthropic's error format.

Claude Code and the SDKs show ``error.message`` to the user and decide on retries by status, so
every failure cmm produces must look like one of Anthropic's own.
"""

from __future__ import annotations

import json

import attrs

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "invalid_request_error",
    504: "timeout_error",
}


@attrs.frozen
class HttpError(Exception):
    """A failure that maps onto one HTTP status; raised by the pure cores, answered by the shell."""

    status: int
    message: str

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for a status (``api_error`` for any other 5xx)."""
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> bytes:
    return json.dumps(
        {"type": "error", "error": {"type": error_type(status), "message": message}},
        ensure_ascii=False,
    ).encode()


def error_response(status: int, message: str, *, close: bool = True, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response; ``close`` because the request body may be half-read.
    ``head_only`` for a HEAD request: its answer has the head a GET would get, never a body."""
    body = error_body(status, message)
    reason = _REASONS.get(status, "Error")
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "x-cmm-error: 1",
    ]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if head_only else body)
