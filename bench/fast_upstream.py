"""A fast fake upstream for the benchmark: asyncio on uvloop, HTTP/1.1 keep-alive, TLS or plain.

    python bench/fast_upstream.py anthropic --cert-dir DIR   # TLS, the test PKI in DIR
    python bench/fast_upstream.py target                     # plain http

The twisted.web fakes in cmm.testing.fakes answer a few thousand requests a second: measured
against them, a proxy's ratio to the direct run looks twice as good as it is. This server
answers the same replies (cmm.testing.fakes.plan_reply makes each one) but keeps the HTTP layer
to a few bytes operations and remembers the reply of a request it has seen before: the
benchmark sends the same few bodies again and again, so after the first of each kind a request
costs a head parse, a search for its model and one write. Only what the benchmark uses is
served: POST /v1/messages (plain JSON and SSE, ``x-fake-deltas``, ``x-fake-event-delay``,
``x-fake-delay``, ``x-fake-close``), GET /v1/models and ``GET /_fake/requests`` (the count
only; no request is kept). Anything else the fakes understand gets a 501 that says so.

A remembered reply repeats its message id (the request-id header keeps counting): the
benchmark compares timings, not ids. A body that is encoded, holds a thinking block (the strict
check must see it) or does not start with its model takes the full path every time.

Prints ``listening on <port>`` once ready, as the fakes do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cmm
from cmm.testing.websocket import (  # noqa: E402
    FLOOD_PIECE, VOICE_STREAM_PATH, FrameReader, Message, Opcode, ProtocolError, close_payload, encode_frame,
    handshake_response, reply_to)
from cmm.testing.fakes import (  # noqa: E402
    ANTHROPIC_PATH,
    ANTHROPIC_PROVIDER,
    FAKE_CONTROL_PATH,
    TEST_SERVER_CERT_FILE,
    TEST_SERVER_KEY_FILE,
    RecordedRequest,
    check_loopback,
    make_test_pki,
    parse_controls,
    plan_reply,
)

_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 64 * 1024
_MODEL_FIRST = re.compile(rb'\{\s*"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_SUPPORTED_CONTROLS = frozenset({"x-fake-deltas", "x-fake-event-delay", "x-fake-delay", "x-fake-close",
                                 "x-fake-delta-size", "x-fake-response-bytes"})
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 501: "Not Implemented"}
_CACHE_LIMIT = 256  # distinct request kinds remembered; the benchmark sends a handful


class Answer:
    """A reply ready to write: the head after the request-id line, and the body or its events."""

    __slots__ = ("status", "head_rest", "body", "events", "joined", "delay", "event_delay", "close")

    def __init__(self, status: int, head_rest: bytes, body: bytes, events: list[bytes] | None,
                 delay: float, event_delay: float, close: bool) -> None:
        self.status = status
        self.head_rest = head_rest
        self.body = body
        self.events = events
        # An unpaced stream is written at once: its chunks joined beforehand.
        self.joined = b"".join(events) + b"0\r\n\r\n" if events is not None else b""
        self.delay = delay
        self.event_delay = event_delay
        self.close = close


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def build_answer(request: RecordedRequest, provider: str, number: int, strict: bool) -> Answer:
    """The fakes' reply to ``request`` (plan_reply), laid out as HTTP/1.1 bytes."""
    unsupported = sorted({name for name, _ in request.headers if name.startswith("x-fake-")} - _SUPPORTED_CONTROLS)
    controls = parse_controls(request)
    if unsupported and not (controls.status is not None and unsupported == ["x-fake-status"]):
        message = f"the fast upstream does not support {', '.join(unsupported)}: use cmm.testing.fakes"
        body = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}}).encode()
        return Answer(501, b"x-fake-provider: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                      % (provider.encode(), len(body)), body, None, 0.0, 0.0, False)
    reply = plan_reply(request, controls, provider=provider, base_path=ANTHROPIC_PATH, request_number=number,
                       strict=strict)
    lines = [f"{name}: {value}\r\n".encode("latin-1") for name, value in reply.headers if name != "request-id"]
    close = controls.close or (request.header("connection") or "").lower() == "close"
    if close:
        lines.append(b"connection: close\r\n")
    if reply.events is not None:
        events = [_chunk(event) for event in reply.events]
        lines.append(b"transfer-encoding: chunked\r\n\r\n")
        return Answer(reply.status, b"".join(lines), b"", events, controls.delay, controls.event_delay, close)
    lines.append(b"content-length: %d\r\n\r\n" % len(reply.body))
    return Answer(reply.status, b"".join(lines), reply.body, None, controls.delay, 0.0, close)


class Upstream:
    """What every connection shares: the count of requests, and the replies remembered."""

    def __init__(self, provider: str, strict: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.provider = provider
        self.strict = strict
        self.loop = loop
        self.request_count = 0
        self.connections_made = 0
        self.cache: dict[tuple[Any, ...], Answer] = {}
        self._request_id = f"request-id: req_fake_{provider}_".encode()

    def request_id_line(self, number: int) -> bytes:
        return self._request_id + b"%06d\r\n" % number

    def cache_key(self, method: bytes, path: bytes, headers: list[tuple[str, str]], body: bytes) -> tuple[Any, ...] | None:
        """A key for requests that get the same reply, or None when this one must be planned in full."""
        if method != b"POST" or path != ANTHROPIC_PATH.encode():
            return None
        controls = []
        for name, value in headers:
            if name.startswith("x-fake-") or name in ("content-encoding", "connection"):
                controls.append((name, value))
        if any(name == "content-encoding" for name, _ in controls):
            return None
        match = _MODEL_FIRST.match(body, 0, 256)
        if match is None or body.find(b'"thinking"') >= 0 or body.count(b'"stream"') > 1:
            return None
        return (match.group(1), _STREAM_TRUE.search(body) is not None, len(body), tuple(controls))

    def answer(self, method: bytes, path: bytes, headers: list[tuple[str, str]], body: bytes,
               number: int) -> Answer:
        key = self.cache_key(method, path, headers, body)
        if key is not None and (known := self.cache.get(key)) is not None:
            return known
        request = RecordedRequest(method=method.decode("latin-1"), path=path.decode("latin-1"),
                                  headers=tuple(headers), body=body, connection=0)
        answer = build_answer(request, self.provider, number, self.strict)
        if key is not None and len(self.cache) < _CACHE_LIMIT:
            self.cache[key] = answer
        return answer

    def control(self) -> bytes:
        body = json.dumps({"connections_made": self.connections_made, "request_count": self.request_count,
                           "requests": []}).encode()
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


class BadRequest(Exception):
    pass


class Connection(asyncio.Protocol):
    """One client connection: requests answered in order, one at a time (pipelining waits)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: tuple[bytes, bytes, list[tuple[str, str]], int | None] | None = None  # method, path, headers, length
        self.busy = False  # a reply is being sent (delayed or paced): later requests wait
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        self.websocket: FrameReader | None = None  # after a 101: the echo end, as the twisted fake's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        self.upstream.connections_made += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.websocket is not None:
            self.echo(data)
            return
        self.buffer += data
        if not self.busy:
            try:
                self.process()
            except BadRequest as error:
                self.fail(str(error))

    def fail(self, message: str) -> None:
        body = message.encode()
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
        self.closing = True
        self.transport.close()

    def process(self) -> None:
        """Answer every complete request in the buffer, until one must wait (delay, paced stream)."""
        while not self.busy and not self.closing:
            if self.head is None:
                end = self.buffer.find(_HEAD_END)
                if end < 0:
                    if len(self.buffer) > _MAX_HEAD:
                        raise BadRequest("request head too large")
                    return
                self.head = self.parse_head(bytes(self.buffer[:end]))
                del self.buffer[:end + 4]
                if ("expect", "100-continue") in self.head[2]:
                    assert self.transport is not None
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            method, path, headers, length = self.head
            if length is None:
                chunked = self.take_chunked()
                if chunked is None:
                    return
                body = chunked
            else:
                if len(self.buffer) < length:
                    return
                body = bytes(self.buffer[:length])
                del self.buffer[:length]
            self.head = None
            self.respond(method, path, headers, body)
            if self.websocket is not None:  # switched: what followed the handshake is WebSocket's
                rest, self.buffer = bytes(self.buffer), bytearray()
                self.echo(rest)
                return

    @staticmethod
    def parse_head(head: bytes) -> tuple[bytes, bytes, list[tuple[str, str]], int | None]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise BadRequest(f"bad request line {lines[0][:100]!r}")
        headers, length, chunked = [], 0, False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadRequest(f"bad header line {line[:100]!r}")
            key, text = name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")
            headers.append((key, text))
            if key == "content-length":
                if not text.isdigit():
                    raise BadRequest(f"bad content-length {text[:40]!r}")
                length = int(text)
            elif key == "transfer-encoding":
                chunked = text.lower() == "chunked"
        return parts[0], parts[1], headers, None if chunked else length

    def take_chunked(self) -> bytes | None:
        """The whole chunked body if it has arrived (taken from the buffer), else None."""
        pieces, at = [], 0
        while True:
            line_end = self.buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            try:
                size = int(bytes(self.buffer[at:line_end]).split(b";")[0], 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                trailer_end = self.buffer.find(_HEAD_END, line_end)
                if self.buffer[line_end:line_end + 4] == _HEAD_END:
                    trailer_end = line_end
                if trailer_end < 0:
                    return None
                del self.buffer[:trailer_end + 4]
                return b"".join(pieces)
            start = line_end + 2
            if len(self.buffer) < start + size + 2:
                return None
            pieces.append(bytes(self.buffer[start:start + size]))
            at = start + size + 2

    def respond(self, method: bytes, path: bytes, headers: list[tuple[str, str]], body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if method == b"GET" and path == FAKE_CONTROL_PATH.encode():
            transport.write(self.upstream.control())
            return
        key = dict(headers).get("sec-websocket-key")
        if method == b"GET" and path == VOICE_STREAM_PATH.encode() and key:
            transport.write(handshake_response(key))
            self.websocket = FrameReader(masked=True)
            return
        self.upstream.request_count += 1
        number = self.upstream.request_count
        answer = self.upstream.answer(method, path, headers, body, number)
        head = b"HTTP/1.1 %d %s\r\n" % (answer.status, _REASONS.get(answer.status, "Status").encode())
        head += self.upstream.request_id_line(number) + answer.head_rest
        if answer.delay > 0:
            self.busy = True
            self.timer = self.upstream.loop.call_later(answer.delay, self.send, head, answer)
        else:
            self.send(head, answer)

    def echo(self, data: bytes) -> None:
        """The voice stream's echo end: the messages back, pong for ping, close for close, and
        ``flood N`` (N bytes of binary frames, then a text saying so), as the twisted fake does."""
        assert self.websocket is not None and self.transport is not None
        if self.closing or not data:
            return
        try:
            messages = self.websocket.feed(data)
        except ProtocolError:
            self.transport.write(encode_frame(Opcode.CLOSE, close_payload(1002)))
            self.transport.close()
            return
        for message in messages:
            self.answer_message(message)

    def answer_message(self, message: Message) -> None:
        """As cmm.testing.websocket's echo end (``pause``, a flow-control test, is not played here)."""
        assert self.transport is not None
        write = self.transport.write
        kind, value = reply_to(message)
        if kind == "send":
            write(encode_frame(*value))
        elif kind == "close":
            write(encode_frame(Opcode.CLOSE, close_payload(value)))
            self.closing = True
            self.transport.close()
        elif kind == "flood":
            left = value
            while left:
                piece = min(FLOOD_PIECE, left)
                left -= piece
                write(encode_frame(Opcode.BINARY, b"\xa5" * piece))
            write(encode_frame(Opcode.TEXT, b"flooded %d paused 0" % value))
        elif kind == "pause":
            write(encode_frame(Opcode.TEXT, message.payload))

    def send(self, head: bytes, answer: Answer) -> None:
        self.timer = None
        transport = self.transport
        if self.closing or transport is None:
            return
        if answer.events is None:
            transport.write(head + answer.body)
            self.finish(answer)
        elif answer.event_delay <= 0:
            transport.write(head + answer.joined)
            self.finish(answer)
        else:
            self.busy = True
            transport.write(head)
            self.pace(answer, 0)

    def pace(self, answer: Answer, index: int) -> None:
        """One event now, the next ``event_delay`` later."""
        self.timer = None
        assert answer.events is not None and self.transport is not None
        if self.closing:
            return
        if index < len(answer.events):
            self.transport.write(answer.events[index])
            self.timer = self.upstream.loop.call_later(answer.event_delay, self.pace, answer, index + 1)
            return
        self.transport.write(b"0\r\n\r\n")
        self.finish(answer)

    def finish(self, answer: Answer) -> None:
        assert self.transport is not None
        if answer.close:
            self.closing = True
            self.transport.close()
            return
        if self.busy:
            self.busy = False
            try:
                self.process()
            except BadRequest as error:
                self.fail(str(error))


def tls_context(cert_dir: Path) -> ssl.SSLContext:
    make_test_pki(cert_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / TEST_SERVER_CERT_FILE, cert_dir / TEST_SERVER_KEY_FILE)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def serve(provider: str, interface: str, port: int, context: ssl.SSLContext | None, strict: bool,
                ready: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream(provider, strict, loop)
    server = await loop.create_server(lambda: Connection(upstream), interface, port, ssl=context, backlog=4096,
                                      reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ready(server.sockets[0].getsockname()[1])
    await stop.wait()
    server.close()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/fast_upstream.py", description="A fast fake upstream (uvloop).")
    sub = parser.add_subparsers(dest="kind", required=True)
    anthropic = sub.add_parser("anthropic", help="fake api.anthropic.com (TLS)")
    anthropic.add_argument("--cert-dir", type=Path, required=True)
    anthropic.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True)
    target = sub.add_parser("target", help="fake CLIProxyAPI (plain http unless --tls-cert-dir)")
    target.add_argument("--tls-cert-dir", type=Path, default=None)
    target.add_argument("--provider", default="target")
    target.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False)
    for each in (anthropic, target):
        each.add_argument("--port", type=int, default=0)
        each.add_argument("--interface", default="127.0.0.1")
        each.add_argument("--keep-requests", type=int, default=0, help="accepted for the fakes' command line; "
                          "this server keeps no request")
        each.add_argument("--no-uvloop", action="store_true", help="asyncio's own loop (for comparison)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_loopback(args.interface)
    except ValueError as error:
        print(f"fast_upstream: {error}", file=sys.stderr)
        return 2
    if args.kind == "anthropic":
        provider, cert_dir = ANTHROPIC_PROVIDER, args.cert_dir
    else:
        provider, cert_dir = args.provider, args.tls_cert_dir
    context = tls_context(Path(cert_dir)) if cert_dir is not None else None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            print("fast_upstream: uvloop is not installed: python3 -m pip install uvloop "
                  "(or '.[bench]'), or pass --no-uvloop", file=sys.stderr)
            return 2

    def ready(port: int) -> None:
        print(f"listening on {port}", flush=True)

    coroutine = serve(provider, args.interface, args.port, context, args.strict, ready)
    if args.no_uvloop:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
