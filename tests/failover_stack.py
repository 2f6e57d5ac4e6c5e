"""cmm's real serving stack and the fakes on loopback, in one reactor in a thread: the test is the client.

Failover rules are built as values (``Mapping`` with ``mode``/``on_target_error``) and served by a
serving unit (``build_context``, TLS, real sockets) or by a master with real worker processes,
against the in-process fake Anthropic (TLS, the test CA) and fake target.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet import ssl
from twisted.internet.selectreactor import SelectReactor
from twisted.protocols import tls

from cmm.core.records import RequestRecord
from cmm.core.router import Mapping, Router, Upstream
from cmm.core.values import ANTHROPIC_HOST, Destination, ProxySettings
from cmm.serve.proxy import ProxyContext, ProxyFactory
from cmm.serve.resolve import AddressBook
from cmm.serve.serving import build_context
from cmm.serve.tls import ReloadableServerTLS, server_factory, server_options
from cmm.testing import fakes
from test_integration import Conn, Response, simple_post

T = TypeVar("T")
SOURCE = "claude-opus-4-6"
TARGET = "gpt-5"
PROXY_KEY = "sk-proxy-key"


class Live:
    """A SelectReactor running in a daemon thread, with both fakes listening."""

    def __init__(self, base: Path) -> None:
        self.reactor = SelectReactor()
        # TLS connections flush small writes on their factory's clock, the global reactor unless
        # told; this reactor is not the global one (Twisted keeps this hook for such tests).
        self._default_clock, tls._get_default_clock = tls._get_default_clock, lambda: self.reactor
        self.pki = base / "pki"
        self.ca = fakes.make_test_pki(self.pki)
        self.anthropic = fakes.start_fake_anthropic(self.reactor, cert_dir=self.pki)
        self.target = fakes.start_fake_target(self.reactor)
        self.closed = socket.socket()  # bound, never listening: connections to it are refused
        self.closed.bind(("127.0.0.1", 0))
        self.records: list[RequestRecord] = []
        self.thread = threading.Thread(target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self.thread.start()

    @property
    def closed_port(self) -> int:
        return int(self.closed.getsockname()[1])

    @property
    def target_url(self) -> str:
        return f"http://127.0.0.1:{self.target.port}/v1/messages"

    def call(self, work: Callable[[], T], timeout: float = 10.0) -> T:
        """``work()`` in the reactor thread; its result here."""
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append((True, work()))
            except BaseException as error:  # raised again in the test thread
                result.append((False, error))
            done.set()

        self.reactor.callFromThread(run)
        assert done.wait(timeout), "the reactor thread did not answer"
        ok, value = result[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def rule(self, **changes: Any) -> Mapping:
        upstream = Upstream.from_url(changes.pop("url", self.target_url), PROXY_KEY)
        return Mapping(SOURCE, TARGET, upstream, **changes)

    def settings(self, *rules: Mapping, anthropic_port: int | None = None, **changes: Any) -> ProxySettings:
        port = self.anthropic.port if anthropic_port is None else anthropic_port
        return ProxySettings(router=Router(rules), anthropic=Destination("https", ANTHROPIC_HOST, port, anthropic=True),
                             **changes)

    def trust(self) -> Any:
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(self.ca.read_bytes())])

    def serve(self, settings: ProxySettings) -> Serving:
        """A serving unit on a port of its own (as one worker is)."""
        def start() -> Serving:
            context = build_context(settings, AddressBook.fixed(["127.0.0.1"]), 2.0, self.reactor,
                                    self.records.append, anthropic_trust=self.trust())
            cert = (self.pki / fakes.TEST_SERVER_CERT_FILE).read_bytes()
            key = (self.pki / fakes.TEST_SERVER_KEY_FILE).read_bytes()
            factory = server_factory(ReloadableServerTLS(server_options(cert, key)), ProxyFactory(context))
            port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
            return Serving(self, context, port.getHost().port)

        return self.call(start)

    def seen(self, fake: fakes.FakeUpstream, tag: str) -> list[fakes.RecordedRequest]:
        return self.call(lambda: [r for r in fake.requests if r.header("x-test-id") == tag])

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(5)
        self.closed.close()
        tls._get_default_clock = self._default_clock


@attrs.define
class Serving:
    live: Live
    context: ProxyContext
    port: int

    def exchange(self, request: bytes) -> Response:
        """One request on a new connection; the records before it are forgotten (see ``record``)."""
        self.live.records.clear()
        with Conn(self.port, self.live.ca) as conn:
            conn.send(request)
            return conn.response()

    def post(self, tag: str, *extra: tuple[str, str], stream: bool = False, body: bytes | None = None,
             model: str = SOURCE) -> Response:
        return self.exchange(simple_post(model, tag, stream=stream, extra=list(extra), body=body))

    def record(self, timeout: float = 5.0) -> RequestRecord:
        """The record of the last request (it is written just after the response's last byte)."""
        deadline = time.monotonic() + timeout
        while not self.live.records and time.monotonic() < deadline:
            time.sleep(0.01)
        [record] = self.live.records
        return record
