"""Small helpers shared by several test modules."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor
from twisted.names import common, dns, error as dns_error, server
from twisted.python.failure import Failure

from cmm.core.records import RequestRecord
from cmm.serve.resolve import Answer
from cmm.testing.checkout import checkout_env


def process_env(**changes: str | None) -> dict[str, str]:
    """The environment for a subprocess running this checkout's cmm; None removes a variable."""
    env = {**checkout_env(), "PYTHONUNBUFFERED": "1"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def done(coroutine: Any) -> Any:
    """The result of a coroutine whose awaits are all already fired (no reactor needed)."""
    results: list[Any] = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "the coroutine waited on something"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class HeaderLookup:
    """``header``/``header_all`` over a ``headers`` list of (lower-case name, value) pairs."""

    headers: Any

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


# Pieces that make a text file awkward for the in-place line edits (cmm.textfile): every line
# break str.splitlines knows besides "\n", blanks, a comment sign, non-ASCII and a byte that was
# not UTF-8 (surrogate-escaped, as read from such a file). Mixed with each edit's own lines.
AWKWARD_TEXT_PIECES = [" ", "#", "\n", "\r\n", "\r", "\t", "\x0c", "\u2028", "\x1c", "é", "\udcff"]


# -- a name server on loopback, for resolving api.anthropic.com -----------------------------------

HOST = b"api.anthropic.com"


class Records(common.ResolverBase):
    """An authority answering from a dict, as a name server would: NXDOMAIN for other names."""

    def __init__(self, records: dict[bytes, list[Any]]) -> None:
        super().__init__()
        self.records = records

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        name = name.lower()
        if name not in self.records:
            return defer.fail(dns_error.DomainError(name))
        return defer.succeed(([dns.RRHeader(name, r.TYPE, dns.IN, r.ttl or 60, r, auth=True)
                               for r in self.records[name] if r.TYPE == type], [], []))


@contextmanager
def dns_server(records: dict[bytes, list[Any]]) -> Iterator[int]:
    """A twisted.names DNSServerFactory on 127.0.0.1 (its own reactor, in a thread); yields its port."""
    reactor = SelectReactor()
    factory = server.DNSServerFactory(authorities=[Records(records)])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory, reactor=reactor), interface="127.0.0.1")
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    try:
        yield port.getHost().port
    finally:
        reactor.callFromThread(reactor.stop)
        thread.join(5)


ANTHROPIC = {HOST: [dns.Record_A("160.79.104.10", ttl=300), dns.Record_A("127.0.0.1", ttl=5),
                    dns.Record_AAAA("2607:6bc0::10", ttl=120)]}


def spin(reactor: SelectReactor, deferred: defer.Deferred, timeout: float = 5.0) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    deadline = time.monotonic() + timeout
    while not results and time.monotonic() < deadline:
        reactor.iterate(0.005)
    assert results, f"nothing within {timeout} s"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def queries_received(sock: socket.socket) -> list[dns.Message]:
    found = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return found
        message = dns.Message()
        message.fromStr(data)
        found.append(message)


def record(**changes: object) -> RequestRecord:
    """A request record for the log-line tests; ``changes`` override its fields."""
    base: dict[str, Any] = dict(started=0.0, method="POST", path="/v1/messages", model="claude-haiku-4-5-20251001",
                                intercepted=True, target="gemini-2.5-flash", status=200, duration=0.0123, bytes_in=300,
                                bytes_out=500)
    base.update(changes)
    return RequestRecord(**base)


class Lookups:
    """The resolve callable: each call is a Deferred the test settles with a real Answer."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Answer]] = []

    def __call__(self) -> defer.Deferred[Answer]:
        self.pending.append(defer.Deferred())
        return self.pending[-1]

    def answer(self, *addresses: str, ttl: int = 300) -> None:
        self.pending[-1].callback(Answer(addresses, ttl))

    def fail(self) -> None:
        self.pending[-1].errback(LookupError("DNS gave no usable address for api.anthropic.com "
                                             "(no answer from the name servers)"))
