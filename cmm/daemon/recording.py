"""The master's side of the usage recorder: start it as the user, feed it request records in
batches over its stdin, start it again when it dies, stop it last.

The master never opens the usage database itself (it is root, the file is the user's). Records
wait in the master while no recorder runs (being started again), up to :data:`MAX_HELD`; a
recorder killed outright loses only the rows it had not committed yet (at most a flush interval's).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure

from cmm.core.records import RequestRecord, escaped
from cmm.daemon import wire

log = Logger()

BATCH_DELAY = 0.2  # seconds records gather in the master before they go down the pipe together
BATCH_RECORDS = 200  # or this many, whichever comes first
MAX_HELD = 20_000  # records kept while no recorder runs; older ones are dropped beyond
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
STOP_TIMEOUT = 15.0  # seconds the recorder gets to write its last batch before it is killed


@attrs.define(eq=False, slots=False)
class RecorderProcess(ProcessProtocol):
    owner: UsageRecorder
    started: float
    out: bytes = b""
    errors: bytes = b""
    ended: defer.Deferred[None] = attrs.field(factory=defer.Deferred)

    def outReceived(self, data: bytes) -> None:
        self.out += data
        *lines, self.out = self.out.split(b"\n")
        for line in lines:
            try:
                message = wire.decode(line)
                text = str(message.get("text", ""))
                level = LogLevel.levelWithName(str(message.get("level", "error")))
            except Exception:
                text, level = line[:300].decode("utf-8", "replace"), LogLevel.error
            log.emit(level, "usage recorder: {text}", text=escaped(text))

    def errReceived(self, data: bytes) -> None:
        self.errors += data
        *lines, self.errors = self.errors.split(b"\n")
        for line in lines:
            log.error("usage recorder: {line}", line=escaped(line.decode("utf-8", "replace")))

    def processEnded(self, reason: Failure) -> None:
        self.owner.ended(self, reason)
        self.ended.callback(None)


@attrs.define(eq=False, slots=False)
class UsageRecorder:
    """The recorder process as the master sees it: :meth:`add` a record, :meth:`stop` at the end."""

    reactor: Any
    database: Path
    retention_days: float
    uid: int | None = None  # None: run as the master runs (not root)
    gid: int | None = None
    environ: dict[str, str] = attrs.field(factory=lambda: dict(os.environ))
    python: str = sys.executable
    spawn: Callable[..., Any] | None = None  # reactor.spawnProcess unless given
    process: RecorderProcess | None = None
    held: list[RequestRecord] = attrs.field(factory=list)  # encoded together, one line a batch
    flush_call: Any = None
    dropped: int = 0
    restarts: int = 0
    backoff: float = 0.0
    stopping: bool = False

    def command(self) -> list[str]:
        argv = [self.python, "-m", "cmm.daemon.recorder", "--database", str(self.database),
                "--retention-days", repr(self.retention_days)]
        if self.uid is not None:
            argv += ["--user", f"{self.uid}:{self.gid if self.gid is not None else self.uid}"]
        return argv

    def start(self) -> None:
        process = RecorderProcess(self, started=self.reactor.seconds())
        spawn = self.spawn or self.reactor.spawnProcess
        try:
            # cwd "/": the recorder must not import modules from wherever the master was started.
            spawn(process, self.python, self.command(), env=self.environ, path="/")
        except Exception as error:
            log.error("Cannot start the usage recorder ({error}); usage is not recorded", error=escaped(str(error)))
            return
        self.process = process
        self._write()

    def add(self, record: RequestRecord) -> None:
        if self.stopping:  # its stdin is closed: a record this late (an aborted request's) is not kept
            return
        self.held.append(record if record.content is None else attrs.evolve(record, content=None))  # not stored
        if len(self.held) > MAX_HELD:
            del self.held[0]
            if not self.dropped:
                log.error("The usage recorder is not running; dropping the oldest usage records")
            self.dropped += 1
        if len(self.held) >= BATCH_RECORDS:
            self._write()
        elif self.flush_call is None:
            self.flush_call = self.reactor.callLater(BATCH_DELAY, self._write)

    def _write(self) -> None:
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        self.flush_call = None
        if self.process is None or self.process.transport is None or not self.held:
            return
        self.process.transport.write(wire.encode(wire.records_message(self.held)))  # field names once a batch
        self.held = []

    def reload(self, retention_days: float) -> None:
        """A new retention takes effect in a recorder started with it; the rows held move over."""
        if retention_days == self.retention_days:
            return
        self.retention_days = retention_days
        if self.process is not None and self.process.transport is not None:
            self._write()
            self.process.transport.closeStdin()  # it writes what it has, exits, and is started again

    def ended(self, process: RecorderProcess, reason: Failure) -> None:
        if self.process is process:
            self.process = None
        if self.stopping:
            return
        ran = self.reactor.seconds() - process.started
        self.backoff = BACKOFF_START if ran >= STABLE_AFTER else min(self.backoff * 2 or BACKOFF_START, BACKOFF_MAX)
        if not reason.check(ProcessDone):  # a clean exit is one asked for (a new retention)
            self.restarts += 1
            log.warn("The usage recorder {how} after {ran:.1f}s; starting it again in {delay:g}s",
                     how=reason.getErrorMessage(), ran=ran, delay=self.backoff)
            self.reactor.callLater(self.backoff, self._restart)
        else:
            self._restart()

    def _restart(self) -> None:
        if not self.stopping and self.process is None:
            self.start()

    def status(self) -> dict[str, Any]:
        pid = self.process.transport.pid if self.process is not None and self.process.transport is not None else None
        return {"pid": pid, "database": str(self.database), "restarts": self.restarts, "dropped": self.dropped}

    def stop(self) -> defer.Deferred[None]:
        """Hand over what is held, close the recorder's stdin (it writes its last batch and exits),
        and kill it if it has not within :data:`STOP_TIMEOUT`."""
        self.stopping = True
        process = self.process
        if process is None or process.transport is None:
            if self.held:
                log.error("The usage recorder is not running; {count} usage records are lost", count=len(self.held))
            return defer.succeed(None)
        self._write()
        process.transport.closeStdin()
        killer = self.reactor.callLater(STOP_TIMEOUT, self._kill, process)
        return process.ended.addBoth(lambda _: killer.cancel() if killer.active() else None)

    def _kill(self, process: RecorderProcess) -> None:
        if process.transport is not None and process.transport.pid is not None:
            log.warn("The usage recorder did not finish within {timeout:g}s; killing it", timeout=STOP_TIMEOUT)
            process.transport.signalProcess("KILL")
