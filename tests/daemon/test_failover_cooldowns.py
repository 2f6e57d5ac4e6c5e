"""Cool-downs and fallbacks across processes: a worker's cool-down reaches the master, the master
tells every worker (and a worker started later), and ``cmm status`` shows them with the fallbacks
counted by cause per rule. The last test runs a master with two real worker processes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from cmm.cli import status
from cmm.cli.status import CertInfo, HostsInfo, Instance, StatusReport
from cmm.core.failover import Cooldown
from cmm.daemon import wire
from cmm.daemon.master import Supervisor, Worker, bind
from cmm.daemon.stats import LiveStats
from cmm.testing import fakes
from failover_stack import SOURCE, TARGET, Live
from support import process_env, record
from test_integration import Conn, new_tag, simple_post

RULE = f"{SOURCE}* → {TARGET}"


class Child:
    """A worker's pipe as the master writes it."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written += [json.loads(line) for line in data.splitlines()]


def worker(master: Supervisor, name: str) -> tuple[Worker, Child]:
    child = Child()
    found = Worker(master, name)
    found.transport = child  # type: ignore[assignment]
    master.workers[name] = found
    return found, child


def test_a_cool_down_travels_as_a_message_and_junk_is_refused() -> None:
    cooldown = Cooldown(RULE, 1_800_000_000.5, "anthropic 429")
    assert wire.cooldown_from_message(wire.decode(wire.encode(wire.cooldown_message(cooldown)))) == cooldown
    for junk in ({"rule": RULE, "until": "soon", "cause": "x"}, {"rule": 1, "until": 1.0, "cause": "x"},
                 {"rule": RULE, "until": True, "cause": "x"}, {"rule": RULE, "until": float("nan"), "cause": "x"},
                 {"rule": RULE, "until": 1.0}):
        with pytest.raises(ValueError):
            wire.cooldown_from_message({"type": "cooldown", **junk})


def test_the_master_tells_every_worker_once_and_a_new_worker_at_its_start() -> None:
    seen: list[Cooldown] = []
    master = Supervisor(reactor=Clock(), sockets=[[]], count=2, record=lambda r, w: None, on_cooldown=seen.append)
    first, one = worker(master, "worker-1")
    _, two = worker(master, "worker-2")
    cooldown = Cooldown(RULE, time.time() + 60, "anthropic 529")
    line = wire.encode(wire.cooldown_message(cooldown))
    first.outReceived(line)
    first.outReceived(line)  # told twice (two requests met it): said once
    assert one.written == two.written == [wire.cooldown_message(cooldown)] and seen == [cooldown]
    master.message(first, wire.encode({"type": "cooldown", "rule": RULE, "until": "never", "cause": "x"}))
    assert len(one.written) == 1  # junk changes nothing
    late, three = worker(master, "worker-3")
    late.connectionMade()
    assert three.written == [wire.cooldown_message(cooldown)]


def status_lines(snapshot: dict[str, Any]) -> list[str]:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    data = json.loads(json.dumps(snapshot))
    report = StatusReport(config_dir=Path("/home/me/.cmm"), now=now, instance=Instance(False), configured=(),
                          hosts=HostsInfo(None, None), certificate=CertInfo(Path("/home/me/.cmm/server.crt"), now),
                          trust=None, targets=(), routes=status.parse_live(data), workers=status.parse_workers(data),
                          failover=status.parse_failover(data))
    return [line.strip() for line in status.format_report(report).splitlines() if line.strip().startswith("fallback")]


def test_status_shows_fallbacks_by_cause_per_rule_the_cool_downs_and_the_bodies_not_kept() -> None:
    stats = LiveStats()
    for why in ("anthropic 429", "anthropic 429", "anthropic 429 cool-down", "anthropic unreachable"):
        stats.add(record(model=SOURCE, mapping=SOURCE, target=TARGET, route="fallback", fallback=why), "worker-1")
    stats.add(record(), "worker-1")
    stats.cooldown(Cooldown(RULE, 4_102_444_800.0, "anthropic 429"))  # 2100-01-01
    stats.cooldown(Cooldown("gone* → x", time.time() - 1, "anthropic 529"))  # over: not shown
    stats.gauges("worker-1", {"fallback_unkept": 2})
    stats.gauges("worker-2", {"fallback_unkept": 1})
    snapshot = stats.snapshot()
    assert snapshot["fallbacks"] == {RULE: {"anthropic 429": 2, "anthropic 429 cool-down": 1,
                                            "anthropic unreachable": 1}}
    assert snapshot["cooldowns"] == [{"rule": RULE, "until": "2100-01-01T00:00:00Z", "cause": "anthropic 429"}]
    assert status_lines(snapshot) == [
        f"fallback     {RULE}: anthropic 429×2, anthropic 429 cool-down×1, anthropic unreachable×1",
        f"fallback     ⚠ {RULE}: straight to its target until 2100-01-01T00:00:00Z (anthropic 429)",
        "fallback     3 requests too large to keep for a failover (--fallback-body-max)"]
    assert status.parse_failover({"fallbacks": [1], "cooldowns": "x", "workers": {"w": {"fallback_unkept": "x"}}}) == ()


# -- a master and two worker processes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    stack = Live(tmp_path_factory.mktemp("cooldowns"))
    try:
        yield stack
    finally:
        stack.stop()


def ask(port: int, ca: Path, tag: str, *extra: tuple[str, str]) -> Any:
    with Conn(port, ca, timeout=30) as conn:
        conn.send(simple_post(SOURCE, tag, extra=list(extra)))
        return conn.response()


def test_a_cool_down_one_worker_meets_holds_in_every_worker(live: Live) -> None:
    sockets = [bind("127.0.0.1", 0), bind("127.0.0.1", 0)]  # one each: the test picks the worker it asks
    ports = [s.getsockname()[1] for s in sockets]
    records: list[tuple[Any, str]] = []
    stats = LiveStats()
    master = Supervisor(reactor=live.reactor, sockets=[[sockets[0]], [sockets[1]]], count=2,
                        record=lambda r, w: records.append((r, w)), on_cooldown=stats.cooldown,
                        environ=process_env(SSL_CERT_FILE=str(live.ca)), grace=1.0)
    config = wire.WorkerConfig(proxy=live.settings(live.rule(mode="fallback")),
                               cert_pem=(live.pki / fakes.TEST_SERVER_CERT_FILE).read_bytes(),
                               key_pem=(live.pki / fakes.TEST_SERVER_KEY_FILE).read_bytes(),
                               anthropic_addresses=("127.0.0.1",), connect_timeout=2.0)
    live.call(lambda: master.start(config))
    pids = live.call(lambda: [w.transport.pid for w in master.workers.values()])
    try:
        for port in ports:  # both serving
            assert ask(port, live.ca, new_tag()).header("x-fake-provider") == "anthropic"
        tag = new_tag()
        refused = ask(ports[0], live.ca, tag, ("x-fake-for", "anthropic"), ("x-fake-status", "429"),
                      ("x-fake-retry-after", "60"))
        assert refused.status == 200 and refused.header("x-cmm-fallback") == "anthropic 429"
        deadline = time.monotonic() + 5
        while not live.call(master.cooldowns.current) and time.monotonic() < deadline:
            time.sleep(0.02)
        [known] = live.call(master.cooldowns.current)
        assert known.rule == RULE and known.cause == "anthropic 429" and stats.cooldowns.current() == [known]
        time.sleep(0.3)  # the master's word on its way to the other worker
        for port in (ports[1], ports[0]):
            tag = new_tag()
            response = ask(port, live.ca, tag)
            assert response.status == 200 and response.header("x-fake-provider") == "target"
            assert response.header("x-cmm-fallback") == "anthropic 429 cool-down"
            assert live.seen(live.anthropic, tag) == []  # no round trip wasted on Anthropic
        deadline = time.monotonic() + 5
        while len(records) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        cooled = {w for r, w in records if r.fallback == "anthropic 429 cool-down"}
        assert cooled == {"worker-1", "worker-2"}
    finally:
        live.call(lambda: [w.close_stdin() for w in master.workers.values()])
        for pid in pids:
            _reap(pid)
        for sock in sockets:
            sock.close()


def _reap(pid: int, timeout: float = 10.0) -> None:
    """The worker drains and exits once its stdin closes; killed if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# -- the master service's wiring ------------------------------------------------------------------------

def test_the_master_service_shows_the_cool_downs_it_serves_or_its_workers_meet(tmp_path: Path) -> None:
    from twisted.internet.testing import StringTransport

    from cmm.machine import certs
    from test_master_service import World, master, start

    key_pair = certs.ensure_certificates(tmp_path / "certs")
    alone = World(tmp_path / "alone")
    serving = master(alone, key_pair, workers=0, **{"anthropic-ip": "192.0.2.7"})
    start(serving)
    assert serving.context is not None
    cooldown = Cooldown(RULE, 4_102_444_800.0, "anthropic 529")
    serving.context.report_cooldown(cooldown)  # what the serving unit calls when it meets one
    [(_, factory)] = alone.control
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert json.loads(transport.value())["cooldowns"] == [
        {"rule": RULE, "until": "2100-01-01T00:00:00Z", "cause": "anthropic 529"}]
    world = World(tmp_path / "workers")
    supervised = master(world, key_pair, workers=2, **{"anthropic-ip": "192.0.2.7"})
    start(supervised)
    [supervisor] = world.supervisors
    supervisor.kwargs["on_cooldown"](cooldown)  # what the supervisor calls when a worker met one
    assert supervised.status()["cooldowns"][0]["cause"] == "anthropic 529"
