"""Fake upstreams: a fake api.anthropic.com (TLS) and a fake CLIProxyAPI, as API and as processes.

Integration tests and the benchmark need upstreams that behave like Anthropic's API (exact SSE
event order, error format, keep-alive) and that record what reached them, so that tests can
prove what cmm forwarded. Request headers ``x-fake-*`` steer a reply (status, delays, size,
abrupt aborts); real clients never send them.

Run one in the foreground::

    python -m cmm.testing.fakes anthropic --port 0 --cert-dir /tmp/pki
    python -m cmm.testing.fakes target --port 8317 [--base-path /v1/messages]

Controls (any route): ``x-fake-status: 529`` (that status, Anthropic error body; with
``x-fake-error-text: ...`` a plain-text body instead; with ``x-fake-status-times: N`` only the
first N requests of the same ``x-test-id`` fail),
``x-fake-delay: 0.5`` (seconds before the head), ``x-fake-event-delay: 0.05``,
``x-fake-deltas: 50``, ``x-fake-delta-size: 1000``, ``x-fake-abort-after: 2`` (stream: N events,
not a stream: the head and N body bytes; then abortConnection), ``x-fake-close: 1``,
``x-fake-response-bytes: N``, ``x-fake-retry-after: 30`` (with status: a ``retry-after`` header, as
given, so an HTTP-date too), ``x-fake-gzip: 1`` (the reply gzipped; a stream flushed event by event).
``x-fake-for: anthropic`` (a provider name) makes every control apply only to the fake of that
provider, so that one request can be refused by the fake Anthropic and answered by the fake target
it fails over to. Malformed values are ignored, out-of-range ones clamped.
Gzip/deflate request bodies are decoded before the JSON is read (recorded as received).

Thinking. A messages request that enables thinking (``"thinking": {"type": "enabled", ...}``, as
Claude Code sends, or ``"adaptive"``) gets a ``thinking`` block before the text block (streamed
as ``thinking_delta`` x 2 then one ``signature_delta``), unless its last message is an assistant
message being continued (a prefill: thinking can only open a turn). Each fake signs its thinking
with an HMAC keyed by its provider name (:func:`thinking_signature`, :func:`verify_signature`):
the fake Anthropic's signatures are plain base64, every other fake's start with ``tgt-``.
Controls: ``x-fake-thinking: 1`` / ``0`` (thinking block whatever the request says, or never),
``x-fake-redacted: 1`` (a ``redacted_thinking`` block after the thinking block, its ``data`` made
by :func:`redacted_data`), ``x-fake-tool-use: NAME`` (a ``tool_use`` block for tool NAME after
the text, ``stop_reason: "tool_use"``), so multi-turn tool loops can be simulated.

Strict mode (the fake Anthropic's default; ``--strict/--no-strict``) checks every messages and
count_tokens body as Anthropic does, with Anthropic's error messages (400
``invalid_request_error``): each ``thinking`` block in ``messages`` must carry a signature this
fake made for exactly that text, each ``redacted_thinking`` block ``data`` this fake made; with
thinking enabled, a last assistant message holding a ``tool_use`` block must start with a
thinking or redacted_thinking block; no message may have empty content except a final assistant
one (:func:`strict_violation`). The fake target is lenient by default: it answers whatever
signatures it gets, and records them.

Besides the Anthropic routes, ``GET /_fake/requests`` answers what a fake has recorded (JSON,
bodies base64) so tests can inspect a fake running in another process; those control requests
are not recorded themselves. The fake Anthropic also answers a WebSocket upgrade on
``/api/ws/speech_to_text/voice_stream`` (an RFC 6455 echo, :mod:`cmm.testing.websocket`) and
``GET /v1/code/sessions/<id>/worker/events/stream`` with ``x-fake-deltas`` ping events, paced by
``x-fake-event-delay``.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import gzip
import hashlib
import hmac
import ipaddress
import itertools
import json
import math
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cmm.machine import certs
from cmm.serve.tls import connected
from cmm.testing import websocket

ANTHROPIC_PATH = "/v1/messages"
FAKE_CONTROL_PATH = "/_fake/requests"
SESSION_EVENTS = re.compile(r"/v1/code/sessions/[^/]+/worker/events/stream")  # x-fake-deltas pings, paced

TEST_CA_FILE = "ca.pem"
TEST_CA_KEY_FILE = "ca-key.pem"
TEST_SERVER_CERT_FILE = "server.pem"
TEST_SERVER_KEY_FILE = "server-key.pem"
TEST_HOSTNAMES = ("api.anthropic.com", "localhost")
TEST_IP_ADDRESSES = ("127.0.0.1", "::1")

FAKE_MODELS = (
    ("claude-opus-4-6", "Claude Opus 4.6"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

_REASONS = {529: b"Overloaded"}

_MAX_DELAY = 600.0
_MAX_DELTAS = 1_000_000
_MAX_DELTA_SIZE = 16 * 1024 * 1024
_MAX_RESPONSE_BYTES = 256 * 1024 * 1024

ANTHROPIC_PROVIDER = "anthropic"
TARGET_SIGNATURE_PREFIX = "tgt-"  # starts the signatures of every fake but the Anthropic one
THINKING_TYPES = ("enabled", "adaptive")  # the values of ``thinking.type`` that turn thinking on
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


# -- values and pure helpers ------------------------------------------------------------------


@attrs.frozen
class RecordedRequest:
    """One request exactly as it reached a fake, for tests to assert on."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    connection: int = 0  # 1-based number of the connection it came on (keep-alive proofs)

    def header(self, name: str) -> str | None:
        """The first value of a header (names are case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": [list(h) for h in self.headers],
            "body": base64.b64encode(self.body).decode("ascii"),
            "connection": self.connection,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordedRequest:
        """Inverse of :meth:`to_json`, for tests reading ``GET /_fake/requests``."""
        return cls(
            method=data["method"],
            path=data["path"],
            headers=tuple((k, v) for k, v in data["headers"]),
            body=base64.b64decode(data["body"]),
            connection=data.get("connection", 0),
        )


@attrs.frozen
class Controls:
    """How a test asked the fake to misbehave, read from ``x-fake-*`` request headers."""

    status: int | None = None
    delay: float = 0.0
    event_delay: float = 0.0
    deltas: int = 3
    delta_size: int | None = None
    abort_after: int | None = None
    close: bool = False
    response_bytes: int | None = None
    error_text: str | None = None  # with status: a plain-text body, as a non-Anthropic proxy sends
    status_times: int | None = None  # with status: only the first N requests carrying this header fail
    thinking: bool | None = None  # x-fake-thinking: force a thinking block on/off; None: as asked
    redacted: bool = False  # x-fake-redacted: a redacted_thinking block after the thinking one
    tool_use: str | None = None  # x-fake-tool-use: end with a tool_use block for this tool
    retry_after: str | None = None  # x-fake-retry-after: with status, a retry-after header as given
    gzip: bool = False  # x-fake-gzip: the reply body gzipped (a stream flushed event by event)


def _float_header(value: str | None, default: float, high: float) -> float:
    try:
        number = float(value) if value is not None else default
    except ValueError:
        return default
    if not math.isfinite(number):
        return default
    return min(max(number, 0.0), high)


def _int_header(value: str | None, default: int | None, low: int, high: int) -> int | None:
    try:
        number = int(value.strip()) if value is not None else None
    except ValueError:
        number = None
    if number is None:
        return default
    return min(max(number, low), high)


def _bool_header(value: str | None) -> bool | None:
    value = (value or "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def parse_controls(request: RecordedRequest) -> Controls:
    """Never fails: a malformed control header is ignored, an out-of-range one clamped."""
    status = _int_header(request.header("x-fake-status"), None, 0, 999)
    close = (request.header("x-fake-close") or "").strip().lower()
    tool = (request.header("x-fake-tool-use") or "").strip()
    return Controls(
        status=status if status is not None and 400 <= status <= 599 else None,
        delay=_float_header(request.header("x-fake-delay"), 0.0, _MAX_DELAY),
        event_delay=_float_header(request.header("x-fake-event-delay"), 0.0, _MAX_DELAY),
        deltas=_int_header(request.header("x-fake-deltas"), 3, 0, _MAX_DELTAS) or 0,
        delta_size=_int_header(request.header("x-fake-delta-size"), None, 1, _MAX_DELTA_SIZE),
        abort_after=_int_header(request.header("x-fake-abort-after"), None, 0, 2**31),
        close=close in ("1", "true", "yes", "on"),
        response_bytes=_int_header(
            request.header("x-fake-response-bytes"), None, 0, _MAX_RESPONSE_BYTES
        ),
        error_text=request.header("x-fake-error-text"),
        status_times=_int_header(request.header("x-fake-status-times"), None, 0, 2**31),
        thinking=_bool_header(request.header("x-fake-thinking")),
        redacted=_bool_header(request.header("x-fake-redacted")) is True,
        tool_use=tool if _TOOL_NAME.fullmatch(tool) else None,
        retry_after=request.header("x-fake-retry-after"),
        gzip=_bool_header(request.header("x-fake-gzip")) is True,
    )


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def error_json(status: int, message: str) -> bytes:
    """Anthropic's error body for ``status``."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _json({"type": "error", "error": {"type": kind, "message": message}})


def greeting(provider: str) -> str:
    """The text each fake answers with, so a test can tell which upstream replied."""
    return f"hello from {provider}"


def delta_texts(provider: str, deltas: int, delta_size: int | None) -> Iterator[str]:
    """The ``text_delta`` pieces; they join to a text that starts with the greeting.

    Without a size the greeting is split on words (then " more" fillers); with a size every
    piece is exactly that many ASCII bytes.
    """
    text = greeting(provider)
    if delta_size is None:
        words = text.split(" ")
        pieces = [words[0]] + [" " + w for w in words[1:]]
        for i in range(deltas):
            if i == deltas - 1 and i < len(pieces):
                yield "".join(pieces[i:])
            else:
                yield pieces[i] if i < len(pieces) else " more"
        return
    source = itertools.chain(text + " ", itertools.cycle("lorem ipsum dolor sit amet "))
    for _ in range(deltas):
        yield "".join(itertools.islice(source, delta_size))


def _signature_prefix(provider: str) -> str:
    return "" if provider == ANTHROPIC_PROVIDER else TARGET_SIGNATURE_PREFIX


def _mac(provider: str, purpose: bytes, data: bytes) -> bytes:
    key = hashlib.sha256(b"cmm fake signing key\0" + provider.encode()).digest()
    return hmac.new(key, purpose + b"\0" + data, hashlib.sha256).digest()


def thinking_signature(provider: str, text: str) -> str:
    """The signature the fake named ``provider`` puts on a thinking block with this text.

    Base64 of an HMAC over the text, keyed by the provider name (so any process can check it);
    fakes other than the Anthropic one prefix theirs with :data:`TARGET_SIGNATURE_PREFIX`.
    """
    mac = _mac(provider, b"thinking", text.encode("utf-8", "surrogatepass"))
    return _signature_prefix(provider) + base64.b64encode(mac).decode("ascii")


def verify_signature(provider: str, text: object, signature: object) -> bool:
    """Whether ``signature`` is the one the fake ``provider`` made for exactly ``text``."""
    if not isinstance(text, str) or not isinstance(signature, str):
        return False
    expected = thinking_signature(provider, text).encode()
    return hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected)


def redacted_data(provider: str, secret: str) -> str:
    """The opaque ``data`` of a ``redacted_thinking`` block: base64 of ``secret`` and its HMAC."""
    payload = secret.encode("utf-8", "surrogatepass")
    blob = payload + _mac(provider, b"redacted", payload)
    return _signature_prefix(provider) + base64.b64encode(blob).decode("ascii")


def verify_redacted(provider: str, data: object) -> bool:
    """Whether ``data`` is a ``redacted_thinking`` payload the fake ``provider`` made."""
    prefix = _signature_prefix(provider)
    if not isinstance(data, str) or not data.startswith(prefix) or not data.isascii():
        return False
    try:
        blob = base64.b64decode(data[len(prefix) :], validate=True)
    except ValueError:
        return False
    payload, mac = blob[:-32], blob[-32:]
    return len(blob) >= 32 and hmac.compare_digest(mac, _mac(provider, b"redacted", payload))


def thinking_text(provider: str, message_id: str) -> str:
    """The thinking of one reply: distinct per reply, so each signature is too."""
    return f"{provider} thinks about {message_id}"


def thinking_enabled(payload: dict[str, Any]) -> bool:
    """Whether a messages request turns extended thinking on."""
    thinking = payload.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in THINKING_TYPES


def _block_type(block: object) -> object:
    return block.get("type") if isinstance(block, dict) else None


def strict_violation(payload: dict[str, Any], provider: str = ANTHROPIC_PROVIDER) -> str | None:
    """What Anthropic would reject in this request's ``messages`` (its 400 message), or None.

    Thinking signatures and redacted data must be ``provider``'s own for exactly that block; with
    thinking enabled, a last assistant message that holds a ``tool_use`` block must start with a
    thinking block; only a final assistant message may have empty content.
    """
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return None
    last_assistant: int | None = None
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        is_final_assistant = n == len(messages) - 1 and message.get("role") == "assistant"
        if content in ([], "") and not is_final_assistant:
            return (
                f"messages.{n}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        if message.get("role") == "assistant":
            last_assistant = n
        if not isinstance(content, list):
            continue
        for m, block in enumerate(content):
            kind = _block_type(block)
            if kind == "thinking":
                if "signature" not in block:
                    return f"messages.{n}.content.{m}.thinking.signature: Field required"
                if not verify_signature(provider, block.get("thinking"), block["signature"]):
                    return f"messages.{n}.content.{m}: Invalid `signature` in `thinking` block"
            elif kind == "redacted_thinking":
                if "data" not in block:
                    return f"messages.{n}.content.{m}.redacted_thinking.data: Field required"
                if not verify_redacted(provider, block["data"]):
                    return f"messages.{n}.content.{m}: Invalid `data` in `redacted_thinking` block"
    if last_assistant is not None and thinking_enabled(payload):
        content = messages[last_assistant]["content"]
        if isinstance(content, list) and any(_block_type(b) == "tool_use" for b in content):
            first = _block_type(content[0])
            if first not in ("thinking", "redacted_thinking"):
                return (
                    f"messages.{last_assistant}.content.0.type: Expected `thinking` or "
                    f"`redacted_thinking`, but found `{first}`. When `thinking` is enabled, a "
                    "final `assistant` message must start with a thinking block (preceeding the "
                    "lastmost set of `tool_use` and `tool_result` blocks). We recommend you "
                    "include thinking blocks from previous turns. To avoid this requirement, "
                    "disable `thinking`. Please consult our documentation at "
                    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
                )
    return None


def _tool_use_block(provider: str, message_id: str, name: str) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": message_id.replace("msg_", "toolu_", 1),
        "name": name,
        "input": {"provider": provider},
    }


def fake_usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    """Usage as Anthropic reports it for a cached conversation: most of the prompt read from the
    cache, a part written to it, the rest (``input_tokens``) neither."""
    read, created = prompt_tokens // 2, prompt_tokens // 4
    return {
        "input_tokens": prompt_tokens - read - created,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": output_tokens,
    }


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _json(data) + b"\n\n"


def sse_events(
    *,
    message_id: str,
    model: str,
    provider: str,
    input_tokens: int,
    deltas: int = 3,
    delta_size: int | None = None,
    thinking: bool = False,
    redacted: bool = False,
    tool_use: str | None = None,
) -> Iterator[bytes]:
    """A streamed reply in Anthropic's exact event order, generated lazily (it may be huge).

    Blocks in order: ``thinking`` (if asked; ``thinking_delta`` x 2, one ``signature_delta``),
    ``redacted_thinking`` (with thinking, if asked), the text, ``tool_use`` (if a name is given).
    ``ping`` follows the first ``content_block_start``.
    """
    yield sse_event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": fake_usage(input_tokens, 1),
            },
        },
    )
    index = 0

    def start(block: dict[str, Any]) -> Iterator[bytes]:
        yield sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )
        if index == 0:
            yield sse_event("ping", {"type": "ping"})

    def delta(delta: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    def stop() -> bytes:
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    if thinking:
        text = thinking_text(provider, message_id)
        yield from start({"type": "thinking", "thinking": "", "signature": ""})
        head, _, rest = text.partition(" ")
        for piece in (head, " " + rest):
            yield delta({"type": "thinking_delta", "thinking": piece})
        signature = thinking_signature(provider, text)
        yield delta({"type": "signature_delta", "signature": signature})
        yield stop()
        index += 1
        if redacted:
            data = redacted_data(provider, f"redacted thinking of {message_id}")
            yield from start({"type": "redacted_thinking", "data": data})
            yield stop()
            index += 1
    yield from start({"type": "text", "text": ""})
    for text in delta_texts(provider, deltas, delta_size):
        yield delta({"type": "text_delta", "text": text})
    yield stop()
    if tool_use is not None:
        index += 1
        block = _tool_use_block(provider, message_id, tool_use)
        yield from start({**block, "input": {}})
        yield delta({"type": "input_json_delta", "partial_json": _json(block["input"]).decode()})
        yield stop()
    yield sse_event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {
                "stop_reason": "end_turn" if tool_use is None else "tool_use",
                "stop_sequence": None,
            },
            "usage": {"output_tokens": max(deltas, 1)},
        },
    )
    yield sse_event("message_stop", {"type": "message_stop"})


def message_json(
    *,
    message_id: str,
    model: str,
    provider: str,
    input_tokens: int,
    pad_to: int | None = None,
    thinking: bool = False,
    redacted: bool = False,
    tool_use: str | None = None,
) -> bytes:
    """A non-streamed ``message``; ``pad_to`` pads the text so the body is about that size.

    The blocks are those of :func:`sse_events` with the same arguments.
    """
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    if thinking:
        thought = thinking_text(provider, message_id)
        signature = thinking_signature(provider, thought)
        before.append({"type": "thinking", "thinking": thought, "signature": signature})
        if redacted:
            data = redacted_data(provider, f"redacted thinking of {message_id}")
            before.append({"type": "redacted_thinking", "data": data})
    if tool_use is not None:
        after.append(_tool_use_block(provider, message_id, tool_use))

    def build(text: str) -> bytes:
        return _json(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [*before, {"type": "text", "text": text}, *after],
                "stop_reason": "end_turn" if tool_use is None else "tool_use",
                "stop_sequence": None,
                "usage": fake_usage(input_tokens, 5),
            }
        )

    text = greeting(provider)
    body = build(text)
    if pad_to is not None and pad_to > len(body):
        body = build(text + " " + "x" * (pad_to - len(body) - 1))
    return body


def models_json() -> bytes:
    data = [
        {"type": "model", "id": mid, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}
        for mid, name in FAKE_MODELS
    ]
    return _json(
        {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    )


@attrs.frozen
class Reply:
    """What to answer: a whole body, or (``events`` not None) an SSE stream."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    events: Iterator[bytes] | None = attrs.field(default=None, eq=False)


def _decoded_body(request: RecordedRequest) -> bytes:
    """The JSON under any Content-Encoding, decoded as the real API would (cmm's own decoder)."""
    from cmm.core.decoding import BodyDecoder
    from cmm.core.errors import HttpError

    codings = [c.strip().lower() for c in (request.header("content-encoding") or "").split(",") if c.strip()]
    decoder = BodyDecoder(codings, _MAX_RESPONSE_BYTES)  # ValueError for an unknown coding
    try:
        body = b"".join(decoder.feed(request.body))
        decoder.finish()
    except HttpError as error:
        raise ValueError(error.message) from None
    return body


def _error(status: int, message: str, common: tuple[tuple[str, str], ...]) -> Reply:
    return Reply(
        status, common + (("content-type", "application/json"),), error_json(status, message)
    )


def plan_reply(
    request: RecordedRequest,
    controls: Controls,
    *,
    provider: str,
    base_path: str,
    request_number: int,
    strict: bool = False,
) -> Reply:
    """The pure core of a fake: request in, reply out (``strict``: see :func:`strict_violation`)."""
    request_id = f"req_fake_{provider}_{request_number:06d}"
    common = (("request-id", request_id), ("x-fake-provider", provider))
    if controls.status is not None and controls.error_text is not None:
        return Reply(controls.status, common + (("content-type", "text/plain"),), controls.error_text.encode())
    if controls.status is not None:
        extra = (("retry-after", controls.retry_after),) if controls.retry_after is not None else ()
        return _error(controls.status, f"x-fake-status asked for {controls.status}", common + extra)
    path = urlsplit(request.path).path
    base = base_path.rstrip("/") or "/"
    if request.method == "GET" and path == "/v1/models":
        return Reply(200, common + (("content-type", "application/json"),), models_json())
    if request.method == "GET" and SESSION_EVENTS.fullmatch(path):  # Remote Control's long event stream
        pings = (sse_event("ping", {"type": "ping", "n": n}) for n in range(controls.deltas))
        return Reply(200, common + (("content-type", "text/event-stream"),), events=pings)
    if request.method != "POST" or path not in (base, base + "/count_tokens"):
        return _error(404, f"{request.method} {path} not found", common)
    try:
        payload = json.loads(_decoded_body(request))
    except (ValueError, zlib.error) as e:
        return _error(400, f"request body is not valid JSON: {e}", common)
    if not isinstance(payload, dict):
        return _error(400, "request body must be a JSON object", common)
    if strict:
        violation = strict_violation(payload, provider)
        if violation is not None:
            return _error(400, violation, common)
    input_tokens = len(request.body) // 4
    if path.endswith("/count_tokens"):
        return Reply(
            200,
            common + (("content-type", "application/json"),),
            _json({"input_tokens": input_tokens}),
        )
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return _error(400, "model: Field required", common)
    message_id = f"msg_fake_{provider}_{request_number:06d}"
    thinking = controls.thinking
    if thinking is None:
        messages = payload.get("messages")
        prefill = (
            isinstance(messages, list)
            and bool(messages)
            and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant"
        )
        thinking = thinking_enabled(payload) and not prefill
    if payload.get("stream") is True:
        events = sse_events(
            message_id=message_id,
            model=model,
            provider=provider,
            input_tokens=input_tokens,
            deltas=controls.deltas,
            delta_size=controls.delta_size,
            thinking=thinking,
            redacted=controls.redacted,
            tool_use=controls.tool_use,
        )
        headers = common + (
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
        )
        if controls.gzip:
            return Reply(200, headers + (("content-encoding", "gzip"),), events=_gzipped(events))
        return Reply(200, headers, events=events)
    body = message_json(
        message_id=message_id,
        model=model,
        provider=provider,
        input_tokens=input_tokens,
        pad_to=controls.response_bytes,
        thinking=thinking,
        redacted=controls.redacted,
        tool_use=controls.tool_use,
    )
    if controls.gzip:
        headers = common + (("content-type", "application/json"), ("content-encoding", "gzip"))
        return Reply(200, headers, gzip.compress(body))
    return Reply(200, common + (("content-type", "application/json"),), body)


def _gzipped(events: Iterator[bytes]) -> Iterator[bytes]:
    """A stream gzipped as a server does it: each event flushed, so it can be read as it comes."""
    compressor = zlib.compressobj(wbits=31)
    for event in events:
        yield compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()


def check_loopback(interface: str) -> str:
    """Fakes must never be reachable from another machine."""
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        raise ValueError(
            f"refusing to listen on {interface!r}: give a loopback IP address (127.0.0.0/8 or ::1)"
        ) from None
    if not address.is_loopback:
        raise ValueError(
            f"refusing to listen on {interface}: not a loopback address (127.0.0.0/8 or ::1)"
        )
    return interface


# -- test PKI -------------------------------------------------------------------------------------


def make_test_pki(directory: Path) -> Path:
    """An unconstrained test CA and a server certificate for the test names; returns the CA PEM.

    Idempotent and safe against concurrent callers (a lock file), so every test and process can
    call it on the same directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / TEST_CA_FILE
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = datetime.now(timezone.utc)
        ca = certs.read_key_pair(ca_path, directory / TEST_CA_KEY_FILE)
        if not certs.ca_is_usable(ca, now + timedelta(days=1)):
            ca = certs.make_ca(now, permitted_names=None, common_name="cmm test CA (unconstrained)")
            certs.write_atomically(directory / TEST_CA_KEY_FILE, ca.key_pem, certs.KEY_MODE)
            certs.write_atomically(ca_path, ca.cert_pem, certs.CERT_MODE)
        assert ca is not None
        server = certs.read_key_pair(
            directory / TEST_SERVER_CERT_FILE, directory / TEST_SERVER_KEY_FILE
        )
        if certs.server_needs_issue(server, ca.cert_pem, now, timedelta(days=1)):
            server = certs.make_server_certificate(
                ca, now, hostnames=TEST_HOSTNAMES, ip_addresses=TEST_IP_ADDRESSES
            )
            certs.write_atomically(directory / TEST_SERVER_KEY_FILE, server.key_pem, certs.KEY_MODE)
            certs.write_atomically(
                directory / TEST_SERVER_CERT_FILE, server.cert_pem, certs.CERT_MODE
            )
    return ca_path


def _tls_options(cert_dir: Path) -> ssl.CertificateOptions:
    make_test_pki(cert_dir)
    cert_pem = (Path(cert_dir) / TEST_SERVER_CERT_FILE).read_bytes()
    key_pem = (Path(cert_dir) / TEST_SERVER_KEY_FILE).read_bytes()
    # cryptography objects, not pyOpenSSL's (deprecated); CertificateOptions hands them to OpenSSL,
    # which takes both kinds, though Twisted annotates only pyOpenSSL's PKey and X509.
    return ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(key_pem, password=None),  # type: ignore[arg-type]  # see above
        certificate=x509.load_pem_x509_certificate(cert_pem),  # type: ignore[arg-type]  # see above
        acceptableProtocols=[b"http/1.1"],
    )


# -- the Twisted shell ----------------------------------------------------------------------------


class _NumberedConnection(ProtocolWrapper):
    """Carries the connection's number so each recorded request can say which one it came on."""

    connection_number = 0


class _TrackingFactory(WrappingFactory):
    """Counts connections and knows the open ones, so ``stop()`` can close them and wait."""

    protocol = _NumberedConnection

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self.connections_made = 0
        self._idle: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> _NumberedConnection:
        proto = super().buildProtocol(addr)
        assert isinstance(proto, _NumberedConnection)  # our ``protocol``
        self.connections_made += 1
        proto.connection_number = self.connections_made
        return proto

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def close_all(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.abortConnection()
        return d


class _QuietSite(Site):
    """No access log: the benchmark measures the proxy, not log formatting in the fake."""

    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


@attrs.define(eq=False)
class _EventStreamer:
    """Writes SSE events one by one as a push producer: paced, and paused by backpressure."""

    request: Request
    events: Iterator[bytes]
    event_delay: float
    abort_after: int | None
    clock: IReactorTime
    _paused: bool = False
    _done: bool = False
    _pumping: bool = False
    _sent: int = 0
    _call: IDelayedCall | None = None

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._pump()

    def _pump(self) -> None:
        self._call = None
        if self._pumping:
            return
        self._pumping = True
        try:
            while not (self._paused or self._done):
                if self.abort_after is not None and self._sent >= self.abort_after:
                    self._abort()
                    return
                event = next(self.events, None)
                if event is None:
                    if self.abort_after is not None:
                        self._abort()
                    else:
                        self._done = True
                        self.request.unregisterProducer()
                        self.request.finish()
                    return
                self.request.write(event)
                self._sent += 1
                if self.event_delay > 0:
                    self._call = self.clock.callLater(self.event_delay, self._pump)
                    return
        finally:
            self._pumping = False

    def _abort(self) -> None:
        """Drop the connection once the events already written have left the fake.

        abortConnection discards whatever is still buffered, so it waits a short grace period
        (longer while the transport is applying backpressure) to let the N events through.
        """
        self._done = True
        _abort_soon(self.request, self.clock, lambda: self._paused)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            if self._call is None and not self._done:
                self._pump()

    def stopProducing(self) -> None:
        self._done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, upstream: FakeUpstream) -> None:
        super().__init__()
        self._upstream = upstream

    def render(self, request: Request) -> Any:
        recorded = _record(request)
        if recorded.method == "GET" and urlsplit(recorded.path).path == FAKE_CONTROL_PATH:
            request.setHeader(b"content-type", b"application/json")
            return _json(
                {
                    "connections_made": self._upstream.connections_made,
                    "request_count": self._upstream.request_count,
                    "requests": [r.to_json() for r in self._upstream.requests],
                }
            )
        number = self._upstream.record(recorded)
        if urlsplit(recorded.path).path == websocket.VOICE_STREAM_PATH:
            return websocket.serve(request, self._upstream.clock)
        controls = parse_controls(recorded)
        if recorded.header("x-fake-for") not in (None, self._upstream.provider):
            controls = Controls()  # the controls are another fake's
        if controls.status is not None and controls.status_times is not None:
            key = recorded.header("x-test-id") or ""
            failed = self._upstream.failures.get(key, 0)
            if failed >= controls.status_times:
                controls = attrs.evolve(controls, status=None)  # enough failures: answer normally
            else:
                self._upstream.failures[key] = failed + 1
        reply = plan_reply(
            recorded,
            controls,
            provider=self._upstream.provider,
            base_path=self._upstream.base_path,
            request_number=number,
            strict=self._upstream.strict,
        )
        if controls.delay > 0:
            call = self._upstream.clock.callLater(
                controls.delay, _send, request, reply, controls, self._upstream.clock
            )
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        else:
            _send(request, reply, controls, self._upstream.clock)
        return NOT_DONE_YET


def _record(request: Request) -> RecordedRequest:
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    )
    assert request.content is not None  # the body, read in full before render
    request.content.seek(0)
    return RecordedRequest(
        method=request.method.decode("latin-1"),
        path=request.uri.decode("latin-1"),
        headers=headers,
        body=request.content.read(),
        connection=getattr(request.channel.transport, "connection_number", 0),
    )


ABORT_GRACE = 0.05


def _abort_soon(request: Request, clock: IReactorTime, busy: Callable[[], bool]) -> None:
    """abortConnection after a grace period (see _EventStreamer._abort); cancelled if the
    connection goes away first, so a stopped fake leaves no timers behind."""
    pending: list[IDelayedCall] = []

    def attempt() -> None:
        pending.clear()
        if busy():
            pending.append(clock.callLater(ABORT_GRACE, attempt))
        else:
            assert request.channel is not None  # notifyFinish would have cancelled this
            connected(request.channel).abortConnection()

    def cancel(_: object) -> None:
        for call in pending:
            if call.active():
                call.cancel()

    pending.append(clock.callLater(ABORT_GRACE, attempt))
    request.notifyFinish().addErrback(cancel)


def _send(request: Request, reply: Reply, controls: Controls, clock: IReactorTime) -> None:
    request.setResponseCode(reply.status, _REASONS.get(reply.status))
    for name, value in reply.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    if controls.close:
        request.setHeader(b"connection", b"close")
        request.channel.persistent = False
    if reply.events is not None:
        _EventStreamer(
            request, reply.events, controls.event_delay, controls.abort_after, clock
        ).start()
        return
    request.setHeader(b"content-length", str(len(reply.body)).encode())
    if controls.abort_after is not None:
        # Not a stream: send the head and the first N body bytes, then drop the connection.
        request.write(reply.body[: controls.abort_after])
        _abort_soon(request, clock, lambda: False)
        return
    request.write(reply.body)
    request.finish()


@attrs.define(eq=False)
class FakeUpstream:
    """One running fake; ``requests`` fills as requests arrive."""

    provider: str
    base_path: str
    clock: IReactorTime
    keep_requests: int | None = None  # keep only the newest N (long benchmark runs); None: all
    requests: list[RecordedRequest] = attrs.field(factory=list)
    request_count: int = 0  # every request ever received, also those no longer kept
    failures: dict[str, int] = attrs.field(factory=dict)  # x-fake-status-times counts, per x-test-id
    strict: bool = False  # check thinking signatures and the other rules (strict_violation)
    _listening: IListeningPort | None = None
    _factory: _TrackingFactory | None = None

    def record(self, request: RecordedRequest) -> int:
        """Keep a request (before it is answered); returns its 1-based number."""
        self.request_count += 1
        if self.keep_requests != 0:
            self.requests.append(request)
            if self.keep_requests is not None and len(self.requests) > self.keep_requests:
                del self.requests[: len(self.requests) - self.keep_requests]
        return self.request_count

    @property
    def port(self) -> int:
        assert self._listening is not None
        address = self._listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))  # fakes listen on TCP
        return address.port

    @property
    def connections_made(self) -> int:
        return self._factory.connections_made if self._factory is not None else 0

    def stop(self) -> Deferred[None]:
        """Stop listening and drop open connections; fires once all of them are gone."""
        if self._listening is None or self._factory is None:
            return succeed(None)
        listening, self._listening = self._listening, None

        def stop_listening() -> Deferred[None]:  # IListeningPort may return None for 'done already'
            stopped = listening.stopListening()
            return stopped if stopped is not None else succeed(None)

        stopping = [maybeDeferred(stop_listening), self._factory.close_all()]
        return gatherResults(stopping, consumeErrors=True).addCallback(lambda _: None)


def _start(
    reactor: Any,
    *,
    provider: str,
    base_path: str,
    port: int,
    interface: str,
    tls_cert_dir: Path | None,
    keep_requests: int | None,
    strict: bool,
) -> FakeUpstream:
    check_loopback(interface)
    upstream = FakeUpstream(
        provider=provider,
        base_path=base_path,
        clock=reactor,
        keep_requests=keep_requests,
        strict=strict,
    )
    factory = _TrackingFactory(_QuietSite(_FakeResource(upstream)))
    if tls_cert_dir is not None:
        listening = reactor.listenSSL(
            port, factory, _tls_options(tls_cert_dir), interface=interface
        )
    else:
        listening = reactor.listenTCP(port, factory, interface=interface)
    upstream._listening = listening
    upstream._factory = factory
    return upstream


def start_fake_anthropic(
    reactor: Any,
    *,
    cert_dir: Path,
    port: int = 0,
    interface: str = "127.0.0.1",
    keep_requests: int | None = None,
    strict: bool = True,
) -> FakeUpstream:
    """A fake api.anthropic.com over TLS (test PKI in ``cert_dir``, made if missing)."""
    return _start(
        reactor,
        provider=ANTHROPIC_PROVIDER,
        base_path=ANTHROPIC_PATH,
        port=port,
        interface=interface,
        tls_cert_dir=Path(cert_dir),
        keep_requests=keep_requests,
        strict=strict,
    )


def start_fake_target(
    reactor: Any,
    *,
    port: int = 0,
    interface: str = "127.0.0.1",
    tls_cert_dir: Path | None = None,
    base_path: str = ANTHROPIC_PATH,
    provider: str = "target",
    keep_requests: int | None = None,
    strict: bool = False,
) -> FakeUpstream:
    """A fake CLIProxyAPI: Anthropic-compatible, plain http unless ``tls_cert_dir`` is given."""
    return _start(
        reactor,
        provider=provider,
        base_path=base_path,
        port=port,
        interface=interface,
        tls_cert_dir=Path(tls_cert_dir) if tls_cert_dir is not None else None,
        keep_requests=keep_requests,
        strict=strict,
    )


# -- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cmm.testing.fakes", description="Run a fake upstream.")
    sub = parser.add_subparsers(dest="kind", required=True)
    anthropic = sub.add_parser("anthropic", help="fake api.anthropic.com (TLS)")
    anthropic.add_argument("--port", type=int, default=0)
    anthropic.add_argument("--cert-dir", type=Path, required=True)
    anthropic.add_argument("--interface", default="127.0.0.1")
    anthropic.add_argument("--keep-requests", type=int, default=None, metavar="N")
    anthropic.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reject thinking blocks this fake did not sign, as Anthropic does (default: on)",
    )
    target = sub.add_parser("target", help="fake CLIProxyAPI (plain http unless --tls-cert-dir)")
    target.add_argument("--port", type=int, default=0)
    target.add_argument("--interface", default="127.0.0.1")
    target.add_argument("--base-path", default=ANTHROPIC_PATH)
    target.add_argument("--tls-cert-dir", type=Path, default=None)
    target.add_argument("--provider", default="target")
    target.add_argument(
        "--keep-requests",
        type=int,
        default=None,
        metavar="N",
        help="remember only the newest N requests (long benchmark runs)",
    )
    target.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="reject thinking blocks this fake did not sign (default: off, answer anything)",
    )
    return parser


def main(argv: Sequence[str] | None = None, reactor: Any = None) -> int:
    """Run one fake until SIGTERM/SIGINT; prints ``listening on <port>`` once ready."""
    args = _parser().parse_args(argv)
    try:
        check_loopback(args.interface)
    except ValueError as e:
        print(f"cmm.testing.fakes: {e}", file=sys.stderr)
        return 2
    if reactor is None:
        from twisted.internet import reactor
    try:
        if args.kind == "anthropic":
            fake = start_fake_anthropic(
                reactor,
                cert_dir=args.cert_dir,
                port=args.port,
                interface=args.interface,
                keep_requests=args.keep_requests,
                strict=args.strict,
            )
        else:
            fake = start_fake_target(
                reactor,
                port=args.port,
                interface=args.interface,
                tls_cert_dir=args.tls_cert_dir,
                base_path=args.base_path,
                provider=args.provider,
                keep_requests=args.keep_requests,
                strict=args.strict,
            )
    except Exception as e:  # a port in use, unreadable certificates, ...
        print(f"cmm.testing.fakes: cannot start: {e}", file=sys.stderr)
        return 1
    print(f"listening on {fake.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
