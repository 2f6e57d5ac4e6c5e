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
