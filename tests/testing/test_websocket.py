"""The RFC 6455 codec the WebSocket tests rely on, checked against the RFC's own examples."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cmm.testing.websocket import (FrameReader, Message, Opcode, ProtocolError, accept_key, encode_frame, masked)

MASK = bytes.fromhex("37fa213d")


def test_the_rfcs_handshake_example() -> None:  # RFC 6455 section 1.3
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(("frame", "masked_frame", "message"), [  # RFC 6455 section 5.7
    ("810548656c6c6f", "818537fa213d7f9f4d5158", Message(Opcode.TEXT, b"Hello")),
    ("890548656c6c6f", "898537fa213d7f9f4d5158", Message(Opcode.PING, b"Hello")),
    ("8a0548656c6c6f", "8a8537fa213d7f9f4d5158", Message(Opcode.PONG, b"Hello")),
])
def test_the_rfcs_frame_examples(frame: str, masked_frame: str, message: Message) -> None:
    assert encode_frame(message.opcode, message.payload) == bytes.fromhex(frame)
    assert encode_frame(message.opcode, message.payload, mask=MASK) == bytes.fromhex(masked_frame)
    assert FrameReader(masked=False).feed(bytes.fromhex(frame)) == [message]
    assert FrameReader(masked=True).feed(bytes.fromhex(masked_frame)) == [message]


def test_the_rfcs_fragmented_text_and_long_lengths() -> None:
    fragments = bytes.fromhex("010348656c") + bytes.fromhex("80026c6f")
    assert FrameReader(masked=False).feed(fragments) == [Message(Opcode.TEXT, b"Hello")]
    assert encode_frame(Opcode.BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert encode_frame(Opcode.BINARY, bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")


@given(st.binary(max_size=70_000), st.sampled_from([Opcode.TEXT, Opcode.BINARY]), st.data())
def test_any_message_read_back_whatever_the_split(payload: bytes, opcode: Opcode, data: st.DataObject) -> None:
    if opcode is Opcode.TEXT:
        payload = payload.decode("latin-1").encode("utf-8")
    stream = encode_frame(opcode, payload, mask=MASK) + encode_frame(Opcode.PING, b"p", mask=MASK)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    reader, found = FrameReader(masked=True), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        found += reader.feed(stream[start:end])
    assert found == [Message(opcode, payload), Message(Opcode.PING, b"p")]


def test_masking_is_its_own_inverse() -> None:
    assert masked(masked(b"some bytes!", MASK), MASK) == b"some bytes!"


@pytest.mark.parametrize(("masked_reader", "frame", "why"), [
    (True, encode_frame(Opcode.TEXT, b"x"), "must mask"),  # a client frame without a mask
    (False, encode_frame(Opcode.TEXT, b"x", mask=MASK), "must mask"),  # a server frame with one
    (False, b"\xc1\x01x", "reserved bits"),
    (False, b"\x83\x01x", "unknown opcode"),
    (False, b"\x89\x7e\x00\x7e" + bytes(126), "control frame"),
    (False, b"\x09\x01x", "control frame"),  # a fragmented ping
    (False, b"\x82\x7e\x00\x05hello", "16-bit length"),
    (False, b"\x82\x7f" + (1 << 63).to_bytes(8, "big"), "64-bit length"),
    (False, b"\x80\x01x", "no message to continue"),
    (False, b"\x01\x01a\x81\x01b", "before the last one's final fragment"),
    (False, b"\x81\x02\xc3\x28", "not UTF-8"),
])
def test_protocol_errors_are_named(masked_reader: bool, frame: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        FrameReader(masked=masked_reader).feed(frame)


def test_a_message_over_the_limit_is_refused_from_its_header() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        FrameReader(masked=False, max_message=1000).feed(b"\x82\x7e\x04\x00")
