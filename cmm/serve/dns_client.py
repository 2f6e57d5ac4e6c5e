"""The DNS client that asks for the real addresses of api.anthropic.com (see :mod:`cmm.serve.resolve`).

Apart from the rest so that twisted.names is loaded only by the processes that look names up:
the master, and ``cmm doctor``; a worker serves from the addresses its master sends.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any, Iterable, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IReadDescriptor, IUDPTransport
from twisted.names import client, dns, error as dns_error
from twisted.python.failure import Failure
from zope.interface import implementer

from cmm.core.values import ANTHROPIC_HOST, Servers
from cmm.serve.resolve import LOOKUP_TIMEOUTS, Answer, MAX_TTL, MIN_TTL, resolv_conf, usable_addresses


@implementer(IReadDescriptor)
class _QuietDatagramPort:
    """One query's UDP socket, read off the reactor directly.

    twisted.names opens a UDP port per query, and Twisted's UDP port logs each bind and close
    (plus 'Starting protocol ...' for the protocol): several lines per lookup in cmm's log.
    This port logs nothing; it offers what DNSDatagramProtocol uses and no more.
    """

    def __init__(self, reactor: Any, protocol: dns.DNSDatagramProtocol, family: socket.AddressFamily) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.socket: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        self.socket.bind(("::" if family == socket.AF_INET6 else "", 0))  # a random source port per query
        protocol.noisy = False
        protocol.makeConnection(cast(IUDPTransport, self))  # DNSDatagramProtocol only writes and stops
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return "cmm-dns"

    def doRead(self) -> None:
        while self.socket is not None:
            try:
                data, address = self.socket.recvfrom(65535)
            except OSError:  # nothing more now (or an ICMP error: the query's timeout answers for it)
                return
            self.protocol.datagramReceived(data, address[:2])

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendto(data, address)
        except OSError as error:  # unreachable network and the like: the query times out
            if error.errno not in (errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL,
                                   errno.ECONNREFUSED, errno.EPERM, errno.EACCES):
                raise

    def stopListening(self) -> defer.Deferred[None]:
        if self.socket is not None:
            self.reactor.removeReader(self)
            self.socket.close()
            self.socket = None
            self.protocol.doStop()
        return defer.succeed(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.stopListening()


class QuietResolver(client.Resolver):
    """twisted.names' resolver without its log lines, with timeouts on an injectable clock.

    ``clock`` runs the query timeouts (tests pass a Clock); ``reactor`` does the socket I/O."""

    def __init__(self, *, reactor: Any, servers: Servers = (), resolv: Path | None = None,
                 timeout: tuple[int, ...] = LOOKUP_TIMEOUTS, clock: IReactorTime | None = None) -> None:
        self._clock = clock if clock is not None else reactor
        super().__init__(resolv=None if servers else str(resolv or resolv_conf()), servers=list(servers) or None,
                         timeout=timeout, reactor=reactor)

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        protocol = dns.DNSDatagramProtocol(self, reactor=self._clock)
        _QuietDatagramPort(self._reactor, protocol, socket.AF_INET6 if interface == "::" else socket.AF_INET)
        return protocol

    def parseConfig(self, resolvConf: Iterable[bytes]) -> None:
        """Only the name servers matter here, read without a log line for each."""
        servers: list[tuple[str, int]] = []
        for line in resolvConf:
            words = line.split()
            if len(words) >= 2 and words[0] == b"nameserver":
                servers.append((words[1].decode("ascii", "replace"), dns.PORT))
        # Twisted's class attribute ``dynServers = ()`` types it as an empty tuple; its own
        # parseConfig assigns a list as well.
        self.dynServers = servers or [("127.0.0.1", dns.PORT)]  # type: ignore[assignment]


def why_failed(failure: Failure) -> str:
    if failure.check(dns_error.DNSQueryTimeoutError, defer.TimeoutError):
        return "no answer from the name servers"
    if failure.check(dns_error.DNSNameError):
        return "no such name"
    if failure.check(dns_error.DNSServerError):
        return "the name server failed"
    if failure.check(dns_error.DNSQueryRefusedError):
        return "the name server refused"
    return failure.getErrorMessage() or type(failure.value).__name__


async def lookup(resolver: Any, name: str = ANTHROPIC_HOST) -> Answer:
    """A and AAAA answers (asked at once, IPv4 first) with the smallest TTL; LookupError if none
    is usable."""
    results = await defer.DeferredList([resolver.lookupAddress(name), resolver.lookupIPV6Address(name)],
                                       consumeErrors=True)
    found: list[str] = []
    ttls: list[int] = []
    errors: list[str] = []
    for (ok, result), kind in zip(results, (dns.A, dns.AAAA)):
        if not ok:
            errors.append(why_failed(result))
            continue
        answers, _authority, _additional = result
        for answer in answers:
            if answer.type == kind:
                found.append(answer.payload.dottedQuad() if kind == dns.A
                             else socket.inet_ntop(socket.AF_INET6, answer.payload.address))
                ttls.append(answer.ttl)
    usable = usable_addresses(found)
    if not usable:
        why = "; ".join(dict.fromkeys(errors)) or ("only loopback answers" if found else "no address records")
        raise LookupError(f"DNS gave no usable address for {name} ({why})")
    return Answer(tuple(usable), max(MIN_TTL, min(min(ttls, default=MIN_TTL), MAX_TTL)))
