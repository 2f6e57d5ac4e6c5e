"""Routing decisions and the edits an intercepted request gets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from cmm.core.http_head import HeadCollector, parse_request_head
from cmm.core.router import Mapping, Router, Upstream, candidate_endpoint, intercepted_head, rewrite_model, with_provider_header
from cmm.core.model_finder import find_model


def head(raw: bytes):
    done = HeadCollector().feed(raw)
    assert done is not None
    return parse_request_head(done[0])


def mapping(source: str, target: str = "t", url: str = "http://localhost:8317/v1/messages") -> Mapping:
    return Mapping(source, target, Upstream.from_url(url))


def test_longest_prefix_wins() -> None:
    router = Router((mapping("claude-", "general"), mapping("claude-haiku-4-5", "specific"), mapping("claude-haiku", "mid")))
    assert router.match("claude-haiku-4-5-20251001").target == "specific"
    assert router.match("claude-haiku-3").target == "mid"
    assert router.match("claude-opus-4-6").target == "general"
    assert router.match("gpt-5") is None


def test_prefix_is_case_sensitive_and_exact() -> None:
    router = Router((mapping("claude-haiku-4-5"),))
    assert router.match("claude-haiku-4-5") is not None
    assert router.match("Claude-haiku-4-5") is None
    assert router.match("claude-haiku-4") is None


@pytest.mark.parametrize("raw, endpoint", [
    (b"POST /v1/messages HTTP/1.1\r\n\r\n", "messages"),
    (b"POST /v1/messages?beta=true HTTP/1.1\r\n\r\n", "messages"),
    (b"POST /v1/messages/count_tokens?beta=true HTTP/1.1\r\n\r\n", "count_tokens"),
    (b"GET /v1/messages HTTP/1.1\r\n\r\n", None),
    (b"POST /v1/messages/batches HTTP/1.1\r\n\r\n", None),
    (b"POST /api/event_logging/v2/batch HTTP/1.1\r\n\r\n", None),
    (b"POST /v1/complete HTTP/1.1\r\n\r\n", None),
])
def test_candidates(raw: bytes, endpoint: str | None) -> None:
    assert candidate_endpoint(head(raw)) == endpoint


@pytest.mark.parametrize("url, problem", [
    ("ftp://host/x", "http:// or https://"),
    ("localhost:8317", "http:// or https://"),
    ("http:///v1/messages", "with a host"),
    ("http://host:99999/v1", "invalid port"),
])
def test_bad_proxy_urls(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Upstream.from_url(url)


def test_upstream_url_parts() -> None:
    upstream = Upstream.from_url("https://[::1]:9443/proxy/v1/messages?key=1", "k")
    assert upstream.host_header == "[::1]:9443"
    assert upstream.target_for("count_tokens", b"?beta=true") == b"/proxy/v1/messages/count_tokens?key=1&beta=true"
    assert Upstream.from_url("http://localhost").target_for("messages", b"") == b"/v1/messages"
    assert Upstream.from_url("https://proxy.example:443/v1/messages").host_header == "proxy.example"


def test_mapping_names_are_checked() -> None:
    with pytest.raises(ValueError, match="source"):
        mapping("")
    with pytest.raises(ValueError, match="target"):
        mapping("claude", "two words")


def test_intercepted_head_drops_credentials_and_keeps_the_rest_in_order() -> None:
    raw = (b"POST /v1/messages?beta=true HTTP/1.1\r\nAccept: application/json\r\nx-api-key: secret\r\n"
           b"authorization: Bearer oauth\r\nCOOKIE: a=b\r\nProxy-Authorization: x\r\nanthropic-version: 2023-06-01\r\n"
           b"Host: api.anthropic.com\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
    upstream = Upstream.from_url("http://127.0.0.1:8317/v1/messages", "sk-proxy")
    out = intercepted_head(head(raw), upstream, "messages", 12)
    assert out == (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:8317\r\nAccept: application/json\r\n"
                   b"anthropic-version: 2023-06-01\r\nAuthorization: Bearer sk-proxy\r\nAccept-Encoding: identity\r\n"
                   b"Content-Length: 12\r\n\r\n")
    no_key = intercepted_head(head(raw), Upstream.from_url("http://h/v1/messages"), "messages", None)
    assert b"authorization" not in no_key.lower() and b"content-length" not in no_key.lower()
    assert no_key.endswith(b"Transfer-Encoding: chunked\r\n\r\n")


def test_decoded_bodies_lose_their_content_encoding() -> None:
    raw = (b"POST /v1/messages HTTP/1.1\r\nContent-Encoding: gzip\r\nAccept-Encoding: gzip, br\r\n"
           b"Content-Length: 10\r\n\r\n")
    out = intercepted_head(head(raw), Upstream.from_url("http://h/v1/messages"), "messages", None, decoded=True)
    assert b"content-encoding" not in out.lower() and b"gzip" not in out
    assert out.endswith(b"Accept-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n")


@given(st.text(min_size=1), st.text(min_size=1), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_rewrite_changes_only_the_model(model: str, target: str, rest: dict) -> None:
    body = json.dumps({"model": model, **{k: v for k, v in rest.items() if k != "model"}}).encode()
    found = find_model(body)
    out = rewrite_model(body, found.start, found.end, target)
    decoded = json.loads(out)
    assert decoded.pop("model") == target
    original = json.loads(body)
    original.pop("model")
    assert decoded == original
    assert out[: found.start] == body[: found.start] and out.endswith(body[found.end :])


def test_provider_header_is_added_before_the_blank_line() -> None:
    assert (with_provider_header(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n")
            == b"HTTP/1.1 200 OK\r\nA: b\r\nx-cmm-provider: cliproxyapi\r\n\r\n")


def test_hop_by_hop_headers_stay_on_the_client_side() -> None:
    raw = (b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
           b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\n")
    out = intercepted_head(head(raw), Upstream.from_url("http://h/v1/messages"), "messages", 2)
    lowered = out.lower()
    for name in (b"connection:", b"keep-alive:", b"te:", b"upgrade:"):
        assert b"\r\n" + name not in lowered
    assert b"X-Kept: 1\r\n" in out
