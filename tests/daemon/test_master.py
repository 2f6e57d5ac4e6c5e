"""The master's relaying of what workers say: whatever a worker prints or reports (and so
whatever a client or upstream slipped into it) reaches the console and the twistd log as one
escaped line, never as terminal escapes or forged lines."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from cmm.daemon import wire
from cmm.daemon.master import Supervisor, Worker

HOSTILE = "evil \x1b[31mred\n[fake] line\u2028sep \ud800 \\ end"
ESCAPED = "evil \\x1b[31mred\\n[fake] line\\u2028sep \ufffd \\\\ end"


def supervisor() -> Supervisor:
    return Supervisor(reactor=Clock(), sockets=[[]], count=1, record=lambda record, worker: None)


def single_line(events: list[dict]) -> str:
    [event] = events
    text = formatEvent(event)
    assert "\n" not in text and "\x1b" not in text and "\u2028" not in text
    text.encode("utf-8")  # no surrogate left: it can be written
    return text


def test_a_line_a_worker_prints_arrives_as_one_escaped_line() -> None:
    worker = Worker(supervisor(), "worker-1")
    printed = HOSTILE.replace("\n", "\r").encode("utf-8", "surrogatepass")
    with capturedLogs() as events:
        worker.errReceived(printed[:9])
        worker.errReceived(printed[9:] + b"\n")
    # an encoded surrogate is three undecodable bytes: each one replaced
    assert single_line(events) == "worker-1: " + ESCAPED.replace("\\n", "\\r").replace("\ufffd", "\ufffd" * 3)


def test_each_line_a_worker_prints_is_its_own_attributed_line() -> None:
    worker = Worker(supervisor(), "worker-1")
    with capturedLogs() as events:
        worker.errReceived(b"\x1b[31mTraceback\n[fake] line\n")
    assert [formatEvent(event) for event in events] == ["worker-1: \\x1b[31mTraceback", "worker-1: [fake] line"]


def test_undecodable_bytes_a_worker_prints_are_written_replaced_not_dropped() -> None:
    worker = Worker(supervisor(), "worker-1")
    with capturedLogs() as events:
        worker.errReceived(b"bad \xff\x85 bytes\n")
    assert single_line(events) == "worker-1: bad \ufffd\ufffd bytes"


def test_a_relayed_log_event_arrives_as_one_escaped_line_at_its_level() -> None:
    master = supervisor()
    worker = Worker(master, "worker-1")
    line = wire.encode({"type": "log", "level": "warn", "text": HOSTILE})
    assert b"\\ud800" in line  # JSON carries the lone surrogate as an escape
    with capturedLogs() as events:
        worker.outReceived(line)
    assert single_line(events) == f"worker-1: {ESCAPED}"
    assert events[0]["log_level"] == LogLevel.warn


def test_an_unreadable_message_is_logged_escaped() -> None:
    worker = Worker(supervisor(), "worker-1")
    with capturedLogs() as events:
        worker.outReceived(json.dumps({"type": "log", "level": "\x1b[31m\n[fake]", "text": "x"}).encode() + b"\n")
    text = single_line(events)
    assert text.startswith("worker-1 sent something unreadable") and "\\x1b" in text
