"""The master's side of multi-process serving: bind, start workers, restart them, talk to them.

The master binds 127.0.0.1:443 and [::1]:443 once (it alone may, as root) and passes the
listening sockets to every worker at fixed descriptors; the kernel spreads accepted connections
across the workers that wait on the shared socket. A worker that dies is started again with
back-off while the others keep serving: a crash costs only its own connections.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure

from cmm.core.failover import Cooldown, CooldownTable
from cmm.core.records import RequestRecord, escaped
from cmm.daemon import wire

log = Logger()

FIRST_FD = 3
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that ran this long starts its back-off afresh when it dies


def bind(address: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket; OSError says why not (in use, no permission, no IPv6)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@attrs.define(eq=False, slots=False)
class Worker(ProcessProtocol):
    """One worker process as the master sees it."""

    supervisor: Supervisor
    name: str
    started: float = 0.0
    buffer: bytes = b""
    errors: bytes = b""
    ended: defer.Deferred[None] = attrs.field(factory=defer.Deferred)

    def connectionMade(self) -> None:
        config = self.supervisor.config
        if config is not None:
            self.send(wire.config_message(config))
        for cooldown in self.supervisor.cooldowns.current():  # a restarted worker skips Anthropic as the others do
            self.send(wire.cooldown_message(cooldown))

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.writeToChild(0, wire.encode(message))

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line:
                self.supervisor.message(self, line)

    def errReceived(self, data: bytes) -> None:
        """A worker's stderr: only a crash or an unexpected print writes there."""
        self.errors += data
        *lines, self.errors = self.errors.split(b"\n")
        for line in lines:
            log.error("{worker}: {line}", worker=self.name, line=escaped(line.decode("utf-8", "replace")))

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.ended(self, reason)
        self.ended.callback(None)

    def close_stdin(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()


@attrs.define(eq=False, slots=False)
class Supervisor:
    """Starts ``count`` workers on ``sockets``, keeps them running, fans out configuration."""

    reactor: Any
    sockets: list[list[socket.socket]]  # per worker slot: the same shared list, or its own SO_REUSEPORT set
    count: int
    record: Callable[[RequestRecord, str], None]
    # A worker's batch of records at once (the log written once for all of them); None: one by one.
    record_batch: Callable[[list[RequestRecord], str], None] | None = None
    gauges: Callable[[str, dict[str, Any]], None] = lambda worker, values: None
    config: wire.WorkerConfig | None = None
    uid: int | None = None
    gid: int | None = None
    grace: float = 30.0
    environ: dict[str, str] = attrs.field(factory=lambda: dict(os.environ))
    python: str = sys.executable
    workers: dict[str, Worker] = attrs.field(factory=dict)
    backoff: dict[str, float] = attrs.field(factory=dict)
    stopping: bool = False
    # The fallback rules' cool-downs: known here alone, and told to every worker.
    cooldowns: CooldownTable = attrs.field(factory=lambda: CooldownTable(time.time))
    on_cooldown: Callable[[Cooldown], None] = lambda cooldown: None

    def start(self, config: wire.WorkerConfig) -> None:
        self.config = config
        for index in range(self.count):
            self.spawn(f"worker-{index + 1}")

    def command(self, slot: int) -> list[str]:
        argv = [self.python, "-m", "cmm.daemon.worker", "--grace", str(self.grace)]
        if self.uid is not None:
            argv += ["--user", f"{self.uid}:{self.gid if self.gid is not None else self.uid}"]
        for offset, sock in enumerate(self.sockets[slot]):
            argv += ["--fd", f"{FIRST_FD + offset}:{'inet6' if sock.family == socket.AF_INET6 else 'inet'}"]
        return argv

    def spawn(self, name: str) -> Worker:
        """Start the worker for slot ``worker-N``; a restarted worker gets the same sockets."""
        slot = int(name.rsplit("-", 1)[1]) - 1
        worker = Worker(self, name, started=self.reactor.seconds())
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for offset, sock in enumerate(self.sockets[slot]):
            child_fds[FIRST_FD + offset] = sock.fileno()
        # The worker starts as root and drops to uid/gid itself once it has adopted the sockets and
        # loaded the keys (so the interpreter may live where only root can read, e.g. /root/.pyenv).
        # cwd "/": the worker must not import modules from wherever the master was started.
        self.reactor.spawnProcess(worker, self.python, self.command(slot), env=self.environ, path="/",
                                  childFDs=child_fds)
        self.workers[name] = worker
        return worker

    def message(self, worker: Worker, line: bytes) -> None:
        try:
            message = wire.decode(line)
            kind = message["type"]
            if kind == "records":
                records = wire.records_from_message(message)
                if self.record_batch is not None:
                    self.record_batch(records, worker.name)
                else:
                    for record in records:
                        self.record(record, worker.name)
            elif kind == "request":
                self.record(wire.record_from_message(message), worker.name)
            elif kind == "gauges":
                self.gauges(worker.name, wire.gauges_from_message(message))
            elif kind == "cooldown":
                self.cooldown(wire.cooldown_from_message(message))
            elif kind == "log":
                # One escaped line: a traceback's line breaks become "\n", and nothing a client or
                # upstream slipped into a worker's message can forge a line or steer a terminal.
                log.emit(LogLevel.levelWithName(message.get("level", "error")), "{worker}: {text}",
                         worker=worker.name, text=escaped(str(message.get("text", ""))))
        except Exception as error:
            log.error("{worker} sent something unreadable ({error}): {line!r}", worker=worker.name,
                      error=escaped(repr(error)), line=line[:200])

    def cooldown(self, cooldown: Cooldown) -> None:
        """A worker met a cool-down: every worker (the reporter too) skips Anthropic for that rule."""
        if self.cooldowns.extend(cooldown):
            self.on_cooldown(cooldown)
            message = wire.cooldown_message(cooldown)
            for worker in self.workers.values():
                worker.send(message)

    def ended(self, worker: Worker, reason: Failure) -> None:
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
        if self.stopping:
            return
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        ran = self.reactor.seconds() - worker.started
        delay = BACKOFF_START if ran >= STABLE_AFTER else min(self.backoff.get(worker.name, 0) * 2 or BACKOFF_START,
                                                               BACKOFF_MAX)
        self.backoff[worker.name] = delay
        log.warn("{worker} {how} after {ran:.1f}s; starting it again in {delay:g}s", worker=worker.name, how=how,
                 ran=ran, delay=delay)
        self.reactor.callLater(delay, self._respawn, worker.name)

    def _respawn(self, name: str) -> None:
        if not self.stopping and name not in self.workers:
            self.spawn(name)

    def reload(self, config: wire.WorkerConfig) -> None:
        self.config = config
        message = wire.config_message(config)
        for worker in self.workers.values():
            worker.send(message)

    def stop(self) -> defer.Deferred[Any]:
        """Ask every worker to drain (close its stdin); kill those still there after the grace."""
        self.stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            worker.close_stdin()
        waiting = defer.DeferredList([worker.ended for worker in workers])
        killer = self.reactor.callLater(self.grace + 5, self._kill, workers)
        return waiting.addBoth(lambda result: (killer.cancel() if killer.active() else None, result)[1])

    def _kill(self, workers: list[Worker]) -> None:
        for worker in workers:
            if worker.transport is not None and worker.transport.pid is not None:
                log.warn("{worker} did not stop within the grace period; killing it", worker=worker.name)
                worker.transport.signalProcess("KILL")
