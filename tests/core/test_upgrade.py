"""Protocol upgrades, sans-IO: which requests may switch, how a 101 is read, what a tunnel records."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cmm.core.errors import HttpError
from cmm.core.exchange import Body, Head, Interim, ResponseReader, Switched
from cmm.core.http_head import parse_request_head
from cmm.core.records import format_json, format_line
from cmm.core.router import Mapping, Upstream
from cmm.core.upgrade import (Ending, Side, TunnelTally, asks_upgrade, intercepted_upgrade_refusal, switch_refusal,
                              tunnel_record, upgrade_protocols)
from support import record

MAPPING = Mapping("claude-haiku-4-5", "gemini-2.5-flash", Upstream("http", "localhost", 8317, "/v1/messages", ""))
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def head(fields: bytes, start: bytes = b"GET /api/ws/speech_to_text/voice_stream HTTP/1.1"):
    return parse_request_head(start + b"\r\nHost: api.anthropic.com\r\n" + fields + b"\r\n")


@pytest.mark.parametrize(("fields", "protocols"), [
    (b"Upgrade: websocket\r\nConnection: Upgrade\r\n", (b"websocket",)),
    (b"upgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\n", (b"websocket",)),
    (b"Upgrade: h2c, websocket\r\nConnection: Upgrade, HTTP2-Settings\r\n", (b"h2c", b"websocket")),
    (b"Upgrade: websocket\r\n", ()),  # Connection does not name it: a plain header
    (b"Connection: Upgrade\r\n", ()),
    (b"Connection: close\r\nUpgrade: websocket\r\n", ()),
    (b"", ()),
])
def test_what_a_request_asks_to_switch_to(fields: bytes, protocols: tuple[bytes, ...]) -> None:
    assert upgrade_protocols(head(fields)) == protocols
    assert asks_upgrade(head(fields)) is bool(protocols)


def test_http_1_0_cannot_upgrade() -> None:
    request = head(b"Upgrade: websocket\r\nConnection: Upgrade\r\n", b"GET /api/ws HTTP/1.0")
    assert upgrade_protocols(request) == ()


def test_an_upgrade_on_an_intercepted_route_is_refused_with_the_mapping_named() -> None:
    request = head(b"Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 2\r\n", b"POST /v1/messages HTTP/1.1")
    refusal = intercepted_upgrade_refusal(request, MAPPING)
    assert refusal is not None and refusal.status == 400
    assert "websocket" in refusal.message and "claude-haiku-4-5* → gemini-2.5-flash" in refusal.message
    assert intercepted_upgrade_refusal(request, None) is None  # passthrough: it may switch
    assert intercepted_upgrade_refusal(head(b"Content-Length: 2\r\n", b"POST /v1/messages HTTP/1.1"), MAPPING) is None


def test_a_switch_is_taken_only_when_asked_for_on_passthrough_with_the_body_sent() -> None:
    asked = head(b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    assert switch_refusal(asked, intercepted=False, body_sent=True) is None
    unasked = switch_refusal(head(b""), intercepted=False, body_sent=True)
    assert unasked is not None and unasked.status == 502 and "without being asked" in unasked.message
    intercepted = switch_refusal(asked, intercepted=True, body_sent=True)
    assert intercepted is not None and intercepted.status == 502
    early = switch_refusal(asked, intercepted=False, body_sent=False)
    assert early is not None and early.status == 502 and "body" in early.message


def test_a_101_to_an_upgrade_ends_the_reading_with_the_new_protocols_first_bytes() -> None:
    frame = b"\x81\x05hello"
    events = list(ResponseReader(b"GET", upgrade=True).feed(SWITCH + frame))
    assert len(events) == 1 and isinstance(events[0], Switched)
    assert events[0].raw == SWITCH and events[0].rest == frame and events[0].response.status == 101


@given(st.integers(min_value=1, max_value=len(SWITCH) - 1))
def test_a_101_split_anywhere_is_found_whole(cut: int) -> None:
    reader = ResponseReader(b"GET", upgrade=True)
    assert list(reader.feed(SWITCH[:cut])) == []
    [switched] = list(reader.feed(SWITCH[cut:] + b"x"))
    assert isinstance(switched, Switched) and switched.raw == SWITCH and switched.rest == b"x"


def test_interim_heads_before_a_101_pass_first() -> None:
    events = list(ResponseReader(b"GET", upgrade=True).feed(b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCH))
    assert events[0] == Interim(b"HTTP/1.1 100 Continue\r\n\r\n") and isinstance(events[1], Switched)


def test_a_101_nobody_asked_for_is_refused_and_other_answers_to_an_upgrade_read_as_usual() -> None:
    with pytest.raises(HttpError) as refused:
        list(ResponseReader(b"GET").feed(SWITCH))
    assert refused.value.status == 502
    events = list(ResponseReader(b"GET", upgrade=True).feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"))
    assert isinstance(events[0], Head) and events[0].response.status == 403
    assert isinstance(events[1], Body) and events[1].progress.done


def test_a_tunnel_is_tallied_both_ways_and_ends_once() -> None:
    tally = TunnelTally(bytes_in=120, bytes_out=0)
    tally.carried(Side.UPSTREAM, len(SWITCH))
    tally.carried(Side.CLIENT, 10)
    tally.carried(Side.UPSTREAM, 7)
    assert (tally.bytes_in, tally.bytes_out) == (130, len(SWITCH) + 7)
    assert tally.end(Ending.UPSTREAM_CLOSED) is True
    assert tally.end(Ending.IDLE) is False and tally.ended is Ending.UPSTREAM_CLOSED


@pytest.mark.parametrize(("ending", "error"), [
    (Ending.CLIENT_CLOSED, None), (Ending.UPSTREAM_CLOSED, None),
    (Ending.IDLE, "tunnel silent both ways for 900 seconds (--tunnel-idle-timeout)"),
    (Ending.DRAINED, "cut at the end of the grace period (--grace)"),
])
def test_a_tunnels_record(ending: Ending, error: str | None) -> None:
    tally = TunnelTally(bytes_in=300, bytes_out=4000)
    tally.end(ending)
    request = record(method="GET", path="/api/ws/speech_to_text/voice_stream", model=None, intercepted=False,
                     target=None, status=None, duration=61.5)
    made = tunnel_record(request, tally, 900.0)
    assert (made.status, made.route, made.upstream, made.error) == (101, "tunnel", "anthropic", error)
    assert (made.bytes_in, made.bytes_out, made.duration) == (300, 4000, 61.5)
    assert '"route":"tunnel"' in format_json(made)
    assert "→ TUNNEL " in format_line(made) and " 101 61500ms ↑300 ↓4000" in format_line(made)
