"""A target's errors in Anthropic's format, and delays stated only in prose."""

from __future__ import annotations

import json

import pytest

from cmm.core.http_head import Headers
from cmm.core.target_errors import delay_from_text, error_response, is_anthropic_error, retry_after


@pytest.mark.parametrize("text, seconds", [
    ("quota exceeded, reset after 46s", 46),
    ("Please retry after 30 seconds", 30),
    ("You can try again in 1m30s.", 90),
    ("Your quota will reset after 2h5m3s.", 7503),
    ("resets in 5 minutes", 300),
    ("retry in 0.5s", 0.5),
    ('{"error":{"message":"Resource exhausted. Please retry after 12s."}}', 12),
    ("rate limited", None),
    ("model gpt-5 in 3 regions", None),
])
def test_delay_from_text(text: str, seconds: float | None) -> None:
    assert delay_from_text(text) == seconds


def test_the_header_wins_over_the_text() -> None:
    assert retry_after(Headers(((b"Retry-After", b"7"),)), b"reset after 46s") == 7
    assert retry_after(Headers(((b"Retry-After", b"Wed, 21 Oct 2026 07:28:00 GMT"),)), b"reset after 46s") == 46
    assert retry_after(Headers(()), b"nothing") is None


def test_error_response_keeps_status_and_headers_and_quotes_the_text() -> None:
    headers = Headers(((b"Content-Type", b"text/plain"), (b"X-Request-Id", b"r1"), (b"Content-Length", b"30")))
    out = error_response(b"HTTP/1.1 429 Too Many Requests", 429, headers, b"quota exceeded, reset after 46s",
                         "http://localhost:8317/v1/messages", [(b"x-cmm-provider", b"cliproxyapi")])
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 429 Too Many Requests"
    assert lines[1:] == [b"X-Request-Id: r1", b"x-cmm-provider: cliproxyapi", b"retry-after: 46",
                         b"content-type: application/json", b"content-length: %d" % len(body)]
    assert json.loads(body)["error"] == {
        "type": "rate_limit_error",
        "message": "http://localhost:8317/v1/messages answered 429: quota exceeded, reset after 46s"}
    assert is_anthropic_error(body)


def test_long_text_is_cut() -> None:
    out = error_response(b"HTTP/1.1 500 Oops", 500, Headers(()), b"x" * 5000, "t")
    message = json.loads(out.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert len(message) < 600 and message.endswith("…")
