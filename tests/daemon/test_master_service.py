"""The master service on a memory reactor: every collaborator that would bind a port, start a
process, edit /etc/hosts, ask DNS or install a signal handler is a fake that records what it was
asked; the config dir is a temporary folder. No root, no sockets, no files outside tmp."""

from __future__ import annotations

import errno
import functools
import io
import json
import signal
import socket
import types
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent

from cmm.config import paths
from cmm.config.userfiles import UserDir
from cmm.core.records import RequestRecord
from cmm.core.settings import ServeConfig, build_config
from cmm.daemon.service import InterceptorService, StatusFactory
from cmm.daemon.tap import load_config
from cmm.daemon.wire import WorkerConfig
from cmm.machine import certs
from cmm.serve import resolve
from cmm.serve.resolve import AddressBook, Answer, format_cache
from support import Lookups

BASE = {"source": "claude-haiku", "target": "gemini", "port": "8443"}


class Reactor(MemoryReactorClock):
    """A signal handler hands its work to the reactor thread; here that is the next turn."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


@attrs.define
class FakeSocket:
    address: str
    family: int
    closed: bool = False

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeSupervisor:
    kwargs: dict[str, Any]
    started: list[WorkerConfig] = attrs.field(factory=list)
    reloaded: list[WorkerConfig] = attrs.field(factory=list)
    stopped: bool = False

    def start(self, config: WorkerConfig) -> None:
        self.started.append(config)

    def reload(self, config: WorkerConfig) -> None:
        self.reloaded.append(config)

    def stop(self) -> defer.Deferred[None]:
        self.stopped = True
        return defer.succeed(None)


@attrs.define
class FakeRecorder:
    kwargs: dict[str, Any]
    events: list[str]
    started: bool = False
    records: list[Any] = attrs.field(factory=list)
    retention: list[float] = attrs.field(factory=list)
    stopped_after: list[str] | None = None  # the world's events when it was stopped

    def start(self) -> None:
        self.started = True

    def add(self, record: Any) -> None:
        self.records.append(record)

    def reload(self, retention_days: float) -> None:
        self.retention.append(retention_days)

    def status(self) -> dict[str, Any]:
        return {"pid": 5151}

    def stop(self) -> defer.Deferred[None]:
        self.stopped_after = list(self.events)
        return defer.succeed(None)


@attrs.define
class FakeLog:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    records: list[Any] = attrs.field(factory=list)
    file: Any = None
    closed: bool = False

    def __call__(self, record: Any) -> None:
        self.records.append(record)

    def write_all(self, records: Any) -> None:  # RequestLog's batch write
        self.records.extend(records)

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakePort:
    stopped: bool = False

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped = True
        return defer.succeed(None)


@attrs.define
class World:
    """Everything the master reached for, as it saw it."""

    tmp: Path
    reactor: Reactor = attrs.field(factory=Reactor)
    events: list[str] = attrs.field(factory=list)  # bind, hosts and serving steps in order
    fail_bind: set[str] = attrs.field(factory=set)
    sockets: list[FakeSocket] = attrs.field(factory=list)
    supervisors: list[FakeSupervisor] = attrs.field(factory=list)
    recorders: list[FakeRecorder] = attrs.field(factory=list)
    logs: list[FakeLog] = attrs.field(factory=list)
    signals: dict[int, Callable[[int, Any], None]] = attrs.field(factory=dict)
    control: list[tuple[UserDir, Any]] = attrs.field(factory=list)
    control_port: FakePort = attrs.field(factory=FakePort)
    lookups: Lookups = attrs.field(factory=Lookups)
    flushes: int = 0

    def bind(self, address: str, port: int, reuse_port: bool = False) -> socket.socket:
        self.events.append(f"bind {address}:{port}{' reuseport' if reuse_port else ''}")
        if address in self.fail_bind:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        sock = FakeSocket(address, socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.sockets.append(sock)
        return sock  # type: ignore[return-value]

    def supervisor(self, **kwargs: Any) -> FakeSupervisor:
        self.events.append("workers")
        self.supervisors.append(FakeSupervisor(kwargs))
        return self.supervisors[-1]

    def usage_recorder(self, **kwargs: Any) -> FakeRecorder:
        self.recorders.append(FakeRecorder(kwargs, self.events))
        return self.recorders[-1]

    def install(self, path: Path) -> bool:
        self.events.append(f"install {path.name}")
        return True

    def restore(self, path: Path) -> bool:
        self.events.append(f"restore {path.name}")
        return True

    def flush(self) -> list[str]:
        self.flushes += 1
        return []

    def request_log(self, *args: Any, **kwargs: Any) -> FakeLog:
        self.logs.append(FakeLog(args, kwargs))
        return self.logs[-1]

    def address_book(self, config: ServeConfig, reactor: Any, **kwargs: Any) -> AddressBook:
        if config.anthropic_ips:
            return AddressBook.fixed(list(config.anthropic_ips))
        return AddressBook(resolve=self.lookups, clock=reactor, **kwargs)

    def listen_control(self, directory: UserDir, factory: Any, reactor: Any) -> FakePort:
        self.control.append((directory, factory))
        return self.control_port

    def answer(self, *addresses: str) -> None:
        self.pending().callback(Answer(addresses, 300))

    def pending(self) -> defer.Deferred[Answer]:
        [waiting] = [d for d in self.lookups.pending if not d.called]
        return waiting


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> certs.EnsureResult:
    return certs.ensure_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def options(world: World, **more: str) -> dict[str, str]:
    return {**BASE, "hosts-file": str(world.tmp / "hosts"), **more}


def master(world: World, key_pair: certs.EnsureResult, workers: int = 0, **more: str) -> InterceptorService:
    flags = options(world, workers=str(workers), **more)
    directory = UserDir.open(world.tmp / "cfg")
    return InterceptorService(
        build_config(flags, {}, directory.path), reactor=world.reactor, environ={}, console=io.StringIO(), euid=1000,
        getpid=lambda: 4242, user_dir=directory, load_config=functools.partial(load_config, flags),
        binder=world.bind, supervisor_factory=world.supervisor, certificates=lambda _: key_pair,
        hosts_editor=world, flush_dns=world.flush, request_log_factory=world.request_log,
        address_book_factory=world.address_book, install_signal=world.signals.__setitem__,
        control_listener=world.listen_control, usage_recorder_factory=world.usage_recorder,
    )


def start(service: InterceptorService) -> None:
    service.privilegedStartService()
    service.startService()


# --- start -----------------------------------------------------------------------------------------


def test_start_binds_every_listen_address_and_edits_hosts_only_once_dns_answered(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2)
    start(service)
    assert world.events == ["bind 127.0.0.1:8443", "bind ::1:8443"]  # bound as root; nothing served yet
    world.answer("192.0.2.1", "2001:db8::1")
    assert world.events[2:] == ["workers", "install hosts"]
    assert world.flushes == 1 and service.hosts_edited
    [supervisor] = world.supervisors
    assert supervisor.started[0].anthropic_addresses == ("192.0.2.1", "2001:db8::1")


def test_workers_0_serves_in_the_master_on_each_bound_socket(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    adopted = [(family, fd) for fd, family, _ in world.reactor.adoptedPorts]
    assert adopted == [(socket.AF_INET, 99), (socket.AF_INET6, 99)]
    assert not world.supervisors and service.context is not None
    assert world.events[-1] == "install hosts"


def test_n_workers_get_the_sockets_the_identity_and_the_certificates(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=3, grace="7", **{"anthropic-ip": "192.0.2.7"})
    start(service)
    [supervisor] = world.supervisors
    assert supervisor.kwargs["count"] == 3 and supervisor.kwargs["grace"] == 7.0
    assert supervisor.kwargs["sockets"] == [world.sockets] * 3  # --accept shared: every worker, every socket
    assert supervisor.kwargs["uid"] is None  # not root: no privileges to drop
    [config] = supervisor.started
    assert (config.cert_pem, config.key_pem) == (key_pair.server.cert_pem, key_pair.server.key_pem)
    assert config.anthropic_addresses == ("192.0.2.7",)
    assert [m.source for m in config.proxy.router.mappings] == ["claude-haiku"]
    assert world.reactor.adoptedPorts == []  # the master itself serves nothing


def test_reuseport_gives_each_worker_its_own_socket_per_address(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2, accept="reuseport", **{"anthropic-ip": "192.0.2.7"})
    start(service)
    assert world.events[:4] == ["bind 127.0.0.1:8443 reuseport"] * 2 + ["bind ::1:8443 reuseport"] * 2
    v4_first, v4_second, v6_first, v6_second = world.sockets
    assert world.supervisors[0].kwargs["sockets"] == [[v4_first, v6_first], [v4_second, v6_second]]


def test_an_address_that_cannot_be_bound_is_skipped_with_a_warning(
        world: World, key_pair: certs.EnsureResult) -> None:
    world.fail_bind.add("::1")
    service = master(world, key_pair, workers=0, **{"anthropic-ip": "192.0.2.7"})
    with capturedLogs() as events:
        start(service)
    assert [sock.address for sock in service.sockets] == ["127.0.0.1"]
    assert "Not listening on ::1:8443: Address already in use" in [formatEvent(e) for e in events]


def test_no_address_bound_stops_the_start_with_the_fix(world: World, key_pair: certs.EnsureResult) -> None:
    world.fail_bind.update({"127.0.0.1", "::1"})
    service = master(world, key_pair)
    with pytest.raises(SystemExit, match=r"cannot listen on port 8443 .*Address already in use.*sudo cmm stop"):
        service.privilegedStartService()


def test_start_writes_the_pid_and_state_files_and_opens_the_log_in_the_config_dir(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    directory = world.tmp / "cfg"
    assert (directory / paths.PID_FILE_NAME).read_text() == "4242\n"
    state = json.loads((directory / paths.STATE_FILE_NAME).read_text())
    assert (state["pid"], state["port"], state["worker_count"]) == (4242, 8443, 2)
    [request_log] = world.logs
    assert request_log.args == (directory / "cmm.log", 1_000_000, 3)
    assert request_log.kwargs["directory"] is service.user_dir and request_log.kwargs["json"] is False
    assert set(world.signals) == {signal.SIGHUP, signal.SIGUSR1}


def test_the_status_socket_answers_the_live_state(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    [(directory, factory)] = world.control
    assert directory is service.user_dir and isinstance(factory, StatusFactory)
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    answer = json.loads(transport.value())
    assert (answer["pid"], answer["listen"]) == (4242, ["127.0.0.1", "::1"])
    assert transport.disconnecting


def test_no_status_socket_is_a_warning_not_a_failed_start(world: World, key_pair: certs.EnsureResult) -> None:
    def refuse(*_: Any) -> FakePort:
        raise OSError(errno.EACCES, "Permission denied")

    service = master(world, key_pair, **{"anthropic-ip": "192.0.2.7"})
    service.control_listener = refuse
    with capturedLogs() as events:
        start(service)
    assert any(formatEvent(e).startswith("No live status: cannot listen on") for e in events)
    assert len(world.reactor.adoptedPorts) == 2


# --- DNS -------------------------------------------------------------------------------------------


def test_dns_down_with_a_cache_serves_at_once_with_the_cached_addresses(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0)
    assert service.user_dir is not None
    service.user_dir.write_bytes(paths.DNS_CACHE_FILE_NAME, format_cache(["192.0.2.9"], 0).encode())
    start(service)
    assert len(world.reactor.adoptedPorts) == 2 and world.events[-1] == "install hosts"  # no clock advanced
    assert service.worker_config is not None and service.worker_config.anthropic_addresses == ("192.0.2.9",)
    assert not world.pending().called  # DNS is still being asked in the background


def test_dns_down_without_a_cache_serves_after_the_start_wait(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0)
    start(service)
    world.reactor.advance(resolve.START_WAIT - 0.1)
    assert world.reactor.adoptedPorts == [] and "install hosts" not in world.events
    world.reactor.advance(0.1)
    assert len(world.reactor.adoptedPorts) == 2 and world.events[-1] == "install hosts"


# --- SIGHUP ----------------------------------------------------------------------------------------


def test_sighup_with_a_bad_config_keeps_the_old_one(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    before = service.config
    (world.tmp / "cfg" / "mappings.toml").write_text("[[mapping]]\nsource = 'x'\n")  # no target
    with capturedLogs() as events:
        world.signals[signal.SIGHUP](signal.SIGHUP, None)
        world.reactor.advance(0)
    assert any(formatEvent(e).startswith("Reload refused, still serving the previous configuration")
               for e in events)
    assert service.config is before and world.supervisors[0].reloaded == []


def test_sighup_with_a_good_config_reaches_the_workers_and_keeps_what_is_bound(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    (world.tmp / "cfg" / "mappings.toml").write_text("[[mapping]]\nsource = 'claude-opus'\ntarget = 'gpt'\n")
    world.signals[signal.SIGHUP](signal.SIGHUP, None)
    world.reactor.advance(0)
    [reloaded] = world.supervisors[0].reloaded
    assert [m.source for m in reloaded.proxy.router.mappings] == ["claude-haiku", "claude-opus"]
    assert service.config.port == 8443 and world.events.count("bind 127.0.0.1:8443") == 1


def test_reload_without_a_command_line_is_refused_not_raised(world: World, key_pair: certs.EnsureResult) -> None:
    config = build_config(options(world), {}, world.tmp)
    service = InterceptorService(config, reactor=world.reactor, user_dir=UserDir.open(world.tmp))
    service.addresses = AddressBook.fixed(["192.0.2.7"])
    with capturedLogs() as events:
        service.reload()
    assert service.config is config
    assert any("started without a command line" in formatEvent(e) for e in events)


# --- stop ------------------------------------------------------------------------------------------


@attrs.define
class BusyTransport:
    aborted: bool = False

    def abortConnection(self) -> None:
        self.aborted = True


@attrs.define(eq=False)
class BusyConnection:
    """A client connection with a request in flight: drain waits for it."""

    transport: BusyTransport = attrs.field(factory=BusyTransport)
    idle: bool = False
    exchange: object = object()


def test_stop_restores_hosts_removes_the_files_and_aborts_what_outlives_the_grace(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0, grace="5", **{"anthropic-ip": "192.0.2.7"})
    start(service)
    assert service.context is not None
    busy = BusyConnection()
    service.context.connections.add(busy)  # type: ignore[arg-type]
    stopped = service.stopService()
    assert world.control_port.stopped and service.ports == []  # no new connections from here on
    world.reactor.advance(4.9)
    assert not stopped.called and not busy.transport.aborted and "restore hosts" not in world.events
    world.reactor.advance(0.1)
    assert stopped.called and busy.transport.aborted
    assert world.events[-1] == "restore hosts" and world.flushes == 2 and not service.hosts_edited
    assert all(sock.closed for sock in world.sockets)
    directory = world.tmp / "cfg"
    assert not (directory / paths.PID_FILE_NAME).exists() and not (directory / paths.STATE_FILE_NAME).exists()
    assert world.logs[0].closed


def test_stop_ends_as_soon_as_the_last_request_finishes(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0, grace="5", **{"anthropic-ip": "192.0.2.7"})
    start(service)
    assert service.context is not None
    busy = BusyConnection()
    service.context.connections.add(busy)  # type: ignore[arg-type]
    stopped = service.stopService()
    world.reactor.advance(1)
    service.context.connections.discard(busy)  # type: ignore[arg-type]
    service.context.check_drained()
    assert stopped.called and not busy.transport.aborted and world.events[-1] == "restore hosts"
    assert world.reactor.getDelayedCalls() == []  # the grace timer is gone with it


def test_stop_stops_the_workers_and_leaves_a_pid_file_not_its_own(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    (world.tmp / "cfg" / paths.PID_FILE_NAME).write_text("777\n")  # a newer cmm's
    stopped = service.stopService()
    assert stopped.called and world.supervisors[0].stopped
    assert (world.tmp / "cfg" / paths.PID_FILE_NAME).read_text() == "777\n"
    assert not (world.tmp / "cfg" / paths.STATE_FILE_NAME).exists()


def test_stop_before_dns_answered_serves_nothing_and_leaves_hosts_alone(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2)
    start(service)
    service.stopService()
    world.answer("192.0.2.1")
    assert world.supervisors == [] and "install hosts" not in world.events and "restore hosts" not in world.events


def test_sigusr1_rotates_the_request_log(world: World, key_pair: certs.EnsureResult) -> None:
    rotated: list[bool] = []
    service = master(world, key_pair, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    world.logs[0].file = types.SimpleNamespace(rotate=lambda: rotated.append(True))
    world.signals[signal.SIGUSR1](signal.SIGUSR1, None)
    assert rotated == []  # not inside the signal handler
    world.reactor.advance(0)
    assert rotated == [True]


# --- usage -----------------------------------------------------------------------------------------


def test_the_usage_recorder_gets_every_record_runs_as_the_dir_owner_and_stops_after_serving(
        world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=2, **{"anthropic-ip": "192.0.2.7", "usage-retention": "30"})
    start(service)
    [recorder] = world.recorders
    assert recorder.started and recorder.kwargs["database"] == world.tmp / "cfg" / paths.USAGE_FILE_NAME
    assert recorder.kwargs["retention_days"] == 30.0
    assert recorder.kwargs["uid"] is None  # not root: it runs as the master does
    record = RequestRecord(1.0, "POST", "/v1/messages", "claude-haiku-4-5", False, None, 200, 0.1, 10, 20)
    world.supervisors[0].kwargs["record"](record, "worker-1")
    assert recorder.records == [record]
    assert service.status()["usage"] == {"pid": 5151}
    service.stopService()
    assert world.supervisors[0].stopped
    assert recorder.stopped_after == world.events and world.events[-1] == "restore hosts"  # last of all


def test_a_root_master_runs_the_recorder_as_the_config_dirs_owner(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0, **{"anthropic-ip": "192.0.2.7"})
    service.euid = 0
    start(service)
    [recorder] = world.recorders
    owner = UserDir.open(world.tmp / "cfg").owner
    assert (recorder.kwargs["uid"], recorder.kwargs["gid"]) == (owner.uid, owner.gid)


def test_sighup_hands_the_new_retention_to_the_recorder(world: World, key_pair: certs.EnsureResult) -> None:
    service = master(world, key_pair, workers=0, **{"anthropic-ip": "192.0.2.7"})
    start(service)
    service.load_config = lambda directory: build_config(
        options(world, workers="0", **{"anthropic-ip": "192.0.2.7", "usage-retention": "7"}), {}, directory.path)
    service.reload()
    assert world.recorders[0].retention == [7.0]
