"""The fake upstreams, over real loopback sockets (each fake in its own process) plus pure cores."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store

from cmm.testing import fakes
from cmm.testing.fakes import Controls, RecordedRequest, check_loopback, make_test_pki, parse_controls

REPO = Path(__file__).resolve().parents[2]
SSE_ORDER = [
    "message_start",
    "content_block_start",
    "ping",
    "content_block_delta",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class FakeProcess:
    """``python -m cmm.testing.fakes ...`` in the background; ``port`` is what it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cmm.testing.fakes", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
            cwd=REPO,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise AssertionError(f"fake did not start: {line!r} {self.proc.stderr.read()!r}")
        self.port = int(line.split()[-1])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="module")
def target() -> Iterator[FakeProcess]:
    fake = FakeProcess("target", "--port", "0")
    yield fake
    assert fake.stop() == 0


@pytest.fixture(scope="module")
def anthropic(pki: Path) -> Iterator[FakeProcess]:
    fake = FakeProcess("anthropic", "--port", "0", "--cert-dir", str(pki))
    yield fake
    assert fake.stop() == 0


def tls_connection(port: int, ca: Path) -> http.client.HTTPSConnection:
    """What Claude Code does: TLS to 127.0.0.1 but verifying the name api.anthropic.com."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])

    class Connection(http.client.HTTPSConnection):
        def connect(self) -> None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.sock = context.wrap_socket(sock, server_hostname="api.anthropic.com")

    return Connection("api.anthropic.com", port, timeout=10)


def post(conn: http.client.HTTPConnection, path: str, body: object, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(
        "POST", path, body=data, headers={"content-type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    return response, response.read()


def sse_types(payload: bytes) -> list[str]:
    events = [e for e in payload.decode().split("\n\n") if e]
    types = []
    for event in events:
        lines = event.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        kind = lines[0][len("event: ") :]
        assert json.loads(lines[1][len("data: ") :])["type"] == kind
        types.append(kind)
    return types


def sse_text(payload: bytes) -> str:
    text = ""
    for event in payload.decode().split("\n\n"):
        if event.startswith("event: content_block_delta"):
            text += json.loads(event.split("\n")[1][6:])["delta"]["text"]
    return text


def recorded(port: int) -> tuple[int, list[RecordedRequest]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", fakes.FAKE_CONTROL_PATH)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data["connections_made"], [RecordedRequest.from_json(r) for r in data["requests"]]


# -- over sockets ---------------------------------------------------------------------------------


def test_sse_event_order_exact(target: FakeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    response, payload = post(
        conn, "/v1/messages?beta=true", {"model": "gemini-2.5-flash", "stream": True}
    )
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    assert sse_types(payload) == SSE_ORDER
    assert sse_text(payload) == "hello from target"
    start = json.loads(payload.split(b"\n\n")[0].split(b"\n")[1][6:])
    assert start["message"]["model"] == "gemini-2.5-flash"
    last_delta = json.loads(payload.split(b"\n\n")[7].split(b"\n")[1][6:])
    assert last_delta["delta"]["stop_reason"] == "end_turn" and "usage" in last_delta


def test_sse_deltas_sizes_and_pacing(target: FakeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    started = time.monotonic()
    _, payload = post(
        conn,
        "/v1/messages",
        {"model": "m", "stream": True},
        {"x-fake-deltas": "5", "x-fake-delta-size": "1000", "x-fake-event-delay": "0.02"},
    )
    assert time.monotonic() - started >= 0.02 * 9
    assert sse_types(payload).count("content_block_delta") == 5
    text = sse_text(payload)
    assert len(text) == 5000 and text.startswith("hello from target")


def test_non_streaming_message(target: FakeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    response, payload = post(conn, "/v1/messages", {"model": "gpt-5", "max_tokens": 10})
    assert response.status == 200
    assert response.getheader("content-type") == "application/json"
    assert response.getheader("request-id")
    message = json.loads(payload)
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "gpt-5" and message["stop_reason"] == "end_turn"
    assert message["content"] == [{"type": "text", "text": "hello from target"}]
    assert set(message["usage"]) >= {"input_tokens", "output_tokens"}
    _, padded = post(conn, "/v1/messages", {"model": "gpt-5"}, {"x-fake-response-bytes": "100000"})
    assert abs(len(padded) - 100000) < 100


def test_recording_body_and_headers(target: FakeProcess) -> None:
    body = b'{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"caf\xc3\xa9"}]}'
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    conn.putrequest("POST", "/v1/messages?beta=true", skip_host=True, skip_accept_encoding=True)
    for name, value in [
        ("Host", "127.0.0.1"),
        ("X-Api-Key", "sk-secret"),
        ("Anthropic-Version", "2023-06-01"),
        ("X-Marker", "recording-test"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]:
        conn.putheader(name, value)
    conn.endheaders(body)
    assert conn.getresponse().read()
    _, requests = recorded(target.port)
    [request] = [r for r in requests if r.header("x-marker") == "recording-test"]
    assert request.method == "POST"
    assert request.path == "/v1/messages?beta=true"
    assert request.body == body
    assert request.headers == (
        ("host", "127.0.0.1"),
        ("x-api-key", "sk-secret"),
        ("anthropic-version", "2023-06-01"),
        ("x-marker", "recording-test"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    )
    assert request.header("X-API-KEY") == "sk-secret" and request.header("cookie") is None


def test_chunked_and_gzip_bodies(target: FakeProcess) -> None:
    raw = json.dumps({"model": "m", "marker": "chunked"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    conn.request(
        "POST",
        "/v1/messages",
        body=iter([raw[:5], raw[5:]]),
        encode_chunked=True,
        headers={"transfer-encoding": "chunked"},
    )
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["model"] == "m"
    zipped = gzip.compress(json.dumps({"model": "zipped"}).encode())
    response, payload = post(conn, "/v1/messages", zipped, {"content-encoding": "gzip"})
    assert response.status == 200 and json.loads(payload)["model"] == "zipped"
    _, requests = recorded(target.port)
    assert any(r.body == raw for r in requests)
    assert any(r.body == zipped for r in requests)


@pytest.mark.parametrize(
    ("status", "kind"), [(529, "overloaded_error"), (429, "rate_limit_error"), (500, "api_error")]
)
def test_status_control(target: FakeProcess, status: int, kind: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    response, payload = post(
        conn, "/v1/messages", {"model": "m", "stream": True}, {"x-fake-status": str(status)}
    )
    assert response.status == status
    assert response.getheader("content-type") == "application/json"
    error = json.loads(payload)
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert error["error"]["message"]


def test_count_tokens_models_and_errors(target: FakeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 100}]}).encode()
    response, payload = post(conn, "/v1/messages/count_tokens?beta=true", body)
    assert response.status == 200 and json.loads(payload) == {"input_tokens": len(body) // 4}
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    assert models["data"] and all(m["type"] == "model" for m in models["data"])
    conn.request("GET", "/api/claude_code/settings")
    response = conn.getresponse()
    assert response.status == 404
    assert json.loads(response.read())["error"]["type"] == "not_found_error"
    response, payload = post(conn, "/v1/messages", b"{not json")
    assert response.status == 400
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"


def test_delay_control(target: FakeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    started = time.monotonic()
    response, _ = post(conn, "/v1/messages", {"model": "m"}, {"x-fake-delay": "0.3"})
    assert response.status == 200 and time.monotonic() - started >= 0.3
    # Malformed controls are ignored, not fatal.
    response, _ = post(
        conn, "/v1/messages", {"model": "m"}, {"x-fake-delay": "nan", "x-fake-deltas": "x"}
    )
    assert response.status == 200


def test_abort_after_drops_connection(target: FakeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    conn.request(
        "POST",
        "/v1/messages",
        body=json.dumps({"model": "m", "stream": True}),
        headers={"x-fake-abort-after": "2", "x-fake-deltas": "50"},
    )
    response = conn.getresponse()
    assert response.status == 200
    received = b""
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break  # a clean end would be wrong: the fake must abort
            received += chunk
    assert sse_types(received) == ["message_start", "content_block_start"]


def test_keep_alive_reuse_counted() -> None:
    fake = FakeProcess("target", "--port", "0", "--base-path", "/api/provider/v1/messages")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
        for _ in range(3):
            response, payload = post(conn, "/api/provider/v1/messages", {"model": "m"})
            assert response.status == 200
        response, _ = post(conn, "/v1/messages", {"model": "m"})
        assert response.status == 404  # only the configured base path is served
        connections, requests = recorded(fake.port)
        assert len(requests) == 4 and {r.connection for r in requests} == {1}
        assert connections == 2  # the kept-alive one plus the one that asked for the records
        response, _ = post(conn, "/api/provider/v1/messages", {"model": "m"}, {"x-fake-close": "1"})
        assert response.getheader("connection") == "close"
        response, _ = post(conn, "/api/provider/v1/messages", {"model": "m"})  # reconnects
        connections, requests = recorded(fake.port)
        assert [r.connection for r in requests] == [1, 1, 1, 1, 1, 3]
        assert connections == 4
    finally:
        assert fake.stop() == 0


def test_anthropic_tls_verified(anthropic: FakeProcess, pki: Path) -> None:
    ca = make_test_pki(pki)
    conn = tls_connection(anthropic.port, ca)
    response, payload = post(
        conn, "/v1/messages?beta=true", {"model": "claude-opus-4-6", "stream": True}
    )
    assert conn.sock.selected_alpn_protocol() == "http/1.1"
    assert response.status == 200 and sse_types(payload) == SSE_ORDER
    assert sse_text(payload) == "hello from anthropic"
    response, payload = post(conn, "/v1/messages", {"model": "claude-opus-4-6"})
    assert json.loads(payload)["content"][0]["text"] == "hello from anthropic"
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 200
    # A client that does not trust the test CA refuses the fake.
    context = ssl.create_default_context(cafile=str(make_test_pki(pki.parent / "other-pki")))
    with socket.create_connection(("127.0.0.1", anthropic.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(sock, server_hostname="api.anthropic.com")


def test_non_loopback_interface_refused() -> None:
    for interface in ("0.0.0.0", "192.0.2.1", "localhost", "::"):
        result = subprocess.run(
            [sys.executable, "-m", "cmm.testing.fakes", "target", "--port", "0", "--interface", interface],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=REPO,
            timeout=30,
        )
        assert result.returncode == 2, interface
        assert "refusing to listen" in result.stderr and result.stdout == ""


def test_python_api_and_stop() -> None:
    """start_fake_target/stop in-process (in a child, to keep this test's process reactor-free)."""
    script = textwrap.dedent("""
        import json
        from twisted.internet import task
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.defer import Deferred
        from twisted.internet.protocol import Protocol
        from twisted.web.http_headers import Headers
        from twisted.web.client import Agent, HTTPConnectionPool, FileBodyProducer
        from io import BytesIO
        from cmm.testing.fakes import start_fake_target

        class Collect(Protocol):
            def __init__(self):
                self.done, self.data = Deferred(), b""
            def dataReceived(self, data):
                self.data += data
            def connectionLost(self, reason):
                self.done.callback(self.data)

        def read_body(response):
            collect = Collect()
            response.deliverBody(collect)
            return collect.done

        async def main(reactor):
            fake = start_fake_target(reactor, interface="::1", provider="cliproxyapi")
            pool = HTTPConnectionPool(reactor, persistent=True)
            agent = Agent(reactor, pool=pool)
            for _ in range(3):
                response = await agent.request(
                    b"POST", b"http://[::1]:%d/v1/messages" % fake.port, None,
                    FileBodyProducer(BytesIO(b'{"model":"m"}')))
                body = json.loads(await read_body(response))
                assert body["content"][0]["text"] == "hello from cliproxyapi", body
            assert fake.connections_made == 1, fake.connections_made
            assert len(fake.requests) == 3 and fake.requests[0].body == b'{"model":"m"}'
            assert fake.request_count == 3
            small = start_fake_target(reactor, keep_requests=1)
            for n in range(2):
                response = await agent.request(
                    b"POST", b"http://127.0.0.1:%d/v1/messages" % small.port, None,
                    FileBodyProducer(BytesIO(b'{"model":"m%d"}' % n)))
                await read_body(response)
            assert small.request_count == 2
            assert [r.body for r in small.requests] == [b'{"model":"m1"}']
            # A delayed reply still in flight: stop() cancels it and closes the connection.
            pending = agent.request(b"POST", b"http://127.0.0.1:%d/v1/messages" % small.port,
                Headers({"x-fake-delay": ["5"]}), FileBodyProducer(BytesIO(b'{"model":"m"}')))
            pending.addErrback(lambda f: None)
            await task.deferLater(reactor, 0.2, lambda: None)
            await small.stop()
            await fake.stop()   # a kept-alive connection is still open: stop must close it
            await pool.closeCachedConnections()
            print("ok")

        task.react(lambda reactor: ensureDeferred(main(reactor)))
        """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=30
    )
    assert result.stdout.strip() == "ok", result.stderr


# -- pure parts -----------------------------------------------------------------------------------


def request_with(*headers: tuple[str, str]) -> RecordedRequest:
    return RecordedRequest(method="POST", path="/v1/messages", headers=headers, body=b"")


def test_parse_controls_defaults_and_defence() -> None:
    assert parse_controls(request_with()) == Controls()
    controls = parse_controls(
        request_with(
            ("x-fake-status", "529"),
            ("x-fake-delay", "0.5"),
            ("x-fake-event-delay", "0.05"),
            ("x-fake-deltas", "50"),
            ("x-fake-delta-size", "1000"),
            ("x-fake-abort-after", "2"),
            ("x-fake-close", "1"),
            ("x-fake-response-bytes", "4096"),
        )
    )
    assert controls == Controls(529, 0.5, 0.05, 50, 1000, 2, True, 4096)
    silly = parse_controls(
        request_with(
            ("x-fake-status", "200"),
            ("x-fake-delay", "inf"),
            ("x-fake-event-delay", "-3"),
            ("x-fake-deltas", "-1"),
            ("x-fake-delta-size", "zero"),
            ("x-fake-abort-after", ""),
            ("x-fake-close", "nope"),
        )
    )
    assert silly == Controls(status=None, delay=0.0, event_delay=0.0, deltas=0)


def test_delta_texts() -> None:
    assert "".join(fakes.delta_texts("x", 3, None)) == "hello from x"
    assert "".join(fakes.delta_texts("x", 1, None)) == "hello from x"
    assert list(fakes.delta_texts("x", 5, None))[3:] == [" more", " more"]
    sized = list(fakes.delta_texts("x", 4, 7))
    assert [len(p) for p in sized] == [7] * 4 and "".join(sized).startswith("hello from x")


def test_check_loopback() -> None:
    for ok in ("127.0.0.1", "127.3.2.1", "::1"):
        assert check_loopback(ok) == ok
    for bad in ("0.0.0.0", "::", "10.0.0.1", "localhost", "example.com"):
        with pytest.raises(ValueError):
            check_loopback(bad)


def test_make_test_pki_idempotent(tmp_path: Path) -> None:
    ca_path = make_test_pki(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert make_test_pki(tmp_path) == ca_path
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    assert x509.NameConstraints.oid not in {e.oid for e in ca.extensions}
    leaf = x509.load_pem_x509_certificate((tmp_path / fakes.TEST_SERVER_CERT_FILE).read_bytes())
    for name in ("api.anthropic.com", "localhost"):
        PolicyBuilder().store(Store([ca])).build_server_verifier(DNSName(name)).verify(leaf, [])
    assert oct((tmp_path / fakes.TEST_SERVER_KEY_FILE).stat().st_mode & 0o777) == "0o600"


# -- thinking, signatures and strict mode ---------------------------------------------------------

THINKING = {"budget_tokens": 31999, "type": "enabled", "display": "omitted"}
SSE_THINKING_ORDER = [
    "message_start",
    "content_block_start",  # thinking, index 0
    "ping",
    "content_block_delta",  # thinking_delta
    "content_block_delta",  # thinking_delta
    "content_block_delta",  # signature_delta
    "content_block_stop",
    "content_block_start",  # text, index 1
    "content_block_delta",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def tool_use_error(n: int, found: str) -> str:
    return (
        f"messages.{n}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
        f"`{found}`. When `thinking` is enabled, a final `assistant` message must start with a "
        "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We "
        "recommend you include thinking blocks from previous turns. To avoid this requirement, "
        "disable `thinking`. Please consult our documentation at "
        "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
    )


def plan(
    body: dict,
    *headers: tuple[str, str],
    provider: str = "anthropic",
    strict: bool = True,
    path: str = "/v1/messages",
    number: int = 1,
) -> fakes.Reply:
    request = RecordedRequest("POST", path, headers, json.dumps(body).encode())
    return fakes.plan_reply(
        request,
        parse_controls(request),
        provider=provider,
        base_path=fakes.ANTHROPIC_PATH,
        request_number=number,
        strict=strict,
    )


def error_of(reply: fakes.Reply) -> dict:
    assert reply.status == 400 and reply.events is None
    body = json.loads(reply.body)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    return body["error"]


def sse_data(payload: bytes) -> list[tuple[str, dict]]:
    out = []
    for event in payload.decode().split("\n\n"):
        if event:
            kind, data = event.split("\n")
            out.append((kind[len("event: ") :], json.loads(data[len("data: ") :])))
    return out


def streamed_content(events: list[tuple[str, dict]]) -> list[dict]:
    """The content blocks a client assembles from a stream (as the SDKs do)."""
    blocks: list[dict] = []
    partial: dict[int, str] = {}
    for kind, data in events:
        if kind == "content_block_start":
            assert data["index"] == len(blocks)
            blocks.append(dict(data["content_block"]))
        elif kind == "content_block_delta":
            block, delta = blocks[data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] += delta["signature"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
    for index, text in partial.items():
        blocks[index]["input"] = json.loads(text)
    return blocks


def conversation(*assistant_turns: list[dict], tool_result: bool = True) -> dict:
    """user, then for each assistant turn: the turn and a user message (a tool_result if asked)."""
    messages: list[dict] = [{"role": "user", "content": "hi"}]
    for turn in assistant_turns:
        messages.append({"role": "assistant", "content": turn})
        tool_ids = [b["id"] for b in turn if b.get("type") == "tool_use"]
        if tool_result and tool_ids:
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": i, "content": "ok"} for i in tool_ids
                    ],
                }
            )
        else:
            messages.append({"role": "user", "content": "go on"})
    return {"model": "claude-opus-4-6", "thinking": THINKING, "messages": messages}


def test_signature_helpers() -> None:
    signature = fakes.thinking_signature("anthropic", "let me think")
    assert signature == fakes.thinking_signature("anthropic", "let me think")  # stateless
    assert fakes.verify_signature("anthropic", "let me think", signature)
    assert not fakes.verify_signature("anthropic", "let me think!", signature)
    assert not fakes.verify_signature("anthropic", "let me think", signature[:-2] + "xx")
    assert not fakes.verify_signature("anthropic", "let me think", None)
    assert not fakes.verify_signature("anthropic", None, signature)
    assert not fakes.verify_signature("anthropic", "let me think", "é" + signature)
    target = fakes.thinking_signature("target", "let me think")
    assert target.startswith("tgt-") and not signature.startswith("tgt-")
    assert fakes.verify_signature("target", "let me think", target)
    assert not fakes.verify_signature("anthropic", "let me think", target)
    assert not fakes.verify_signature("target", "let me think", signature)
    assert fakes.thinking_signature("cliproxyapi", "let me think") != target  # keyed by provider
    data = fakes.redacted_data("anthropic", "secret")
    assert fakes.verify_redacted("anthropic", data)
    assert not fakes.verify_redacted("target", data)
    assert fakes.verify_redacted("target", fakes.redacted_data("target", "secret"))
    for bad in (data[:-4], "tgt-" + data, "!!!", "", "é", None, signature):
        assert not fakes.verify_redacted("anthropic", bad), bad


def test_thinking_only_when_enabled_or_forced() -> None:
    def types(body: dict, *headers: tuple[str, str]) -> list[str]:
        reply = plan(body, *headers)
        assert reply.status == 200, reply.body
        return [b["type"] for b in json.loads(reply.body)["content"]]

    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert types(plain) == ["text"]
    assert types({**plain, "thinking": {"type": "disabled"}}) == ["text"]
    assert types({**plain, "thinking": THINKING}) == ["thinking", "text"]
    assert types({**plain, "thinking": {"type": "adaptive"}}) == ["thinking", "text"]
    assert types(plain, ("x-fake-thinking", "1")) == ["thinking", "text"]
    assert types({**plain, "thinking": THINKING}, ("x-fake-thinking", "0")) == ["text"]
    # Continuing a final assistant message (a prefill): thinking can only open a turn.
    prefill = {
        **plain,
        "thinking": THINKING,
        "messages": plain["messages"] + [{"role": "assistant", "content": "Su"}],
    }
    assert types(prefill) == ["text"]
    assert types(prefill, ("x-fake-thinking", "yes")) == ["thinking", "text"]
    assert types({**plain, "thinking": THINKING}, ("x-fake-redacted", "1")) == [
        "thinking",
        "redacted_thinking",
        "text",
    ]
    assert types(plain, ("x-fake-redacted", "1")) == ["text"]  # redacted only with thinking
    assert types(plain, ("x-fake-tool-use", "Bash")) == ["text", "tool_use"]
    assert types({**plain, "thinking": THINKING}, ("x-fake-tool-use", "Bash")) == [
        "thinking",
        "text",
        "tool_use",
    ]


def test_non_streaming_thinking_blocks_are_signed() -> None:
    body = {
        "model": "claude-opus-4-6",
        "thinking": THINKING,
        "messages": [{"role": "user", "content": "hi"}],
    }
    reply = plan(body, ("x-fake-tool-use", "Read"), ("x-fake-redacted", "1"), number=7)
    message = json.loads(reply.body)
    thinking, redacted, text, tool = message["content"]
    assert list(thinking) == ["type", "thinking", "signature"]  # Claude Code's key order
    assert thinking["thinking"]
    assert fakes.verify_signature("anthropic", thinking["thinking"], thinking["signature"])
    assert not thinking["signature"].startswith("tgt-")
    assert fakes.verify_redacted("anthropic", redacted["data"])
    assert text == {"type": "text", "text": "hello from anthropic"}
    assert tool == {
        "type": "tool_use",
        "id": "toolu_fake_anthropic_000007",
        "name": "Read",
        "input": {"provider": "anthropic"},
    }
    assert message["stop_reason"] == "tool_use"
    other = json.loads(plan(body, number=8).body)["content"][0]
    assert other["thinking"] != thinking["thinking"] and other["signature"] != thinking["signature"]
    # The target signs its own way, and only it can verify that.
    tgt = json.loads(plan(body, provider="target", strict=False).body)["content"][0]
    assert tgt["signature"].startswith("tgt-")
    assert fakes.verify_signature("target", tgt["thinking"], tgt["signature"])
    assert not fakes.verify_signature("anthropic", tgt["thinking"], tgt["signature"])
    # pad_to still pads the text block.
    padded = plan(body, ("x-fake-response-bytes", "5000"))
    assert abs(len(padded.body) - 5000) < 10
    assert json.loads(padded.body)["content"][0]["type"] == "thinking"


def test_streaming_event_order_with_thinking() -> None:
    body = {"model": "m", "stream": True, "thinking": THINKING}
    body["messages"] = [{"role": "user", "content": "hi"}]
    events = sse_data(b"".join(plan(body).events))
    assert [kind for kind, _ in events] == SSE_THINKING_ORDER
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert [d["delta"]["type"] for _, d in events[3:6]] == [
        "thinking_delta",
        "thinking_delta",
        "signature_delta",
    ]
    assert events[6][1]["index"] == 0 and events[7][1]["index"] == 1
    assert events[7][1]["content_block"] == {"type": "text", "text": ""}
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    thinking, text = streamed_content(events)
    assert fakes.verify_signature("anthropic", thinking["thinking"], thinking["signature"])
    assert text["text"] == "hello from anthropic"
    # The same blocks as the non-streamed reply to the same request.
    assert [thinking, text] == json.loads(plan({**body, "stream": False}).body)["content"]
    # Without thinking, the stream is exactly what it was.
    no_thinking = sse_data(b"".join(plan({**body, "thinking": {"type": "disabled"}}).events))
    assert [kind for kind, _ in no_thinking] == SSE_ORDER


def test_streaming_tool_use_and_redacted() -> None:
    body = {"model": "m", "stream": True, "thinking": THINKING}
    body["messages"] = [{"role": "user", "content": "hi"}]
    headers = (("x-fake-tool-use", "Bash"), ("x-fake-redacted", "1"))
    events = sse_data(b"".join(plan(body, *headers, provider="target").events))
    assert [kind for kind, _ in events].count("ping") == 1 and events[2][0] == "ping"
    thinking, redacted, text, tool = streamed_content(events)
    assert fakes.verify_signature("target", thinking["thinking"], thinking["signature"])
    assert fakes.verify_redacted("target", redacted["data"]) and redacted["data"].startswith("tgt-")
    assert text["text"] == "hello from target"
    assert tool == {
        "type": "tool_use",
        "id": "toolu_fake_target_000001",
        "name": "Bash",
        "input": {"provider": "target"},
    }
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert parse_controls(request_with(("x-fake-tool-use", "bad name!"))).tool_use is None
    assert parse_controls(request_with(("x-fake-thinking", "maybe"))).thinking is None


def test_strict_accepts_its_own_blocks_in_a_tool_loop() -> None:
    """Two Anthropic turns with thinking and tool use, every block sent back: all accepted."""
    body = conversation()
    for n in range(1, 4):
        reply = plan(body, ("x-fake-tool-use", "Bash"), ("x-fake-redacted", "1"), number=n)
        assert reply.status == 200, reply.body
        turns = [m["content"] for m in body["messages"] if m["role"] == "assistant"]
        body = conversation(*turns, json.loads(reply.body)["content"])
    assert plan(body, path="/v1/messages/count_tokens").status == 200


def test_strict_rejects_foreign_or_altered_signatures() -> None:
    ours = json.loads(plan(conversation(), ("x-fake-tool-use", "Bash")).body)["content"]
    theirs = json.loads(
        plan(conversation(), ("x-fake-tool-use", "Bash"), provider="target").body
    )["content"]
    message = "messages.1.content.0: Invalid `signature` in `thinking` block"
    for path in ("/v1/messages", "/v1/messages/count_tokens?beta=true"):
        assert error_of(plan(conversation(theirs), path=path))["message"] == message
    altered = [{**ours[0], "thinking": ours[0]["thinking"] + " "}, *ours[1:]]
    assert error_of(plan(conversation(altered)))["message"] == message
    # The index names the offending block, in an older turn too.
    text_only = [{"type": "text", "text": "x"}]
    assert error_of(plan(conversation(text_only, [ours[1], theirs[0]], ours)))["message"] == (
        "messages.3.content.1: Invalid `signature` in `thinking` block"
    )
    unsigned = [{"type": "thinking", "thinking": "hmm"}, *ours[1:]]
    assert error_of(plan(conversation(unsigned)))["message"] == (
        "messages.1.content.0.thinking.signature: Field required"
    )
    foreign_data = fakes.redacted_data("target", "x")
    redacted = [{"type": "redacted_thinking", "data": foreign_data}, *ours[1:]]
    assert error_of(plan(conversation(redacted)))["message"] == (
        "messages.1.content.0: Invalid `data` in `redacted_thinking` block"
    )
    # The exact body, as Anthropic sends it.
    assert json.loads(plan(conversation(theirs)).body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }
    # Lenient fakes answer anything, and strict ones accept their own.
    assert plan(conversation(theirs), strict=False).status == 200
    assert plan(conversation(ours), provider="target", strict=False).status == 200
    assert plan(conversation(theirs), provider="target", strict=True).status == 200
    assert plan(conversation(ours), provider="target", strict=True).status == 400


def test_strict_last_assistant_tool_use_needs_thinking_first() -> None:
    ours = json.loads(plan(conversation(), ("x-fake-tool-use", "Bash")).body)["content"]
    thinking, text, tool = ours
    assert error_of(plan(conversation([text, tool])))["message"] == tool_use_error(1, "text")
    assert error_of(plan(conversation([tool])))["message"] == tool_use_error(1, "tool_use")
    assert error_of(plan(conversation([text, thinking, tool])))["message"] == (
        tool_use_error(1, "text")
    )
    redacted = {"type": "redacted_thinking", "data": fakes.redacted_data("anthropic", "r")}
    assert plan(conversation([redacted, text, tool])).status == 200
    # Only the last assistant turn must keep its thinking; older ones may lose it.
    assert plan(conversation([text, tool], ours)).status == 200
    assert error_of(plan(conversation(ours, [text, tool])))["message"] == tool_use_error(3, "text")
    # Without thinking, or without tool use in the last turn, there is no such rule.
    no_thinking = {**conversation([text, tool]), "thinking": {"type": "disabled"}}
    assert plan(no_thinking).status == 200
    assert plan(conversation([text])).status == 200
    assert plan(conversation([text, tool]), strict=False).status == 200


def test_strict_empty_content() -> None:
    body = conversation([{"type": "text", "text": "x"}])
    body["messages"][1]["content"] = []
    assert error_of(plan(body))["message"] == (
        "messages.1: all messages must have non-empty content except for the optional final "
        "assistant message"
    )
    body["messages"][1]["content"] = ""
    assert error_of(plan(body))["message"].startswith("messages.1: all messages must have")
    body["messages"][1]["content"] = [{"type": "text", "text": "x"}]
    body["messages"][2]["content"] = []
    assert error_of(plan(body))["message"].startswith("messages.2: all messages")
    final = {"model": "m"}
    final["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]
    assert plan(final).status == 200  # the optional final assistant message
    assert plan({**final, "messages": [{"role": "user", "content": []}]}).status == 400
    assert plan({"model": "m", "messages": "not a list"}).status == 200  # not this fake's business


def test_alternating_providers_need_foreign_blocks_removed() -> None:
    """A session alternating Anthropic and the target, as cmm must make it work."""
    anthropic_turn = json.loads(plan(conversation(), ("x-fake-tool-use", "Bash")).body)["content"]
    target_reply = plan(
        conversation(anthropic_turn), ("x-fake-tool-use", "Read"), provider="target", strict=False
    )
    target_turn = json.loads(target_reply.body)["content"]
    history = conversation(anthropic_turn, target_turn)
    assert plan(history, provider="target", strict=False).status == 200  # the target takes anything
    assert error_of(plan(history))["message"] == (
        "messages.3.content.0: Invalid `signature` in `thinking` block"
    )
    # Dropping the target's thinking leaves its tool_use turn, the last one, without thinking.
    dropped = conversation(anthropic_turn, target_turn[1:])
    assert error_of(plan(dropped))["message"] == tool_use_error(3, "text")
    # A later Anthropic turn makes the target's turn an older one: then it may lose its thinking.
    text_turn = [{"type": "text", "text": "x"}]
    later = json.loads(plan(conversation(anthropic_turn, target_turn[1:], text_turn)).body)
    assert later["content"][0]["type"] == "thinking"


def test_cli_strict_defaults() -> None:
    parser = fakes._parser()
    assert parser.parse_args(["anthropic", "--cert-dir", "x"]).strict is True
    assert parser.parse_args(["anthropic", "--cert-dir", "x", "--no-strict"]).strict is False
    assert parser.parse_args(["target"]).strict is False
    assert parser.parse_args(["target", "--strict"]).strict is True


def test_thinking_over_sockets(anthropic: FakeProcess, target: FakeProcess, pki: Path) -> None:
    """Real sockets: the strict Anthropic fake signs, verifies, and rejects the target's blocks."""
    conn = tls_connection(anthropic.port, make_test_pki(pki))
    gzipped = gzip.compress(json.dumps({**conversation(), "stream": True}).encode())
    headers = {"content-encoding": "gzip", "x-fake-tool-use": "Bash"}
    response, payload = post(conn, "/v1/messages?beta=true", gzipped, headers)
    assert response.status == 200
    events = sse_data(payload)
    ours = streamed_content(events)
    assert [b["type"] for b in ours] == ["thinking", "text", "tool_use"]
    assert fakes.verify_signature("anthropic", ours[0]["thinking"], ours[0]["signature"])
    response, payload = post(conn, "/v1/messages", conversation(ours))
    assert response.status == 200, payload

    plain = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    response, payload = post(plain, "/v1/messages", conversation(ours), {"x-fake-tool-use": "Read"})
    theirs = json.loads(payload)["content"]
    assert response.status == 200 and theirs[0]["signature"].startswith("tgt-")
    response, payload = post(conn, "/v1/messages", conversation(ours, theirs))
    assert response.status == 400
    assert json.loads(payload) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.3.content.0: Invalid `signature` in `thinking` block",
        },
    }
    conn.close()
    plain.close()
