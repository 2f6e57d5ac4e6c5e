"""The real addresses of api.anthropic.com, asked of DNS directly.

cmm points the name at itself in /etc/hosts, so the system resolver would answer with cmm's own
address; twisted.names queries the name servers without the hosts file. systemd-resolved's stub
(127.0.0.53) answers from /etc/hosts too, so its upstream list is preferred where it exists.
Loopback or unspecified answers are refused: they would send passthrough traffic back to cmm.

Answers are kept for their TTL and refreshed in the background while the old ones keep serving;
the last good answer is saved to ``anthropic-ip.cache`` so that cmm still reaches the API when
DNS is down at start.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.python.failure import Failure

from cmm.upstream import ANTHROPIC_HOST

log = Logger()

RESOLV_CONF_CHOICES = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))
MIN_TTL = 30  # do not hammer DNS for names with tiny TTLs
MAX_TTL = 3600


@attrs.frozen
class Answer:
    addresses: tuple[str, ...]
    ttl: int


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


async def lookup(resolver: client.Resolver, name: str = ANTHROPIC_HOST) -> Answer:
    """A and AAAA answers (IPv4 first) with the smallest TTL; raise if none is usable."""
    found: list[str] = []
    ttls: list[int] = []
    errors: list[str] = []
    for query, kind in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _authority, _additional = await query(name)
        except Exception as error:
            errors.append(type(error).__name__)
            continue
        for answer in answers:
            if answer.type == kind:
                found.append(answer.payload.dottedQuad() if kind == dns.A
                             else socket.inet_ntop(socket.AF_INET6, answer.payload.address))
                ttls.append(answer.ttl)
    usable = usable_addresses(found)
    if not usable:
        raise LookupError(f"DNS gave no usable address for {name} ({', '.join(errors) or 'only loopback answers'})")
    return Answer(tuple(usable), max(MIN_TTL, min(min(ttls, default=MIN_TTL), MAX_TTL)))


@attrs.define
class AddressBook:
    """Addresses for passthrough connections: fixed (``--anthropic-ip``), or from DNS with TTL
    refresh, a shared in-flight lookup, and the cache file as the fallback."""

    resolve: Callable[[], defer.Deferred[Answer]] | None
    clock: IReactorTime | None = None
    addresses: list[str] = attrs.field(factory=list)
    cache: Path | None = None
    expires: float = math.inf
    load_cache: Callable[[], str] | None = None  # instead of reading ``cache`` (e.g. as another user)
    save_cache: Callable[[str], None] | None = None  # instead of writing ``cache``
    _waiters: list[defer.Deferred[list[str]]] | None = None

    @classmethod
    def fixed(cls, addresses: list[str]) -> AddressBook:
        return cls(resolve=None, addresses=list(addresses))

    @classmethod
    def from_dns(cls, reactor: IReactorTime, cache: Path | None = None, resolv: Path | None = None,
                 load_cache: Callable[[], str] | None = None,
                 save_cache: Callable[[str], None] | None = None) -> AddressBook:
        resolver = client.Resolver(resolv=str(resolv or resolv_conf()), reactor=reactor)
        return cls(resolve=lambda: defer.ensureDeferred(lookup(resolver)), clock=reactor, cache=cache,
                   load_cache=load_cache, save_cache=save_cache)

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    def current(self) -> defer.Deferred[list[str]]:
        """Known addresses at once (refreshing them in the background once their TTL is over);
        else one shared lookup that every caller waits for."""
        if self.addresses or self.resolve is None:
            if self.resolve is not None and self._now() >= self.expires and self._waiters is None:
                self._start_lookup()
            return defer.succeed(list(self.addresses))
        waiter: defer.Deferred[list[str]] = defer.Deferred()
        if self._waiters is None:
            self._start_lookup()
        assert self._waiters is not None
        self._waiters.append(waiter)
        return waiter

    def _start_lookup(self) -> None:
        assert self.resolve is not None
        self._waiters = []
        self.resolve().addBoth(self._settle)

    def _settle(self, result: Answer | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, Failure):
            if not self.addresses:
                self.addresses = self._cached()
            if self.addresses:  # stale or cached answers beat none; ask again in a while
                log.warn("DNS lookup of {name} failed ({why}); using {addresses}", name=ANTHROPIC_HOST,
                         why=result.getErrorMessage(), addresses=", ".join(self.addresses))
                self.expires = self._now() + MIN_TTL
                for waiter in waiters:
                    waiter.callback(list(self.addresses))
                return
            for waiter in waiters:
                waiter.errback(result)
            return
        self.addresses = list(result.addresses)
        self.expires = self._now() + result.ttl
        self._save()
        for waiter in waiters:
            waiter.callback(list(self.addresses))

    def _cached(self) -> list[str]:
        if self.cache is None and self.load_cache is None:
            return []
        try:
            return parse_cache(self.load_cache() if self.load_cache is not None else self.cache.read_text())
        except (OSError, UnicodeDecodeError):
            return []

    def _save(self) -> None:
        if self.cache is None and self.save_cache is None:
            return
        text = format_cache(self.addresses, time.time())
        try:
            if self.save_cache is not None:
                self.save_cache(text)
            else:
                self.cache.write_text(text)
        except OSError as error:
            log.warn("Cannot save the address cache {path}: {why}", path=str(error.filename or self.cache),
                     why=error.strerror)
