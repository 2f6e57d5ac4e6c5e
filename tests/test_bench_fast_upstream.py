"""bench/fast_upstream.py gives the benchmark's requests the answers the twisted.web fakes give
(cmm.testing.fakes.plan_reply), over plain HTTP/1.1 and TLS, keep-alive, JSON and SSE alike:
the benchmark's direct run is only a baseline if it is the same work."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmm.testing.checkout import checkout_env
from cmm.testing.fakes import ANTHROPIC_PATH, Controls, RecordedRequest, make_test_pki, plan_reply, sse_events

REPO = Path(__file__).resolve().parents[1]
BODY = json.dumps({"model": "claude-haiku-4-5-20251001", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}, separators=(",", ":")).encode()
STREAM_BODY = BODY[:-1] + b',"stream":true}'


def start(tmp_path: Path, *args: str) -> Iterator[int]:
    # asyncio's own loop: the answers, not uvloop's speed, are under test here
    process = subprocess.Popen([sys.executable, str(REPO / "bench" / "fast_upstream.py"), *args, "--no-uvloop"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=checkout_env(), cwd=tmp_path)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode(errors="replace")
        match = re.match(r"listening on (\d+)", line)
        assert match, f"fast_upstream did not start: {line}"
        yield int(match.group(1))
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[int]:
    yield from start(tmp_path, "target")


def expected(body: bytes, number: int, provider: str = "target", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    request = RecordedRequest(method="POST", path=ANTHROPIC_PATH, headers=headers, body=body, connection=0)
    return plan_reply(request, Controls(), provider=provider, base_path=ANTHROPIC_PATH, request_number=number).body


def test_json_answers_are_the_fakes_and_keep_alive_holds(target: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", target, timeout=10)
    for number in (1, 2):  # the second comes from what the first left behind
        connection.request("POST", ANTHROPIC_PATH, BODY, {"content-type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200 and response.getheader("x-fake-provider") == "target"
        assert response.getheader("request-id") == f"req_fake_target_{number:06d}"
        assert body == expected(BODY, 1)
    connection.request("GET", "/_fake/requests")
    assert json.loads(connection.getresponse().read())["request_count"] == 2


def test_a_stream_is_the_fakes_events_chunked_and_paced(target: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", target, timeout=10)
    started = time.monotonic()
    connection.request("POST", ANTHROPIC_PATH, STREAM_BODY, {"x-fake-deltas": "4", "x-fake-event-delay": "0.05"})
    response = connection.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    events = response.read()
    assert time.monotonic() - started >= 0.05 * 8  # each of the stream's events waited its turn
    assert events == b"".join(sse_events(message_id="msg_fake_target_000001", model="claude-haiku-4-5-20251001",
                                         provider="target", input_tokens=len(STREAM_BODY) // 4, deltas=4))


def test_a_control_it_does_not_serve_is_refused_by_name(target: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", target, timeout=10)
    connection.request("POST", ANTHROPIC_PATH, BODY, {"x-fake-abort-after": "2"})
    response = connection.getresponse()
    assert response.status == 501 and b"x-fake-abort-after" in response.read()


def test_the_anthropic_upstream_speaks_tls_and_keeps_the_strict_check(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    for port in start(tmp_path, "anthropic", "--cert-dir", str(pki)):
        context = ssl.create_default_context(cafile=str(make_test_pki(pki)))
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        opus = BODY.replace(b"claude-haiku-4-5-20251001", b"claude-opus-4-6")
        connection.request("POST", ANTHROPIC_PATH, opus)
        response = connection.getresponse()
        assert response.status == 200 and response.read() == expected(opus, 1, "anthropic")
        forged = json.dumps({"model": "claude-opus-4-6", "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "forged"}]},
            {"role": "user", "content": "again"}]}).encode()
        connection.request("POST", ANTHROPIC_PATH, forged)
        response = connection.getresponse()
        assert response.status == 400, response.read()
        response.read()


def test_the_voice_stream_is_an_echo_as_the_fakes_is(target: int) -> None:
    """The benchmark's WebSocket rows go through cmm to this upstream: it must switch and echo
    as cmm.testing.websocket's end does (pipelined bytes, ping, flood, close)."""
    import socket

    from cmm.testing.websocket import Opcode, WebSocketClient

    client = WebSocketClient(socket.create_connection(("127.0.0.1", target), timeout=10))
    try:
        head = client.handshake(pipelined=WebSocketClient.frame(Opcode.TEXT, b"sent with the handshake"))
        assert head.startswith(b"HTTP/1.1 101 ")
        assert client.receive().payload == b"sent with the handshake"
        client.send(Opcode.BINARY, b"\x00" * 70_000)  # a 64-bit length
        assert client.receive().payload == b"\x00" * 70_000
        client.send(Opcode.PING, b"p")
        assert (message := client.receive()).opcode is Opcode.PONG and message.payload == b"p"
        client.send(Opcode.TEXT, b"flood 200000")
        flooded = 0
        while (message := client.receive()).opcode is Opcode.BINARY:
            flooded += len(message.payload)
        assert flooded == 200_000 and message.payload.startswith(b"flooded 200000")
        client.send(Opcode.CLOSE, b"\x03\xe8")
        assert (message := client.receive()).opcode is Opcode.CLOSE and message.payload == b"\x03\xe8"
    finally:
        client.sock.close()
