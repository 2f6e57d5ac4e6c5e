"""A worker process: serves on listening sockets the master bound, as an unprivileged user.

Started by the master as ``python -m cmm.daemon.worker --fd 3:inet --fd 4:inet6`` with the sockets at
those descriptors. Its stdin carries the master's messages (configuration, reloads); its stdout
carries request records, log lines and gauges back, one JSON object a line (``cmm.daemon.wire``). When
stdin closes — the master stopped, or was killed — the worker drains and exits, so no worker
outlives its master.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from typing import Any, Callable, Sequence

from twisted.internet import defer, stdio
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import ILogObserver, LogLevel, Logger, formatEvent, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from cmm.daemon import wire
from cmm.daemon.privileges import _can_regain_root, drop_privileges, parse_user  # noqa: F401  (named here too)
from cmm.serve.proxy import ProxyContext, ProxyFactory
from cmm.core.records import RequestRecord
from cmm.serve.record_batch import RecordBatch
from cmm.serve.resolve import AddressBook
from cmm.serve.serving import build_context
from cmm.serve.tls import ReloadableServerTLS, connected, server_factory, server_options

log = Logger()

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
GAUGE_INTERVAL = 1.0
OUTPUT_FLUSH_TIMEOUT = 5.0  # seconds a stopping worker waits for the master to take its last output
MAX_LINE = 64 * 1024 * 1024  # a configuration carries key material and mappings: generous


@implementer(IHalfCloseableProtocol)
class WorkerControl(LineReceiver):
    """The worker's end of the pipe pair to the master."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, reactor: Any, fds: Sequence[tuple[int, int]], grace: float,
                 user: tuple[int, int] | None = None, drop: Callable[[int, int], None] | None = None) -> None:
        self.reactor = reactor
        self.fds = fds
        self.grace = grace
        self.user = user
        self.drop = drop or drop_privileges
        self.context: ProxyContext | None = None
        self.addresses: AddressBook | None = None
        self.tls: ReloadableServerTLS | None = None
        self.ports: list[IListeningPort] = []
        self.stopping = False
        self._last_gauges: dict[str, int] = {}
        self.records = RecordBatch(reactor, lambda records: self.send(wire.records_message(records)))
        self._output_flushed: defer.Deferred[None] | None = None
        self._output_closed = False

    # master → worker

    def lineReceived(self, line: bytes) -> None:
        try:
            message = wire.decode(line)
            if message["type"] == "config":
                self.configure(wire.config_from_message(message))
            elif message["type"] == "cooldown" and self.context is not None:
                self.context.cooldowns.extend(wire.cooldown_from_message(message))
        except Exception as error:  # a bad message must not take the worker down
            log.error("Ignoring a message from the master: {error}", error=repr(error))

    def configure(self, config: wire.WorkerConfig) -> None:
        options = server_options(config.cert_pem, config.key_pem)
        if self.context is None:
            # The master resolves (and keeps resolving) and sends every new answer with the config.
            self.addresses = AddressBook.fixed(config.anthropic_addresses)
            self.context = build_context(config.proxy, self.addresses, config.connect_timeout, self.reactor,
                                         self.send_record)
            self.context.record_later = self.records.add  # built with the batch, on warm code
            self.context.report_cooldown = lambda cooldown: self.send(wire.cooldown_message(cooldown))
            self.tls = ReloadableServerTLS(options)
            factory = server_factory(self.tls, ProxyFactory(self.context))
            for fd, family in self.fds:
                port = self.reactor.adoptStreamPort(fd, family, factory)
                accept_one_at_a_time(port, self.reactor)
                self.ports.append(port)
            if self.user is not None:
                self.drop(*self.user)  # sockets adopted, keys loaded: nothing left that needs root
            LoopingCall(self.send_gauges).start(GAUGE_INTERVAL, now=False)
            return
        assert self.tls is not None and self.addresses is not None
        self.addresses.update(config.anthropic_addresses)
        self.context.settings = config.proxy  # new requests route by it; those in flight finish as they began
        self.tls.options = options

    # worker → master

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(wire.encode(message))

    def send_record(self, record: RequestRecord) -> None:
        self.records.add(record)

    def flush_records(self) -> None:
        self.records.flush()

    def send_gauges(self) -> None:
        if self.context is None:
            return
        gauges = self.context.gauges()
        if gauges != self._last_gauges:
            self._last_gauges = gauges
            self.send(wire.gauges_message(gauges))

    # the end

    def readConnectionLost(self) -> None:
        """stdin closed: the master wants us gone (or is gone). Drain, then exit; stdout stays
        open meanwhile so the last requests' records still reach the master."""
        self.stop()

    def writeConnectionLost(self) -> None:
        """The master stopped reading (or the last output reached it, see :meth:`flush_output`):
        nothing to tell it any more, but requests may finish."""
        self._output_closed = True
        waiting, self._output_flushed = self._output_flushed, None
        if waiting is not None and not waiting.called:
            waiting.callback(None)

    def flush_output(self) -> defer.Deferred[None]:
        """Fires once what is still buffered for the master (the last records, log lines) has
        been written, or after OUTPUT_FLUSH_TIMEOUT: a stopping reactor drops unwritten output."""
        lose = getattr(self.transport, "loseWriteConnection", None)
        if lose is None or self._output_closed:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._output_flushed = waiting

        def give_up() -> None:
            if not waiting.called:
                waiting.callback(None)

        timeout = self.reactor.callLater(OUTPUT_FLUSH_TIMEOUT, give_up)

        def done(result: None) -> None:
            if timeout.active():
                timeout.cancel()
            return result

        waiting.addBoth(done)
        lose()  # writes what is buffered, then closes stdout: writeConnectionLost
        return waiting

    def connectionLost(self, reason: object = None) -> None:
        self.stop()

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.reactor.callLater(0, self.shut_down)

    @defer.inlineCallbacks
    def shut_down(self) -> Any:
        for port in self.ports:
            yield port.stopListening()
        if self.context is not None:
            drained = self.context.drain()
            timeout = self.reactor.callLater(self.grace, drained.cancel)
            try:
                yield drained
            except defer.CancelledError:
                for connection in list(self.context.connections):
                    connected(connection).abortConnection()
                yield deferLater(self.reactor, 0.1, lambda: None)  # their records, written as they go
            else:
                timeout.cancel()
            self.context.pool.close_idle()
        self.flush_records()  # the last requests' records, before the reactor stops
        yield self.flush_output()
        if self.reactor.running:
            self.reactor.stop()


def accept_one_at_a_time(port: Any, reactor: Any) -> None:
    """Accept one connection per turn of the loop from a listening socket the workers share.

    Twisted's port accepts up to a hundred pending connections at once (and learns to take
    more). Every worker wakes for a new connection, so the first one awake took all that a
    client opened together (8 keep-alive connections: all on one worker, the other idle for
    their whole life). Taking one and then leaving the socket to the others until its next
    turn, each worker gets its share, and a busy one, slower back to its loop, takes fewer."""
    read = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        result = read()
        if port.connected:  # still listening: skip this turn, so another worker takes the next
            port.stopReading()
            reactor.callLater(0, _resume, port)
        return result

    port.doRead = doRead


def _resume(port: Any) -> None:
    if port.connected:
        port.startReading()


@implementer(ILogObserver)
class MasterLogObserver:
    """Sends this worker's warnings and errors to the master, which owns the log files."""

    def __init__(self, control: WorkerControl) -> None:
        self.control = control

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < LogLevel.warn or self.control.transport is None:
            return
        text = formatEvent(event)
        if "log_failure" in event:
            text += "\n" + event["log_failure"].getTraceback()
        self.control.transport.write(wire.encode({"type": "log", "level": level.name, "text": text}))


def parse_fd(text: str) -> tuple[int, int]:
    fd, _, family = text.partition(":")
    if family not in FAMILIES:
        raise argparse.ArgumentTypeError(f"expected FD:inet or FD:inet6, not {text!r}")
    return int(fd), FAMILIES[family]


def main(argv: Sequence[str] | None = None, reactor: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmm.daemon.worker", description="A cmm worker; started by the master.")
    parser.add_argument("--fd", type=parse_fd, action="append", required=True, help="listening socket FD:inet|inet6")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to finish requests when told to stop")
    parser.add_argument("--user", type=parse_user, default=None, help="UID:GID to serve as, once set up")
    args = parser.parse_args(argv)
    if reactor is None:
        from twisted.internet import reactor
    control = WorkerControl(reactor, args.fd, args.grace, args.user)
    globalLogBeginner.beginLoggingTo([MasterLogObserver(control)], redirectStandardIO=False)
    stdio.StandardIO(control, reactor=reactor)
    # Ctrl-C reaches the whole foreground process group: the master decides when workers stop
    # (it closes their stdin). A SIGTERM sent to a worker alone drains it the same way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(control.stop))
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
