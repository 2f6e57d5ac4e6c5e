"""The real addresses of api.anthropic.com, asked of DNS directly.

cmm points the name at itself in /etc/hosts, so the system resolver would answer with cmm's own
address; twisted.names queries the name servers without the hosts file. systemd-resolved's stub
(127.0.0.53) answers from /etc/hosts too, so its upstream list is preferred where it exists, and
``--dns-server`` names others (a local dnsmasq also reads /etc/hosts). Loopback or unspecified
answers are refused: they would send passthrough traffic back to cmm.

The master keeps the addresses fresh on its own (:meth:`AddressBook.start`): again when their
TTL ends, and with back-off while DNS fails, the old addresses serving meanwhile. The last good
answer is saved to ``anthropic-ip.cache``, so a start with DNS down serves from it at once.
"""

from __future__ import annotations

import ipaddress
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmm.config import paths
from cmm.core.values import ANTHROPIC_HOST, Servers

log = Logger()


def __getattr__(name: str) -> Any:
    """The DNS client (twisted.names) is in :mod:`cmm.serve.dns_client`, loaded only where a
    lookup is made (the master, ``cmm doctor``): a worker uses the addresses its master sends."""
    if name in ("QuietResolver", "lookup"):
        from cmm.serve import dns_client

        return getattr(dns_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

CACHE_FILE = paths.DNS_CACHE_FILE_NAME
RESOLV_CONF_CHOICES = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))
LOOKUP_TIMEOUTS = (1, 3)  # seconds per try; twisted.names' default (1, 3, 11, 45) waits a minute per query
MIN_TTL = 30  # do not hammer DNS for names with tiny TTLs
MAX_TTL = 3600
RETRY_FIRST = 2.0  # after a failed lookup: 2, 4, 8 ... seconds, at most RETRY_MAX
RETRY_MAX = 60.0
START_WAIT = 1.5  # the longest a start without cached addresses waits for DNS before serving




@attrs.frozen
class Answer:
    addresses: tuple[str, ...]
    ttl: int


class Unresolved(LookupError):
    """No address for api.anthropic.com: passthrough requests get this as their 502's reason."""


def usable_addresses(candidates: Iterable[str]) -> list[str]:
    """Keep routable addresses, in order, without duplicates."""
    seen: list[str] = []
    for text in candidates:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            continue
        if address.is_loopback or address.is_unspecified or address.is_multicast:
            continue
        if str(address) not in seen:
            seen.append(str(address))
    return seen


def format_cache(addresses: Iterable[str], now: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return f"# real addresses of {ANTHROPIC_HOST}, last resolved {stamp}; written by cmm\n" + "".join(
        f"{address}\n" for address in addresses)


def parse_cache(text: str) -> list[str]:
    """Addresses from the cache file; anything unusable (or a tampered loopback entry) is dropped."""
    return usable_addresses(line for line in text.splitlines() if not line.startswith("#"))


def resolv_conf(choices: Iterable[Path] = RESOLV_CONF_CHOICES) -> Path:
    for path in choices:
        if path.exists():
            return path
    return Path("/etc/resolv.conf")


def file_cache(path: Path) -> tuple[Callable[[], str | None], Callable[[str], None]]:
    """``(load_cache, save_cache)`` for a plain file: None when it does not exist yet."""

    def load() -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    def save(text: str) -> None:
        path.write_text(text)

    return load, save


@attrs.define(eq=False)
class AddressBook:
    """Addresses for passthrough connections: fixed (``--anthropic-ip``, or what the master sends a
    worker), or from DNS with TTL refresh, a shared in-flight lookup, and a cache as the fallback.

    The cache is two callables so that the caller decides how the file is touched:
    ``load_cache()`` returns the saved text (None: nothing saved; OSError: unreadable) and
    ``save_cache(text)`` stores it (OSError is logged). :func:`file_cache` gives plain-file ones.
    ``on_change(addresses)`` hears of every new set of addresses, e.g. to tell the workers.
    """

    resolve: Callable[[], defer.Deferred[Answer]] | None
    clock: IReactorTime | None = None
    addresses: list[str] = attrs.field(factory=list)
    load_cache: Callable[[], str | None] | None = None
    save_cache: Callable[[str], None] | None = None
    on_change: Callable[[list[str]], None] | None = None
    expires: float = -math.inf  # no answer yet: the first current() asks
    failures: int = 0  # lookups failed in a row
    problem: str | None = None  # why the last lookup failed
    _saved: list[str] | None = None
    _waiters: list[defer.Deferred[list[str]]] | None = None  # not None while a lookup is under way
    _timer: IDelayedCall | None = None
    _started: bool = False

    @classmethod
    def fixed(cls, addresses: Iterable[str]) -> AddressBook:
        return cls(resolve=None, addresses=list(addresses))

    @classmethod
    def from_dns(cls, reactor: Any, *, servers: Servers = (), resolv: Path | None = None, cache: Path | None = None,
                 load_cache: Callable[[], str | None] | None = None, save_cache: Callable[[str], None] | None = None,
                 on_change: Callable[[list[str]], None] | None = None, clock: IReactorTime | None = None,
                 timeout: tuple[int, ...] = LOOKUP_TIMEOUTS) -> AddressBook:
        """Ask ``servers`` (else those in ``resolv``, else the system's resolv.conf); ``cache`` is
        a plain file unless ``load_cache``/``save_cache`` are given."""
        from cmm.serve.dns_client import QuietResolver, lookup

        clock = clock if clock is not None else reactor
        resolver = QuietResolver(reactor=reactor, servers=servers, resolv=resolv, timeout=timeout, clock=clock)
        if cache is not None:
            default_load, default_save = file_cache(cache)
            load_cache, save_cache = load_cache or default_load, save_cache or default_save
        return cls(resolve=lambda: defer.ensureDeferred(lookup(resolver)), clock=clock, load_cache=load_cache,
                   save_cache=save_cache, on_change=on_change)

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    # asking

    def current(self) -> defer.Deferred[list[str]]:
        """Known addresses at once (refreshing them in the background once their TTL is over);
        with none, Unresolved at once. Only a book used without :meth:`start` waits for its lookup
        under way: a started one has had its wait for DNS before serving."""
        if self.resolve is not None and self._waiters is None and self._now() >= self.expires:
            self._start_lookup()
        if self.addresses:
            return defer.succeed(list(self.addresses))
        if self._waiters is not None and not self._started:
            waiter: defer.Deferred[list[str]] = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        return defer.fail(Unresolved(self._unresolved()))

    def _unresolved(self) -> str:
        if self.resolve is None:
            return f"no address known for {ANTHROPIC_HOST} yet (DNS has not answered cmm); give them with --anthropic-ip"
        problem = self.problem or f"DNS has not answered for {ANTHROPIC_HOST} yet"
        return f"{problem}; none is cached: cmm keeps trying, or give the addresses with --anthropic-ip"

    def update(self, addresses: Iterable[str]) -> None:
        """New addresses from elsewhere (a worker hears them from the master); none keeps the old."""
        fresh = usable_addresses(addresses)
        if fresh:
            self.addresses = fresh

    # keeping fresh

    def start(self) -> None:
        """Keep the addresses fresh unasked: the cache serves at once, DNS is asked now, again when
        the TTL ends, and after a failure with back-off."""
        self._started = True
        if not self.addresses:
            self.addresses = self._cached()
            self._saved = list(self.addresses)
            if self.addresses:
                log.info("{name}: using {addresses} from {cache} until DNS answers", name=ANTHROPIC_HOST,
                         addresses=", ".join(self.addresses), cache=CACHE_FILE)
        if self.resolve is not None and self._waiters is None:
            self._start_lookup()

    def stop(self) -> None:
        self._started = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def ready(self, timeout: float = START_WAIT) -> defer.Deferred[None]:
        """Fires once there are addresses to serve with, the lookup under way has ended, or after
        ``timeout`` seconds, whichever comes first."""
        if self.addresses or self._waiters is None or self.clock is None:
            return defer.succeed(None)
        result: defer.Deferred[None] = defer.Deferred()

        def fire(_: object = None) -> None:
            if not result.called:
                result.callback(None)
            if timer.active():
                timer.cancel()

        timer = self.clock.callLater(timeout, fire)
        answered: defer.Deferred[list[str]] = defer.Deferred()
        self._waiters.append(answered)
        answered.addBoth(fire)
        return result

    def _start_lookup(self) -> None:
        assert self.resolve is not None
        self._waiters = []
        defer.maybeDeferred(self.resolve).addBoth(self._settle)

    def _schedule(self, delay: float) -> None:
        self.expires = self._now() + delay
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._started and self.clock is not None:
            self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._started and self._waiters is None:
            self._start_lookup()

    def _settle(self, result: Answer | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, Failure):
            self._failed(result, waiters)
            return
        if self.failures:
            log.info("DNS answers again for {name}", name=ANTHROPIC_HOST)
        self.failures, self.problem = 0, None
        changed = list(result.addresses) != self.addresses
        self.addresses = list(result.addresses)
        self._schedule(result.ttl)
        if changed:
            log.info("{name} is at {addresses}", name=ANTHROPIC_HOST, addresses=", ".join(self.addresses))
            self._save()
            if self.on_change is not None:
                self.on_change(list(self.addresses))
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(list(self.addresses))

    def _failed(self, failure: Failure, waiters: list[defer.Deferred[list[str]]]) -> None:
        self.failures += 1
        from cmm.serve.dns_client import why_failed

        self.problem = (failure.getErrorMessage() if failure.check(LookupError)
                        else f"DNS lookup of {ANTHROPIC_HOST} failed: {why_failed(failure)}")
        delay = min(RETRY_FIRST * 2 ** (self.failures - 1), RETRY_MAX)
        self._schedule(delay)
        if not self.addresses and not self._started:
            self.addresses = self._cached()  # asked before start(): the cache is the fallback
            self._saved = list(self.addresses)
        if self.failures == 1:  # said once per outage, not at every retry
            if self.addresses:
                log.warn("{why}; using {addresses} and retrying in the background", why=self.problem,
                         addresses=", ".join(self.addresses))
            else:
                log.error("{why}, and no address is cached: requests passed through to Anthropic get a 502 until "
                          "DNS answers (cmm keeps trying), or restart cmm with --anthropic-ip and the API's addresses",
                          why=self.problem)
        for waiter in waiters:
            if waiter.called:
                continue
            if self.addresses:
                waiter.callback(list(self.addresses))
            else:
                waiter.errback(Unresolved(self._unresolved()))

    # the cache

    def _cached(self) -> list[str]:
        if self.load_cache is None:
            return []
        try:
            text = self.load_cache()
        except OSError as error:
            log.warn("Cannot read {cache}: {why}", cache=CACHE_FILE, why=error.strerror or str(error))
            return []
        return parse_cache(text) if text else []

    def _save(self) -> None:
        if self.save_cache is None or self.addresses == self._saved:
            return
        try:
            self.save_cache(format_cache(self.addresses, time.time()))
            self._saved = list(self.addresses)
        except OSError as error:
            log.warn("Cannot save {cache}: {why}", cache=CACHE_FILE, why=error.strerror or str(error))
