"""What a failover costs: the time it adds beyond the failed upstream's own answer, and the memory
a kept body costs.

    python bench/failover.py [--rounds 30] [--body-mib 4]

Starts the fakes and one cmm worker process (``python -m cmm.daemon.worker``, configured over its
pipe as the master does, so fallback rules need no file syntax), all on loopback. Each figure is
the median of ``--rounds`` requests, each on a new TLS connection, as Claude Code mostly sends:

* Anthropic's 429 alone (a fallback rule that does not list 429: the refusal reaches the client),
  the target's answer alone (a plain rule), and the failover (Anthropic's 429, then the target);
  the failover's cost is what it adds beyond the 429 (the target's answer, on a pooled
  connection, included: the client's TLS handshake with cmm is in both);
* a rule in its cool-down (straight to the target) against the plain rule;
* what a fresh worker holds per request while four ``--body-mib`` MiB requests wait for their
  answer: to Anthropic through a fallback rule (the body kept until the answer starts) against no
  rule, and to the target through an ``on_target_error`` rule (kept) against a plain one.

Figures on a loaded machine are indicative: compare them with each other, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cmm, not an installed one
from cmm.core.router import Mapping, Router, Upstream  # noqa: E402
from cmm.core.values import ANTHROPIC_HOST, Destination, MiB, ProxySettings  # noqa: E402
from cmm.daemon import wire  # noqa: E402
from cmm.testing import fakes  # noqa: E402
from cmm.testing.checkout import checkout_env  # noqa: E402
from cmm.testing.processes import Fakes, memory_kib  # noqa: E402

FAILOVER = "claude-opus-4-6"  # a fallback rule with the default causes
REFUSED = "claude-sonnet-4-5"  # a fallback rule that fails over on 529 only: Anthropic's 429 reaches the client
PLAIN = "claude-haiku-4-5"  # always to the target
COOLED = "claude-3-7-sonnet"  # a fallback rule put in a cool-down at the start
PASSTHROUGH = "claude-2"  # no rule: Anthropic, nothing kept
HANDS_BACK = "claude-instant"  # to the target, kept for Anthropic should the target fail
REFUSE_429 = (("x-fake-for", "anthropic"), ("x-fake-status", "429"))
HEADERS = ["measurement", "ms (MiB where named)"]


def _rules(target_url: str) -> tuple[Mapping, ...]:
    upstream = Upstream.from_url(target_url, "sk-bench")
    return (Mapping(FAILOVER, "gpt-5", upstream, mode="fallback"),
            Mapping(REFUSED, "gpt-5", upstream, mode="fallback", fallback_on=(529,)),
            Mapping(PLAIN, "gpt-5", upstream),
            Mapping(COOLED, "gpt-5", upstream, mode="fallback"),
            Mapping(HANDS_BACK, "gpt-5", upstream, on_target_error="anthropic"))


def _body(model: str, size: int = 0) -> bytes:
    text = "x" * size if size else "hi"
    return json.dumps({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}).encode()


class Worker:
    """One cmm worker process serving a socket this process bound, configured over its stdin."""

    def __init__(self, work: Path, settings: ProxySettings, pki: Path) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.setblocking(False)  # the worker adopts it into its reactor
        self.port = self.sock.getsockname()[1]
        env = {**checkout_env(), "SSL_CERT_FILE": str(pki / fakes.TEST_CA_FILE)}
        os.set_inheritable(self.sock.fileno(), True)
        self.out = open(work / "worker.out", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cmm.daemon.worker", "--fd", f"{self.sock.fileno()}:inet", "--grace", "1"],
            stdin=subprocess.PIPE, stdout=self.out, stderr=subprocess.STDOUT, env=env,
            pass_fds=(self.sock.fileno(),))
        config = wire.WorkerConfig(proxy=settings, cert_pem=(pki / fakes.TEST_SERVER_CERT_FILE).read_bytes(),
                                   key_pem=(pki / fakes.TEST_SERVER_KEY_FILE).read_bytes(),
                                   anthropic_addresses=("127.0.0.1",), connect_timeout=5.0)
        assert self.process.stdin is not None
        self.process.stdin.write(wire.encode(wire.config_message(config)))
        self.process.stdin.flush()
        self.context = ssl.create_default_context(cafile=str(pki / fakes.TEST_CA_FILE))

    def ask(self, model: str, *extra: tuple[str, str], body: bytes | None = None) -> tuple[int, str, float]:
        """One request on a new connection: its status, its x-cmm-fallback, and seconds to its last byte."""
        body = _body(model) if body is None else body
        head = ["POST /v1/messages HTTP/1.1", f"Host: {ANTHROPIC_HOST}", "x-api-key: sk-ant-bench",
                "Content-Type: application/json", "Connection: close", *(f"{k}: {v}" for k, v in extra),
                f"Content-Length: {len(body)}"]
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw, \
                self.context.wrap_socket(raw, server_hostname=ANTHROPIC_HOST) as conn:
            conn.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        elapsed = time.perf_counter() - started
        status = int(data.split(b" ", 2)[1])
        why = next((line.split(b":", 1)[1].strip().decode() for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                    if line.lower().startswith(b"x-cmm-fallback:")), "")
        return status, why, elapsed

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the worker drains and exits
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sock.close()
        self.out.close()


def _median_ms(worker: Worker, rounds: int, model: str, *extra: tuple[str, str],
               expect: tuple[int, str]) -> float:
    times = []
    for _ in range(rounds):
        status, why, elapsed = worker.ask(model, *extra)
        if (status, why) != expect:
            raise AssertionError(f"{model}: got {status} {why!r}, expected {expect}")
        times.append(elapsed)
    return statistics.median(times) * 1000


def _held_mib(work: Path, settings: ProxySettings, model: str, body: bytes, count: int = 4,
              think: float = 1.5) -> float:
    """What a fresh worker holds per request while ``count`` requests with ``body`` wait for an
    upstream that thinks ``think`` seconds before it answers, in MiB: its RSS then, above its RSS
    before. A kept body is held exactly that long, so this is its cost (a peak would hide it: the
    body is in memory anyway while it is being sent)."""
    worker = Worker(work, settings, work / "pki")
    try:
        worker.ask(model)  # warm
        before = memory_kib(worker.process.pid)["VmRSS"]
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(
            worker.ask(model, ("x-fake-delay", str(think)), body=body)[0])) for _ in range(count)]
        for thread in threads:
            thread.start()
        time.sleep(think * 0.7)
        during = memory_kib(worker.process.pid)["VmRSS"]
        for thread in threads:
            thread.join()
        if statuses != [200] * count:
            raise AssertionError(f"{model}: {statuses}")
        return (during - before) / 1024 / count
    finally:
        worker.stop()


def failover_rows(rounds: int = 30, body_mib: int = 4) -> list[list[str]]:
    """The failover's figures, as table rows (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="cmm-bench-failover.") as name:
        work = Path(name)
        stack = Fakes(work, checkout_env())
        worker: Worker | None = None
        try:
            settings = ProxySettings(router=Router(_rules(stack.target_url)),
                                     anthropic=Destination("https", ANTHROPIC_HOST, stack.anthropic_port,
                                                           anthropic=True))
            worker = Worker(work, settings, work / "pki")
            for model in (FAILOVER, PLAIN, PASSTHROUGH):  # warm: imports, TLS sessions, pooled connections
                worker.ask(model)
            refused = _median_ms(worker, rounds, REFUSED, *REFUSE_429, expect=(429, ""))
            target = _median_ms(worker, rounds, PLAIN, expect=(200, ""))
            failover = _median_ms(worker, rounds, FAILOVER, *REFUSE_429, expect=(200, "anthropic 429"))
            worker.ask(COOLED, *REFUSE_429, ("x-fake-retry-after", "3600"))
            cooled = _median_ms(worker, rounds, COOLED, expect=(200, "anthropic 429 cool-down"))
        finally:
            if worker is not None:
                worker.stop()
        try:
            held = [_held_mib(work, settings, model, _body(model, body_mib * MiB))
                    for model in (FAILOVER, PASSTHROUGH, HANDS_BACK, PLAIN)]
        finally:
            stack.stop()
    return [
        ["Anthropic's 429 alone, through cmm", f"{refused:.2f}"],
        ["the target's answer alone (plain rule)", f"{target:.2f}"],
        ["failover: Anthropic's 429, then the target", f"{failover:.2f}"],
        ["  added beyond the 429 (the target's own answer included)", f"{failover - refused:+.2f}"],
        ["a rule in cool-down (straight to the target)", f"{cooled:.2f}"],
        ["  against the plain rule", f"{cooled - target:+.2f}"],
        [f"held per waiting {body_mib} MiB request to Anthropic, fallback rule (kept), MiB", f"{held[0]:.1f}"],
        [f"held per waiting {body_mib} MiB request to Anthropic, no rule (not kept), MiB", f"{held[1]:.1f}"],
        ["  a kept body costs, to Anthropic, MiB", f"{held[0] - held[1]:+.1f}"],
        [f"held per waiting {body_mib} MiB request to the target, on_target_error rule (kept), MiB",
         f"{held[2]:.1f}"],
        [f"held per waiting {body_mib} MiB request to the target, plain rule (not kept), MiB", f"{held[3]:.1f}"],
        ["  a kept body costs, to the target, MiB", f"{held[2] - held[3]:+.1f}"],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--body-mib", type=int, default=4)
    args = parser.parse_args(argv)
    rows = failover_rows(args.rounds, args.body_mib)
    width = max(len(row[0]) for row in rows)
    print(f"{HEADERS[0]:<{width}}  {HEADERS[1]}")
    for label, value in rows:
        print(f"{label:<{width}}  {value:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
