"""Sans-IO routing: which requests are candidates, which mapping a model takes, and the edits an
intercepted request gets on its way to the target.
"""

from __future__ import annotations

import enum
import json
from fnmatch import fnmatchcase
from typing import Literal, Protocol
from urllib.parse import urlsplit

import attrs

from cmm.core.http_head import RequestHead

DEFAULT_PROXY_URL = "http://localhost:8317/v1/messages"
PROVIDER_HEADER = b"x-cmm-provider: cliproxyapi\r\n"

Endpoint = Literal["messages", "count_tokens"]

ANY_MODEL = "*"  # a source that matches every model
# The kinds of request Claude Code names in every messages request's REQUEST_CLASS_HEADER.
REQUEST_CLASS_HEADER = b"x-claude-code-request-class"
REQUEST_CLASSES = ("main", "subagent", "workflow", "compaction", "auxiliary", "side_reply")
MODES = ("always", "fallback")
TARGET_ERROR_ACTIONS = ("error", "anthropic")
UNREACHABLE = "unreachable"
DEFAULT_FALLBACK_ON: tuple[int | str, ...] = (429, 529, 500, 502, 503, 504, UNREACHABLE)

_CANDIDATE_PATHS: dict[bytes, Endpoint] = {
    b"/v1/messages": "messages",
    b"/v1/messages/count_tokens": "count_tokens",
}

# The user's Anthropic credentials must never reach another provider.
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"cookie", b"proxy-authorization"})
# Rewritten or answered by cmm itself, or hop-by-hop: they concern the client's connection to
# cmm, not cmm's pooled connection to the target (a client's "Connection: close" must not cost
# the pool its connection).
_REPLACED_HEADERS = frozenset({b"host", b"content-length", b"expect", b"accept-encoding", b"connection",
                               b"keep-alive", b"proxy-connection", b"te", b"upgrade"})


@attrs.frozen
class Upstream:
    """An Anthropic-compatible server that intercepted requests go to."""

    scheme: str
    host: str
    port: int
    path: str
    query: str
    api_key: str = ""

    @classmethod
    def from_url(cls, url: str, api_key: str = "") -> Upstream:
        """Parse PROXY_URL; ValueError with a message a user can act on."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"proxy URL must be an http:// or https:// URL with a host, not {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"proxy URL has an invalid port: {url!r}") from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/") or "/v1/messages", parts.query, api_key)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.host_header}{self.path}{query}"

    def target_for(self, endpoint: Endpoint, client_query: bytes) -> bytes:
        """Request-target on the upstream: its path (+ /count_tokens), its query and the client's."""
        path = self.path + ("/count_tokens" if endpoint == "count_tokens" else "")
        queries = [q for q in (self.query.encode(), client_query.lstrip(b"?")) if q]
        return path.encode() + (b"?" + b"&".join(queries) if queries else b"")


@attrs.frozen
class BodySize:
    """What is known of a request body's decoded size: at least ``seen`` bytes, exactly that
    many when ``complete``."""

    seen: int
    complete: bool


class Pending(enum.Enum):
    """The rule depends on more of the body than is in hand (its decoded size)."""

    SIZE = "size"


@attrs.frozen
class Mapping:
    """Models whose name starts with ``source`` are answered by ``target`` at ``upstream``.

    A mapping with conditions (request class, headers, body size) is a rule tried before the
    plain ones, so that e.g. subagents of any model can go elsewhere than the model's mapping.
    """

    source: str  # a model prefix, or "*" for any model
    target: str
    upstream: Upstream
    mode: str = "always"  # "always", or "fallback": Anthropic first, the target when it refuses
    fallback_on: tuple[int | str, ...] = ()  # statuses (and "unreachable") that fail over, for "fallback"
    on_target_error: str = "error"  # "error", or "anthropic": a failing target hands the request back
    request_class: tuple[str, ...] = ()  # conditions: any of these x-claude-code-request-class values
    headers: tuple[tuple[str, str], ...] = ()  # conditions: header name -> glob, all must match
    min_body_bytes: int | None = None  # condition: the decoded body is at least this long

    def __attrs_post_init__(self) -> None:
        for name, value in (("source", self.source), ("target", self.target)):
            if not value or any(c.isspace() for c in value):
                raise ValueError(f"{name} model must be a non-empty name without spaces, not {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.on_target_error not in TARGET_ERROR_ACTIONS:
            raise ValueError(f"on_target_error must be one of {', '.join(TARGET_ERROR_ACTIONS)}, "
                             f"not {self.on_target_error!r}")
        if self.min_body_bytes is not None and self.min_body_bytes < 1:
            raise ValueError(f"min_body_bytes must be positive, not {self.min_body_bytes}")

    @property
    def conditioned(self) -> bool:
        return bool(self.request_class or self.headers or self.min_body_bytes is not None)

    @property
    def prefix(self) -> str:
        """What a model's name must start with ("*" is every model: the empty prefix)."""
        return "" if self.source == ANY_MODEL else self.source

    def head_holds(self, head: RequestHead) -> bool:
        """The conditions read from the request head: its class and the header globs."""
        if self.request_class and request_class_of(head) not in self.request_class:
            return False
        return all(any(fnmatchcase(value.decode("latin-1"), glob) for value in head.headers.get_all(name.encode()))
                   for name, glob in self.headers)


def request_class_of(head: RequestHead) -> str | None:
    """The kind of request Claude Code says this is (``main``, ``subagent``, ...), if it says."""
    value = head.headers.get(REQUEST_CLASS_HEADER)
    return None if value is None else value.decode("latin-1").strip()


class RuleLike(Protocol):
    """What names a rule: a router ``Mapping``, or a mapping as its file gives it."""

    @property
    def source(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def request_class(self) -> tuple[str, ...]: ...

    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def min_body_bytes(self) -> int | None: ...


def rule_label(rule: RuleLike) -> str:
    """A short name for a rule in logs and ``cmm status``: its source (a prefix shown with its
    ``*``), conditions and target, e.g. ``claude-sonnet* [min_body_bytes≥600000] → gemini-2.5-pro``.
    Two rules of one file never share it (a file may not repeat a source with the same conditions)."""
    conditions = [",".join(rule.request_class)] if rule.request_class else []
    conditions += [f"{name}={glob}" for name, glob in rule.headers]
    if rule.min_body_bytes is not None:
        conditions.append(f"min_body_bytes≥{rule.min_body_bytes}")
    shown = f" [{' '.join(conditions)}]" if conditions else ""
    source = rule.source if rule.source == ANY_MODEL else rule.source + "*"
    return f"{source}{shown} → {rule.target}"


@attrs.frozen
class Router:
    mappings: tuple[Mapping, ...]

    def match(self, model: str) -> Mapping | None:
        """The plain mapping with the longest matching prefix, so specific ones beat general ones."""
        best = None
        for mapping in self.mappings:
            if not mapping.conditioned and model.startswith(mapping.prefix) and (
                    best is None or len(mapping.prefix) > len(best.prefix)):
                best = mapping
        return best

    def choose(self, model: str, head: RequestHead, size: BodySize) -> Mapping | None | Pending:
        """The rule for a request: the first (in order) whose source and conditions all hold,
        else :meth:`match`. ``Pending.SIZE`` when a body-size condition decides and the size
        known so far cannot: the caller reads on and asks again."""
        for rule in self.mappings:
            if not rule.conditioned or not model.startswith(rule.prefix) or not rule.head_holds(head):
                continue
            if rule.min_body_bytes is None or size.seen >= rule.min_body_bytes:
                return rule
            if not size.complete:
                return Pending.SIZE
        return self.match(model)


def candidate_endpoint(head: RequestHead) -> Endpoint | None:
    """Only message and token-count POSTs can be routed by model; all else passes at once."""
    if head.method != b"POST":
        return None
    return _CANDIDATE_PATHS.get(head.path)


def intercepted_head(head: RequestHead, upstream: Upstream, endpoint: Endpoint, body_length: int | None,
                     decoded: bool = False) -> bytes:
    """The request head for the target: new target and Host, no user credentials, new length.

    ``body_length`` None means the body is sent chunked; ``decoded`` that cmm decoded the
    body's Content-Encoding, which therefore goes. The response is asked for uncompressed
    (``Accept-Encoding: identity``) so that cmm can read what it needs of it.
    """
    lines = [b"%s %s HTTP/1.1" % (head.method, upstream.target_for(endpoint, head.query))]
    lines.append(b"Host: " + upstream.host_header.encode())
    chunked = False
    for name, value in head.headers.fields:
        lowered = name.lower()
        if lowered in _CREDENTIAL_HEADERS or lowered in _REPLACED_HEADERS or decoded and lowered == b"content-encoding":
            continue
        chunked = chunked or lowered == b"transfer-encoding"
        lines.append(name + b": " + value)
    if upstream.api_key:
        lines.append(b"Authorization: Bearer " + upstream.api_key.encode())
    lines.append(b"Accept-Encoding: identity")
    if body_length is not None:
        lines.append(b"Content-Length: %d" % body_length)
    elif not chunked:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def decoded_head(head: RequestHead, length: int) -> bytes:
    """A passthrough head for a body cmm had to decode to edit: no Content-Encoding, the new
    length; every other field as it came."""
    lines = [head.raw.split(b"\r\n", 1)[0]]
    lines += [name + b": " + value for name, value in head.headers.fields
              if name.lower() not in (b"content-encoding", b"content-length")]
    lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def rewrite_model(prefix: bytes, start: int, end: int, target: str) -> bytes:
    """Replace the model's JSON string token in the buffered start of a body."""
    return prefix[:start] + json.dumps(target).encode() + prefix[end:]


def redacted_head(head: RequestHead) -> str:
    """The request head for ``--log-content``, with credential values replaced."""
    lines = [f"{head.method.decode()} {head.target.decode('ascii', 'replace')} {head.version.decode()}"]
    for name, value in head.headers.fields:
        shown = "[redacted]" if name.lower() in _CREDENTIAL_HEADERS else value.decode("latin-1")
        lines.append(f"{name.decode('latin-1')}: {shown}")
    return "\n".join(lines)


def with_content_length(response_head: bytes, length: int) -> bytes:
    """The head with its Content-Length set to ``length`` (a body cmm rewrote)."""
    return _with_field(response_head, b"Content-Length", b"%d" % length)


def _with_field(head: bytes, name: bytes, value: bytes) -> bytes:
    """The head with exactly one ``name`` field, set to ``value`` and placed last."""
    prefix = name.lower() + b":"
    lines = [line for line in head[:-4].split(b"\r\n") if not line.lower().startswith(prefix)]
    return b"\r\n".join(lines + [name + b": " + value]) + b"\r\n\r\n"


def with_connection_close(response_head: bytes) -> bytes:
    """The head with ``Connection: close`` (in place of any other Connection field)."""
    return _with_field(response_head, b"Connection", b"close")


def with_provider_header(response_head: bytes) -> bytes:
    """Mark an intercepted response so users can tell who answered."""
    return response_head[:-2] + PROVIDER_HEADER + b"\r\n"
