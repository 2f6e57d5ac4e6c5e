"""Through the real serving stack: what cmm must carry as it is, and the one edit it makes for the target.

``twistd cmm`` runs from this checkout as a subprocess, in front of the fake target (a process)
and a fake api.anthropic.com that records every request's bytes exactly as they arrived (a TLS
server in a thread here, so that nothing an HTTP library would normalise is hidden).

* Every method and path that is not routed by model (HEAD probes, OPTIONS, a GET with a chunked
  body, paths with percent-escapes and sub-delimiters) reaches Anthropic byte for byte, and its
  answer reaches the client framed right (a HEAD answer has no body).
* Successive turns of one conversation reach the target with the same system blocks: the billing
  line in gateway form; with ``--keep-billing-line`` as Claude Code sent them.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from claude_code_turns import GATEWAY_LINE, turn_body
from cmm.core import cch
from cmm.testing.checkout import REPO
from cmm.testing.fakes import TEST_SERVER_CERT_FILE, TEST_SERVER_KEY_FILE, make_test_pki
from cmm.testing.processes import Process, fake_command
from support import process_env
from test_integration import ANTHROPIC_HOST, Cmm, Fake, claude_code_headers, http_request, new_tag

HAIKU = "claude-haiku-5-5"
OPUS = "claude-opus-5-5"
TARGET_MODEL = "gemini-2.5-flash"


# -- a fake Anthropic that keeps the bytes ---------------------------------------------------------

class RawAnthropic:
    """TLS on loopback; each request is kept as the bytes that came (head and framed body) and
    answered ``200`` with a body naming it, chunked if it asks with ``X-Answer: chunked`` (a
    HEAD answer: the same head, no body), with a malformed status line for ``X-Answer: garbage``."""

    def __init__(self, cert_dir: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_dir / TEST_SERVER_CERT_FILE, cert_dir / TEST_SERVER_KEY_FILE)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls, tls.makefile("rb") as reader:
                while (raw := self._request(reader)) is not None:
                    with self.lock:
                        self.requests.append(raw)
                    method, target = raw.split(b" ", 2)[:2]
                    body = b"seen %s %s" % (method, target)
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Raw-Fake: yes\r\n"
                    if b"\r\nX-Answer: garbage\r\n" in raw:
                        tls.sendall(b"HTTP/1.1 2OO Okay\r\n\r\n")
                        return
                    if b"\r\nX-Answer: chunked\r\n" in raw:
                        framed = b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                    else:
                        framed = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    if method == b"HEAD":
                        framed = framed[: framed.index(b"\r\n\r\n") + 4]
                    tls.sendall(head + framed)
        except (OSError, ValueError):
            pass

    @staticmethod
    def _request(reader: object) -> bytes | None:
        read_line = reader.readline  # type: ignore[attr-defined]
        read = reader.read  # type: ignore[attr-defined]
        head = b""
        while (line := read_line(65536)) not in (b"\r\n", b""):
            head += line
        if not head:
            return None
        head += b"\r\n"
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size_line = read_line(65536)
                body += size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while (trailer := read_line(65536)) not in (b"\r\n", b""):
                        body += trailer
                    return head + body + b"\r\n"
                body += read(size + 2)
        return head + read(int(fields.get(b"content-length", b"0")))

    def find(self, marker: bytes) -> list[bytes]:
        with self.lock:
            return [raw for raw in self.requests if marker in raw]

    def close(self) -> None:
        self.listener.close()


# -- the stack --------------------------------------------------------------------------------------

@dataclass
class Rig:
    anthropic: RawAnthropic
    target: Fake
    main: Cmm  # default settings: the billing line goes to gateway form
    keep: Cmm  # --keep-billing-line, and a mapping for last generation's sonnet
    base: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("carried")
    ca = make_test_pki(base / "pki")
    anthropic = RawAnthropic(base / "pki")
    env = process_env(SSL_CERT_FILE=str(ca), SSL_CERT_DIR=None)
    target = Process("fake target", fake_command("target"), env, base / "fake-target.out")
    instances: list[Cmm] = []
    try:
        target_port = target.port()
        common = ["--source", "claude-haiku", "--target", TARGET_MODEL, "--listen", "127.0.0.1",
                  "--proxy-url", f"http://127.0.0.1:{target_port}/v1/messages",
                  "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(anthropic.port)]
        instances = [Cmm("main", common, env, base / "cfg-main", base),
                     Cmm("keep", [*common, "--keep-billing-line", "--source", "claude-sonnet-4-5", "--target", "gpt-5"],
                         env, base / "cfg-keep", base)]
        for instance in instances:
            instance.launch()
        for instance in instances:
            instance.wait_ready()
        yield Rig(anthropic, Fake(target, target_port, None), instances[0], instances[1], base)
    finally:
        for instance in instances:
            instance.stop()
        target.stop()
        anthropic.close()


# -- every method and path not routed by model ----------------------------------------------------

ODD_PATHS = [
    "/",
    "/api/hello",
    "/v1/files/a%20b%2Fc%25;v=1:x@y~z!$'()*+,=",
    "/v1/models/claude-haiku-5-5;type=a:b@c?beta=true&q=a%26b%3D~!$'()*+,;=:@/?",
    "/v1/messages;x=1",  # not the messages path: passes whatever its body says
    "/%7Eapi/%E6%97%A5%E6%9C%AC/claude_code/settings?x=%2F..%2F&&=&",
]


def probe_request(method: str, target: str, tag: str, extra: list[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    headers = [("Host", ANTHROPIC_HOST), ("User-Agent", "claude-cli/2.1.330 (external, cli)"),
               ("x-api-key", "sk-ant-user"), ("X-Test-Id", tag), *extra]
    return http_request(method, target, headers, body)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HAIKU_JSON = json.dumps({"model": HAIKU, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()

REQUESTS = [
    pytest.param("HEAD", "/", [], b"", id="HEAD /"),
    pytest.param("HEAD", "/api/hello", [], b"", id="HEAD /api/hello"),
    pytest.param("HEAD", "/api/hello", [("X-Answer", "chunked"), ("Connection", "keep-alive")], b"",
                 id="HEAD answered chunked"),
    pytest.param("OPTIONS", "/v1/messages", [("Origin", "https://claude.ai"),
                                             ("Access-Control-Request-Method", "POST")], b"", id="OPTIONS"),
    pytest.param("OPTIONS", "*", [], b"", id="OPTIONS *"),
    pytest.param("GET", "/api/claude_code/settings", [("Transfer-Encoding", "chunked")],
                 chunked([b'{"model":"claude-haiku-5-5"', b"}"]), id="GET chunked"),
    pytest.param("GET", "/v1/messages", [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")],
                 chunked([HAIKU_JSON]), id="GET messages chunked"),
    pytest.param("GET", "/api/claude_code/policy_limits", [("Transfer-Encoding", "chunked"), ("X-Answer", "chunked")],
                 b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n", id="GET chunked, extension and trailer"),
    pytest.param("POST", "/v1/messages", [], b"", id="POST messages without a body"),
    pytest.param("OPTIONS", "/v1/messages?beta=true", [("Content-Length", str(len(HAIKU_JSON)))], HAIKU_JSON,
                 id="OPTIONS with a body"),
    pytest.param("DELETE", "/v1/files/file_011;x", [("Content-Length", "0")], b"", id="DELETE"),
    pytest.param("PATCH", "/v1/messages", [("Content-Length", str(len(HAIKU_JSON)))], HAIKU_JSON, id="PATCH"),
    pytest.param("POST", "/v1/messages;x=1", [("Content-Length", str(len(HAIKU_JSON)))], HAIKU_JSON,
                 id="POST ;path"),
    *(pytest.param("GET", path, [], b"", id=f"GET {path}") for path in ODD_PATHS),
]


@pytest.mark.parametrize("method, target, extra, body", REQUESTS)
def test_every_method_and_path_reaches_anthropic_byte_for_byte(rig: Rig, method: str, target: str,
                                                               extra: list[tuple[str, str]], body: bytes) -> None:
    tag = new_tag()
    raw = probe_request(method, target, tag, extra, body)
    with rig.main.connect() as conn:
        conn.send(raw)
        response = conn.response(method)
        assert response.status == 200, response.body[:300]
        assert response.header("x-raw-fake") == "yes" and response.header("x-cmm-provider") is None
        expected = b"seen %s %s" % (method.encode(), target.encode())
        if ("X-Answer", "chunked") in extra:
            assert response.header("transfer-encoding") == "chunked"
        else:
            assert response.header("content-length") == str(len(expected))
        assert response.body == (b"" if method == "HEAD" else expected)
        # Framed right (no body after a HEAD answer): the connection carries the next request.
        follow = new_tag()
        conn.send(probe_request("GET", "/v1/models", follow))
        assert conn.response().body == b"seen GET /v1/models"
    assert rig.anthropic.find(tag.encode()) == [raw]
    assert len(rig.anthropic.find(follow.encode())) == 1
    assert rig.target.find(tag) == []


# -- the billing line on intercepted routes ---------------------------------------------------------

def send_turn(cmm: Cmm, body: bytes, gzipped: bool = False) -> str:
    """One messages request as Claude Code sends it; returns its x-client-request-id."""
    request_id = new_tag()
    data = gzip.compress(body, mtime=0) if gzipped else body
    extra = [("Content-Encoding", "gzip")] if gzipped else []
    headers = claude_code_headers(len(data), request_id, extra=extra)
    response = cmm.exchange(http_request("POST", "/v1/messages?beta=true", headers, data))
    assert response.status == 200, response.body[:300]
    return request_id


def received(rig: Rig, request_id: str) -> bytes:
    [seen] = rig.target.find(request_id, header="x-client-request-id")
    return seen.body


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_successive_turns_reach_the_target_with_the_same_system_blocks(rig: Rig, gzipped: bool) -> None:
    turns = [turn_body(HAIKU, n) for n in (1, 2)]
    bodies = [received(rig, send_turn(rig.main, body, gzipped)) for body in turns]
    systems = [json.loads(body)["system"] for body in bodies]
    assert systems[0] == systems[1]
    assert systems[0][0] == {"type": "text", "text": GATEWAY_LINE}
    for sent, got in zip(turns, bodies):
        expected = json.loads(sent)
        expected["model"], expected["system"][0]["text"] = TARGET_MODEL, GATEWAY_LINE
        assert json.loads(got) == expected  # nothing else changed


def test_with_keep_billing_line_the_target_gets_the_turns_as_sent(rig: Rig) -> None:
    turns = [turn_body(HAIKU, n) for n in (1, 2)]
    bodies = [received(rig, send_turn(rig.keep, body)) for body in turns]
    systems = [json.loads(body)["system"] for body in bodies]
    assert systems[0] != systems[1]
    for sent, got in zip(turns, bodies):
        assert got == sent.replace(f'"{HAIKU}"'.encode(), f'"{TARGET_MODEL}"'.encode(), 1)
        assert cch.is_valid(got)


def test_passthrough_turns_keep_their_billing_line_byte_for_byte(rig: Rig) -> None:
    body = cch.resign(turn_body(HAIKU, 2).replace(HAIKU.encode(), OPUS.encode(), 1))
    request_id = send_turn(rig.main, body)
    [raw] = rig.anthropic.find(request_id.encode())
    assert raw.endswith(b"\r\n\r\n" + body) and cch.is_valid(body)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_an_error_cmm_answers_itself_has_no_body_for_head(rig: Rig, method: str) -> None:
    with rig.main.connect() as conn:
        conn.send(probe_request(method, "/api/hello", new_tag(), [("X-Answer", "garbage")]))
        response = conn.head()
        assert response.status == 502 and response.header("x-cmm-error") == "1"
        length = int(response.header("content-length") or 0)
        assert length > 0 and response.header("connection") == "close"
        rest, how = conn.read_to_eof(5)
        assert how == "eof" and len(rest) == (0 if method == "HEAD" else length)


# -- what cmm status and cmm doctor make of the models asked for ---------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cmm.cli", *args], capture_output=True, text=True,
                          env=process_env(), cwd=REPO, timeout=60)


def test_status_and_doctor_show_a_mapping_that_names_last_generation(rig: Rig, answering: int) -> None:
    send_turn(rig.keep, turn_body(HAIKU, 1))  # matches claude-haiku
    sonnet = cch.resign(turn_body(HAIKU, 1).replace(HAIKU.encode(), b"claude-sonnet-5-5", 1))
    for _ in range(2):
        request_id = send_turn(rig.keep, sonnet)  # claude-sonnet-4-5 does not match it: Anthropic answers
    assert len(rig.anthropic.find(request_id.encode())) == 1
    config = str(rig.keep.config_dir)
    shown = cli("status", "--config-dir", config, "--timeout", "1")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    [haiku] = [line for line in lines if "mapping      claude-haiku* → " in line]
    assert haiku.endswith("s ago") and "; last match " in haiku
    [stale] = [line for line in lines if "mapping      claude-sonnet-4-5* → gpt-5" in line]
    assert stale.endswith("; ⚠ no match since start, while claude-sonnet-5-5 went to Anthropic: map the family, "
                          "`cmm map add claude-sonnet gpt-5`")
    [unmatched] = [line for line in lines if line.startswith("  unmatched ")]
    assert unmatched.split(None, 1)[1].startswith("claude-sonnet-5-5 ×2 (")
    checked = cli("doctor", "--config-dir", config, "--port", str(rig.keep.port), "--hosts-file",
                  str(rig.base / "no-hosts"), "--timeout", "1", "--dns-server", f"127.0.0.1:{answering}")
    assert "Traceback" not in checked.stderr, checked.stderr
    lines = checked.stdout.splitlines()
    [at] = [n for n, line in enumerate(lines) if line.startswith("✗ mapping claude-sonnet-4-5* ")]
    assert lines[at].endswith(" matched no request since start, but claude-sonnet-5-5 (its family) went to Anthropic")
    assert "fix: map the family prefix, which matches every generation: `cmm map add claude-sonnet gpt-5` " \
           "(or --source claude-sonnet), and remove claude-sonnet-4-5" in lines[at + 1]
