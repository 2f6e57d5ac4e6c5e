"""RFC 6455 WebSocket for the fakes, the tests and the benchmark: frames, handshake, an echo server.

cmm carries a WebSocket (Claude Code's voice dictation on ``/api/ws/speech_to_text/voice_stream``)
as a raw tunnel and never reads it; proving that it carries one whole needs both ends to speak
the real protocol: masking, the 16- and 64-bit lengths, control frames, fragments, the close
handshake. ``FrameReader`` and ``encode_frame`` are sans-IO; ``EchoWebSocket`` is the fake
Anthropic's end (``serve`` upgrades a twisted.web request to it); ``WebSocketClient`` is a
blocking client over any connected socket (the tests' TLS sockets to cmm).

The echo server answers every text and binary message with the same message, a ping with a pong
carrying its payload, a close with a close carrying its code. A few text messages steer it:
``flood N`` sends N bytes as binary messages, as fast as the connection takes them (it stops
while its transport is paused), then a text ``flooded N paused P`` (P: how often it was
paused); ``pause S`` stops reading for S seconds after answering ``paused``. A request header
``x-fake-ws-greeting: TEXT`` makes it send TEXT in the same write as its ``101``.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import re
import socket
import struct
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from cmm.serve.tls import connected

VOICE_STREAM_PATH = "/api/ws/speech_to_text/voice_stream"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 256 * 1024 * 1024
FLOOD_PIECE = 64 * 1024


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class ProtocolError(Exception):
    """The peer broke RFC 6455; the message says how."""


@attrs.frozen
class Message:
    """A whole message (fragments joined) or a control frame."""

    opcode: Opcode
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")


def accept_key(key: bytes | str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw.strip() + GUID).digest()).decode("ascii")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def encode_frame(opcode: Opcode, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One frame; ``mask`` (4 bytes) for a client's frames, None for a server's."""
    first = (0x80 if fin else 0) | int(opcode)
    size = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if mask is None:
        return head + payload
    if len(mask) != 4:
        raise ValueError("a frame's mask is 4 bytes")
    return head + mask + masked(payload, mask)


def masked(payload: bytes, mask: bytes) -> bytes:
    """XOR with the repeated 4-byte mask (its own inverse), a whole int at a time."""
    if not payload:
        return b""
    repeat = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeat, "little")).to_bytes(len(payload), "little")


class FrameReader:
    """Bytes in, messages out, whatever the split. ``masked``: whether the peer must mask (a
    server reads masked frames, a client unmasked ones)."""

    def __init__(self, masked: bool, max_message: int = MAX_MESSAGE) -> None:
        self._masked = masked
        self._max = max_message
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None
        self._fragment_size = 0

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        out = []
        while (frame := self._frame()) is not None:
            message = self._message(*frame)
            if message is not None:
                out.append(message)
        return out

    def _frame(self) -> tuple[bool, Opcode, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise ProtocolError("reserved bits set without an extension")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise ProtocolError(f"unknown opcode {first & 0x0F:#x}") from None
        if bool(second & 0x80) != self._masked:
            raise ProtocolError("a client must mask its frames and a server must not")
        size, at = second & 0x7F, 2
        if size == 126:
            if len(buffer) < 4:
                return None
            (size,), at = struct.unpack_from("!H", buffer, 2), 4
            if size < 126:
                raise ProtocolError("a 16-bit length for a size that fits in 7 bits")
        elif size == 127:
            if len(buffer) < 10:
                return None
            (size,), at = struct.unpack_from("!Q", buffer, 2), 10
            if size >> 63 or size < 1 << 16:
                raise ProtocolError("a 64-bit length that is too large or fits in 16 bits")
        fin = bool(first & 0x80)
        if opcode >= Opcode.CLOSE and (size > 125 or not fin):
            raise ProtocolError("a control frame longer than 125 bytes or fragmented")
        if size > self._max:
            raise ProtocolError(f"a frame of {size} bytes is over the {self._max}-byte limit")
        mask_size = 4 if self._masked else 0
        if len(buffer) < at + mask_size + size:
            return None
        mask = bytes(buffer[at : at + mask_size])
        payload = bytes(buffer[at + mask_size : at + mask_size + size])
        del buffer[: at + mask_size + size]
        return fin, opcode, masked(payload, mask) if mask else payload

    def _message(self, fin: bool, opcode: Opcode, payload: bytes) -> Message | None:
        if opcode >= Opcode.CLOSE:
            return Message(opcode, payload)
        if opcode is Opcode.CONTINUATION:
            if self._fragment_opcode is None:
                raise ProtocolError("a continuation frame with no message to continue")
        elif self._fragment_opcode is not None:
            raise ProtocolError("a new message before the last one's final fragment")
        else:
            self._fragment_opcode = opcode
        self._fragment_size += len(payload)
        if self._fragment_size > self._max:
            raise ProtocolError(f"a message over the {self._max}-byte limit")
        self._fragments.append(payload)
        if not fin:
            return None
        whole, kind = b"".join(self._fragments), self._fragment_opcode
        self._fragments, self._fragment_opcode, self._fragment_size = [], None, 0
        if kind is Opcode.TEXT:
            try:
                whole.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("a text message that is not UTF-8") from None
        return Message(kind, whole)


def handshake_request(path: str, key: str, host: str = "api.anthropic.com",
                      extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def handshake_response(key: str) -> bytes:
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode("ascii")


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")


# -- the fake Anthropic's end ---------------------------------------------------------------------


def reply_to(message: Message) -> tuple[str, Any]:
    """What the echo end does with a message, for every fake that plays it: ("send", (opcode,
    payload)), ("close", code), ("flood", bytes), ("pause", seconds) or ("ignore", None)."""
    if message.opcode is Opcode.PING:
        return "send", (Opcode.PONG, message.payload)
    if message.opcode is Opcode.CLOSE:
        code = message.payload[:2] if len(message.payload) >= 2 else struct.pack("!H", 1000)
        return "close", struct.unpack("!H", code)[0]
    if message.opcode is Opcode.TEXT and (command := re.fullmatch(r"flood (\d+)", message.text)):
        return "flood", int(command.group(1))
    if message.opcode is Opcode.TEXT and (command := re.fullmatch(r"pause ([0-9.]+)", message.text)):
        return "pause", float(command.group(1))
    if message.opcode in (Opcode.TEXT, Opcode.BINARY):
        return "send", (message.opcode, message.payload)
    return "ignore", None


@implementer(IPushProducer)
class EchoWebSocket(Protocol):
    """The server end: echoes, answers pings and closes, and obeys ``flood`` and ``pause``."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.reader = FrameReader(masked=True)
        self.closing = False
        self._flood_left = 0
        self._flood_size = 0
        self._paused = False
        self.pauses = 0
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        connected(self).registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            messages = self.reader.feed(data)
        except ProtocolError as error:
            self._close(1002, str(error)[:100])
            return
        for message in messages:
            self._answer(message)

    def _send(self, opcode: Opcode, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(encode_frame(opcode, payload))

    def _answer(self, message: Message) -> None:
        kind, value = reply_to(message)
        if kind == "send":
            self._send(*value)
        elif kind == "close":
            self._close(value)
        elif kind == "flood":
            self._flood_left = self._flood_size = value
            self._flood()
        elif kind == "pause":
            self._send(Opcode.TEXT, b"paused")
            connected(self).pauseProducing()
            self._timer = self.clock.callLater(value, self._read_again)

    def _read_again(self) -> None:
        self._timer = None
        if self.transport is not None:
            connected(self).resumeProducing()

    def _flood(self) -> None:
        while self._flood_left and not self._paused:
            piece = min(FLOOD_PIECE, self._flood_left)
            self._flood_left -= piece
            self._send(Opcode.BINARY, b"\xa5" * piece)
            if not self._flood_left:
                self._send(Opcode.TEXT, f"flooded {self._flood_size} paused {self.pauses}".encode())

    def _close(self, code: int, reason: str = "") -> None:
        self.closing = True
        self._send(Opcode.CLOSE, close_payload(code, reason))
        connected(self).unregisterProducer()  # TLS does not close while a producer is registered
        connected(self).loseConnection()

    # IPushProducer: the transport says when its buffer is full
    def pauseProducing(self) -> None:
        self._paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self._paused = False
        if self._flood_left:
            self.clock.callLater(0, self._flood)

    def stopProducing(self) -> None:
        self._flood_left = 0

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._flood_left = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


def serve(request: Any, clock: IReactorTime) -> Any:
    """Upgrade a twisted.web request to ``EchoWebSocket``; a 400 for a bad handshake.

    Bytes the client sent after its handshake, already read by the HTTP channel, go to the
    WebSocket: none may be lost (cmm must not lose them either).
    """
    from twisted.web.server import NOT_DONE_YET

    header = request.getHeader
    key = header(b"sec-websocket-key")
    try:
        nonce = base64.b64decode(key or b"", validate=True)
    except ValueError:
        nonce = b""
    if ((header(b"upgrade") or b"").lower() != b"websocket"
            or b"upgrade" not in (header(b"connection") or b"").lower()
            or header(b"sec-websocket-version") != b"13" or len(nonce) != 16):
        request.setResponseCode(400)
        return b"not a WebSocket handshake"
    channel = request.channel
    transport = channel.transport
    protocol = EchoWebSocket(clock)
    greeting = header(b"x-fake-ws-greeting")
    transport.write(handshake_response(key.decode("ascii"))
                    + (encode_frame(Opcode.TEXT, greeting) if greeting else b""))
    buffered, channel._dataBuffer = b"".join(channel._dataBuffer), []
    transport.unregisterProducer()  # the HTTP channel's; the WebSocket produces now
    channel._protocolUpgradeForWebsockets(protocol)
    channel.rawDataReceived = protocol.dataReceived  # the rest of the read that carried the head
    if buffered:
        protocol.dataReceived(buffered)
    return NOT_DONE_YET


# -- a blocking client ----------------------------------------------------------------------------


class WebSocketClient:
    """A client end over a connected (TLS) socket, for tests and the benchmark; masks its frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(masked=False)
        self.messages: list[Message] = []
        self.head = b""

    def handshake(self, path: str = VOICE_STREAM_PATH, extra: tuple[tuple[str, str], ...] = (),
                  pipelined: bytes = b"") -> bytes:
        """Send the upgrade request (and ``pipelined`` bytes in the same write); return the
        response head. ``AssertionError`` unless it is a ``101`` with the right accept key."""
        key = new_key()
        self.sock.sendall(handshake_request(path, key, extra=extra) + pipelined)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed during the handshake after {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.head = head + b"\r\n\r\n"
        assert head.startswith(b"HTTP/1.1 101 "), head
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        accepted = {name.strip().lower(): value.strip() for name, value in fields.items()}
        assert accepted.get(b"sec-websocket-accept") == accept_key(key).encode(), head
        self.messages.extend(self.reader.feed(rest))
        return self.head

    def send(self, opcode: Opcode, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(self.frame(opcode, payload, fin))

    @staticmethod
    def frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
        return encode_frame(opcode, payload, mask=os.urandom(4), fin=fin)

    def receive(self) -> Message:
        """The next message; ConnectionError if the connection closes first."""
        while not self.messages:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("connection closed")
            self.messages.extend(self.reader.feed(chunk))
        return self.messages.pop(0)
