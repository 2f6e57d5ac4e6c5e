"""Socket settings for a splice: what ``tune`` sets, seen through a TLS wrapper to TCP."""

from __future__ import annotations

from twisted.internet import tcp

from cmm.serve.upstream import SPLICE_BUFFER, tune


class FakeTcp:
    bufferSize = tcp.Connection.bufferSize

    def __init__(self) -> None:
        self.no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class FakeTls:
    """A TLS transport: passes setTcpNoDelay on, holds the TCP transport as ``transport``."""

    def __init__(self, tcp_transport: FakeTcp) -> None:
        self.transport = tcp_transport

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)


def test_plain_tcp_gets_no_delay_and_the_splice_buffer() -> None:
    transport = FakeTcp()
    tune(transport)
    assert transport.no_delay and transport.bufferSize == SPLICE_BUFFER > tcp.Connection.bufferSize


def test_under_tls_the_tcp_transport_is_tuned() -> None:
    transport = FakeTcp()
    tune(FakeTls(transport))
    assert transport.no_delay and transport.bufferSize == SPLICE_BUFFER



def test_an_https_target_host_gets_one_tls_context_for_all_its_connections() -> None:
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from cmm.serve.upstream import Connector, anthropic_tls_options

    connector = Connector(Clock(), lambda: defer.succeed([]), anthropic_tls_options())
    first = connector._target_tls("proxy.example")
    assert connector._target_tls("proxy.example") is first
    assert connector._target_tls("other.example") is not first


def test_a_target_s_next_address_is_tried_soon_after_the_first() -> None:
    """``localhost`` may resolve to ::1 first while the target listens on 127.0.0.1 only: the
    second address must not wait Twisted's default 0.3 s."""
    from twisted.internet import defer
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.interfaces import IReactorPluggableNameResolver
    from twisted.internet.testing import MemoryReactorClock
    from zope.interface import alsoProvides

    from cmm.core.values import Destination
    from cmm.serve.upstream import Connector, anthropic_tls_options

    class Resolver:
        def resolveHostName(self, receiver, name, portNumber=0, addressTypes=None, transportSemantics="TCP"):
            receiver.resolutionBegan(None)
            receiver.addressResolved(IPv6Address("TCP", "::1", portNumber))
            receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
            receiver.resolutionComplete()
            return receiver

    reactor = MemoryReactorClock()
    reactor.nameResolver = Resolver()
    alsoProvides(reactor, IReactorPluggableNameResolver)
    connector = Connector(reactor, lambda: defer.succeed([]), anthropic_tls_options())
    connector.connect(Destination("http", "localhost", 8317))
    reactor.advance(0)
    assert [client[0] for client in reactor.tcpClients] == ["::1"]
    reactor.advance(connector.attempt_delay)
    assert [client[0] for client in reactor.tcpClients] == ["::1", "127.0.0.1"]
    assert connector.attempt_delay <= 0.1
