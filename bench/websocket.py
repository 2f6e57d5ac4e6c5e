"""WebSocket through cmm's tunnel: echo round-trip time added by cmm, and bytes/s both ways.

Against the fake Anthropic's RFC 6455 echo end (``cmm.testing.websocket``) on Claude Code's voice
path, once directly and once via cmm (TLS to cmm, which tunnels to the fake over TLS). Voice
dictation sends small frames and waits for the answers, so the round trip of a small message is
what a user feels; bytes/s shows what one tunnel can carry. ``measure`` returns the raw figures,
``rows`` the report's table rows.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from typing import Any

from cmm.testing.websocket import Opcode, WebSocketClient

HOST_NAME = "api.anthropic.com"
SMALL = b"x" * 64  # about one chunk of dictated audio's metadata
ECHO_PIECE = 1024 * 1024


def connect(port: int, tls: ssl.SSLContext, timeout: float = 60.0) -> WebSocketClient:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = WebSocketClient(tls.wrap_socket(raw, server_hostname=HOST_NAME))
    client.handshake()
    return client


def round_trips(client: WebSocketClient, count: int, warmup: int = 10) -> list[float]:
    times = []
    for n in range(warmup + count):
        started = time.perf_counter()
        client.send(Opcode.TEXT, SMALL)
        answer = client.receive()
        elapsed = time.perf_counter() - started
        if answer.payload != SMALL:
            raise RuntimeError(f"the echo differed: {answer.payload[:40]!r}")
        if n >= warmup:
            times.append(elapsed)
    return times


def download_rate(client: WebSocketClient, size: int) -> float:
    """Bytes/s the fake pushes to the client (its ``flood``), as the client reads them."""
    started = time.perf_counter()
    client.send(Opcode.TEXT, f"flood {size}".encode())
    received = 0
    while (message := client.receive()).opcode is Opcode.BINARY:
        received += len(message.payload)
    if received != size:
        raise RuntimeError(f"flooded {received} bytes, not {size}")
    return size / (time.perf_counter() - started)


def echo_rate(client: WebSocketClient, size: int) -> float:
    """Bytes/s each way for 1 MiB messages sent and echoed one at a time."""
    piece = b"\x5a" * ECHO_PIECE
    started = time.perf_counter()
    for _ in range(max(1, size // ECHO_PIECE)):
        client.send(Opcode.BINARY, piece)
        if len(client.receive().payload) != ECHO_PIECE:
            raise RuntimeError("a short echo")
    return max(1, size // ECHO_PIECE) * ECHO_PIECE / (time.perf_counter() - started)


def measure(ways: dict[str, tuple[int, ssl.SSLContext]], rtt_count: int = 200,
            volume: int = 64 * 1024 * 1024) -> dict[str, Any]:
    """``ways``: "direct" and "via" → (port, TLS context trusting that end)."""
    out: dict[str, Any] = {"rtt_count": rtt_count, "volume_bytes": volume}
    for way, (port, tls) in ways.items():
        client = connect(port, tls)
        try:
            times = sorted(round_trips(client, rtt_count))
            out[way] = {
                "rtt_median_ms": statistics.median(times) * 1000,
                "rtt_p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
                "download_bytes_s": download_rate(client, volume),
                "echo_bytes_s": echo_rate(client, volume // 2),
            }
            client.send(Opcode.CLOSE, b"\x03\xe8")
            client.receive()
        finally:
            client.sock.close()
    return out


def rows(measured: dict[str, Any]) -> list[list[str]]:
    """[what, direct, via, added or ratio] for the report's table."""
    direct, via = measured["direct"], measured["via"]
    out = []
    for key, label in (("rtt_median_ms", "echo round trip, median (ms)"), ("rtt_p99_ms", "echo round trip, p99 (ms)")):
        out.append([label, f"{direct[key]:.3f}", f"{via[key]:.3f}", f"{via[key] - direct[key]:+.3f}"])
    for key, label in (("download_bytes_s", "fake → client (MB/s)"), ("echo_bytes_s", "1 MiB echoes, each way (MB/s)")):
        out.append([label, f"{direct[key] / 1e6:.1f}", f"{via[key] / 1e6:.1f}", f"×{via[key] / direct[key]:.2f}"])
    return out


HEADERS = ["WebSocket (voice path)", "direct", "via cmm", "added / ratio"]
