"""WebSocket tunnels and long passthrough streams through the real serving stack: twistd cmm with a
worker process, the fake Anthropic (TLS) speaking RFC 6455 on Claude Code's voice path, and
clients as Claude Code connects (TLS to 127.0.0.1 as api.anthropic.com)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmm.testing.websocket import (VOICE_STREAM_PATH, Message, Opcode, WebSocketClient, close_payload,
                                   handshake_request, new_key)
from test_integration import Closed, Conn, http_request, json_body, new_tag, simple_post
from test_multiprocess import Stack, status, wait_until

SOURCE = "claude-haiku-4-5-20251001"
IDLE_LIMIT = 4.0  # --tunnel-idle-timeout of the stack's cmm
UPSTREAM_LIMIT = 2.0  # --upstream-timeout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("tunnel"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def cmm(stack: Stack) -> tuple[object, Path, int]:
    return stack.start("tunnel", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                       "--proxy-url", stack.target_url, "--tunnel-idle-timeout", str(IDLE_LIMIT),
                       "--upstream-timeout", str(UPSTREAM_LIMIT), "--log-format", "json", workers=1)


def open_socket(port: int, config_dir: Path, timeout: float = 20.0) -> socket.socket:
    conn = Conn(port, config_dir / "ca.crt", timeout=timeout)
    conn.reader.close()
    return conn.sock


def websocket(port: int, config_dir: Path, **handshake: object) -> WebSocketClient:
    client = WebSocketClient(open_socket(port, config_dir))
    client.handshake(**handshake)  # type: ignore[arg-type]
    return client


def tunnels(config_dir: Path) -> int:
    return sum(worker.get("tunnels", 0) for worker in status(config_dir)["workers"].values())


def log_lines(config_dir: Path, marker: str) -> list[dict]:
    return [json.loads(line) for line in (config_dir / "cmm.log").read_text().splitlines() if marker in line]


def test_a_websocket_echo_exchange_passes_whole(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    client = websocket(port, config_dir)
    assert b"Sec-WebSocket-Accept" in client.head and b"x-cmm" not in client.head.lower()
    client.send(Opcode.TEXT, "héllo, voice".encode())
    assert client.receive() == Message(Opcode.TEXT, "héllo, voice".encode())
    big = os.urandom(200 * 1024)  # over 64 KiB: the 64-bit length, both ways
    client.send(Opcode.BINARY, big)
    assert client.receive() == Message(Opcode.BINARY, big)
    client.send(Opcode.BINARY, b"frag-", fin=False)  # a fragmented message, joined at the far end
    client.send(Opcode.CONTINUATION, b"mented")
    assert client.receive() == Message(Opcode.BINARY, b"frag-mented")
    client.send(Opcode.PING, b"are you there")
    assert client.receive() == Message(Opcode.PONG, b"are you there")
    client.send(Opcode.CLOSE, close_payload(1000, "done"))
    assert client.receive() == Message(Opcode.CLOSE, close_payload(1000))
    assert client.sock.recv(1) == b""  # then the server closes, and cmm closes the client side
    client.sock.close()
    record = wait_until(lambda: [r for r in log_lines(config_dir, "voice_stream")
                                 if r["bytes_in"] > 200 * 1024], what="the tunnel's record")[-1]
    assert record["status"] == 101 and record["route"] == "tunnel" and record["error"] is None
    assert record["method"] == "GET" and record["path"] == VOICE_STREAM_PATH
    assert record["bytes_in"] > len(big) and record["bytes_out"] > len(big)


def test_the_first_frames_either_side_sent_with_the_switch_are_not_lost(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    client = WebSocketClient(open_socket(port, config_dir))
    pipelined = client.frame(Opcode.TEXT, b"sent with the upgrade") + client.frame(Opcode.PING, b"p")
    client.handshake(extra=(("x-fake-ws-greeting", "welcome"),), pipelined=pipelined)
    assert client.receive() == Message(Opcode.TEXT, b"welcome")  # came in the same write as the 101
    assert client.receive() == Message(Opcode.TEXT, b"sent with the upgrade")
    assert client.receive() == Message(Opcode.PONG, b"p")
    client.sock.close()


def test_other_requests_are_served_while_a_tunnel_is_open_and_it_is_counted(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    before = tunnels(config_dir)
    client = websocket(port, config_dir)
    wait_until(lambda: tunnels(config_dir) == before + 1, what="the open tunnel in cmm status")
    with Conn(port, config_dir / "ca.crt") as conn:
        conn.send(simple_post("claude-opus-4-6", new_tag()))
        assert conn.response().status == 200
    client.send(Opcode.TEXT, b"still here")
    assert client.receive() == Message(Opcode.TEXT, b"still here")
    client.sock.close()
    wait_until(lambda: tunnels(config_dir) == before, what="the tunnel gone from cmm status")


def test_an_upgrade_on_an_intercepted_route_is_refused_in_anthropics_format(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    body = json_body(SOURCE)
    with Conn(port, config_dir / "ca.crt") as conn:
        conn.send(http_request("POST", "/v1/messages", [("Host", "api.anthropic.com"), ("Upgrade", "websocket"),
                                                        ("Connection", "Upgrade"), ("Content-Type", "application/json"),
                                                        ("Content-Length", str(len(body)))], body))
        response = conn.response()
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "cannot switch protocols (websocket)" in error["message"] and "claude-haiku-4-5" in error["message"]


def test_a_silent_tunnel_is_closed_at_the_idle_limit_and_pings_keep_one_open(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    pinged, silent = websocket(port, config_dir), websocket(port, config_dir)
    opened = time.monotonic()
    while time.monotonic() - opened < IDLE_LIMIT * 1.7:
        pinged.send(Opcode.PING, b"keepalive")
        assert pinged.receive() == Message(Opcode.PONG, b"keepalive")
        time.sleep(IDLE_LIMIT / 4)
    assert silent.sock.recv(1) == b""  # closed by cmm meanwhile
    closed = time.monotonic() - opened
    assert IDLE_LIMIT * 0.9 <= closed
    pinged.send(Opcode.TEXT, b"alive")
    assert pinged.receive() == Message(Opcode.TEXT, b"alive")
    pinged.sock.close()
    silent.sock.close()
    record = wait_until(lambda: [r for r in log_lines(config_dir, "tunnel silent") if r["error"]],
                        what="the idle tunnel's record")[-1]
    assert record["status"] == 101 and "--tunnel-idle-timeout" in record["error"]
    assert record["duration"] >= IDLE_LIMIT * 0.9


def test_a_client_that_stops_reading_pauses_the_upstream(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    client = websocket(port, config_dir)
    total = 48 * 1024 * 1024
    client.send(Opcode.TEXT, f"flood {total}".encode())
    time.sleep(1.5)  # not reading: the fake must be held back through cmm, not buffered by it
    received = 0
    while True:
        message = client.receive()
        if message.opcode is Opcode.TEXT:
            break
        received += len(message.payload)
    assert received == total
    paused = int(message.text.split()[-1])
    assert paused >= 1, message.text  # the fake's transport paused it at least once
    client.sock.close()


def test_an_upstream_that_stops_reading_pauses_the_client(cmm: tuple[object, Path, int]) -> None:
    _, config_dir, port = cmm
    client = websocket(port, config_dir)
    payload = os.urandom(64 * 1024 * 1024)
    frame = client.frame(Opcode.BINARY, payload)
    client.send(Opcode.TEXT, b"pause 2.5")  # under the idle limit: a stalled tunnel moves nothing either
    assert client.receive() == Message(Opcode.TEXT, b"paused")
    sent = [0]

    def send() -> None:
        view = memoryview(frame)
        for at in range(0, len(view), 65536):
            client.sock.sendall(view[at : at + 65536])
            sent[0] = at + 65536

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(0.8)
    early = sent[0]
    time.sleep(0.7)
    assert sent[0] == early < len(frame)  # stalled: cmm stopped reading the client
    assert client.receive() == Message(Opcode.BINARY, payload)  # and all of it goes once the fake reads again
    sender.join(10)
    client.sock.close()


def test_a_tunnel_survives_sighup(stack: Stack, cmm: tuple[object, Path, int]) -> None:
    master, config_dir, port = cmm
    client = websocket(port, config_dir)
    client.send(Opcode.TEXT, b"before")
    assert client.receive() == Message(Opcode.TEXT, b"before")
    os.kill(master.proc.pid, signal.SIGHUP)  # type: ignore[attr-defined]
    master.wait_for(r"Reloaded")  # type: ignore[attr-defined]
    for n in range(3):
        client.send(Opcode.TEXT, b"after %d" % n)
        assert client.receive() == Message(Opcode.TEXT, b"after %d" % n)
        time.sleep(0.3)
    client.sock.close()


def test_a_long_event_stream_outlives_the_upstream_silence_limit(cmm: tuple[object, Path, int]) -> None:
    """An event more often than --upstream-timeout keeps a passthrough stream open however long."""
    _, config_dir, port = cmm
    events = 8
    delay = UPSTREAM_LIMIT / 2  # 8 events, one a second: 8 s in all, four times the limit
    started = time.monotonic()
    with Conn(port, config_dir / "ca.crt", timeout=30) as conn:
        conn.send(http_request("GET", "/v1/code/sessions/cse_1/worker/events/stream",
                               [("Host", "api.anthropic.com"), ("Accept", "text/event-stream"),
                                ("x-fake-deltas", str(events)), ("x-fake-event-delay", str(delay))]))
        response = conn.head()
        data = b"".join(conn.chunks())
    assert response.status == 200
    assert data.count(b"event: ping") == events
    assert time.monotonic() - started > UPSTREAM_LIMIT * 2



def test_a_stream_silent_past_the_upstream_limit_is_cut(cmm: tuple[object, Path, int]) -> None:
    """The other side of the test above: the limit is real, silence beyond it ends a stream."""
    _, config_dir, port = cmm
    got: list[bytes] = []
    with Conn(port, config_dir / "ca.crt", timeout=30) as conn:
        conn.send(http_request("GET", "/v1/code/sessions/cse_2/worker/events/stream",
                               [("Host", "api.anthropic.com"), ("x-fake-deltas", "3"),
                                ("x-fake-event-delay", str(UPSTREAM_LIMIT * 1.5))]))
        assert conn.head().status == 200
        with pytest.raises(Closed):
            for chunk in conn.chunks():
                got.append(chunk)
    assert b"".join(got).count(b"event: ping") == 1  # the first, then silence past the limit


def test_sigterm_drains_an_open_tunnel_like_a_request_in_flight(stack: Stack) -> None:
    master, config_dir, port = stack.start("drain", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                                           "--proxy-url", stack.target_url, "--grace", "2", workers=1)
    client = websocket(port, config_dir)
    client.send(Opcode.TEXT, b"one")
    assert client.receive() == Message(Opcode.TEXT, b"one")
    os.kill(master.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    client.send(Opcode.TEXT, b"during the grace")  # still carried while draining
    assert client.receive() == Message(Opcode.TEXT, b"during the grace")
    started = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        while True:
            client.receive()  # cut when the grace is over
    assert time.monotonic() - started < 10
    master.proc.wait(timeout=15)
    client.sock.close()
    [line] = [line for line in (config_dir / "cmm.log").read_text().splitlines() if "voice_stream" in line]
    assert "TUNNEL ✗ 101" in line and "(cut at the end of the grace period (--grace))" in line


def test_an_unasked_switch_is_not_tunnelled(cmm: tuple[object, Path, int]) -> None:
    """The voice path without Connection: upgrade is plain HTTP: the fake's 400, no tunnel."""
    _, config_dir, port = cmm
    with Conn(port, config_dir / "ca.crt") as conn:
        conn.send(handshake_request(VOICE_STREAM_PATH, new_key()).replace(b"Connection: Upgrade", b"X-No: 1"))
        response = conn.response(method="GET")
    assert response.status == 400


def test_tunnels_have_their_own_line_in_the_route_counts() -> None:
    """A tunnel lasts minutes: counted with passthrough requests it would swamp their p50 and p99."""
    from cmm.daemon.stats import LiveStats
    from support import record

    stats = LiveStats()
    stats.add(record(model=None, intercepted=False, target=None, status=101, duration=300.0, route="tunnel"), "w")
    stats.add(record(model="claude-opus-4-6", intercepted=False, target=None, duration=0.02), "w")
    routes = stats.snapshot()["routes"]
    assert routes["tunnel"]["requests"] == 1 and routes["passthrough"]["requests"] == 1
    assert routes["passthrough"]["p99_ms"] < 1000
