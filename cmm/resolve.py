"""The real addresses of api.anthropic.com, asked of DNS directly.

cmm points the name at itself in /etc/hosts, so the system resolver would answer with cmm's own
address; twisted.names queries the name servers without the hosts file. systemd-resolved's stub
(127.0.0.53) answers from /etc/hosts too, so its upstream list is preferred where it exists.
Loopback or unspecified answers are refused: they would send passthrough traffic back to cmm.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.names import client, dns
from twisted.python.failure import Failure

from cmm.upstream import ANTHROPIC_HOST

RESOLV_CONF_CHOICES = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))


def usable_addresses(candidates: Iterable[str]) -> list[str]:
    """Keep routable addresses, in order, without duplicates."""
    seen: list[str] = []
    for text in candidates:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_loopback or address.is_unspecified or address.is_multicast:
            continue
        if str(address) not in seen:
            seen.append(str(address))
    return seen


def resolv_conf(choices: Iterable[Path] = RESOLV_CONF_CHOICES) -> Path:
    for path in choices:
        if path.exists():
            return path
    return Path("/etc/resolv.conf")


async def lookup(resolver: client.Resolver, name: str = ANTHROPIC_HOST) -> list[str]:
    """A and AAAA answers (IPv4 first); raise if neither gives a usable address."""
    found: list[str] = []
    errors: list[str] = []
    for query, kind in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _authority, _additional = await query(name)
        except Exception as error:
            errors.append(type(error).__name__)
            continue
        found.extend(answer.payload.dottedQuad() if kind == dns.A else answer.payload._address_str()
                     for answer in answers if answer.type == kind)
    usable = usable_addresses(found)
    if not usable:
        raise LookupError(f"DNS gave no usable address for {name} ({', '.join(errors) or 'only loopback answers'})")
    return usable


@attrs.define
class AddressBook:
    """Addresses for passthrough connections: fixed (``--anthropic-ip``) or looked up once and
    looked up again while they are unknown (DNS down at start)."""

    resolve: Callable[[], defer.Deferred[list[str]]] | None
    addresses: list[str] = attrs.field(factory=list)
    _waiters: list[defer.Deferred[list[str]]] | None = None

    @classmethod
    def fixed(cls, addresses: list[str]) -> AddressBook:
        return cls(resolve=None, addresses=list(addresses))

    @classmethod
    def from_dns(cls, reactor: object, resolv: Path | None = None) -> AddressBook:
        resolver = client.Resolver(resolv=str(resolv or resolv_conf()), reactor=reactor)
        return cls(resolve=lambda: defer.ensureDeferred(lookup(resolver)))

    def current(self) -> defer.Deferred[list[str]]:
        """Known addresses at once; else one shared lookup that every caller waits for."""
        if self.addresses or self.resolve is None:
            return defer.succeed(list(self.addresses))
        waiter: defer.Deferred[list[str]] = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        self.resolve().addBoth(self._settle)
        return waiter

    def _settle(self, value: list[str] | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(value, Failure):
            for waiter in waiters:
                waiter.errback(value)
            return
        self.addresses = value
        for waiter in waiters:
            waiter.callback(list(value))
