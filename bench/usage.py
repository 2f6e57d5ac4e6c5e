"""What reading token usage costs a passed-through answer: with and without the reader, same run.

    python bench/usage.py [--runs 7] [--json]

cmm reads every 2xx messages answer's usage beside the bytes it passes on (cmm.core.usage). A
passed-through answer costs cmm, per byte, at least this: TLS decryption of what Anthropic sent,
the response framing (cmm.core.exchange.ResponseReader) and TLS encryption to the client. That
path is timed here in this process (pyOpenSSL memory BIOs, no sockets, no event loop), once with
the reader fed as the serving protocol feeds it and once without, alternately, best of ``runs``,
on a large realistic SSE stream and a large JSON answer, and as pieces arrive two ways: 16 KiB
TLS records (a fast answer), and one event per read (a stream as the model writes it, the worst
case for a per-read cost). The share is the reader's time over the path's without it: an upper
bound of the throughput it costs, since the event loop and the sockets, left out here, only add
to the path's time. A gzipped answer is decoded on the side; its row says what that costs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import statistics
import string
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cmm, not an installed one
from OpenSSL import SSL  # noqa: E402

from cmm.core.exchange import Body, Head, ResponseReader  # noqa: E402
from cmm.core.framing import LAST_CHUNK, encode_chunk  # noqa: E402
from cmm.core.usage import UsageReader, usage_fed, usage_of, usage_reader  # noqa: E402
from cmm.testing.fakes import fake_usage, message_json, sse_event, sse_events  # noqa: E402

from components import PIECE, _records, _tls_pair  # noqa: E402

MB = 1_000_000
DELTAS = 20_000  # about 4 MB of stream: content_block_delta events of ~190 bytes
DELTA_SIZE = 60  # characters of text per delta, about what a model streams at a time
JSON_BYTES = 4 * MB
PROMPT = 40_000
WARM_UP = 10  # requests through cmm before its CPU time is counted
# Requests in a row with the reader, then as many without, a batch of records each: for small answers about
# what a busy worker's batch holds; a large answer's stream is its own batch.
BLOCKS = {"small json": 10, "sse 3.6 MB": 1, "json 4 MB": 1}


def prose(size: int, seed: int = 0) -> str:
    """Text that compresses about as well as a model's (3 to 4 times with gzip): words drawn from a
    vocabulary of a thousand, unlike the fakes' repeated sentence, which compresses a hundredfold."""
    chooser = random.Random(seed)
    vocabulary = ["".join(chooser.choice(string.ascii_lowercase) for _ in range(chooser.randint(2, 9)))
                  for _ in range(1000)]
    words: list[str] = []
    length = 0
    while length < size:
        word = chooser.choice(vocabulary) + chooser.choice(" " * 12 + ".,\n")
        words.append(word)
        length += len(word)
    return "".join(words)[:size]


def stream_answer(coding: str | None) -> tuple[bytes, list[bytes]]:
    """A chunked SSE answer, one chunk per event as a server flushes them: its head, and its body
    as wire pieces (each event's chunk; gzipped, each event's flushed part)."""
    frame = list(sse_events(message_id="msg_bench", model="claude-opus-4-6", provider="anthropic",
                            input_tokens=PROMPT, deltas=0))  # start, block start, ping, block stop, delta, stop
    text = prose(DELTAS * DELTA_SIZE)
    deltas = [sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": text[at : at + DELTA_SIZE]}}) for at in range(0, len(text), DELTA_SIZE)]
    events = frame[:3] + deltas + frame[3:]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
    if coding == "gzip":
        compressor = zlib.compressobj(wbits=31)
        events = [compressor.compress(e) + compressor.flush(zlib.Z_SYNC_FLUSH) for e in events] + [compressor.flush()]
        head += b"Content-Encoding: gzip\r\n"
    return head + b"\r\n", [encode_chunk(e) for e in events if e] + [LAST_CHUNK]


def json_answer(coding: str | None) -> tuple[bytes, list[bytes]]:
    answer = json.loads(message_json(message_id="msg_bench", model="claude-opus-4-6", provider="anthropic",
                                     input_tokens=PROMPT))
    answer["content"][0]["text"] = prose(JSON_BYTES)
    body = json.dumps(answer, separators=(",", ":")).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if coding == "gzip":
        body = gzip.compress(body)
        head += b"Content-Encoding: gzip\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body), [body]


class _Path:
    """The passthrough path for one answer: decrypt each read, frame it, encrypt it on; each run
    gets its records freshly encrypted (Anthropic's work, not timed: TLS records are not replayable)."""

    def __init__(self, wire_reads: list[bytes], read: bool, check: Callable[[Any], None]) -> None:
        self._reads = wire_reads
        self._read = read
        self._check = check
        self._upstream, self._cmm_upstream = _tls_pair()  # Anthropic's end and cmm's
        self._cmm_client, self._client = _tls_pair()  # cmm's end towards the client, and the client's

    def timed(self) -> float:
        encrypted = [_records(self._upstream, piece) for piece in self._reads]
        began = time.perf_counter()
        self._run(encrypted)
        return time.perf_counter() - began

    def _run(self, encrypted: list[bytes]) -> None:
        source, sink = self._cmm_upstream, self._cmm_client
        reader = ResponseReader(b"POST")
        usage: Any = None
        response = None
        for records in encrypted:
            source.bio_write(records)
            while True:
                try:
                    data = source.recv(1 << 16)  # as Twisted's TLS reads: one record's data a call
                except SSL.WantReadError:
                    break
                for event in reader.feed(data):
                    if isinstance(event, Body):
                        if isinstance(usage, UsageReader):  # as the exchange feeds it (cmm.serve.proxy)
                            usage.feed(event.progress.payload, event.progress.consumed)
                        elif usage is not None:
                            usage = usage_fed(usage, event.progress.payload, event.progress.consumed)
                    elif self._read and isinstance(event, Head):
                        response, usage = event.response, usage_reader(event.response)
                sink.send(data)
                sink.bio_read(1 << 22)
        if usage is not None and response is not None:
            self._check(usage_of(usage, response, True))


def _reads(head: bytes, body: list[bytes], per_event: bool) -> list[bytes]:
    """What the upstream connection's reads carry: one event each, or 16 KiB at a time."""
    if per_event:
        return [head + body[0], *body[1:]]
    wire = head + b"".join(body)
    return [wire[at : at + PIECE] for at in range(0, len(wire), PIECE)]


def usage_costs(runs: int = 7) -> dict[str, Any]:
    """Per answer: its size, the path's seconds without and with the reader, best of ``runs``."""
    results: dict[str, Any] = {}
    cases = [("sse", None, False), ("sse", None, True), ("json", None, False), ("sse", "gzip", False),
             ("sse", "gzip", True), ("json", "gzip", False)]
    for kind, coding, per_event in cases:
        head, body = (stream_answer if kind == "sse" else json_answer)(coding)
        expected = fake_usage(PROMPT, 1 if kind == "sse" else 5)

        def check(usage: Any, expected: dict[str, int] = expected) -> None:
            got = {name: getattr(usage, name) for name in expected}
            if got != expected:
                raise AssertionError(f"the reader read {got}, not {expected}")

        reads = _reads(head, body, per_event)
        paths = {"without": _Path(reads, False, check), "with": _Path(reads, True, check)}
        best = {"without": float("inf"), "with": float("inf")}
        for _ in range(runs):  # alternately, so that both see the same machine
            for name, path in paths.items():
                best[name] = min(best[name], path.timed())
        label = f"{kind}{' ' + coding if coding else ''}, {'one event' if per_event else '16 KiB'} a read"
        results[label] = {"bytes": sum(map(len, reads)), "reads": len(reads), "without_s": best["without"],
                          "with_s": best["with"]}
    return results


# -- the serving protocol itself, with and without the reader --------------------------------------

REQUEST_BODY = json.dumps({"model": "claude-opus-4-6", "max_tokens": 64, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
REQUEST = (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\ncontent-type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(REQUEST_BODY), REQUEST_BODY))


def small_answer() -> tuple[bytes, list[bytes]]:
    body = message_json(message_id="msg_bench", model="claude-opus-4-6", provider="anthropic", input_tokens=PROMPT)
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body), [body]


ANSWERS: dict[str, Callable[[], tuple[bytes, list[bytes]]]] = {
    "small json": small_answer, "sse 3.6 MB": lambda: stream_answer(None), "json 4 MB": lambda: json_answer(None)}


def _upstream(kind: str) -> None:
    """A child process: answer every request on every connection with the same answer."""
    import socket
    import threading
    head, body = ANSWERS[kind]()
    answer = head + b"".join(body)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                request_head, _, pending = pending.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", request_head).group(1))  # type: ignore[union-attr]
                while len(pending) < length:
                    pending += conn.recv(65536)
                pending = pending[length:]
                conn.sendall(answer)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _client(port: int, count: int, size: int) -> None:
    """A child process: ``count`` requests in turn on one TLS connection, each answer read whole."""
    import socket
    import ssl
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="api.anthropic.com") as conn:
        for _ in range(count):
            conn.sendall(REQUEST)
            got = 0
            while got < size:
                data = conn.recv(1 << 18)
                if not data:
                    raise SystemExit("cmm closed the connection")
                got += len(data)


def serving_costs(requests: dict[str, int] | None = None, control: bool = False) -> dict[str, Any]:
    """cmm's CPU time per answer (this process's, the upstream and the client being children) with
    the reader and without it, on one keep-alive connection. Records are made as a worker makes
    them, a batch at a time (``cmm.serve.record_batch``): ``BLOCKS`` requests, about what a busy
    worker's batch holds, alternate between the two; the figure is the median block's per answer."""
    import subprocess
    from datetime import datetime, timezone

    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    import cmm.serve.proxy as proxy
    from cmm.core.router import Router
    from cmm.core.values import ProxySettings
    from cmm.machine import certs
    from cmm.serve.proxy import ProxyContext, ProxyFactory
    from cmm.serve.record_batch import RecordBatch
    from cmm.serve.tls import server_factory, server_options
    from cmm.serve.upstream import Pool, _open

    requests = requests or {"small json": 5000, "sse 3.6 MB": 100, "json 4 MB": 100}
    now = datetime.now(timezone.utc)
    ca = certs.make_ca(now)
    pair = certs.make_server_certificate(ca, now)
    no_reader = lambda response: None  # noqa: E731
    real_reader = no_reader if control else proxy.usage_reader  # control: the same in both slots, to see the bias
    results: dict[str, Any] = {}
    children: list[subprocess.Popen[bytes]] = []
    script = [sys.executable, str(Path(__file__).resolve())]

    def run_kind(kind: str) -> None:
        head, body = ANSWERS[kind]()
        size = len(head) + sum(map(len, body))
        upstream = subprocess.Popen([*script, "--upstream", kind], stdout=subprocess.PIPE)
        children.append(upstream)
        assert upstream.stdout is not None
        upstream_port = int(upstream.stdout.readline())
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        counts: list[int | None] = []
        mode, mark, seen = ["with"], [time.process_time()], [0]
        proxy.usage_reader = real_reader

        def batch_made(records: list[Any]) -> None:
            now_cpu = time.process_time()
            seen[0] += len(records)
            if seen[0] > WARM_UP:  # the first ones also pay for starting the client, the handshake, ...
                cpu[mode[0]].append((now_cpu - mark[0]) / len(records))
            if mode[0] == "with":
                counts.extend(rec.output_tokens for rec in records)
            mode[0] = "without" if mode[0] == "with" else "with"
            proxy.usage_reader = real_reader if mode[0] == "with" else no_reader
            mark[0] = time.process_time()

        pool = Pool(lambda d: _open(TCP4ClientEndpoint(reactor, "127.0.0.1", upstream_port), d), reactor)
        context = ProxyContext(ProxySettings(router=Router(())), pool, reactor, lambda record: None)
        context.record_later = RecordBatch(reactor, batch_made, size=BLOCKS[kind], delay=3600.0).add
        factory = server_factory(server_options(pair.cert_pem, pair.key_pem), ProxyFactory(context), reactor)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        port = listening.getHost().port  # type: ignore[attr-defined]
        count = requests[kind] * 2 + WARM_UP  # whole blocks: requests and WARM_UP are multiples of BLOCKS[kind]
        client = subprocess.Popen([*script, "--client", str(port), str(count), str(size)])
        children.append(client)

        def poll() -> None:
            if client.poll() is None:
                reactor.callLater(0.05, poll)  # type: ignore[attr-defined]
                return
            listening.stopListening()
            pool.close_idle()
            upstream.kill()
            results[kind] = {"bytes": size, "requests": {mode: len(cpu[mode]) * BLOCKS[kind] for mode in cpu},
                             "with_s": statistics.median(cpu["with"]), "without_s": statistics.median(cpu["without"]),
                             # each block with the reader less the block without it that follows: a machine whose
                             # speed drifts (a shared VM) moves both alike
                             "added_s": statistics.median(a - b for a, b in zip(cpu["with"], cpu["without"])),
                             "client_exit": client.returncode, "counted": sum(1 for c in counts if c is not None)}
            remaining = [k for k in requests if k not in results]
            if remaining:
                run_kind(remaining[0])
            else:
                reactor.stop()  # type: ignore[attr-defined]
        poll()

    try:
        reactor.callWhenRunning(run_kind, next(iter(requests)))  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    finally:
        proxy.usage_reader = real_reader
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    return results


def serving_report(costs: dict[str, Any]) -> str:
    lines = ["   cmm's CPU per answer (median block) through its serving protocol (client TLS, upstream plain http, one",
             f"   keep-alive connection; blocks of {BLOCKS['small json']} small requests, or of one large, alternate with and",
             "   without the reader, records made a block at a time as a worker makes them; added: the median of the",
             "   paired blocks' differences; bench/usage.py --serving):"]
    for kind, c in costs.items():
        added = c["added_s"]
        lines.append(f"  {kind:<11} without {c['without_s'] * 1e6:9.1f} us  with {c['with_s'] * 1e6:9.1f} us  "
                     f"added {added * 1e6:+8.1f} us ({added / c['without_s'] * 100:+.1f}%)  "
                     f"requests {c['requests']['with']}+{c['requests']['without']}, usage read in {c['counted']}")
    return "\n".join(lines)


def usage_report(costs: dict[str, Any]) -> str:
    rows = []
    for label, c in costs.items():
        added = c["with_s"] - c["without_s"]
        rows.append((label, f"{c['bytes'] / MB:.1f}", str(c["reads"]), f"{c['without_s'] / c['bytes'] * MB * 1000:.3f}",
                     f"{c['with_s'] / c['bytes'] * MB * 1000:.3f}", f"{added / c['bytes'] * MB * 1e6:+.0f}",
                     f"{added / c['without_s'] * 100:+.1f}%"))
    headers = ("answer", "MB", "reads", "path ms/MB", "with reader ms/MB", "reader us/MB", "share")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["   Reading token usage on the passthrough path (decrypt, frame, encrypt; bench/usage.py), best of runs:",
             "  " + "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))),
             "  " + "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  " + "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--upstream"]:
        _upstream(sys.argv[2])
        return 0
    if sys.argv[1:2] == ["--client"]:
        _client(*map(int, sys.argv[2:5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--serving", action="store_true",
                        help="also time cmm's serving protocol on real sockets, with and without the reader")
    parser.add_argument("--control", action="store_true",
                        help="with --serving: no reader in either slot, to see what the alternation alone gives")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    costs: dict[str, Any] = {"path": usage_costs(args.runs)}
    if args.serving:
        costs["serving"] = serving_costs(control=args.control)
    if args.json:
        print(json.dumps(costs, indent=2))
    else:
        print(usage_report(costs["path"]))
        if "serving" in costs:
            print(serving_report(costs["serving"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
