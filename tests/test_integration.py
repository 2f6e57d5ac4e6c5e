"""Real-socket integration tests: cmm between real clients and the shipped fake upstreams.

Everything runs as subprocesses on loopback (127.0.0.1 and ::1): the fake api.anthropic.com
(TLS, test CA), the fake CLIProxyAPI (plain http), and cmm itself started through twistd from
*this checkout* (``PYTHONPATH`` = the repository, so ``twisted/plugins/cmm_plugin.py`` and the
``cmm`` package are the ones under test, not an installed copy). The test process has no reactor:
clients are the official ``anthropic`` SDK and raw ``ssl`` sockets, and the fakes are asked over
``GET /_fake/requests`` what reached them.

Three cmm instances start once per module, in parallel:

* ``main``: default limits, the fake Anthropic trusted through ``SSL_CERT_FILE``;
* ``strict``: small body limit and short head/idle/upstream timeouts, for the error paths;
* ``broken``: the fake Anthropic *not* trusted and the proxy URL on a closed port.

Requests carry an ``x-test-id`` header (or a unique ``x-client-request-id``) so each test finds
its own requests in the fakes' records, whatever ran before it.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cmm.testing.checkout import ANNOUNCE, twistd_command
from cmm.testing.processes import Fakes, Process, free_port
from support import HeaderLookup, process_env

REPO = Path(__file__).resolve().parent.parent
ANTHROPIC_HOST = "api.anthropic.com"
SOURCE_PREFIX = "claude-haiku-4-5"
SOURCE_MODEL = "claude-haiku-4-5-20251001"
TARGET_MODEL = "gemini-2.5-flash"
PASS_MODEL = "claude-opus-4-6"
PROXY_KEY = "sk-proxy-key"
USER_KEY = "sk-ant-api03-user-secret-never-leaves"
USER_OAUTH = "Bearer sk-ant-oat01-user-oauth-token-never-leaves"
USER_COOKIE = "sessionKey=user-cookie-never-leaves"
USER_PROXY_AUTH = "Basic dXNlcjpuZXZlci1sZWF2ZXM="
STRICT_BODY_LIMIT = 256 * 1024  # --body-limit 0.25 (MiB)
STARTUP_TIMEOUT = 30.0
IO_TIMEOUT = 10.0

SSE_HEAD = ["message_start", "content_block_start", "ping"]
SSE_TAIL = ["content_block_stop", "message_delta", "message_stop"]


def sse_order(deltas: int) -> list[str]:
    return SSE_HEAD + ["content_block_delta"] * deltas + SSE_TAIL


# A body signed by Claude Code's cch scheme (see cmm/core/cch.py): a haiku request with a
# nested "model" in a tool input and in a tool schema, an escaped quote and non-ASCII text.
CCH_BODY = (
    '{"model":"claude-haiku-4-5-20251001","messages":[{"role":"user","content":"title this: été '
    '\\"quoted\\""},{"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":'
    '"EqQBCkYIBxgCKkBsig"},{"type":"tool_use","id":"toolu_01","name":"Task","input":{"model":"sonnet",'
    '"prompt":"x"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content"'
    ':"ok"}]}],"system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=2.1.330.a1b; '
    'cc_entrypoint=sdk-cli; cch=9cf06; cc_prompt_id=00000000-0000-4000-8000-000000000001;"}],"tools":'
    '[{"name":"Task","input_schema":{"type":"object","properties":{"model":{"type":"string"}}}}],'
    '"max_tokens":128000,"stream":true}'
).encode()
CCH_SEED = 0x4D659218E32A3268


# -- processes --------------------------------------------------------------------------------------


_env = process_env


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- raw HTTP/1.1 over TLS ------------------------------------------------------------------------


@dataclass
class Response(HeaderLookup):
    status: int
    reason: str
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes = b""
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this one

    def json(self) -> Any:
        return json.loads(self.body)


class Closed(Exception):
    """The peer closed the connection before a complete response."""


def client_context(ca: Path, alpn: tuple[str, ...] | None = ("http/1.1",)) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))  # only cmm's CA: verification is real
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


class Conn:
    """One TLS connection to cmm as Claude Code makes it: to 127.0.0.1, SNI and name api.anthropic.com."""

    def __init__(self, port: int, ca: Path, host: str = "127.0.0.1", alpn: tuple[str, ...] | None = ("http/1.1",),
                 server_hostname: str = ANTHROPIC_HOST, timeout: float = IO_TIMEOUT) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock = client_context(ca, alpn).wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def _line(self) -> bytes:
        line = self.reader.readline(70000)
        if not line:
            raise Closed("connection closed")
        if not line.endswith(b"\r\n"):
            raise AssertionError(f"line without CRLF: {line[:200]!r}")
        return line[:-2]

    def _exact(self, n: int) -> bytes:
        data = self.reader.read(n)
        if len(data) != n:
            raise Closed(f"connection closed after {len(data)} of {n} bytes")
        return data

    def head(self) -> Response:
        """Read a response head, skipping (and remembering) interim 1xx responses."""
        interim = []
        while True:
            status_line = self._line()
            match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: (.*))?", status_line)
            assert match, f"bad status line {status_line!r}"
            headers = []
            while line := self._line():
                name, _, value = line.partition(b":")
                headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
            status = int(match.group(1))
            if 100 <= status < 200:
                interim.append(status)
                continue
            return Response(status, (match.group(2) or b"").decode("latin-1"), headers, interim=interim)

    def chunks(self) -> Iterator[bytes]:
        """The payload of each chunk of a chunked body, as it arrives."""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():  # trailers
                    pass
                return
            data = self._exact(size)
            assert self._exact(2) == b"\r\n"
            yield data

    def body(self, response: Response, method: str = "POST") -> bytes:
        if method == "HEAD" or response.status in (204, 304):
            return b""
        if "chunked" in (response.header("transfer-encoding") or "").lower():
            return b"".join(self.chunks())
        length = response.header("content-length")
        if length is not None:
            return self._exact(int(length))
        return self.reader.read()

    def response(self, method: str = "POST") -> Response:
        response = self.head()
        response.body = self.body(response, method)
        return response

    def read_to_eof(self, timeout: float) -> tuple[bytes, str]:
        """Everything until the peer closes; fails the test if it stays open ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        data = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError(f"connection still open after {timeout}s; got {bytes(data[-300:])!r}")
                piece = self.reader.read1(65536)
                if not piece:
                    return bytes(data), "eof"
                data += piece
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as error:
            return bytes(data), type(error).__name__
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"connection still open after {timeout}s; got {bytes(data[-300:])!r}") from None


def http_request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def json_body(model: str, *, stream: bool = False, text: str = "hi", **extra: Any) -> bytes:
    payload = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


def simple_post(model: str, tag: str, *, stream: bool = False, path: str = "/v1/messages?beta=true",
                extra: list[tuple[str, str]] = (), body: bytes | None = None) -> bytes:
    body = json_body(model, stream=stream) if body is None else body
    headers = [("Host", ANTHROPIC_HOST), ("Content-Type", "application/json"), ("anthropic-version", "2023-06-01"),
               ("x-api-key", USER_KEY), ("x-test-id", tag), *extra, ("Content-Length", str(len(body)))]
    return http_request("POST", path, headers, body)


def chunk_encode(pieces: list[bytes]) -> list[bytes]:
    return [b"%x\r\n" % len(piece) + piece + b"\r\n" for piece in pieces if piece] + [b"0\r\n\r\n"]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def sse_parse(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.split(b"\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        events.append((fields[b"event"].decode(), json.loads(fields[b"data"])))
    return events


def sse_text(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(data["delta"]["text"] for kind, data in events if kind == "content_block_delta")


def assert_anthropic_error(response: Response, status: int, error_type: str | None = None,
                           contains: str | None = None) -> dict[str, Any]:
    """Status AND Anthropic's error JSON shape; returns the ``error`` object."""
    assert response.status == status, (response.status, response.body[:500])
    assert (response.header("content-type") or "").startswith("application/json"), response.headers
    body = json.loads(response.body)
    assert set(body) == {"type", "error"}, body
    assert body["type"] == "error", body
    error = body["error"]
    assert isinstance(error, dict) and set(error) >= {"type", "message"}, body
    assert isinstance(error["type"], str) and error["type"], body
    assert isinstance(error["message"], str) and error["message"].strip(), body
    assert "Traceback" not in error["message"]
    if error_type is not None:
        assert error["type"] == error_type, body
    if contains is not None:
        assert contains.lower() in error["message"].lower(), body
    return error


def new_tag() -> str:
    return uuid.uuid4().hex


# -- fakes --------------------------------------------------------------------------------------------


@dataclass
class Seen(HeaderLookup):
    """A request as a fake recorded it (header names lower-cased, in arrival order)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int

    def json(self) -> Any:
        data = self.body
        if (self.header("content-encoding") or "").lower() == "gzip":
            data = gzip.decompress(data)
        return json.loads(data)


class Fake:
    def __init__(self, process: Process, port: int, ca: Path | None) -> None:
        self.process = process
        self.port = port
        self.ca = ca

    def state(self) -> dict[str, Any]:
        """``GET /_fake/requests`` on a new connection (which the fake counts: see ``connections_made``)."""
        if self.ca is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=IO_TIMEOUT,
                                               context=ssl.create_default_context(cafile=str(self.ca)))
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=IO_TIMEOUT)
        try:
            conn.request("GET", "/_fake/requests")
            response = conn.getresponse()
            assert response.status == 200
            return json.loads(response.read())
        finally:
            conn.close()

    def requests(self) -> list[Seen]:
        return [Seen(r["method"], r["path"], [tuple(h) for h in r["headers"]], base64.b64decode(r["body"]),
                     r.get("connection", 0)) for r in self.state()["requests"]]

    def find(self, value: str, header: str = "x-test-id") -> list[Seen]:
        return [r for r in self.requests() if r.header(header) == value]


# -- cmm ---------------------------------------------------------------------------------------------

@dataclass
class Cmm:
    name: str
    args: list[str]
    env: dict[str, str]
    config_dir: Path
    out_dir: Path
    port: int = 0
    process: Process | None = None
    attempt: int = 0

    @property
    def ca(self) -> Path:
        return self.config_dir / "ca.crt"

    def launch(self) -> None:
        self.attempt += 1
        self.port = free_port()
        argv = twistd_command(["--port", str(self.port), "--config-dir", str(self.config_dir), "--no-hosts", *self.args])
        self.process = Process(f"cmm {self.name}", argv, self.env, self.out_dir / f"cmm-{self.name}-{self.attempt}.out")

    def wait_ready(self) -> None:
        assert self.process is not None
        try:
            self.process.wait_for(rf"cmm serving on port {self.port}\b")
        except AssertionError:
            if "cannot listen" in self.process.output() and self.attempt < 3:  # lost a race for the port
                self.process.stop()
                self.launch()
                self.wait_ready()
                return
            raise
        package = self.process.wait_for(rf"{ANNOUNCE} (.*)").group(1).strip()
        assert Path(package).resolve() == (REPO / "cmm" / "__init__.py").resolve(), package

    def log(self) -> str:
        assert self.process is not None
        return self.process.output()

    def connect(self, **kwargs: Any) -> Conn:
        return Conn(self.port, self.ca, **kwargs)

    def exchange(self, request: bytes, method: str = "POST") -> Response:
        """One request on a new connection (what Claude Code mostly does)."""
        with self.connect() as conn:
            conn.send(request)
            return conn.response(method)

    def wait_log(self, pattern: str, after: int, timeout: float = 5.0) -> re.Match[str]:
        """A request log line matching ``pattern`` written after offset ``after`` of the output."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log()[after:])
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"cmm {self.name} never logged {pattern!r}; new output:\n{self.log()[after:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class Stack:
    anthropic: Fake
    target: Fake
    main: Cmm
    strict: Cmm
    broken: Cmm
    closed_port: int
    pki: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("integration")
    pki = base / "pki"
    processes: list[Process] = []
    instances: list[Cmm] = []
    # A socket bound but never listening: connections to its port are refused, and no other
    # process can take the port while the module runs.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    try:
        fakes = Fakes(base, _env())
        processes += [fakes.anthropic, fakes.target]
        a_port, t_port = fakes.anthropic_port, fakes.target_port
        anthropic = Fake(fakes.anthropic, a_port, fakes.ca)
        target = Fake(fakes.target, t_port, None)

        mapping = ["--source", SOURCE_PREFIX, "--target", TARGET_MODEL, "--proxy-api-key", PROXY_KEY,
                   "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(a_port)]
        target_url = f"http://127.0.0.1:{t_port}/v1/messages"
        trusted = _env(SSL_CERT_FILE=str(pki / "ca.pem"), SSL_CERT_DIR=None)
        listen_main = "127.0.0.1,::1" if _ipv6_loopback() else "127.0.0.1"
        main = Cmm("main", [*mapping, "--proxy-url", target_url, "--listen", listen_main], trusted,
                   base / "cfg-main", base)
        strict = Cmm("strict", [*mapping, "--proxy-url", target_url, "--listen", "127.0.0.1",
                                "--body-limit", "0.25", "--upstream-timeout", "1", "--head-timeout", "1",
                                "--idle-timeout", "2", "--connect-timeout", "2"], trusted, base / "cfg-strict", base)
        # No SSL_CERT_FILE: the fake Anthropic's test CA is not trusted, as a real MITM would not be.
        broken = Cmm("broken", [*mapping, "--proxy-url", f"http://127.0.0.1:{closed_port}/v1/messages",
                                "--listen", "127.0.0.1", "--connect-timeout", "2"],
                     _env(SSL_CERT_FILE=None, SSL_CERT_DIR=None), base / "cfg-broken", base)
        instances = [main, strict, broken]
        for instance in instances:
            instance.launch()
        for instance in instances:
            instance.wait_ready()
        yield Stack(anthropic, target, main, strict, broken, closed_port, pki)
    finally:
        for instance in instances:
            instance.stop()
        for process in processes:
            process.stop()
        closed.close()


@pytest.fixture(scope="module")
def sdk(stack: Stack) -> Any:
    """The official SDK as Claude Code's stand-in: real TLS verification of api.anthropic.com.

    The SDK's base URL is https://127.0.0.1:<port>; a transport sets httpcore's ``sni_hostname``
    request extension, which is both the SNI and the name the certificate is verified against
    (check_hostname stays on), and sends ``Host: api.anthropic.com`` as Claude Code does.
    """
    anthropic = pytest.importorskip("anthropic")
    try:
        import httpx2 as httpx  # anthropic 2.x
    except ImportError:  # pragma: no cover - anthropic 0.x/1.x
        httpx = pytest.importorskip("httpx")

    class AnthropicNameTransport(httpx.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            request.extensions = {**request.extensions, "sni_hostname": ANTHROPIC_HOST}
            request.headers["Host"] = ANTHROPIC_HOST
            return super().handle_request(request)

    context = ssl.create_default_context(cafile=str(stack.main.ca))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    http_client = httpx.Client(transport=AnthropicNameTransport(verify=context))
    client = anthropic.Anthropic(api_key=USER_KEY, base_url=f"https://127.0.0.1:{stack.main.port}",
                                 http_client=http_client, max_retries=0, timeout=IO_TIMEOUT)
    yield client
    client.close()


# -- 1. the official SDK as the client --------------------------------------------------------------

ROUTES = [pytest.param(SOURCE_MODEL, "target", id="intercepted"), pytest.param(PASS_MODEL, "anthropic", id="passthrough")]


def _check_route(stack: Stack, tag: str, provider: str, model: str,
                 credential: tuple[str, str] = ("x-api-key", USER_KEY)) -> Seen:
    """Exactly one request with ``tag`` reached ``provider`` and none the other; returns it.

    ``credential`` is the header the client authenticated with: Anthropic gets it as sent, the
    target gets cmm's proxy key instead and never the user's secret.
    """
    here, there = (stack.target, stack.anthropic) if provider == "target" else (stack.anthropic, stack.target)
    seen = here.find(tag)
    assert len(seen) == 1, f"{provider} got {len(seen)} requests tagged {tag}"
    assert there.find(tag) == []
    if provider == "target":
        assert seen[0].json()["model"] == TARGET_MODEL
        assert seen[0].header_all("authorization") == [f"Bearer {PROXY_KEY}"]
        assert seen[0].header("x-api-key") is None
        assert all(USER_KEY not in value for _, value in seen[0].headers)
    else:
        assert seen[0].json()["model"] == model
        assert seen[0].header_all(credential[0]) == [credential[1]]
    return seen[0]


SDK_CREDENTIAL = ("authorization", f"Bearer {USER_KEY}")  # anthropic 2.x sends api_key as a Bearer token


@pytest.mark.parametrize("model, provider", ROUTES)
def test_sdk_non_streaming(stack: Stack, sdk: Any, model: str, provider: str) -> None:
    tag = new_tag()
    raw = sdk.messages.with_raw_response.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "say hi"}], extra_headers={"x-test-id": tag})
    message = raw.parse()
    assert raw.status_code == 200
    assert message.content[0].text == f"hello from {provider}"
    assert raw.headers.get("x-fake-provider") == provider
    if provider == "target":
        assert raw.headers.get("x-cmm-provider") == "cliproxyapi"
        assert message.model == TARGET_MODEL  # the fake echoes the model it was asked for
    else:
        assert "x-cmm-provider" not in raw.headers
        assert message.model == model
    _check_route(stack, tag, provider, model, SDK_CREDENTIAL)


@pytest.mark.parametrize("model, provider", ROUTES)
def test_sdk_streaming(stack: Stack, sdk: Any, model: str, provider: str) -> None:
    # The raw event stream: exact order, ping included (the SDK's parsed stream hides pings).
    tag = new_tag()
    with sdk.messages.with_streaming_response.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "say hi"}], stream=True,
        extra_headers={"x-test-id": tag, "x-fake-deltas": "5"},
    ) as response:
        assert response.status_code == 200
        assert response.headers.get("content-type", "").startswith("text/event-stream")
        if provider == "target":
            assert response.headers.get("x-cmm-provider") == "cliproxyapi"
        else:
            assert "x-cmm-provider" not in response.headers
        kinds, datas = [], []
        for line in response.iter_lines():
            if line.startswith("event: "):
                kinds.append(line[len("event: "):])
            elif line.startswith("data: "):
                datas.append(json.loads(line[len("data: "):]))
    assert kinds == sse_order(5)
    assert [d["type"] for d in datas] == kinds
    assert datas[0]["message"]["model"] == (TARGET_MODEL if provider == "target" else model)
    assert "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta").startswith(
        f"hello from {provider}")
    _check_route(stack, tag, provider, model, SDK_CREDENTIAL)

    # The SDK's own streaming helper over the same route.
    tag = new_tag()
    with sdk.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "say hi"}],
                             extra_headers={"x-test-id": tag}) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert text == f"hello from {provider}"
    assert final.model == (TARGET_MODEL if provider == "target" else model)
    assert final.stop_reason == "end_turn"
    seen = _check_route(stack, tag, provider, model, SDK_CREDENTIAL)
    assert seen.json()["stream"] is True


def test_sdk_count_tokens(stack: Stack, sdk: Any) -> None:
    tag = new_tag()
    result = sdk.messages.count_tokens(model=SOURCE_MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"x-test-id": tag})
    assert result.input_tokens > 0
    seen = _check_route(stack, tag, "target", SOURCE_MODEL, SDK_CREDENTIAL)
    assert seen.path.split("?")[0] == "/v1/messages/count_tokens"


# -- 2./3. what exactly reaches each upstream -----------------------------------------------------


def claude_code_body(model: str, size: int = 88_000, nested_model: str | None = None) -> bytes:
    """A Claude Code-shaped messages body (keys in its order, JSON.stringify spacing), ~``size`` bytes."""
    messages: list[dict[str, Any]] = []
    turn = 0
    filler = "Lorem ipsum dolor sit amet, «ünïcödé» 日本語 \"quoted\" \\ back\\slash\n\ttab 🙂. "
    while len(json.dumps(messages, ensure_ascii=False).encode()) < size:
        turn += 1
        messages.append({"role": "user", "content": [{"type": "text", "text": f"turn {turn}: " + filler * 20}]})
        assistant: list[dict[str, Any]] = [{"type": "text", "text": filler * 10}]
        if nested_model and turn == 2:
            assistant.append({"type": "tool_use", "id": "toolu_01", "name": "Task",
                              "input": {"model": nested_model, "prompt": "check \"model\": things"}})
        messages.append({"role": "assistant", "content": assistant})
    payload = {
        "model": model,
        "messages": messages,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.330.a1b; cc_entrypoint=sdk-cli;"
                                              " cch=00000; cc_prompt_id=00000000-0000-4000-8000-000000000001;"},
                   {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}],
        "tools": [{"name": "Task", "description": "Launch an agent",
                   "input_schema": {"type": "object", "properties": {"model": {"type": "string"},
                                                                      "prompt": {"type": "string"}}}}],
        "metadata": {"user_id": json.dumps({"device_id": "d", "account_uuid": "", "session_id": "s"})},
        "max_tokens": 32000,
        "thinking": {"budget_tokens": 31999, "type": "enabled", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "diagnostics": {"client": "cli"},
        "stream": True,
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def claude_code_headers(body_length: int, request_id: str, auth: tuple[str, str] = ("x-api-key", USER_KEY),
                        extra: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Claude Code 2.1.330's messages headers, in its order."""
    return [
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        ("User-Agent", "claude-cli/2.1.330 (external, sdk-cli)"),
        ("X-Claude-Code-Session-Id", "4f1c7a3e-0000-4000-8000-00000000c0de"),
        ("X-Stainless-Arch", "x64"),
        ("X-Stainless-Lang", "js"),
        ("X-Stainless-OS", "Linux"),
        ("X-Stainless-Package-Version", "0.70.0"),
        ("X-Stainless-Retry-Count", "0"),
        ("X-Stainless-Runtime", "node"),
        ("X-Stainless-Runtime-Version", "v24.3.0"),
        ("X-Stainless-Timeout", "600"),
        ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"),
        ("anthropic-dangerous-direct-browser-access", "true"),
        ("anthropic-version", "2023-06-01"),
        auth,
        *extra,
        ("x-app", "cli"),
        ("x-claude-code-request-class", "main"),
        ("x-client-request-id", request_id),
        ("Connection", "keep-alive"),
        ("Host", ANTHROPIC_HOST),
        ("Accept-Encoding", "gzip, deflate, br, zstd"),
        ("Content-Length", str(body_length)),
    ]


@pytest.mark.parametrize("auth", [("x-api-key", USER_KEY), ("Authorization", USER_OAUTH)], ids=["api-key", "oauth"])
def test_passthrough_is_byte_identical(stack: Stack, auth: tuple[str, str]) -> None:
    body = claude_code_body(PASS_MODEL, nested_model=SOURCE_MODEL)  # a nested haiku must not matter
    assert 80_000 < len(body) < 100_000
    request_id = new_tag()
    headers = claude_code_headers(len(body), request_id, auth=auth)
    response = stack.main.exchange(http_request("POST", "/v1/messages?beta=true", headers, body))
    assert response.status == 200
    assert response.header("x-fake-provider") == "anthropic"
    assert response.header("x-cmm-provider") is None
    assert sse_text(sse_parse(response.body)).startswith("hello from anthropic")

    [seen] = stack.anthropic.find(request_id, header="x-client-request-id")
    assert stack.target.find(request_id, header="x-client-request-id") == []
    assert (seen.method, seen.path) == ("POST", "/v1/messages?beta=true")
    assert seen.body == body
    # Every head field arrived, with its value, in Claude Code's order (the fake lower-cases names).
    assert seen.headers == [(name.lower(), value) for name, value in headers]


def test_intercepted_body_differs_only_in_model(stack: Stack) -> None:
    body = claude_code_body(SOURCE_MODEL, nested_model=SOURCE_MODEL)
    old, new = f'"model":"{SOURCE_MODEL}"'.encode(), f'"model":"{TARGET_MODEL}"'.encode()
    assert body.count(old) == 2 and body.index(old) == 1  # top-level first, one nested in a tool input
    expected = gateway_billing_line(body.replace(old, new, 1))
    request_id = new_tag()
    credentials = [("Authorization", USER_OAUTH), ("Cookie", USER_COOKIE), ("Proxy-Authorization", USER_PROXY_AUTH)]
    headers = claude_code_headers(len(body), request_id, extra=credentials)
    response = stack.main.exchange(http_request("POST", "/v1/messages?beta=true", headers, body))
    assert response.status == 200
    assert response.header("x-cmm-provider") == "cliproxyapi"
    assert response.header("x-fake-provider") == "target"
    events = sse_parse(response.body)
    assert [kind for kind, _ in events] == sse_order(3)
    assert events[0][1]["message"]["model"] == TARGET_MODEL
    assert sse_text(events) == "hello from target"

    [seen] = stack.target.find(request_id, header="x-client-request-id")
    assert stack.anthropic.find(request_id, header="x-client-request-id") == []
    assert (seen.method, seen.path) == ("POST", "/v1/messages?beta=true")
    assert seen.body == expected
    assert seen.header("content-length") == str(len(expected))
    assert seen.header("host") == f"127.0.0.1:{stack.target.port}"
    assert seen.header_all("authorization") == [f"Bearer {PROXY_KEY}"]
    for name in ("x-api-key", "cookie", "proxy-authorization"):
        assert seen.header(name) is None, name
    for secret in (USER_KEY, USER_OAUTH.split()[1], USER_COOKIE, USER_PROXY_AUTH.split()[1]):
        assert all(secret not in value for _, value in seen.headers), secret
    # cmm reads intercepted responses, so it asks for them uncompressed; the client's hop-by-hop
    # Connection header stays on its side (cmm pools its connection to the target).
    assert seen.header("accept-encoding") == "identity" and seen.header("connection") is None
    # The other fields are kept, values and order unchanged.
    dropped = {"authorization", "x-api-key", "cookie", "proxy-authorization", "host", "content-length",
               "accept-encoding", "connection"}
    kept = [(name.lower(), value) for name, value in headers if name.lower() not in dropped]
    assert [(k, v) for k, v in seen.headers if k not in dropped] == kept


def cch_of(raw: bytes) -> str:
    """Claude Code's body hash (as cmm/core/cch.py describes it), computed on raw bytes."""
    xxhash = pytest.importorskip("xxhash")
    data = re.sub(rb"(cch=)[0-9a-f]{5}", rb"\g<1>00000", raw, count=1)
    data = re.sub(rb'"model":"(?:[^"\\]|\\.)*"', b'"model":""', data)
    for key in (b"max_tokens", b"fallbacks", b"fallback_credit_token"):
        data = re.sub(rb',"' + key + rb'":(?:-?\d+|"(?:[^"\\]|\\.)*"|null|true|false)', b"", data)
    return "%05x" % (xxhash.xxh64_intdigest(data, seed=CCH_SEED) & 0xFFFFF)


def gateway_billing_line(body: bytes) -> bytes:
    """``body`` with its billing line as Claude Code writes it for a gateway (cc_version and
    cc_entrypoint only), padded with spaces after the string to keep the body's length."""
    return re.sub(rb'(x-anthropic-billing-header: cc_version=[^;"]*; cc_entrypoint=[^;"]*;)([^"]*)"',
                  lambda m: m[1] + b'"' + b" " * len(m[2]), body, count=1)


def test_intercepted_body_gets_the_billing_line_a_gateway_gets(stack: Stack) -> None:
    assert cch_of(CCH_BODY) == "9cf06"  # the vector is signed; proves the checker itself
    tag = new_tag()
    response = stack.main.exchange(simple_post(SOURCE_MODEL, tag, body=CCH_BODY))
    assert response.status == 200 and response.header("x-cmm-provider") == "cliproxyapi"
    [seen] = stack.target.find(tag)
    expected = CCH_BODY.replace(f'"{SOURCE_MODEL}"'.encode(), f'"{TARGET_MODEL}"'.encode(), 1)
    assert seen.body == gateway_billing_line(expected) != expected
    assert b'"input":{"model":"sonnet"' in seen.body  # nested model untouched
    assert b"cch=" not in seen.body  # the per-request hash goes (--keep-billing-line keeps it, still valid)


# -- 4. keep-alive, both directions --------------------------------------------------------------


def test_keep_alive_routes_each_request_on_one_connection(stack: Stack) -> None:
    plan = [(PASS_MODEL, "anthropic"), (SOURCE_MODEL, "target"), (PASS_MODEL, "anthropic"), (SOURCE_MODEL, "target")]
    tags = []
    with stack.main.connect() as conn:
        for model, provider in plan:
            tag = new_tag()
            tags.append(tag)
            conn.send(simple_post(model, tag))
            response = conn.response()
            assert response.status == 200
            assert response.header("x-fake-provider") == provider
            assert response.header("connection") != "close"
            assert response.json()["content"][0]["text"] == f"hello from {provider}"
            assert (response.header("x-cmm-provider") == "cliproxyapi") == (provider == "target")
    seen = [_check_route(stack, tag, provider, model) for tag, (model, provider) in zip(tags, plan)]
    # cmm lent the same upstream connection to both requests of each provider.
    assert seen[0].connection == seen[2].connection
    assert seen[1].connection == seen[3].connection


def test_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    tags = [new_tag() for _ in range(3)]
    plan = [(SOURCE_MODEL, "target"), (PASS_MODEL, "anthropic"), (SOURCE_MODEL, "target")]
    with stack.main.connect() as conn:
        conn.send(b"".join(simple_post(model, tag) for tag, (model, _) in zip(tags, plan)))
        for _tag, (_model, provider) in zip(tags, plan):
            response = conn.response()
            assert response.status == 200
            assert response.header("x-fake-provider") == provider
    for tag, (model, provider) in zip(tags, plan):
        _check_route(stack, tag, provider, model)


def test_upstream_connections_are_reused(stack: Stack) -> None:
    per_provider = 4
    before_t, before_a = stack.target.state(), stack.anthropic.state()
    for i in range(2 * per_provider):
        model = SOURCE_MODEL if i % 2 == 0 else PASS_MODEL
        response = stack.main.exchange(simple_post(model, new_tag()))  # a new client connection each time
        assert response.status == 200
    after_t, after_a = stack.target.state(), stack.anthropic.state()
    for name, before, after in (("target", before_t, after_t), ("anthropic", before_a, after_a)):
        assert after["request_count"] - before["request_count"] == per_provider, name
        # The second state() query opened one connection of its own.
        opened = after["connections_made"] - before["connections_made"] - 1
        assert opened < per_provider, f"{name}: cmm opened {opened} connections for {per_provider} requests"
        assert opened <= 1, f"{name}: cmm opened {opened} connections for {per_provider} sequential requests"


def test_upstream_connection_close_is_honoured(stack: Stack) -> None:
    tag = new_tag()
    response = stack.main.exchange(simple_post(SOURCE_MODEL, tag, extra=[("x-fake-close", "1")]))
    assert response.status == 200 and response.header("x-fake-provider") == "target"
    # The closed upstream connection is not reused: the next requests still succeed.
    for _ in range(2):
        response = stack.main.exchange(simple_post(SOURCE_MODEL, new_tag()))
        assert response.status == 200 and response.header("x-fake-provider") == "target"


# -- 5. chunked request bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("model, provider", ROUTES)
def test_chunked_request_body(stack: Stack, model: str, provider: str) -> None:
    tag = new_tag()
    body = json_body(model, stream=True, text="chunked " * 3000)
    at = body.index(model.encode())
    # Cuts inside "model", inside the value (several times) and in the long text after it.
    pieces = split_at(body, [3, 7, at + 2, at + 9, at + 11, at + len(model) - 1, at + len(model) + 1, 5000, 15000])
    assert len(pieces) >= 9
    head = http_request("POST", "/v1/messages?beta=true", [
        ("Host", ANTHROPIC_HOST), ("Content-Type", "application/json"), ("x-api-key", USER_KEY),
        ("x-test-id", tag), ("Transfer-Encoding", "chunked")])
    with stack.main.connect() as conn:
        conn.send(head)
        for chunk in chunk_encode(pieces):
            conn.send(chunk)
            time.sleep(0.01)  # separate TLS records and reads
        response = conn.response()
        assert response.status == 200
        assert response.header("x-fake-provider") == provider
        assert sse_text(sse_parse(response.body)) == f"hello from {provider}"
        # The connection stays usable after a chunked request.
        conn.send(simple_post(PASS_MODEL, new_tag()))
        assert conn.response().status == 200
    seen = _check_route(stack, tag, provider, model)
    if provider == "target":
        assert seen.body == body.replace(f'"{model}"'.encode(), f'"{TARGET_MODEL}"'.encode(), 1)
        assert seen.header("content-length") is None
        assert response.header("x-cmm-provider") == "cliproxyapi"
    else:
        assert seen.body == body
        assert response.header("x-cmm-provider") is None


# -- 6. token counting ------------------------------------------------------------------------------


@pytest.mark.parametrize("model, provider", ROUTES)
def test_count_tokens(stack: Stack, model: str, provider: str) -> None:
    tag = new_tag()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "count me"}]},
                      separators=(",", ":")).encode()
    response = stack.main.exchange(simple_post(model, tag, path="/v1/messages/count_tokens?beta=true", body=body))
    assert response.status == 200
    assert response.header("x-fake-provider") == provider
    assert response.json()["input_tokens"] > 0
    seen = _check_route(stack, tag, provider, model)
    assert seen.path == "/v1/messages/count_tokens?beta=true"
    if provider == "target":
        assert response.header("x-cmm-provider") == "cliproxyapi"
        assert seen.body == body.replace(model.encode(), TARGET_MODEL.encode())
    else:
        assert response.header("x-cmm-provider") is None
        assert seen.body == body


# -- 7. everything else goes to Anthropic untouched ---------------------------------------------------


def _plain(method: str, target: str, tag: str, body: bytes = b"") -> tuple[bytes, list[tuple[str, str]]]:
    headers = [("Host", ANTHROPIC_HOST), ("User-Agent", "claude-cli/2.1.330 (external, cli)"), ("x-api-key", USER_KEY),
               ("X-Test-Id", tag), ("anthropic-version", "2023-06-01")]
    if body:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return http_request(method, target, headers, body), headers


haiku_body = json_body(SOURCE_MODEL)


@pytest.mark.parametrize("method, target, body, status", [
    ("GET", "/v1/models", b"", 200),
    ("GET", "/v1/models?limit=20&beta=true", b"", 200),
    ("HEAD", "/api/hello", b"", 404),
    ("GET", "/api/claude_code/settings", b"", 404),
    ("GET", "/api/claude_code/policy_limits", b"", 404),
    ("POST", "/api/event_logging/v2/batch", haiku_body, 404),  # a haiku model on another path
    ("POST", "/v1/messages/batches", haiku_body, 404),
    ("GET", "/v1/messages", b"", 404),  # a candidate path, but not a POST
    ("PUT", "/v1/messages", haiku_body, 404),
])
def test_other_requests_pass_through_untouched(stack: Stack, method: str, target: str, body: bytes,
                                               status: int) -> None:
    tag = new_tag()
    raw, headers = _plain(method, target, tag, body)
    with stack.main.connect() as conn:
        conn.send(raw)
        response = conn.response(method)
        assert response.status == status
        assert response.header("x-fake-provider") == "anthropic"
        assert response.header("x-cmm-provider") is None
        if target.startswith("/v1/models"):
            assert [m["id"] for m in response.json()["data"]][0] == "claude-opus-4-6"
        # The response was framed right (HEAD included): the connection carries another request.
        conn.send(simple_post(PASS_MODEL, new_tag()))
        assert conn.response().header("x-fake-provider") == "anthropic"
    [seen] = stack.anthropic.find(tag)
    assert stack.target.find(tag) == []
    assert (seen.method, seen.path, seen.body) == (method, target, body)
    assert seen.headers == [(name.lower(), value) for name, value in headers]


# -- 8. the model late in a large body ------------------------------------------------------------


@pytest.mark.parametrize("model, provider", ROUTES)
def test_model_after_a_megabyte(stack: Stack, model: str, provider: str) -> None:
    tag = new_tag()
    messages = [{"role": "user", "content": f"{i}: " + "x" * 1000 + ' "model":"claude-opus-4-6" '} for i in range(1050)]
    body = json.dumps({"messages": messages, "max_tokens": 5, "model": model},
                      separators=(",", ":")).encode()
    assert body.index(f'"model":"{model}"'.encode()) > 1024 * 1024
    response = stack.main.exchange(simple_post(model, tag, body=body))
    assert response.status == 200
    assert response.header("x-fake-provider") == provider
    seen = _check_route(stack, tag, provider, model)
    if provider == "target":
        assert seen.body == body.replace(f'"model":"{model}"'.encode(), f'"model":"{TARGET_MODEL}"'.encode())
    else:
        assert seen.body == body


def test_expect_100_continue(stack: Stack) -> None:
    for model, provider in (SOURCE_MODEL, "target"), (PASS_MODEL, "anthropic"):
        tag = new_tag()
        body = json_body(model)
        request = simple_post(model, tag, extra=[("Expect", "100-continue")], body=body)
        head, _ = request.split(b"\r\n\r\n", 1)
        with stack.main.connect() as conn:
            conn.send(head + b"\r\n\r\n")
            assert conn._line().startswith(b"HTTP/1.1 100")  # before any body byte is sent
            assert conn._line() == b""
            conn.send(body)
            response = conn.response()
        assert response.status == 200 and response.header("x-fake-provider") == provider
        seen = _check_route(stack, tag, provider, model)
        if provider == "target":
            assert seen.header("expect") is None


# -- 9. errors, in Anthropic's format -----------------------------------------------------------------


def test_target_down_is_502(stack: Stack) -> None:
    before = len(stack.broken.log())
    with stack.broken.connect() as conn:
        conn.send(simple_post(SOURCE_MODEL, new_tag()))
        response = conn.response()
        error = assert_anthropic_error(response, 502, "api_error")
        assert f"127.0.0.1:{stack.closed_port}" in error["message"]
        assert response.header("connection") == "close"
        conn.read_to_eof(5)
    stack.broken.wait_log(rf"{SOURCE_MODEL}\s+→ INTERCEPTED → {TARGET_MODEL} ✗ 502", before)


def test_target_down_502_says_why_in_words(stack: Stack) -> None:
    response = stack.broken.exchange(simple_post(SOURCE_MODEL, new_tag()))
    error = assert_anthropic_error(response, 502, "api_error")
    assert "refused" in error["message"].lower(), error["message"]


def test_untrusted_anthropic_certificate_is_502(stack: Stack) -> None:
    before = len(stack.broken.log())
    tag = new_tag()
    response = stack.broken.exchange(simple_post(PASS_MODEL, tag))
    assert_anthropic_error(response, 502, "api_error", contains="certificate verification")
    assert stack.anthropic.find(tag) == []  # nothing was sent over the unverified connection
    stack.broken.wait_log(r"claude-opus-4-6\s+→ PASSTHROUGH ✗ 502", before)


@pytest.mark.parametrize("model, provider", ROUTES)
def test_silent_upstream_is_504(stack: Stack, model: str, provider: str) -> None:
    tag = new_tag()
    started = time.monotonic()
    response = stack.strict.exchange(simple_post(model, tag, extra=[("x-fake-delay", "3")]))
    elapsed = time.monotonic() - started
    assert_anthropic_error(response, 504, "timeout_error")
    assert 0.8 < elapsed < 2.8, elapsed  # --upstream-timeout 1, well before the fake's 3 s
    assert len((stack.target if provider == "target" else stack.anthropic).find(tag)) == 1


def test_body_over_limit_by_content_length_is_413(stack: Stack) -> None:
    with stack.strict.connect() as conn:
        head = simple_post(SOURCE_MODEL, new_tag(), body=b"").replace(
            b"Content-Length: 0", b"Content-Length: %d" % (STRICT_BODY_LIMIT + 1))
        conn.send(head)  # no body: the head alone decides
        response = conn.response()
        assert_anthropic_error(response, 413, "request_too_large")
        assert response.header("connection") == "close"
        rest, _ = conn.read_to_eof(5)
        assert rest == b""


@pytest.mark.parametrize("model, provider", ROUTES)
def test_chunked_body_over_limit_is_413(stack: Stack, model: str, provider: str) -> None:
    tag = new_tag()
    start = f'{{"model":"{model}","messages":[{{"role":"user","content":"'.encode()
    piece = b"y" * 16384
    head = http_request("POST", "/v1/messages", [("Host", ANTHROPIC_HOST), ("x-test-id", tag),
                                                 ("Content-Type", "application/json"),
                                                 ("Transfer-Encoding", "chunked")])
    with stack.strict.connect() as conn:
        conn.send(head + chunk_encode([start])[0])
        sent = len(start)
        # Stop right after the limit is passed (no last chunk) so cmm has read all we sent.
        while sent <= STRICT_BODY_LIMIT:
            conn.send(chunk_encode([piece])[0])
            sent += len(piece)
        response = conn.response()
        assert_anthropic_error(response, 413, "request_too_large")
        conn.read_to_eof(5)
    assert stack.strict.process.alive()


MALFORMED = [
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nBad Header: x\r\n\r\n", 400,
                 id="space-in-name"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\nx: y\r\n\r\n", 400, id="bare-lf"),
    pytest.param(b"GET /v1/models HTTP/1.1 extra\r\nHost: api.anthropic.com\r\n\r\n", 400, id="request-line"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, id="h2-preface"),
    pytest.param(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="cl-and-te"),
    pytest.param(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 2\r\n"
                 b"Content-Length: 2\r\n\r\n{}", 400, id="two-cl"),
    pytest.param(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: -1\r\n\r\n", 400,
                 id="negative-cl"),
    pytest.param(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\n{}\r\n0\r\n\r\n", 400, id="bad-chunk-size"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n"
                 + b"".join(b"X-Filler-%d: v\r\n" % i for i in range(100)) + b"\r\n", 431, id="101-headers"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431,
                 id="70k-head"),
]


@pytest.mark.parametrize("raw, status", MALFORMED)
def test_malformed_requests_get_anthropic_errors_and_a_close(stack: Stack, raw: bytes, status: int) -> None:
    with stack.main.connect() as conn:
        conn.send(raw)
        response = conn.response()
        assert_anthropic_error(response, status)
        assert response.header("connection") == "close"
        conn.read_to_eof(5)
    assert stack.main.process.alive()


def test_slow_head_gets_408_and_idle_connection_is_closed(stack: Stack) -> None:
    # Both wait at once: --head-timeout 1 and --idle-timeout 2 on the strict instance.
    with stack.strict.connect() as slow, stack.strict.connect() as idle:
        started = time.monotonic()
        slow.send(b"POST /v1/messages HTTP/1.1\r\nHost: api.anth")  # half a head, then nothing
        data, _ = slow.read_to_eof(5)
        slow_elapsed = time.monotonic() - started
        rest, _ = idle.read_to_eof(5)
        idle_elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    head, _, body = data.partition(b"\r\n\r\n")
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "timeout_error" and error["error"]["message"]
    assert 0.8 < slow_elapsed < 3.0, slow_elapsed
    assert rest == b""  # an idle keep-alive connection is closed without a word
    assert 1.5 < idle_elapsed < 4.5, idle_elapsed


@pytest.mark.parametrize("model, provider", ROUTES)
def test_upstream_abort_mid_stream_closes_the_client(stack: Stack, model: str, provider: str) -> None:
    before = len(stack.main.log())
    tag = new_tag()
    with stack.main.connect() as conn:
        conn.send(simple_post(model, tag, stream=True, extra=[("x-fake-abort-after", "3"), ("x-fake-deltas", "20"),
                                                               ("x-fake-event-delay", "0.02")]))
        data, how = conn.read_to_eof(5)  # fails if cmm leaves the connection hanging
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"message_start" in data
    assert b"message_stop" not in data
    assert len(stack.target.find(tag) if provider == "target" else stack.anthropic.find(tag)) == 1
    stack.main.wait_log(rf"{re.escape(model)}\s+→ .*✗ 200 .*upstream closed", before)


def test_client_gone_mid_stream_is_logged_and_cmm_stays_healthy(stack: Stack) -> None:
    before = len(stack.main.log())
    for model in (SOURCE_MODEL, PASS_MODEL):
        conn = stack.main.connect()
        conn.send(simple_post(model, new_tag(), stream=True, extra=[("x-fake-deltas", "50"),
                                                                     ("x-fake-event-delay", "0.05")]))
        response = conn.head()
        assert response.status == 200
        next(conn.chunks())  # the stream is flowing
        conn.close()
        stack.main.wait_log(rf"{re.escape(model)}\s+→ .*client closed the connection", before)
    for model, provider in (SOURCE_MODEL, "target"), (PASS_MODEL, "anthropic"):
        response = stack.main.exchange(simple_post(model, new_tag(), stream=True))
        assert response.status == 200 and response.header("x-fake-provider") == provider
        assert [kind for kind, _ in sse_parse(response.body)] == sse_order(3)


# -- 10. TLS --------------------------------------------------------------------------------------------


def test_alpn_negotiates_http11_only(stack: Stack) -> None:
    with stack.main.connect(alpn=("h2", "http/1.1")) as conn:
        assert conn.sock.selected_alpn_protocol() == "http/1.1"
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.send(_plain("GET", "/v1/models", new_tag())[0])
        assert conn.response("GET").status == 200
    try:
        conn = stack.main.connect(alpn=("h2",))
    except ssl.SSLError:
        pass  # refusing the handshake (no_application_protocol) is also fine
    else:
        with conn:
            assert conn.sock.selected_alpn_protocol() != "h2"
    with stack.main.connect(alpn=None) as conn:  # Claude Code's settings requests offer no ALPN
        assert conn.sock.selected_alpn_protocol() is None
        conn.send(_plain("GET", "/v1/models", new_tag())[0])
        assert conn.response("GET").status == 200


def test_certificate_is_verified_for_api_anthropic_com_only(stack: Stack) -> None:
    with stack.main.connect() as conn:
        assert conn.sock.getpeercert()["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError):
        stack.main.connect(server_hostname="example.com")


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_serves_on_ipv6_loopback(stack: Stack) -> None:
    with stack.main.connect(host="::1") as conn:
        for model, provider in (SOURCE_MODEL, "target"), (PASS_MODEL, "anthropic"):
            conn.send(simple_post(model, new_tag()))
            assert conn.response().header("x-fake-provider") == provider


# -- 11. one bad connection never affects another ---------------------------------------------------


def test_bad_connection_does_not_affect_others(stack: Stack) -> None:
    slow_tag = new_tag()
    with stack.main.connect() as slow:
        slow.send(simple_post(PASS_MODEL, slow_tag, stream=True,
                              extra=[("x-fake-deltas", "10"), ("x-fake-event-delay", "0.1")]))
        head = slow.head()
        assert head.status == 200
        chunks = slow.chunks()
        received = [next(chunks)]  # the stream is open and slow (about 1 s in all)

        with stack.main.connect() as bad:
            bad.send(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
            assert_anthropic_error(bad.response(), 400)
        for model, provider in (SOURCE_MODEL, "target"), (PASS_MODEL, "anthropic"):
            response = stack.main.exchange(simple_post(model, new_tag()))
            assert response.status == 200 and response.header("x-fake-provider") == provider
        # The others were served while the slow stream was still going, and it still completes.
        rest = list(chunks)
        assert sum(c.count(b"event: content_block_delta") for c in rest) >= 3
        received.extend(rest)
    events = sse_parse(b"".join(received))
    assert [kind for kind, _ in events] == sse_order(10)
    assert sse_text(events).startswith("hello from anthropic")


# -- compressed request bodies (Claude Code may gzip its messages body) -----------------------------


COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": __import__("zlib").compress,
    "br": __import__("brotli").compress,
    "zstd": lambda data: __import__("zstandard").ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("coding", sorted(COMPRESSORS))
def test_compressed_messages_bodies_are_routed(stack: Stack, coding: str) -> None:
    """Without NODE_EXTRA_CA_CERTS Claude Code gzips its messages body."""
    plain = json_body(SOURCE_MODEL)
    tag = new_tag()
    body = COMPRESSORS[coding](plain)
    response = stack.main.exchange(simple_post(SOURCE_MODEL, tag, body=body, extra=[("Content-Encoding", coding)]))
    assert response.status == 200 and response.header("x-fake-provider") == "target"
    [seen] = stack.target.find(tag)
    assert seen.body == plain.replace(SOURCE_MODEL.encode(), TARGET_MODEL.encode())  # decoded, model rewritten
    assert seen.header("content-encoding") is None and seen.header("accept-encoding") == "identity"
    tag = new_tag()
    body = COMPRESSORS[coding](json_body(PASS_MODEL))
    response = stack.main.exchange(simple_post(PASS_MODEL, tag, body=body, extra=[("Content-Encoding", coding)]))
    assert response.status == 200 and response.header("x-fake-provider") == "anthropic"
    [seen] = stack.anthropic.find(tag)
    assert seen.body == body and seen.header("content-encoding") == coding  # untouched


def test_truncated_gzip_is_a_clear_400(stack: Stack) -> None:
    tag = new_tag()
    body = gzip.compress(json_body(SOURCE_MODEL))[:-8]
    response = stack.main.exchange(simple_post(SOURCE_MODEL, tag, body=body, extra=[("Content-Encoding", "gzip")]))
    error = assert_anthropic_error(response, 400, "invalid_request_error")
    assert "Truncated gzip" in error["message"]
    assert stack.target.find(tag) == [] and stack.anthropic.find(tag) == []


def test_gzip_bomb_is_413(stack: Stack) -> None:
    body = gzip.compress(b'{"model":"' + b"x" * (64 << 20) + b'"}')
    response = stack.strict.exchange(simple_post(SOURCE_MODEL, new_tag(), body=body,
                                                 extra=[("Content-Encoding", "gzip")]))
    assert_anthropic_error(response, 413, "request_too_large")


# -- backpressure: a client that does not read must not make cmm buffer the response ---------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("model, provider", [(PASS_MODEL, "anthropic"), (SOURCE_MODEL, "target")])
def test_slow_reader_does_not_grow_cmm_memory(stack: Stack, model: str, provider: str) -> None:
    size = 64 * 1024 * 1024
    pid = stack.main.process.proc.pid
    before = _rss_mib(pid)
    with stack.main.connect(timeout=30) as conn:
        conn.send(simple_post(model, new_tag(), extra=[("x-fake-response-bytes", str(size))]))
        response = conn.head()
        assert response.header("x-fake-provider") == provider
        time.sleep(1.5)  # the fake has long written it all; cmm must have stopped reading from it
        while_stalled = _rss_mib(pid)
        body = conn.body(response)
    assert len(body) >= size
    assert while_stalled - before < 24, f"cmm grew {while_stalled - before:.1f} MiB while the client did not read"


# -- target errors and rate limits -------------------------------------------------------------------


def test_target_429_with_the_delay_in_prose_is_retried_by_cmm(stack: Stack) -> None:
    tag = new_tag()
    started = time.monotonic()
    response = stack.main.exchange(simple_post(SOURCE_MODEL, tag, extra=[
        ("x-fake-status", "429"), ("x-fake-status-times", "1"), ("x-fake-error-text", "quota exceeded, reset after 1s")]))
    assert response.status == 200 and response.header("x-cmm-provider") == "cliproxyapi"
    assert time.monotonic() - started >= 0.9  # it honoured the delay
    assert len(stack.target.find(tag)) == 2


def test_target_plain_text_errors_reach_the_client_in_anthropic_format(stack: Stack) -> None:
    response = stack.main.exchange(simple_post(SOURCE_MODEL, new_tag(), extra=[
        ("x-fake-status", "500"), ("x-fake-error-text", "upstream gemini exploded")]))
    error = assert_anthropic_error(response, 500, "api_error")
    assert "upstream gemini exploded" in error["message"] and response.header("x-cmm-provider") == "cliproxyapi"


# -- a session that alternates providers, against the strict fake Anthropic ---------------------------

THINKING = {"budget_tokens": 31999, "type": "enabled", "display": "omitted"}


def turn(stack: Stack, model: str, messages: list[dict[str, Any]], tool: str | None = None) -> tuple[Response, str]:
    tag = new_tag()
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 32000, "thinking": THINKING},
                      separators=(",", ":")).encode()
    extra = [("x-fake-tool-use", tool)] if tool else []
    return stack.main.exchange(simple_post(model, tag, body=body, extra=extra)), tag


def test_a_session_alternating_providers_keeps_both_happy(stack: Stack) -> None:
    from cmm.testing.fakes import verify_signature

    history: list[dict[str, Any]] = [{"role": "user", "content": "plan the change"}]
    # 1. The mapped model thinks; its signature comes back marked.
    response, _ = turn(stack, SOURCE_MODEL, history)
    assert response.status == 200 and response.header("x-fake-provider") == "target"
    target_blocks = response.json()["content"]
    assert target_blocks[0]["type"] == "thinking" and target_blocks[0]["signature"].startswith("cmm1.")
    history += [{"role": "assistant", "content": target_blocks}, {"role": "user", "content": "now do it"}]
    # 2. Anthropic gets the history: the target's block must not reach it (it would answer 400).
    response, tag = turn(stack, PASS_MODEL, history, tool="Read")
    assert response.status == 200, response.body
    [seen] = stack.anthropic.find(tag)
    assert "cmm1." not in seen.body.decode() and len(seen.body) == int(seen.header("content-length"))
    anthropic_blocks = response.json()["content"]
    assert [b["type"] for b in anthropic_blocks] == ["thinking", "text", "tool_use"]
    history += [{"role": "assistant", "content": anthropic_blocks},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": anthropic_blocks[2]["id"],
                                              "content": "file contents"}]}]
    # 3. The tool loop goes on at Anthropic: its own thinking block must arrive byte for byte.
    response, tag = turn(stack, PASS_MODEL, history)
    assert response.status == 200, response.body
    [seen] = stack.anthropic.find(tag)
    assert json.dumps(anthropic_blocks[0], separators=(",", ":")) in seen.body.decode()
    history += [{"role": "assistant", "content": response.json()["content"]}, {"role": "user", "content": "thanks"}]
    # 4. Back to the mapped model: it gets its own signature unmarked, Anthropic's untouched.
    response, tag = turn(stack, SOURCE_MODEL, history)
    assert response.status == 200
    [seen] = stack.target.find(tag)
    sent = json.loads(seen.body)
    first = sent["messages"][1]["content"][0]
    assert verify_signature("target", first["thinking"], first["signature"])
    assert sent["messages"][3]["content"][0] == anthropic_blocks[0]


def test_a_gzipped_turn_with_a_foreign_block_is_accepted_by_anthropic(stack: Stack) -> None:
    """Claude Code gzips its bodies when it trusts cmm through the system store."""
    response, _ = turn(stack, SOURCE_MODEL, [{"role": "user", "content": "plan"}])
    blocks = response.json()["content"]
    assert blocks[0]["signature"].startswith("cmm1.")
    history = [{"role": "user", "content": "plan"}, {"role": "assistant", "content": blocks},
               {"role": "user", "content": "go on"}]
    tag = new_tag()
    body = gzip.compress(json.dumps({"model": PASS_MODEL, "messages": history, "max_tokens": 100, "thinking": THINKING},
                                    separators=(",", ":")).encode())
    response = stack.main.exchange(simple_post(PASS_MODEL, tag, body=body, extra=[("Content-Encoding", "gzip")]))
    assert response.status == 200, response.body
    [seen] = stack.anthropic.find(tag)
    assert seen.header("content-encoding") is None and b"cmm1." not in seen.body


def test_a_tool_loop_the_target_started_can_be_continued_at_anthropic(stack: Stack) -> None:
    """The target's turn ends in tool_use; Anthropic gets the tool result. Its thinking block must
    go, and with thinking on Anthropic requires one there: cmm turns thinking off for this turn."""
    signed = ('{"type":"text","text":"x-anthropic-billing-header: cc_version=2.1.330.a1b; cc_entrypoint=sdk-cli; '
              'cch=00000; cc_prompt_id=00000000-0000-4000-8000-000000000001;"}')
    response, _ = turn(stack, SOURCE_MODEL, [{"role": "user", "content": "read it"}], tool="Read")
    blocks = response.json()["content"]
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    history = [{"role": "user", "content": "read it"}, {"role": "assistant", "content": blocks},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": blocks[2]["id"], "content": "ok"}]}]
    body = ('{"model":"%s","messages":%s,"system":[%s],"tools":[],"max_tokens":32000,"thinking":%s,"stream":false}' % (
        PASS_MODEL, json.dumps(history, separators=(",", ":")), signed,
        json.dumps(THINKING, separators=(",", ":")))).encode()
    from cmm.core import cch

    body = cch.resign(body)
    tag = new_tag()
    response = stack.main.exchange(simple_post(PASS_MODEL, tag, body=body))
    assert response.status == 200, response.body
    [seen] = stack.anthropic.find(tag)
    sent = json.loads(seen.body)
    assert "thinking" not in sent and cch.is_valid(seen.body) and len(seen.body) == len(body)


# -- hostile and stuck clients: strict framing, deadlines, closes that end, the connection cap -------------

# The start of a TLS ClientHello, as a client that speaks TLS inside TLS sends it: 125 bytes, no line end.
CLIENT_HELLO = bytes.fromhex("160301007801000074030300") + bytes(range(14, 127))


@pytest.mark.parametrize("extension", [b";a\x00b", b";a\rb"], ids=["nul", "bare-cr"])
def test_a_chunk_extension_with_a_control_byte_never_reaches_anthropic(stack: Stack, extension: bytes) -> None:
    """Passthrough starts at once on this path, so the head and first chunk are on their way when
    the bad line comes: it must be refused, not forwarded for Anthropic to read another way."""
    tag = new_tag()
    head = http_request("POST", "/v1/files", [("Host", ANTHROPIC_HOST), ("x-api-key", USER_KEY), ("x-test-id", tag),
                                              ("Transfer-Encoding", "chunked")])
    with stack.main.connect() as conn:
        conn.send(head + b"5\r\nhello\r\n")
        time.sleep(0.1)  # the head and the first chunk go upstream first
        conn.send(b"5" + extension + b"\r\nworld\r\n0\r\n\r\n")
        response = conn.response()
        error = assert_anthropic_error(response, 400, "invalid_request_error")
        assert "malformed chunk extension" in error["message"] and response.header("connection") == "close"
        conn.read_to_eof(5)
    time.sleep(0.3)
    assert stack.anthropic.find(tag) == []  # no complete request ever reached it
    assert stack.main.exchange(simple_post(PASS_MODEL, new_tag())).status == 200


def test_a_client_hello_inside_tls_is_refused_at_once(stack: Stack) -> None:
    with stack.main.connect() as conn:  # --head-timeout 30 here: only an early refusal is quick
        started = time.monotonic()
        conn.send(CLIENT_HELLO)
        response = conn.response()
        elapsed = time.monotonic() - started
        assert_anthropic_error(response, 400)
        conn.read_to_eof(5)
    assert elapsed < 0.5, elapsed


def test_a_head_sent_a_byte_at_a_time_still_gets_408_on_time(stack: Stack) -> None:
    # --head-timeout 1 on the strict instance: counted from the first byte, not the last.
    with stack.strict.connect() as slow:
        head = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Slow: abcdefgh"
        started = time.monotonic()
        slow.settimeout(0.1)
        got = b""
        for byte in head:  # one byte every 0.1 s, until cmm answers
            slow.send(bytes([byte]))
            try:
                got = slow.sock.recv(65536)
                break
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
    assert got.startswith(b"HTTP/1.1 408 "), got[:100]
    assert 0.8 < elapsed < 2.0, elapsed


def test_a_close_the_client_never_answers_is_cut_after_a_few_seconds(stack: Stack) -> None:
    """cmm sends close_notify; this client neither answers it nor closes. Its socket must not stay."""
    with stack.main.connect() as conn:
        conn.send(http_request("GET", "/v1/models", [("Host", ANTHROPIC_HOST), ("Connection", "close")]))
        response = conn.response("GET")
        assert response.status == 200
        assert conn.sock.recv(1) == b""  # cmm's close_notify; Python's ssl does not answer it
        started = time.monotonic()
        raw = socket.socket(fileno=os.dup(conn.sock.fileno()))
        raw.settimeout(10)
        try:
            left = raw.recv(1)  # the TCP end, when cmm gives up waiting
        except ConnectionResetError:
            left = b""
        finally:
            raw.close()
        elapsed = time.monotonic() - started
    assert left == b"" and 3 < elapsed < 8, elapsed


@pytest.fixture(scope="module")
def capped(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cmm]:
    """A cmm whose one worker holds at most three client connections."""
    base = tmp_path_factory.mktemp("capped")
    instance = Cmm("capped", ["--source", SOURCE_PREFIX, "--target", TARGET_MODEL, "--anthropic-ip", "127.0.0.1",
                              "--anthropic-port", str(stack.anthropic.port), "--listen", "127.0.0.1",
                              "--proxy-url", f"http://127.0.0.1:{stack.target.port}/v1/messages",
                              "--workers", "1", "--max-connections", "3"],
                   _env(SSL_CERT_FILE=str(stack.pki / "ca.pem"), SSL_CERT_DIR=None), base / "cfg", base)
    instance.launch()
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()


def test_at_the_cap_the_longest_idle_connection_makes_room(capped: Cmm) -> None:
    idle = [capped.connect() for _ in range(3)]
    try:
        for conn in idle:
            time.sleep(0.05)
            conn.send(b"\r\n")  # nothing but an empty line: still idle
        time.sleep(0.2)
        response = capped.exchange(simple_post(PASS_MODEL, new_tag()))  # the fourth
        assert response.status == 200
        data, _ = idle[0].read_to_eof(3)  # the oldest was closed to make room, without a word
        assert data == b""
        idle[1].send(simple_post(PASS_MODEL, new_tag()))  # the others still serve
        assert idle[1].response().status == 200
    finally:
        for conn in idle:
            conn.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(capped: Cmm) -> None:
    busy = [capped.connect() for _ in range(3)]
    try:
        for conn in busy:
            conn.send(simple_post(PASS_MODEL, new_tag(), extra=[("x-fake-delay", "1.5")]))
        time.sleep(0.3)
        with pytest.raises((OSError, Closed)):
            with capped.connect(timeout=3) as refused:
                refused.send(simple_post(PASS_MODEL, new_tag()))
                refused.response()
        for conn in busy:  # the busy ones were never cut
            assert conn.response().status == 200
    finally:
        for conn in busy:
            conn.close()
    assert capped.exchange(simple_post(PASS_MODEL, new_tag())).status == 200
