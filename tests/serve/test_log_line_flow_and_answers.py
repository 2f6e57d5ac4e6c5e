"""Request log format, DNS answer filtering, deadlines and valves."""

from __future__ import annotations

import time

from twisted.internet.task import Clock

from support import record

from cmm.core.errors import error_body, error_response
from cmm.serve.flow import Deadline, Valve
from cmm.core.records import format_line
from cmm.serve.request_log import RequestLog
from cmm.serve.resolve import usable_addresses


def test_seed_line_format() -> None:
    line = format_line(record(), localtime=time.gmtime)
    assert line == ("[1970-01-01 00:00:00] claude-haiku-4-5-20251001           → INTERCEPTED → gemini-2.5-flash ✓ "
                    "200 12ms ↑300 ↓500")
    passthrough = format_line(record(model=None, method="GET", path="/v1/models", intercepted=False, target=None),
                              localtime=time.gmtime)
    assert passthrough.startswith("[1970-01-01 00:00:00] GET /v1/models                      → PASSTHROUGH ✓")
    failed = format_line(record(status=502, error="Cannot reach x"), localtime=time.gmtime)
    assert "✗ 502" in failed and failed.endswith("(Cannot reach x)")


def test_request_log_writes_console_and_rotating_file(tmp_path) -> None:
    import io

    console = io.StringIO()
    log = RequestLog.to_file(tmp_path / "logs" / "cmm.log", max_bytes=300, backups=2, console=console)
    for _ in range(10):
        log(record())
    log.close()
    assert console.getvalue().count("INTERCEPTED") == 10
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["cmm.log", "cmm.log.1", "cmm.log.2"]  # rotated, only two backups kept


def test_error_body_is_anthropic_format() -> None:
    assert error_body(529, "busy") == b'{"type": "error", "error": {"type": "api_error", "message": "busy"}}'
    response = error_response(413, "too big")
    assert response.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b'"request_too_large"' in response and b"connection: close\r\n" in response


def test_usable_addresses_drop_loopback_and_duplicates() -> None:
    assert usable_addresses(["127.0.0.1", "192.0.2.1", "::1", "0.0.0.0", "2001:db8::1", "192.0.2.1", "junk"]) == [
        "192.0.2.1", "2001:db8::1"]


def test_deadline_extends_on_touch_without_new_timers() -> None:
    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(clock, lambda: fired.append(clock.seconds()))
    deadline.start(10)
    clock.advance(6)
    deadline.touch()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6)
    assert fired == []
    clock.advance(4)
    assert fired == [16]
    deadline.start(5)
    deadline.cancel()
    clock.advance(10)
    assert fired == [16]


def test_deadline_restart_with_a_shorter_interval() -> None:
    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(clock, lambda: fired.append(clock.seconds()))
    deadline.start(120)
    deadline.start(30)
    clock.advance(29)
    assert fired == []
    clock.advance(1)
    assert fired == [30]


class Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


def test_valve_resumes_only_when_every_reason_is_gone() -> None:
    transport = Transport()
    valve = Valve(transport)
    valve.pause("connecting")
    valve.pauseProducing()  # backpressure from the other side
    valve.resume("connecting")
    assert transport.calls == ["pause"] and valve.paused
    valve.resumeProducing()
    assert transport.calls == ["pause", "resume"] and not valve.paused
    valve.resume("never-paused")
    assert transport.calls == ["pause", "resume"]
