"""Request log format, DNS answer filtering and the shared lookup, deadlines and valves."""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error as dns_error
from twisted.python.failure import Failure

from cmm.errors import error_body, error_response
from cmm.flow import Deadline, Valve
from cmm.request_log import RequestLog, RequestRecord, format_line
from cmm.resolve import AddressBook, Answer, format_cache, lookup, parse_cache, usable_addresses


def record(**changes: object) -> RequestRecord:
    base = dict(started=0.0, method="POST", path="/v1/messages", model="claude-haiku-4-5-20251001", intercepted=True,
                target="gemini-2.5-flash", status=200, duration=0.0123, bytes_in=300, bytes_out=500)
    base.update(changes)
    return RequestRecord(**base)


def test_seed_line_format() -> None:
    line = format_line(record(), localtime=time.gmtime)
    assert line == ("[1970-01-01 00:00:00] claude-haiku-4-5-20251001           → INTERCEPTED → gemini-2.5-flash ✓ "
                    "200 12ms ↑300 ↓500")
    passthrough = format_line(record(model=None, method="GET", path="/v1/models", intercepted=False, target=None),
                              localtime=time.gmtime)
    assert passthrough.startswith("[1970-01-01 00:00:00] GET /v1/models                      → PASSTHROUGH ✓")
    failed = format_line(record(status=502, error="Cannot reach x"), localtime=time.gmtime)
    assert "✗ 502" in failed and failed.endswith("(Cannot reach x)")


def test_request_log_writes_console_and_rotating_file(tmp_path) -> None:
    import io

    console = io.StringIO()
    log = RequestLog.to_file(tmp_path / "logs" / "cmm.log", max_bytes=300, backups=2, console=console)
    for _ in range(10):
        log(record())
    log.close()
    assert console.getvalue().count("INTERCEPTED") == 10
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["cmm.log", "cmm.log.1", "cmm.log.2"]  # rotated, only two backups kept


def test_error_body_is_anthropic_format() -> None:
    assert error_body(529, "busy") == b'{"type": "error", "error": {"type": "api_error", "message": "busy"}}'
    response = error_response(413, "too big")
    assert response.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b'"request_too_large"' in response and b"connection: close\r\n" in response


def test_usable_addresses_drop_loopback_and_duplicates() -> None:
    assert usable_addresses(["127.0.0.1", "192.0.2.1", "::1", "0.0.0.0", "2001:db8::1", "192.0.2.1", "junk"]) == [
        "192.0.2.1", "2001:db8::1"]


def _book(tmp_path=None, **kwargs):
    lookups: list[defer.Deferred] = []

    def resolve() -> defer.Deferred:
        lookups.append(defer.Deferred())
        return lookups[-1]

    clock = Clock()
    cache = tmp_path / "anthropic-ip.cache" if tmp_path is not None else None
    return AddressBook(resolve=resolve, clock=clock, cache=cache, **kwargs), lookups, clock


def test_address_book_shares_one_lookup_and_retries_after_failure() -> None:
    book, lookups, _ = _book()
    first, second = book.current(), book.current()
    assert len(lookups) == 1
    lookups[0].errback(Failure(LookupError("DNS down")))
    assert first.called and second.called
    first.addErrback(lambda f: f.trap(LookupError))
    second.addErrback(lambda f: f.trap(LookupError))
    third = book.current()
    assert len(lookups) == 2  # asked again
    lookups[1].callback(Answer(("192.0.2.1",), 300))
    assert third.result == ["192.0.2.1"]
    assert book.current().result == ["192.0.2.1"] and len(lookups) == 2


def test_address_book_refreshes_after_the_ttl_without_waiting(tmp_path) -> None:
    book, lookups, clock = _book(tmp_path)
    book.current()
    lookups[0].callback(Answer(("192.0.2.1", "2001:db8::1"), 60))
    assert "192.0.2.1\n2001:db8::1\n" in (tmp_path / "anthropic-ip.cache").read_text()
    clock.advance(59)
    assert book.current().result == ["192.0.2.1", "2001:db8::1"] and len(lookups) == 1
    clock.advance(1)
    assert book.current().result == ["192.0.2.1", "2001:db8::1"]  # the old answer serves meanwhile
    assert len(lookups) == 2
    lookups[1].callback(Answer(("192.0.2.7",), 60))
    assert book.current().result == ["192.0.2.7"]
    clock.advance(60)
    book.current()
    lookups[2].errback(Failure(LookupError("DNS down")))  # a failed refresh keeps the last answer
    assert book.current().result == ["192.0.2.7"]


def test_address_book_falls_back_to_the_cache_file_when_dns_is_down(tmp_path) -> None:
    (tmp_path / "anthropic-ip.cache").write_text(format_cache(["192.0.2.9", "127.0.0.1"], 0))
    book, lookups, _ = _book(tmp_path)
    waiting = book.current()
    lookups[0].errback(Failure(LookupError("DNS down")))
    assert waiting.result == ["192.0.2.9"]  # a loopback entry in the cache is never used


def test_cache_format_round_trips() -> None:
    assert parse_cache(format_cache(["192.0.2.1", "2001:db8::1"], 0)) == ["192.0.2.1", "2001:db8::1"]


def test_deadline_extends_on_touch_without_new_timers() -> None:
    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(clock, lambda: fired.append(clock.seconds()))
    deadline.start(10)
    clock.advance(6)
    deadline.touch()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6)
    assert fired == []
    clock.advance(4)
    assert fired == [16]
    deadline.start(5)
    deadline.cancel()
    clock.advance(10)
    assert fired == [16]


def test_deadline_restart_with_a_shorter_interval() -> None:
    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(clock, lambda: fired.append(clock.seconds()))
    deadline.start(120)
    deadline.start(30)
    clock.advance(29)
    assert fired == []
    clock.advance(1)
    assert fired == [30]


class Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


def test_valve_resumes_only_when_every_reason_is_gone() -> None:
    transport = Transport()
    valve = Valve(transport)
    valve.pause("connecting")
    valve.pauseProducing()  # backpressure from the other side
    valve.resume("connecting")
    assert transport.calls == ["pause"] and valve.paused
    valve.resumeProducing()
    assert transport.calls == ["pause", "resume"] and not valve.paused
    valve.resume("never-paused")
    assert transport.calls == ["pause", "resume"]


class FakeResolver:
    """Answers like twisted.names: (answers, authority, additional) of RRHeaders."""

    def __init__(self, a: list[tuple[str, int]], aaaa: list[tuple[str, int]], fail_aaaa: bool = False) -> None:
        self.a, self.aaaa, self.fail_aaaa = a, aaaa, fail_aaaa

    def lookupAddress(self, name: str) -> defer.Deferred:
        records = [dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(address, ttl)) for address, ttl in self.a]
        return defer.succeed((records, [], []))

    def lookupIPV6Address(self, name: str) -> defer.Deferred:
        if self.fail_aaaa:
            return defer.fail(dns_error.DNSNameError(name))
        records = [dns.RRHeader(name, dns.AAAA, ttl=ttl, payload=dns.Record_AAAA(address, ttl))
                   for address, ttl in self.aaaa]
        return defer.succeed((records, [], []))


def test_lookup_keeps_all_usable_answers_with_the_smallest_ttl() -> None:
    resolver = FakeResolver([("192.0.2.1", 300), ("127.0.0.1", 5)], [("2001:db8::1", 120)])
    answer = defer.ensureDeferred(lookup(resolver)).result
    assert answer == Answer(("192.0.2.1", "2001:db8::1"), 30)  # 5 s is raised to the 30 s floor
    answer = defer.ensureDeferred(lookup(FakeResolver([("192.0.2.1", 300)], [], fail_aaaa=True))).result
    assert answer == Answer(("192.0.2.1",), 300)


def test_lookup_refuses_loopback_only_answers() -> None:
    failed = defer.ensureDeferred(lookup(FakeResolver([("127.0.0.1", 60)], [("::1", 60)])))
    assert isinstance(failed.result, Failure) and "only loopback" in str(failed.result.value)
    failed.addErrback(lambda f: None)
