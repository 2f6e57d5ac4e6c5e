"""Where a large body's time goes inside cmm: each stage on its own, in this process, no network.

The 2 MB rows of the benchmark add up everything on a machine that the client, the fakes and
cmm share. This splits cmm's share into its parts, each timed alone (best of ``runs``) on the
same body as section 3, fed in 16 KiB pieces as TLS records deliver it: TLS decryption (every
request) and encryption (passthrough: cmm speaks TLS to Anthropic too) through pyOpenSSL memory
BIOs, the thinking-block scans (passthrough: neutralise; routed: unmark), the cch re-signing
stage and the body framing. Their sum is a floor for what cmm adds to a 2 MB request on this
machine, whatever the event loop around them does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone

from OpenSSL import SSL

from cmm.machine import certs
from cmm.core.cch import Resigner
from cmm.core.framing import LengthBody
from cmm.core.thinking_edits import Neutraliser, Unmarker
from cmm.core.thinking_scan import MARK
from cmm.serve.tls import server_options
from cmm.serve.upstream import SPLICE_BUFFER

PIECE = 16 * 1024  # one TLS record's payload
READ = SPLICE_BUFFER  # the most one socket read brings cmm: its records go through the stages together


def best(runs: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best


def _tls_pair() -> tuple[SSL.Connection, SSL.Connection]:
    """A handshaken (server, client) pair over memory BIOs, with cmm's own server options."""
    now = datetime.now(timezone.utc)
    ca = certs.make_ca(now)
    server_pair = certs.make_server_certificate(ca, now)
    server = SSL.Connection(server_options(server_pair.cert_pem, server_pair.key_pem).getContext(), None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        _pump(client, server)
        _pump(server, client)
    return server, client


def _pump(source: SSL.Connection, sink: SSL.Connection) -> int:
    moved = 0
    while True:
        try:
            data = source.bio_read(1 << 20)
        except SSL.WantReadError:
            return moved
        if not data:
            return moved
        sink.bio_write(data)
        moved += len(data)


def _records(sender: SSL.Connection, body: bytes) -> bytes:
    """``body`` encrypted by ``sender`` in PIECE-sized records, as it would go on the wire."""
    out = []
    for start in range(0, len(body), PIECE):
        sender.send(body[start : start + PIECE])
        out.append(sender.bio_read(1 << 22))
    return b"".join(out)


def _pieces(body: bytes) -> list[bytes]:
    """``body`` as cmm's stages get it from a fast client: a socket read's worth at a time."""
    return [body[start : start + READ] for start in range(0, len(body), READ)]


def component_costs(body: bytes, conversation: bytes | None = None, runs: int = 5) -> dict[str, float]:
    """Seconds per ``body`` for each stage, best of ``runs``. With ``conversation`` (a body of as
    many blocks as a long agentic session sends), the two scans again on it, per ``body``'s size,
    and beside each body a ``bytes.find`` of the mark through its pieces: what a search that
    cannot tell a block from a string costs, the floor of any scan."""
    pieces = _pieces(body)
    server, client = _tls_pair()

    def decrypt() -> float:
        wire = _records(client, body)  # encrypting is the client's work: not timed
        began = time.perf_counter()
        for start in range(0, len(wire), READ):  # socket reads of up to READ
            server.bio_write(wire[start : start + READ])
            while True:
                try:
                    server.recv(PIECE * 2)
                except SSL.WantReadError:
                    break
        return time.perf_counter() - began

    def encrypt() -> None:
        for piece in pieces:
            server.sendall(piece)
            server.bio_read(1 << 22)

    def scan(make: Callable[[], Neutraliser | Unmarker], pieces: list[bytes] = pieces) -> Callable[[], None]:
        def run() -> None:
            stage = make()
            for piece in pieces:
                stage.feed(piece)
            stage.finish()
        return run

    def search(pieces: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            for piece in pieces:
                piece.find(MARK)
        return run

    def resign() -> None:
        stage = Resigner(lambda: False)
        for piece in pieces:
            stage.feed(piece)
        stage.finish()

    def framing() -> None:
        tracker = LengthBody(len(body))
        for piece in pieces:
            tracker.feed(piece)

    costs = {
        "tls_decrypt_s": min(decrypt() for _ in range(runs)),
        "tls_encrypt_s": best(runs, encrypt),
        "neutralise_s": best(runs, scan(Neutraliser)),
        "unmark_s": best(runs, scan(Unmarker)),
        "resign_s": best(runs, resign),
        "framing_s": best(runs, framing),
        "mark_search_s": best(runs, search(pieces)),
    }
    if conversation is not None:
        talk = _pieces(conversation)
        per_body = len(body) / len(conversation)
        costs["neutralise_agentic_s"] = best(runs, scan(Neutraliser, talk)) * per_body
        costs["unmark_agentic_s"] = best(runs, scan(Unmarker, talk)) * per_body
        costs["mark_search_agentic_s"] = best(runs, search(talk)) * per_body
    return costs


# Which stages each route's request body goes through in cmm.
ROUTE_STAGES = {
    "routed": ("tls_decrypt_s", "unmark_s", "framing_s"),
    "passthrough": ("tls_decrypt_s", "tls_encrypt_s", "neutralise_s", "resign_s", "framing_s"),
}
