"""Resolving api.anthropic.com: against a real twisted.names server on loopback (answering, and
silent as when DNS is down), the address book's refresh, back-off and cache, and the quiet log."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.python.failure import Failure

from cmm.core import values
from cmm.serve import resolve
from support import Lookups

from cmm.serve.resolve import AddressBook, Answer, QuietResolver, Unresolved, format_cache, lookup, parse_cache
from support import HOST, dns_server, queries_received, spin

TWISTED_NOISE = re.compile(r"Starting protocol|Stopping protocol|Port \d+ Closed|starting on \d+|Resolver added")
DNS_NOISE = re.compile(r"DNSDatagramProtocol|UDP Port|Resolver added")  # in twistd's log, beside other ports


@pytest.fixture(scope="module")
def reactor() -> SelectReactor:
    """The client side's reactor, turned by hand (the global one cannot run twice in a process)."""
    return SelectReactor()


def turn(reactor: SelectReactor, seconds: float = 0.05) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reactor.iterate(0.005)


def time_out(reactor: SelectReactor, clock: Clock) -> None:
    """Let every try of a lookup to a silent server send, then time out."""
    for seconds in resolve.LOOKUP_TIMEOUTS:
        turn(reactor)
        clock.advance(seconds)
    turn(reactor)


@pytest.fixture
def events() -> Iterator[list[str]]:
    seen: list[str] = []

    def observe(event: dict) -> None:
        seen.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# --- lookups against a real name server -----------------------------------------------------------


def test_lookup_asks_a_real_server_and_keeps_usable_answers(reactor: SelectReactor, answering: int) -> None:
    resolver = QuietResolver(reactor=reactor, servers=(("127.0.0.1", answering),))
    answer = spin(reactor, defer.ensureDeferred(lookup(resolver)))
    assert answer == Answer(("160.79.104.10", "2607:6bc0::10"), 30)  # loopback dropped; 5 s raised to 30


def test_lookup_of_a_name_the_server_does_not_know(reactor: SelectReactor, answering: int) -> None:
    resolver = QuietResolver(reactor=reactor, servers=(("127.0.0.1", answering),))
    with pytest.raises(LookupError, match=r"^DNS gave no usable address for claude.invalid \(no such name\)$"):
        spin(reactor, defer.ensureDeferred(lookup(resolver, "claude.invalid")))


def test_lookup_refuses_loopback_only_answers(reactor: SelectReactor) -> None:
    with dns_server({HOST: [dns.Record_A("127.0.0.1"), dns.Record_AAAA("::1")]}) as port:
        resolver = QuietResolver(reactor=reactor, servers=(("127.0.0.1", port),))
        with pytest.raises(LookupError, match="only loopback answers"):
            spin(reactor, defer.ensureDeferred(lookup(resolver)))


def test_lookup_with_dns_down_fails_after_the_short_timeouts(reactor: SelectReactor, silent: socket.socket) -> None:
    clock = Clock()
    resolver = QuietResolver(reactor=reactor, servers=(silent.getsockname(),), clock=clock)
    result = defer.ensureDeferred(lookup(resolver))
    turn(reactor)
    first = queries_received(silent)
    assert sorted(m.queries[0].type for m in first) == [dns.A, dns.AAAA]  # both asked at once
    assert {m.queries[0].name.name for m in first} == {HOST}
    clock.advance(resolve.LOOKUP_TIMEOUTS[0])
    turn(reactor)
    assert len(queries_received(silent)) == 2  # asked again, the same server
    assert not result.called
    clock.advance(resolve.LOOKUP_TIMEOUTS[1])
    with pytest.raises(LookupError, match=r"api.anthropic.com \(no answer from the name servers\)"):
        spin(reactor, result, timeout=0.5)


def test_resolv_conf_name_servers_are_read_quietly(tmp_path: Path, reactor: SelectReactor, events: list[str]) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 192.0.2.53\nnameserver\nsearch example\nnameserver 2001:db8::53\n")
    resolver = QuietResolver(reactor=reactor, resolv=conf, clock=Clock())
    assert resolver.dynServers == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert not [line for line in events if TWISTED_NOISE.search(line)]


def test_no_twisted_noise_in_the_log_during_lookups(reactor: SelectReactor, answering: int, silent: socket.socket,
                                                    events: list[str]) -> None:
    resolver = QuietResolver(reactor=reactor, servers=(("127.0.0.1", answering),))
    spin(reactor, defer.ensureDeferred(lookup(resolver)))
    clock = Clock()
    down = QuietResolver(reactor=reactor, servers=(silent.getsockname(),), clock=clock)
    failed = defer.ensureDeferred(lookup(down))
    time_out(reactor, clock)
    with pytest.raises(LookupError):
        spin(reactor, failed, timeout=0.5)
    turn(reactor)
    assert not [line for line in events if TWISTED_NOISE.search(line)], events
    # the same lookups with twisted.names' own resolver do log those lines: the check can fail
    from twisted.names import client

    spin(reactor, defer.ensureDeferred(lookup(client.Resolver(servers=[("127.0.0.1", answering)], reactor=reactor))))
    turn(reactor)
    assert [line for line in events if TWISTED_NOISE.search(line)]


def test_every_query_socket_is_closed(reactor: SelectReactor, answering: int) -> None:
    before = len(reactor.getReaders())
    resolver = QuietResolver(reactor=reactor, servers=(("127.0.0.1", answering),))
    for _ in range(3):
        spin(reactor, defer.ensureDeferred(lookup(resolver)))
    turn(reactor)
    assert len(reactor.getReaders()) == before


def test_address_book_from_a_real_server(reactor: SelectReactor, answering: int, tmp_path: Path) -> None:
    cache = tmp_path / resolve.CACHE_FILE
    changes: list[list[str]] = []
    book = AddressBook.from_dns(reactor, servers=(("127.0.0.1", answering),), cache=cache, on_change=changes.append)
    book.start()
    spin(reactor, book.ready(5))
    assert book.current().result == ["160.79.104.10", "2607:6bc0::10"]
    assert changes == [["160.79.104.10", "2607:6bc0::10"]]
    assert parse_cache(cache.read_text()) == ["160.79.104.10", "2607:6bc0::10"]
    book.stop()


def test_address_book_with_dns_down_serves_the_cache_and_keeps_asking(reactor: SelectReactor, silent: socket.socket,
                                                                      tmp_path: Path) -> None:
    cache = tmp_path / resolve.CACHE_FILE
    cache.write_text(format_cache(["160.79.104.10"], 0))
    clock = Clock()
    book = AddressBook.from_dns(reactor, servers=(silent.getsockname(),), cache=cache, clock=clock)
    book.start()
    assert book.ready().called  # serve at once
    assert spin(reactor, book.current()) == ["160.79.104.10"]
    time_out(reactor, clock)
    assert book.failures == 1 and book.addresses == ["160.79.104.10"]
    queries_received(silent)
    clock.advance(resolve.RETRY_FIRST)  # the retry in the background
    turn(reactor)
    assert len(queries_received(silent)) == 2
    book.stop()


# --- the address book's schedule, on a Clock ------------------------------------------------------


class MemoryCache:
    def __init__(self, text: str | None = None, fail: bool = False) -> None:
        self.text, self.fail, self.saved = text, fail, []

    def load(self) -> str | None:
        if self.fail:
            raise PermissionError(13, "Permission denied")
        return self.text

    def save(self, text: str) -> None:
        if self.fail:
            raise PermissionError(13, "Permission denied")
        self.saved.append(text)


def book_for(cache: MemoryCache | None = None, **kwargs: Any) -> tuple[AddressBook, Lookups, Clock]:
    lookups, clock = Lookups(), Clock()
    book = AddressBook(resolve=lookups, clock=clock, load_cache=cache.load if cache else None,
                       save_cache=cache.save if cache else None, **kwargs)
    return book, lookups, clock


def test_start_serves_from_the_cache_at_once_and_tells_of_the_dns_answer() -> None:
    cache = MemoryCache(format_cache(["192.0.2.9", "127.0.0.1"], 0))
    changes: list[list[str]] = []
    book, lookups, clock = book_for(cache, on_change=changes.append)
    book.start()
    assert book.ready().called and book.addresses == ["192.0.2.9"]  # a loopback entry is never used
    assert len(lookups.pending) == 1
    lookups.answer("192.0.2.1", "2001:db8::1", ttl=60)
    assert changes == [["192.0.2.1", "2001:db8::1"]]
    assert parse_cache(cache.saved[-1]) == ["192.0.2.1", "2001:db8::1"]
    clock.advance(59)
    assert len(lookups.pending) == 1
    clock.advance(1)  # the TTL is over: asked again without any request
    assert len(lookups.pending) == 2
    lookups.answer("192.0.2.1", "2001:db8::1", ttl=60)
    assert len(changes) == 1 and len(cache.saved) == 1  # the same answer: nobody told, nothing written


def test_dns_down_retries_with_back_off_and_keeps_the_old_addresses() -> None:
    book, lookups, clock = book_for(MemoryCache(format_cache(["192.0.2.9"], 0)))
    book.start()
    asked_at = []
    for _ in range(8):
        asked_at.append(clock.seconds())
        lookups.fail()
        assert book.current().result == ["192.0.2.9"]
        before = len(lookups.pending)
        while len(lookups.pending) == before:
            clock.advance(1)
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:])]
    assert gaps == [2, 4, 8, 16, 32, 60, 60]
    lookups.answer("192.0.2.1")
    assert book.failures == 0 and book.addresses == ["192.0.2.1"]


def test_no_cache_and_no_dns_is_a_clear_error_at_once() -> None:
    book, lookups, clock = book_for(MemoryCache(None))
    book.start()
    ready = book.ready(resolve.START_WAIT)
    clock.advance(resolve.START_WAIT)
    assert ready.called  # the master serves anyway after 1.5 s
    early = book.current()  # and a request gets its answer at once, while the first lookup goes on
    assert early.result.check(Unresolved) and "DNS has not answered for api.anthropic.com yet" in str(early.result.value)
    early.addErrback(lambda f: None)
    lookups.fail()
    after = book.current()
    failure = after.result
    after.addErrback(lambda f: None)
    assert failure.check(Unresolved)
    message = failure.getErrorMessage()
    assert message.startswith("DNS gave no usable address for api.anthropic.com (no answer from the name servers)")
    assert "--anthropic-ip" in message and len(message) < 200  # the 502 shows up to 200 characters
    again = book.current()  # between retries: no waiting
    assert isinstance(again.result, Failure) and again.result.check(Unresolved)
    again.addErrback(lambda f: None)
    clock.advance(resolve.RETRY_FIRST)
    lookups.answer("192.0.2.1")
    assert book.current().result == ["192.0.2.1"]


def test_ready_fires_with_the_first_answer_before_the_wait_is_over() -> None:
    book, lookups, clock = book_for()
    book.start()
    ready = book.ready(resolve.START_WAIT)
    clock.advance(0.2)
    assert not ready.called
    lookups.answer("192.0.2.1")
    assert ready.called and not clock.getDelayedCalls()[1:]  # the wait's timer is gone


def test_lazy_use_shares_one_lookup_and_falls_back_to_the_cache() -> None:
    book, lookups, _ = book_for(MemoryCache(format_cache(["192.0.2.9"], 0)))
    first, second = book.current(), book.current()
    assert len(lookups.pending) == 1
    lookups.fail()
    assert first.result == second.result == ["192.0.2.9"]


def test_cache_that_cannot_be_read_or_written_is_logged_not_raised(events: list[str]) -> None:
    book, lookups, _ = book_for(MemoryCache(fail=True))
    book.start()
    lookups.answer("192.0.2.1")
    assert book.addresses == ["192.0.2.1"]
    assert any("Cannot read anthropic-ip.cache: Permission denied" in line for line in events)
    assert any("Cannot save anthropic-ip.cache: Permission denied" in line for line in events)


def test_file_cache_default(tmp_path: Path) -> None:
    load, save = resolve.file_cache(tmp_path / "c")
    assert load() is None
    save("192.0.2.1\n")
    assert load() == "192.0.2.1\n"


def test_stop_cancels_the_refresh() -> None:
    book, lookups, clock = book_for()
    book.start()
    lookups.answer("192.0.2.1", ttl=60)
    book.stop()
    assert not clock.getDelayedCalls()
    clock.advance(600)
    assert len(lookups.pending) == 1


def test_fixed_and_updated_books() -> None:
    book = AddressBook.fixed([])
    failed = book.current()
    assert failed.result.check(Unresolved) and "--anthropic-ip" in str(failed.result.value)
    failed.addErrback(lambda f: None)
    book.update(["127.0.0.1", "192.0.2.1"])
    assert book.current().result == ["192.0.2.1"]
    book.update([])  # nothing new keeps what is known
    assert book.current().result == ["192.0.2.1"]


def test_cache_format_round_trips() -> None:
    assert parse_cache(format_cache(["192.0.2.1", "2001:db8::1"], 0)) == ["192.0.2.1", "2001:db8::1"]


# --- --dns-server -------------------------------------------------------------------------------------


def test_parse_servers() -> None:
    assert values.parse_servers("192.0.2.53, 127.0.0.1:5353,[::1]:53000,2001:db8::1") == (
        ("192.0.2.53", 53), ("127.0.0.1", 5353), ("::1", 53000), ("2001:db8::1", 53))


@pytest.mark.parametrize("text", ["dns.example", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:x", "[::1", "[::1]x",
                                  "", "1.2.3.4,"])
def test_parse_servers_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        values.parse_servers(text)


# --- twistd cmm with DNS down ----------------------------------------------------------------------


def start_cmm(tmp_path: Path, dns_server: tuple[str, int], cache: list[str] | None, workers: int) -> tuple[Any, int]:
    """``twistd -n cmm`` asking only ``dns_server``; returns the process and its port."""
    from cmm.machine import certs
    from cmm.testing.checkout import twistd_command
    from support import process_env
    from cmm.testing.processes import Process, free_port

    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    certs.ensure_certificates(config_dir)  # made beforehand: what is timed is the wait for DNS alone
    if cache is not None:
        (config_dir / resolve.CACHE_FILE).write_text(format_cache(cache, 0))
    port = free_port()
    argv = twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--config-dir", str(config_dir), "--no-hosts",
                           "--workers", str(workers), "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                           "--dns-server", "{}:{}".format(*dns_server)])
    return Process("cmm", argv, process_env(HOME=str(tmp_path)), tmp_path / "cmm.out"), port


def time_to_serve(process: Any, port: int) -> float:
    """Seconds from the start of the service (its first log line of its own) to serving."""
    process.wait_for(r"cmm: claude-haiku-4-5\* → gemini-2.5-flash")
    started = time.monotonic()
    process.wait_for(rf"cmm serving on port {port}\b")
    return time.monotonic() - started


def test_dns_down_with_a_cache_serves_at_once(tmp_path: Path, silent: socket.socket) -> None:
    process, port = start_cmm(tmp_path, silent.getsockname(), ["192.0.2.1"], workers=0)
    try:
        assert time_to_serve(process, port) < 0.5
        assert "using 192.0.2.1 from anthropic-ip.cache until DNS answers" in process.output()
        deadline = time.monotonic() + 10
        while len(queries_received(silent)) < 2 and time.monotonic() < deadline:  # still asking in the background
            time.sleep(0.05)
        assert time.monotonic() < deadline
    finally:
        process.stop()
    assert not DNS_NOISE.search(process.output()), process.output()


@pytest.mark.parametrize("workers", [0, 1])
def test_no_cache_and_no_dns_serves_after_the_short_wait_with_a_clear_502(tmp_path: Path, silent: socket.socket,
                                                                         workers: int) -> None:
    from test_integration import Conn, assert_anthropic_error, new_tag, simple_post

    process, port = start_cmm(tmp_path, silent.getsockname(), None, workers=workers)
    try:
        waited = time_to_serve(process, port)
        assert resolve.START_WAIT - 0.2 < waited < resolve.START_WAIT + 1.5
        assert "No address for api.anthropic.com yet: DNS has not answered within 1.5 s" in process.output()
        with Conn(port, tmp_path / "cfg" / "ca.crt") as conn:
            asked = time.monotonic()
            conn.send(simple_post("claude-opus-4-6", new_tag()))
            response = conn.response("POST")
            assert time.monotonic() - asked < 1.0  # not kept waiting for DNS
        error = assert_anthropic_error(response, 502, "api_error", contains="api.anthropic.com")
        assert "--anthropic-ip" in error["message"]
        process.wait_for(r"no address is cached: requests passed through to Anthropic get a 502", timeout=10)
    finally:
        process.stop()
    assert not DNS_NOISE.search(process.output()), process.output()


def test_new_addresses_reach_the_workers(tmp_path: Path) -> None:
    """The master's book tells the service, which sends the workers a config with the new addresses."""
    from cmm.daemon.service import InterceptorService
    from cmm.core.settings import build_config
    from cmm.daemon.wire import WorkerConfig

    config = build_config({"source": "a", "target": "b"}, {}, tmp_path)
    sent: list[WorkerConfig] = []

    @attrs.define
    class Supervisor:
        def reload(self, worker_config: WorkerConfig) -> None:
            sent.append(worker_config)

    service = InterceptorService(config, reactor=Clock())
    service.worker_config = WorkerConfig(proxy=config.proxy, cert_pem=b"c", key_pem=b"k", anthropic_addresses=(),
                                         connect_timeout=1.0)
    service.supervisor = Supervisor()  # type: ignore[assignment]
    book, lookups, _ = book_for(on_change=service._addresses_changed)
    book.start()
    lookups.answer("192.0.2.1", "2001:db8::1")
    assert [c.anthropic_addresses for c in sent] == [("192.0.2.1", "2001:db8::1")]
    assert service.worker_config.anthropic_addresses == ("192.0.2.1", "2001:db8::1")


def test_dns_server_option() -> None:
    from cmm.core.settings import ConfigError, build_config

    options = {"source": "a", "target": "b"}
    assert build_config(options, {}, Path("/tmp")).dns_servers == ()
    assert build_config({**options, "dns-server": "127.0.0.1:5353"}, {}, Path("/tmp")).dns_servers == (
        ("127.0.0.1", 5353),)
    with pytest.raises(ConfigError, match=r"^--dns-server: 'ns.example' is not an IP address"):
        build_config({**options, "dns-server": "ns.example"}, {}, Path("/tmp"))


def test_a_worker_takes_the_addresses_each_config_brings(tmp_path: Path) -> None:
    from cmm.machine import certs
    from cmm.core.settings import build_config
    from cmm.daemon.wire import WorkerConfig
    from cmm.daemon.worker import WorkerControl

    paths = certs.ensure_certificates(tmp_path).paths
    config = build_config({"source": "a", "target": "b"}, {}, tmp_path)
    worker_config = WorkerConfig(proxy=config.proxy, cert_pem=paths.server_cert.read_bytes(),
                                 key_pem=paths.server_key.read_bytes(), anthropic_addresses=(), connect_timeout=1.0)
    worker = WorkerControl(Clock(), fds=[], grace=1.0)
    worker.configure(worker_config)  # the master had no address yet
    assert worker.addresses is not None
    first = worker.addresses.current()
    assert first.result.check(Unresolved)
    first.addErrback(lambda f: None)
    worker.configure(attrs.evolve(worker_config, anthropic_addresses=("192.0.2.1",)))
    assert worker.addresses.current().result == ["192.0.2.1"]
