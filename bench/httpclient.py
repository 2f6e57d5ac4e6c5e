"""A minimal blocking HTTP/1.1 client that timestamps every read, for the benchmark.

http.client hides when bytes arrive and ties the TLS server name to the host it dials; the
benchmark needs both (cmm's certificate names api.anthropic.com, but we dial 127.0.0.1), so
this client does the little HTTP/1.1 it needs itself: keep-alive, Content-Length and chunked
bodies, and a callback with the arrival time of every decoded body piece.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Called with (arrival time from time.perf_counter(), decoded body bytes) for each piece.
OnData = Callable[[float, bytes], None]

_READ_SIZE = 256 * 1024


class ProtocolError(Exception):
    """The server's reply was not HTTP/1.1 this client understands (or the connection broke)."""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    sent: float  # perf_counter when the last request byte was handed to the kernel
    started: float  # perf_counter just before the first request byte was sent
    finished: float  # perf_counter when the last body byte arrived
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class Connection:
    """One keep-alive connection to ``host:port``, TLS when ``tls`` is given."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_name: str | None = None
    timeout: float = 60.0
    _sock: socket.socket | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _arrived: float = 0.0  # when the newest bytes in the buffer arrived

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.server_name or self.host)
        self._buffer.clear()
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        on_data: OnData | None = None,
    ) -> Response:
        """Send one request and read the whole reply; reconnects if the last reply closed."""
        if self._sock is None:
            self._sock = self._connect()
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"content-length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        started = time.perf_counter()
        # One sendall for small requests (one TLS record); big bodies go separately, no copy.
        if len(body) < 64 * 1024:
            self._sock.sendall(head + body)
        else:
            self._sock.sendall(head)
            self._sock.sendall(memoryview(body))
        sent = time.perf_counter()
        try:
            response = self._read_response(on_data)
        except Exception:
            self.close()
            raise
        response.started, response.sent = started, sent
        if not response.keep_alive:
            self.close()
        return response

    # -- reading --------------------------------------------------------------------------

    def _fill(self) -> None:
        """Read more bytes into the buffer and note when they arrived."""
        assert self._sock is not None
        data = self._sock.recv(_READ_SIZE)
        now = time.perf_counter()
        if not data:
            raise ProtocolError("connection closed by the server")
        self._buffer += data
        self._arrived = now

    def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > 64 * 1024:
                raise ProtocolError("header line too long")
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _read_response(self, on_data: OnData | None) -> Response:
        status_line = self._read_line().decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {status_line!r}")
        status = int(parts[1])
        headers: list[tuple[str, str]] = []
        while line := self._read_line():
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        response = Response(status, headers, b"", 0.0, 0.0, 0.0)
        connection = (response.header("connection") or "").lower()
        response.keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        body = bytearray()

        def deliver(when: float, piece: bytes) -> None:
            body.extend(piece)
            if on_data is not None and piece:
                on_data(when, piece)

        encoding = (response.header("transfer-encoding") or "").lower()
        length = response.header("content-length")
        if "chunked" in encoding:
            self._read_chunked(deliver)
        elif length is not None:
            self._read_exactly(int(length), deliver)
        else:
            self._read_until_close(deliver)
            response.keep_alive = False
        response.body = bytes(body)
        response.finished = time.perf_counter()
        return response

    def _take(self, count: int, when: float, deliver: Callable[[float, bytes], None]) -> int:
        piece = bytes(self._buffer[:count])
        del self._buffer[:count]
        deliver(when, piece)
        return len(piece)

    def _read_exactly(self, count: int, deliver: Callable[[float, bytes], None]) -> None:
        while count > 0:
            if not self._buffer:
                self._fill()
            count -= self._take(min(count, len(self._buffer)), self._arrived, deliver)

    def _read_chunked(self, deliver: Callable[[float, bytes], None]) -> None:
        while True:
            size = int(self._read_line().split(b";")[0].strip(), 16)
            if size == 0:
                while self._read_line():  # trailers, then the blank line
                    pass
                return
            self._read_exactly(size, deliver)
            if self._read_line() != b"":
                raise ProtocolError("chunk not followed by CRLF")

    def _read_until_close(self, deliver: Callable[[float, bytes], None]) -> None:
        while True:
            if self._buffer:
                self._take(len(self._buffer), self._arrived, deliver)
            try:
                self._fill()
            except ProtocolError:
                return
