"""cmm's TLS: the listening side's options (a key OpenSSL cannot serve with is refused when loaded),
and how decrypted records reach the protocol."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from OpenSSL import SSL
from OpenSSL._util import lib
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from cmm.machine import certs
from cmm.serve.tls import DirectTLSFactory, ReloadableServerTLS, connected, server_factory, server_options
from cmm.serve.upstream import anthropic_tls_options

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_a_key_pair_from_certs_makes_a_context() -> None:
    ca = certs.make_ca(NOW)
    server = certs.make_server_certificate(ca, NOW, hostnames=("api.anthropic.com",))
    context = ReloadableServerTLS(server_options(server.cert_pem, server.key_pem)).getContext()
    context.check_privatekey()  # raises if the key does not match the certificate


def test_a_key_tls_cannot_use_is_refused_at_load_not_at_the_first_handshake() -> None:
    ca = certs.make_ca(NOW)
    x25519_pem = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ValueError, match="X25519PrivateKey"):
        server_options(ca.cert_pem, x25519_pem)


def test_connected_gives_the_transport_and_refuses_an_unconnected_protocol() -> None:
    protocol = Protocol()
    with pytest.raises(RuntimeError, match="not connected"):
        connected(protocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert connected(protocol) is transport


def _connection_mode(connection: SSL.Connection) -> int:
    """The mode OpenSSL gave this connection (SSL_set_mode with nothing to add reads it)."""
    return int(lib.SSL_set_mode(connection._ssl, 0))  # pyOpenSSL has no getter


def test_server_connections_free_their_record_buffers_while_idle() -> None:
    """An open stream waits between events nearly all its life; Twisted's options set
    SSL_MODE_RELEASE_BUFFERS (about 34 KB a connection while idle): cmm's must keep it."""
    ca = certs.make_ca(NOW)
    server = certs.make_server_certificate(ca, NOW, hostnames=("api.anthropic.com",))
    factory = server_factory(ReloadableServerTLS(server_options(server.cert_pem, server.key_pem)),
                             Factory.forProtocol(Protocol))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert _connection_mode(protocol._tlsConnection) & SSL.MODE_RELEASE_BUFFERS


def test_upstream_connections_free_their_record_buffers_while_idle() -> None:
    creator = anthropic_tls_options()
    for _ in range(2):
        factory = DirectTLSFactory(creator, True, Factory.forProtocol(Protocol))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        assert _connection_mode(protocol._tlsConnection) & SSL.MODE_RELEASE_BUFFERS


def _handshake(server_context: SSL.Context, client_groups: bytes | None) -> str:
    """The key exchange group a client offering ``client_groups`` (None: OpenSSL's defaults, the
    post-quantum hybrid first) agrees on with ``server_context``."""
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if client_groups is not None:
        assert lib.SSL_CTX_set1_curves_list(client_context._context, client_groups) == 1
    server, client = SSL.Connection(server_context, None), SSL.Connection(client_context, None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        moved = False
        for side, peer in ((client, server), (server, client)):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return ""  # refused
            try:
                peer.bio_write(side.bio_read(1 << 16))
                moved = True
            except SSL.WantReadError:
                pass
        if not moved:
            break
    name = lib.SSL_get0_group_name(server._ssl)
    return SSL._ffi.string(name).decode() if name else ""  # type: ignore[attr-defined]


def test_the_listener_agrees_on_x25519_even_with_a_client_that_prefers_the_hybrid() -> None:
    """Loopback traffic gains nothing from a post-quantum share, and keeping one costs each open
    connection about 8 KiB; a P-256 client still gets in; Anthropic's side keeps the hybrid."""
    ca = certs.make_ca(NOW)
    server = certs.make_server_certificate(ca, NOW, hostnames=("api.anthropic.com",))
    context = server_options(server.cert_pem, server.key_pem).getContext()
    assert _handshake(context, None) == "x25519"
    assert _handshake(context, b"P-256") == "secp256r1"
    assert _handshake(context, b"X25519MLKEM768") == ""  # offered nothing it takes: no handshake
    plain = SSL.Context(SSL.TLS_SERVER_METHOD)  # what OpenSSL alone would agree on
    plain.use_certificate(server_options(server.cert_pem, server.key_pem).certificate)
    plain.use_privatekey(server_options(server.cert_pem, server.key_pem).privateKey)
    assert _handshake(plain, None) == "X25519MLKEM768"


class _Recorder(Protocol):
    """Each call's bytes, and whether TCP was already being closed when they came."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bool]] = []

    def dataReceived(self, data: bytes) -> None:
        tcp = self.transport.transport  # type: ignore[union-attr]  # under TLS: the TCP transport
        self.calls.append((data, tcp.disconnecting))


def _served_pair() -> tuple[Protocol, _Recorder, StringTransport, SSL.Connection]:
    """cmm's listening TLS around a recorder, and a memory-BIO client that finished its handshake."""
    ca = certs.make_ca(NOW)
    server = certs.make_server_certificate(ca, NOW, hostnames=("api.anthropic.com",))
    recorder = _Recorder()
    factory = server_factory(ReloadableServerTLS(server_options(server.cert_pem, server.key_pem)),
                             Factory.forProtocol(lambda: recorder))
    tls = factory.buildProtocol(None)
    tcp = StringTransport()
    tls.makeConnection(tcp)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            tls.dataReceived(client.bio_read(1 << 16))
        except SSL.WantReadError:
            pass
        answer = tcp.value()
        tcp.clear()
        if answer:
            client.bio_write(answer)
    client.do_handshake()
    assert recorder.calls == []
    return tls, recorder, tcp, client


def _records(client: SSL.Connection, pieces: list[bytes]) -> bytes:
    for piece in pieces:
        client.sendall(piece)
    return client.bio_read(1 << 20)


def test_the_records_of_one_read_reach_the_protocol_in_one_call() -> None:
    """Three 16 KiB records and a short one, read at once: one call with all of them, in order."""
    tls, recorder, tcp, client = _served_pair()
    pieces = [bytes([65 + i]) * 16384 for i in range(3)] + [b"tail"]
    tls.dataReceived(_records(client, pieces))
    assert recorder.calls == [(b"".join(pieces), False)]
    tls.dataReceived(_records(client, [b"next"]))  # a later read: its own call
    assert recorder.calls[1:] == [(b"next", False)]


def test_what_came_before_a_close_notify_is_handed_on_before_the_close() -> None:
    tls, recorder, tcp, client = _served_pair()
    wire = _records(client, [b"x" * 20000, b"last"])
    client.shutdown()
    tls.dataReceived(wire + client.bio_read(1 << 16))
    assert recorder.calls == [(b"x" * 20000 + b"last", False)]
    assert tcp.disconnecting  # and then the close went on


def test_what_came_before_a_broken_record_is_handed_on_before_the_error() -> None:
    tls, recorder, tcp, client = _served_pair()
    good = _records(client, [b"y" * 20000])
    broken = bytearray(_records(client, [b"never seen"]))
    broken[-1] ^= 0xFF  # the record's authentication fails
    tls.dataReceived(good + bytes(broken))
    assert recorder.calls == [(b"y" * 20000, False)]
    assert tcp.disconnecting


def test_nothing_is_handed_on_after_an_abort() -> None:
    tls, recorder, tcp, client = _served_pair()
    tls.abortConnection()
    tls.dataReceived(_records(client, [b"z" * 100]))
    assert recorder.calls == []
