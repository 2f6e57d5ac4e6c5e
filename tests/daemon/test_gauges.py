"""A worker's gauges on their way to ``cmm status``: counted in the serving unit, sent by the
worker, read and kept by the master, rendered per worker."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cmm.cli import status

from cmm.daemon import wire
from cmm.daemon.master import Supervisor, Worker
from cmm.daemon.stats import LiveStats
from cmm.cli.status import CertInfo, HostsInfo, Instance, StatusReport
from cmm.daemon.worker import WorkerControl
from memory_harness import Harness, make_pki, settings

PKI = make_pki()
OPUS = b'{"model":"claude-opus-4-6","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
POST = b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n\r\n%s" % (len(OPUS), OPUS)


def status_text(snapshot: dict) -> str:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    report = StatusReport(config_dir=Path("/home/me/.cmm"), now=now, instance=Instance(False), configured=(),
                          hosts=HostsInfo(None, None), certificate=CertInfo(Path("/home/me/.cmm/server.crt"), now),
                          trust=None, targets=(), routes=status.parse_live(snapshot),
                          workers=status.parse_workers(json.loads(json.dumps(snapshot))))
    return status.format_report(report)


def test_refused_and_evicted_connections_reach_cmm_status() -> None:
    harness = Harness(PKI, settings(max_connections=2))
    harness.upstreams["anthropic"].reply = lambda server, exchange: None  # requests stay in flight
    idle, _ = harness.client()
    busy, _ = harness.client()
    harness.send(busy, POST)
    second_busy, _ = harness.client()  # closes the idle one to make room
    harness.send(second_busy, POST)
    for _ in range(3):
        assert harness.client()[0].lost  # every one busy: refused
    assert idle.lost
    context = harness.factory.wrappedFactory.context

    control = WorkerControl(Clock(), [], grace=1.0)
    control.context = context
    control.transport = StringTransport()
    control.send_gauges()
    stats = LiveStats()
    master = Supervisor(reactor=Clock(), sockets=[[]], count=1, record=stats.add, gauges=stats.gauges)
    Worker(master, "worker-1").outReceived(control.transport.value())

    assert stats.snapshot()["workers"]["worker-1"] == {
        "requests": 0, "connections": 2, "in_flight": 2, "upstream_idle": 0, "upstream_opened": 2,
        "refused": 3, "evicted_idle": 1, "tunnels": 0}
    lines = [line for line in status_text(stats.snapshot()).splitlines() if "worker-1" in line]
    assert lines == ["  process      worker-1: 0 requests, 2 connections, 2 in flight, 0 idle upstream connections "
                     "(2 opened), 1 idle connections closed to make room (--max-connections), "
                     "⚠ 3 connections refused, all busy (--max-connections)"]


def test_a_quiet_worker_shows_no_cap_counts() -> None:
    [worker] = status.parse_workers({"workers": {"worker-1": {"requests": 2, "refused": 0, "evicted_idle": 0}}})
    assert status._worker_line(worker) == "worker-1: 2 requests"


@pytest.mark.parametrize("values", [[1, 2], {"refused": "3"}, {"refused": 1.5}, {"refused": True}, {"": None}])
def test_gauges_that_are_not_named_counts_are_refused(values: object) -> None:
    with pytest.raises(ValueError, match="named whole numbers"):
        wire.gauges_from_message({"type": "gauges", "values": values})
