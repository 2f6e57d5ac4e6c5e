"""Benchmark cmm against its fake upstreams: direct versus through cmm, in one run.

    python bench/run.py [--quick] [--out bench/results]
    python bench/run.py [--only] [--scaling] [--streams N[,N...]] [--soak SECONDS]
    python bench/run.py --full      # every row of the targets table (about 20 minutes)

Brings up the fake Anthropic API (TLS), the fake target (plain http) and cmm, all on loopback;
measures throughput and latency (wrk), streaming time to first byte and event pacing, latency
for a 2 MB body (and what each of cmm's stages costs on it alone: bench/components.py), and
cmm's peak RSS against body size; then, with a fresh cmm for each of
--workers 0, 1 and 2 (--accept shared and reuseport), throughput, cmm's CPU time per request
and how the requests spread over the workers (the master's status socket), with keep-alive
and with a new connection per request. Prints a table of ratios and differences and writes
the raw figures to ``<out>/<UTC timestamp>.json``. Everything it starts runs in its own
process group and is stopped on the way out, also on Ctrl-C.

The figures come from one run on a machine that the load generator, the fakes and cmm share,
so only ratios and differences against the direct run mean anything. Exits 1 when the run
found problems (errors, misrouted replies, batched events), listed under the table.

Opt-in, after the default sections (or alone with --only), on the same cmm: --scaling, routed
req/s direct and via cmm at 1 to 64 connections and latency against body size from 1 KB to
32 MB on both routes; --streams, cmm's memory per open stream with
N concurrent routed streams and that all of them complete; --soak, a long run at about half
the peak routed rate, with cmm's RSS sampled every 10 s. The table ends with cmm's performance
targets, each with its figure, the direct run beside it and whether it was met.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cmm, not an installed one
from cmm.daemon.tap import DEFAULT_WORKERS  # noqa: E402
from cmm.testing.checkout import checkout_env, twistd_command  # noqa: E402
from cmm.testing.processes import fake_command, free_port, memory_kib, reset_peak  # noqa: E402

from components import ROUTE_STAGES, component_costs  # noqa: E402  (imports cmm: after the path)
from failover import HEADERS as FAILOVER_HEADERS, failover_rows  # noqa: E402
from usage import serving_report, usage_report  # noqa: E402
from httpclient import Connection, Response  # noqa: E402
from plot import kb_per_stream, missing_dependency, plot  # noqa: E402
import websocket as websocket_bench  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "post.lua"
FAST_UPSTREAM = BENCH_DIR / "fast_upstream.py"
# The direct run must be this many times faster than cmm, or the ratios only measure the upstream.
UPSTREAM_HEADROOM = 5.0
LOOPBACK = "127.0.0.1"
ANTHROPIC_NAME = "api.anthropic.com"  # the name on cmm's certificate and the fake's

SOURCE_PREFIX = "claude-haiku-4-5"
TARGET_MODEL = "gemini-2.5-flash"
ROUTED_MODEL = "claude-haiku-4-5-20251001"  # starts with the source prefix: goes to the target
PASSTHROUGH_MODEL = "claude-opus-4-6"  # everything else: goes to the (fake) Anthropic API
MB = 1_000_000
# cmm's default body limit is 32 MiB (33,554,432 bytes); "32 MB" is 32,000,000 bytes, under it.
RSS_SIZES_MB = (1, 8, 32)
LARGE_BODY_BYTES = 2 * MB

CLIENT_HEADERS = (
    ("content-type", "application/json"),
    ("accept", "application/json"),
    ("anthropic-version", "2023-06-01"),
    ("anthropic-beta", "interleaved-thinking-2025-05-14"),
    ("x-api-key", "sk-ant-bench-0000000000000000"),
    ("user-agent", "claude-cli/2.1.330 (external, cli)"),
    ("x-app", "cli"),
)


@dataclass(frozen=True)
class Plan:
    """How much to measure; --quick shrinks everything to fit in about a minute and a half."""

    wrk_seconds: int
    ttfb_requests: int
    large_requests: int
    rss_requests: int  # per route and body size

    @classmethod
    def make(cls, quick: bool) -> Plan:
        return cls(3, 20, 5, 1) if quick else cls(10, 100, 20, 3)


# -- request bodies -------------------------------------------------------------------------


def small_body(model: str, stream: bool = False) -> bytes:
    """A short Claude Code-like request, model first as Claude Code sends it."""
    return json.dumps(
        {
            "model": model,
            "max_tokens": 32000,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about proxies."}]}],
            "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}],
            "metadata": {"user_id": "user_bench_account__session_00000000"},
            "temperature": 1,
            "stream": stream,
        },
        separators=(",", ":"),
    ).encode()


_FILLER_TEXT = (
    'def handle(request):\n    """Route by model."""\n    if request["model"].startswith("claude"):\n'
    "        return upstream(request)\t# keep-alive\n    return target(request)\n\n"
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit — naïve café façade.\n"
)


def large_body(model: str, size: int) -> bytes:
    """A request of exactly ``size`` bytes: model first, then a conversation with a long text.

    The text carries JSON escapes (quotes, newlines, tabs, non-ASCII) so that the body is as
    awkward to scan as a real one full of pasted code.
    """
    marker = "@@FILL@@"
    template = json.dumps(
        {
            "model": model,
            "max_tokens": 32000,
            "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}],
            "messages": [
                {"role": "user", "content": "Summarise this file."},
                {"role": "assistant", "content": "Please paste it."},
                {"role": "user", "content": [{"type": "text", "text": marker}]},
            ],
            "metadata": {"user_id": "user_bench_account__session_00000000"},
            "stream": False,
        },
        separators=(",", ":"),
    ).encode()
    room = size - (len(template) - len(marker))
    if room < 0:
        raise ValueError(f"a body of {size} bytes is too small for the template")
    unit = json.dumps(_FILLER_TEXT)[1:-1].encode()  # JSON-escaped, ASCII only
    fill = unit * (room // len(unit)) + b"x" * (room % len(unit))
    body = template.replace(marker.encode(), fill)
    assert len(body) == size
    return body


def agentic_body(model: str, size: int) -> bytes:
    """A request of about ``size`` bytes (at least) shaped like a long agentic Claude Code session:
    turn after turn of a tool result (pasted code), then the assistant's Anthropic-signed thinking
    block, a text block and a tool call. Many blocks, each walked by the thinking scans: where
    ``large_body``'s one long text is their cheapest case, this is their usual one."""
    code = _FILLER_TEXT * 8
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "Fix the failing test."}]}]
    turn, grown = 0, 0
    while grown < size:
        turn += 1
        messages.append({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Let me read the next file. " * (5 + turn % 7 * 5), "signature": "Eq" + "A" * 300},
            {"type": "text", "text": "I'll read the file."},
            {"type": "tool_use", "id": f"toolu_{turn:020d}", "name": "Read",
             "input": {"file_path": f"/src/app/module_{turn}.py", "limit": 2000}}]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{turn:020d}",
                                                      "content": code * (1 + turn % 5)}]})
        grown += sum(len(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()) + 1
                     for message in messages[-2:])
    return json.dumps({"model": model, "messages": messages, "max_tokens": 32000, "stream": True},
                      separators=(",", ":"), ensure_ascii=False).encode()


# -- processes ------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where a client sends requests for one route, directly or via cmm."""

    label: str
    port: int
    tls: ssl.SSLContext | None
    host_header: str | None  # None: let wrk write 127.0.0.1:port

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{LOOPBACK}:{self.port}/v1/messages"

    def connect(self, timeout: float = 60.0) -> Connection:
        return Connection(LOOPBACK, self.port, self.tls, ANTHROPIC_NAME, timeout)

    def headers(self, extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
        host = self.host_header or f"{LOOPBACK}:{self.port}"
        return [("host", host), *CLIENT_HEADERS, *extra]


@dataclass
class Cmm:
    """One running cmm (the master; twistd -n does not fork) with its own port and config dir."""

    name: str  # also the name of its output file
    process: subprocess.Popen[bytes]
    port: int
    config: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def control_socket(self) -> Path:
        return self.config / "cmm.sock"


@dataclass
class Stack:
    """The two fakes and cmm, each in its own process group, output in files under ``work``."""

    work: Path
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    anthropic_port: int = 0
    target_port: int = 0
    cmm: Cmm | None = None  # the one sections 1-4 measure (cmm's default workers and accept)
    upstream: str = "fast"  # "fast": bench/fast_upstream.py (uvloop); "twisted": cmm.testing.fakes
    cmm_args: list[str] = field(default_factory=list)  # added to every cmm's command line

    def pid_of(self, name: str) -> int:
        return next(process.pid for each, process in self.processes if each == name)

    def log_path(self, name: str) -> Path:
        return self.work / f"{name}.out"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_path(name), "wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                env=env or checkout_env(),  # this checkout's cmm, also for the fakes
                start_new_session=True,  # own process group, so stop() reaches its children too
            )
        self.processes.append((name, process))
        return process

    def _wait_listening(self, name: str, process: subprocess.Popen[bytes], deadline: float = 20.0) -> int:
        """The port a fake printed as ``listening on <port>``."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            text = self.log_path(name).read_text(errors="replace")
            if match := re.search(r"listening on (\d+)", text):
                return int(match.group(1))
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start:\n{self.tail(name)}")

    def _wait_port(self, name: str, process: subprocess.Popen[bytes], port: int, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if process.poll() is not None:
                break
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} is not listening on {port}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def start(self) -> None:
        python = sys.executable
        pki = self.work / "pki"

        def command(kind: str, *args: str) -> list[str]:
            if self.upstream == "fast":
                return [python, str(FAST_UPSTREAM), kind, *args]
            return fake_command(kind, *args, "--keep-requests", "0", python=python)

        anthropic = self._spawn("fake-anthropic", command("anthropic", "--cert-dir", str(pki)))
        target = self._spawn("fake-target", command("target"))
        self.anthropic_port = self._wait_listening("fake-anthropic", anthropic)
        self.target_port = self._wait_listening("fake-target", target)
        self.cmm = self.start_cmm("cmm", [])

    def start_cmm(self, name: str, extra_args: list[str], env: dict[str, str] | None = None) -> Cmm:
        """Start a cmm in front of the fakes, on a port and in a config dir of its own; ``env``
        is added to its environment."""
        config, port = self.work / f"{name}-config", free_port(LOOPBACK)
        # cmm trusts the fake's test CA only through SSL_CERT_FILE, as a test would.
        env = {**checkout_env(), "SSL_CERT_FILE": str(self.work / "pki" / "ca.pem"), **(env or {})}
        argv = twistd_command([
            "--source", SOURCE_PREFIX, "--target", TARGET_MODEL,
            "--port", str(port), "--listen", LOOPBACK, "--config-dir", str(config),
            "--anthropic-ip", LOOPBACK, "--anthropic-port", str(self.anthropic_port),
            "--proxy-url", f"http://{LOOPBACK}:{self.target_port}/v1/messages",
            "--no-hosts", "--log-file", str(config / "cmm.log"), *self.cmm_args, *extra_args,
        ], sys.executable)  # fmt: skip
        process = self._spawn(name, argv, env)
        self._wait_port(name, process, port)
        return Cmm(name, process, port, config)

    def stop(self, only: Cmm | None = None) -> None:
        """SIGTERM every process group (or only that cmm's), then SIGKILL whatever is still there
        after 5 s."""
        processes = [p for _, p in self.processes if only is None or p is only.process]
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 5
        for process in processes:
            try:
                process.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()

    def endpoints(self, cmm: Cmm | None = None) -> dict[str, dict[str, Endpoint]]:
        """route -> {"direct": ..., "via": ...}, via ``cmm`` (default: the stack's own)."""
        cmm = cmm or self.cmm
        assert cmm is not None
        fake_ca = ssl.create_default_context(cafile=str(self.work / "pki" / "ca.pem"))
        cmm_ca = ssl.create_default_context(cafile=str(cmm.config / "ca.crt"))
        via = Endpoint("via cmm", cmm.port, cmm_ca, ANTHROPIC_NAME)
        return {
            "routed": {"direct": Endpoint("target", self.target_port, None, None), "via": via},
            "passthrough": {"direct": Endpoint("anthropic", self.anthropic_port, fake_ca, ANTHROPIC_NAME), "via": via},
        }


ROUTE_MODELS = {"routed": ROUTED_MODEL, "passthrough": PASSTHROUGH_MODEL}
Routes = dict[str, dict[str, Endpoint]]  # route -> {"direct": ..., "via": ...}
Log = Callable[[str], None]
ROUTE_PROVIDER = {"routed": "target", "passthrough": "anthropic"}


# -- small helpers ----------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def check_reply(response: Response, route: str, via: bool, stream: bool = False) -> str | None:
    """Why this reply is not what the route should produce, or None."""
    if response.status != 200:
        return f"status {response.status}: {response.body[:200]!r}"
    provider = response.header("x-fake-provider")
    if provider != ROUTE_PROVIDER[route]:
        return f"answered by {provider!r}, expected {ROUTE_PROVIDER[route]!r}"
    marked = response.header("x-cmm-provider") == "cliproxyapi"
    if via and marked != (route == "routed"):
        return f"x-cmm-provider is {response.header('x-cmm-provider')!r}"
    if stream and not response.body.rstrip().endswith(b'data: {"type":"message_stop"}'):
        return "stream did not end with message_stop"
    return None


# -- 1. throughput and latency (wrk) ---------------------------------------------------------


def run_wrk(endpoint: Endpoint, body: bytes, threads: int, connections: int, seconds: int,
            close: bool = False, delay_ms: float = 0.0) -> dict[str, Any]:
    """wrk with post.lua; ``close`` sends "Connection: close": a new connection per request;
    ``delay_ms``: each connection pauses that long before each request (to pace the rate)."""
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
        "-s", str(WRK_SCRIPT), endpoint.url,
    ]  # fmt: skip
    env = {**os.environ, "CMM_BENCH_BODY": body.decode(), "CMM_BENCH_HOST": endpoint.host_header or "",
           "CMM_BENCH_CLOSE": "1" if close else "", "CMM_BENCH_DELAY_MS": f"{delay_ms:.3f}" if delay_ms else ""}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    result: dict[str, Any] = {"argv": argv, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    match = re.search(r"^CMM_BENCH_RESULT (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        result["error"] = f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()[-300:]}"
        return result
    summary = json.loads(match.group(1))
    result.update(summary)
    result["rps"] = summary["requests"] / (summary["duration_us"] / 1e6)
    result["error_count"] = sum(summary["errors"].values())
    return result


def fake_request_count(endpoint: Endpoint) -> int | None:
    """How many requests a fake has received (its control route), or None if it cannot say."""
    try:
        connection = endpoint.connect(timeout=10)
        try:
            response = connection.request("GET", "/_fake/requests", endpoint.headers())
        finally:
            connection.close()
        return int(json.loads(response.body)["request_count"])
    except (OSError, ValueError, KeyError):
        return None


CpuOf = dict[str, Callable[[], float]]  # "via", "routed", "passthrough" -> CPU seconds so far


def measure_wrk(endpoints: Routes, plan: Plan, log: Log, cpu_of: CpuOf) -> dict[str, Any]:
    """``cpu_of``: CPU seconds so far of whoever serves each way ("via": cmm's master and workers,
    else the route's fake), read around each run for the CPU time per request."""
    results: dict[str, Any] = {}
    for route, ends in endpoints.items():
        body = small_body(ROUTE_MODELS[route])
        upstream = ends["direct"]
        for load, (threads, connections) in (("c8", (2, 8)), ("c1", (1, 1))):
            for way in ("direct", "via"):
                log(f"wrk {route} {way} -t{threads} -c{connections} -d{plan.wrk_seconds}s")
                before = fake_request_count(upstream)
                cpu = cpu_of["via" if way == "via" else route]
                cpu_before = cpu()
                run = run_wrk(ends[way], body, threads, connections, plan.wrk_seconds)
                cpu_used = cpu() - cpu_before
                after = fake_request_count(upstream)
                if before is not None and after is not None:
                    run["upstream_received"] = after - before  # control requests are not counted
                if run.get("requests"):
                    run["server_cpu_ms_per_request"] = 1000 * cpu_used / run["requests"]
                results.setdefault(route, {}).setdefault(load, {})[way] = run
    return results


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (a fake), in seconds."""
    stat = proc_stat(pid)
    return (int(stat[11]) + int(stat[12])) / CLOCK_TICKS


# -- 2. streaming: time to first event, and pacing -------------------------------------------


@dataclass
class Arrivals:
    """Body pieces of one streamed reply with their arrival times."""

    pieces: list[tuple[float, int]] = field(default_factory=list)  # (arrival, cumulative end offset)
    size: int = 0

    def __call__(self, when: float, piece: bytes) -> None:
        self.size += len(piece)
        self.pieces.append((when, self.size))

    def at(self, offset: int) -> float:
        """When the byte at ``offset`` arrived."""
        return next(when for when, end in self.pieces if end > offset)


def first_event_time(response: Response, arrivals: Arrivals) -> float:
    offset = response.body.find(b"event: message_start")
    if offset < 0:
        raise ValueError("no message_start event in the reply")
    return arrivals.at(offset) - response.started


def event_times(response: Response, arrivals: Arrivals) -> list[float]:
    """Arrival time of the last byte of each SSE event (events end with a blank line)."""
    times, start = [], 0
    while (end := response.body.find(b"\n\n", start)) >= 0:
        times.append(arrivals.at(end + 1))
        start = end + 2
    return times


def measure_streaming(endpoints: Routes, plan: Plan, log: Log) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for route, ends in endpoints.items():
        body = small_body(ROUTE_MODELS[route], stream=True)
        for way in ("direct", "via"):
            log(f"streaming TTFB {route} {way} x{plan.ttfb_requests}")
            entry = timed_requests(ends[way], route, way, body, plan.ttfb_requests, warmups=3, stream=True,
                                   figure=first_event_time, key="ttfb_s", timeout=30)
            results.setdefault(route, {})[way] = entry
    return results


def measure_pacing(endpoints: Routes, log: Log) -> dict[str, Any]:
    """Events the fake sends 20 ms apart must reach the client 20 ms apart, not in one batch."""
    delay, deltas, repeats = 0.02, 5, 3
    extra = (("x-fake-event-delay", str(delay)), ("x-fake-deltas", str(deltas)))
    results: dict[str, Any] = {"event_delay_s": delay, "deltas": deltas}
    for route, ends in endpoints.items():
        body = small_body(ROUTE_MODELS[route], stream=True)
        for way in ("direct", "via"):
            log(f"event pacing {route} {way}")
            entry: dict[str, Any] = {"gaps_s": [], "events": [], "errors": []}
            connection = ends[way].connect(timeout=30)
            try:
                for _ in range(repeats):
                    arrivals = Arrivals()
                    try:
                        response = connection.request("POST", "/v1/messages", ends[way].headers(extra), body, arrivals)
                        if problem := check_reply(response, route, way == "via", stream=True):
                            raise ValueError(problem)
                    except (OSError, ValueError) as error:
                        entry["errors"].append(error_text(error))
                        connection.close()
                        continue
                    times = event_times(response, arrivals)
                    entry["events"].append(len(times))
                    entry.setdefault("offsets_ms", []).append([round((t - response.started) * 1000, 2) for t in times])
                    entry["gaps_s"] += [b - a for a, b in zip(times, times[1:])]
            finally:
                connection.close()
            gaps = entry["gaps_s"]
            entry["min_gap_s"] = min(gaps) if gaps else None
            entry["median_gap_s"] = median(gaps)
            results.setdefault(route, {})[way] = entry
    return results


# -- 3. a 2 MB body -----------------------------------------------------------------------------


def with_foreign_thinking(body: bytes) -> bytes:
    """The body with a thinking block the target signed (as cmm marked it) in the assistant turn:
    on its way to Anthropic cmm must blank it and re-sign (the strict fake rejects it otherwise)."""
    block = {"type": "thinking", "thinking": "Let me look at the file. " * 40, "signature": "cmm1.tgt-" + "A" * 300}
    old = b'{"role":"assistant","content":"Please paste it."}'
    new = json.dumps({"role": "assistant", "content": [block, {"type": "text", "text": "Please paste it."}]},
                     separators=(",", ":")).encode()
    assert old in body
    return body.replace(old, new, 1)


def large_body_kinds(route: str) -> list[tuple[str, bytes, tuple[tuple[str, str], ...], bool]]:
    """(kind, body, extra headers, has a direct run) for the 2 MB measurements."""
    body = large_body(ROUTE_MODELS[route], LARGE_BODY_BYTES)
    kinds = [("plain", body, (), True), ("gzip", gzip.compress(body), (("content-encoding", "gzip"),), True)]
    if route == "passthrough":  # no direct run: the fake Anthropic rightly refuses the foreign block
        kinds.append(("foreign thinking", with_foreign_thinking(body), (), False))
    return kinds


def measure_large_body(endpoints: Routes, plan: Plan, log: Log, cpu_of: CpuOf) -> dict[str, Any]:
    """``cpu_of`` as for :func:`measure_wrk`: the CPU time per request of whoever serves."""
    results: dict[str, Any] = {"body_bytes": LARGE_BODY_BYTES}
    for route, ends in endpoints.items():
        for kind, body, extra, has_direct in large_body_kinds(route):
            for way in ("direct", "via") if has_direct else ("via",):
                log(f"2 MB body ({kind}) {route} {way} x{plan.large_requests}")
                cpu = cpu_of["via" if way == "via" else route]
                cpu_before = cpu()
                entry = timed_requests(ends[way], route, way, body, plan.large_requests, extra=extra)
                entry["server_cpu_ms_per_request"] = 1000 * (cpu() - cpu_before) / (plan.large_requests + 1)
                results.setdefault(route, {}).setdefault(kind, {})[way] = entry
    return results


def total_time(response: Response, arrivals: Arrivals) -> float:
    """From the first request byte to the last response byte."""
    return response.finished - response.started


def timed_requests(end: Endpoint, route: str, way: str, body: bytes, count: int, *,
                   extra: tuple[tuple[str, str], ...] = (), warmups: int = 1, stream: bool = False,
                   figure: Callable[[Response, Arrivals], float] = total_time, key: str = "latency_s",
                   timeout: float = 120) -> dict[str, Any]:
    """``count`` sequential POSTs of ``body`` on one connection after ``warmups`` more: each
    reply checked, ``figure`` of each kept under ``key``, and the errors (the connection is then
    renewed). Streamed replies have their pieces' arrival times recorded for ``figure``."""
    entry: dict[str, Any] = {key: [], "errors": [], "bytes": len(body)}
    connection = end.connect(timeout=timeout)
    try:
        for i in range(count + warmups):
            arrivals = Arrivals()
            try:
                response = connection.request("POST", "/v1/messages", end.headers(extra), body,
                                              arrivals if stream else None)
                if problem := check_reply(response, route, way == "via", stream=stream):
                    raise ValueError(problem)
                if i >= warmups:
                    entry[key].append(figure(response, arrivals))
            except (OSError, ValueError) as error:
                entry["errors"].append(error_text(error))
                connection.close()
    finally:
        connection.close()
    entry["median_s"] = median(entry[key])
    return entry


# -- 4. peak RSS against body size ------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: [0] is the state (field 3)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid``: for a cmm master, its workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(proc_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    return sorted(found)


def tree_memory_kib(pid: int) -> dict[str, Any]:
    """VmRSS and VmHWM summed over a cmm master and its workers, and each process's own."""
    each = {str(p): memory_kib(p) for p in [pid, *child_pids(pid)]}
    return {key: sum(v[key] for v in each.values()) for key in ("VmRSS", "VmHWM")} | {"processes": each}


def measure_rss(endpoints: Routes, pid: int, plan: Plan, log: Log) -> dict[str, Any]:
    """Memory of the whole process tree: the workers serve, so their peaks are the ones that grow."""
    results: dict[str, Any] = {"pid": pid, "workers": child_pids(pid), "before_kib": tree_memory_kib(pid), "sizes": {}}
    for size_mb in RSS_SIZES_MB:
        size = size_mb * MB
        log(f"RSS {size_mb} MB body x{plan.rss_requests} per route")
        reset = all([reset_peak(p) for p in [pid, *child_pids(pid)]])
        entry: dict[str, Any] = {"body_bytes": size, "peak_reset": reset, "errors": [], "latency_s": {}}
        entry["start_kib"] = tree_memory_kib(pid)
        for route, ends in endpoints.items():
            body = large_body(ROUTE_MODELS[route], size)
            run = timed_requests(ends["via"], route, "via", body, plan.rss_requests, warmups=0)
            entry["latency_s"][route] = run["latency_s"]
            entry["errors"] += [f"{route}: {error}" for error in run["errors"]]
            del body
        entry["after_kib"] = tree_memory_kib(pid)
        results["sizes"][str(size_mb)] = entry
    return results


def private_kib(pid: int) -> int | None:
    """Memory only this process holds (Private_Clean + Private_Dirty, Linux >= 4.14), in KiB: RSS
    also counts the shared libraries' pages every worker maps (libcrypto, Python itself) again."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))


def idle_footprint(pid: int, stack: Stack) -> dict[str, Any]:
    """RSS (and private memory) of each of cmm's processes once its workers have reported and
    before any load (the route check has served one request each way), and of the upstreams, in KiB."""
    master = memory_kib(pid)["VmRSS"]
    children = {str(p): memory_kib(p)["VmRSS"] for p in child_pids(pid)}
    recorder = {p: kib for p, kib in children.items() if is_recorder(int(p))}  # the usage recorder, not a worker
    workers = {p: kib for p, kib in children.items() if p not in recorder}
    upstreams = {name: memory_kib(process.pid)["VmRSS"] for name, process in stack.processes
                 if name.startswith("fake-")}
    private = {str(p): private_kib(p) for p in [pid, *child_pids(pid)]}
    return {"master_kib": master, "workers_kib": workers, "recorder_kib": recorder,
            "total_kib": master + sum(children.values()), "private_kib": private, "upstreams_kib": upstreams}


def is_recorder(pid: int) -> bool:
    try:
        return b"cmm.daemon.recorder" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def idle_report(idle: dict[str, Any]) -> str:
    private = idle.get("private_kib", {})

    def cell(name: str, pid: str, kib: int) -> str:
        own = private.get(pid)
        return f"{name} {kib / 1024:.1f}" + ("" if own is None else f" ({own / 1024:.1f} private)")

    cells = [cell("master", next(iter(private), ""), idle["master_kib"])]
    cells += [cell(f"worker {pid}", pid, kib) for pid, kib in idle["workers_kib"].items()]
    cells += [cell(f"usage recorder {pid}", pid, kib) for pid, kib in idle.get("recorder_kib", {}).items()]
    return (f"0. Idle RSS of cmm, MiB: {', '.join(cells)}; total {idle['total_kib'] / 1024:.1f} "
            f"({len(idle['workers_kib'])} workers, cmm's default)")


# -- 5. workers and accept spread -------------------------------------------------------------

# (key, label, cmm flags): each configuration gets a cmm of its own, stopped before the next.
WORKER_CONFIGS: tuple[tuple[str, str, list[str]], ...] = (
    ("w0", "--workers 0 (single process)", ["--workers", "0"]),
    ("w1", "--workers 1", ["--workers", "1"]),
    ("w2-shared", "--workers 2 --accept shared", ["--workers", "2", "--accept", "shared"]),
    ("w2-reuseport", "--workers 2 --accept reuseport", ["--workers", "2", "--accept", "reuseport"]),
)
# (run name, route, Connection: close): keep-alive wrk spreads only its 8 accepts; with a new TLS
# connection per request (as a client that does not keep connections alive) every request is one.
SPREAD_RUNS: tuple[tuple[str, str, bool], ...] = (
    ("routed", "routed", False),
    ("passthrough", "passthrough", False),
    ("routed close", "routed", True),
)
SPREAD_LOAD = (2, 8)  # wrk threads, connections: as section 1's c8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cmm_status(cmm: Cmm, timeout: float = 5.0) -> dict[str, Any]:
    """The master's live status: one JSON document on the control socket, then EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(cmm.control_socket))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def worker_requests(status: dict[str, Any]) -> dict[str, int]:
    """Requests per worker ("master" with --workers 0), as the master has counted them so far."""
    workers = status.get("workers")
    if not isinstance(workers, dict):
        return {}
    return {name: int(values.get("requests", 0)) for name, values in workers.items()}


def settled_requests(cmm: Cmm, at_least: int, deadline: float = 5.0) -> dict[str, int]:
    """Per-worker counts once the records of a run have reached the master: at least
    ``at_least`` in all and unchanged over 0.2 s, or whatever there is after ``deadline``."""
    end = time.monotonic() + deadline
    counts = worker_requests(cmm_status(cmm))
    while time.monotonic() < end:
        time.sleep(0.2)
        newer = worker_requests(cmm_status(cmm))
        if newer == counts and sum(counts.values()) >= at_least:
            break
        counts = newer
    return counts


def cpu_seconds(pid: int) -> dict[str, Any]:
    """utime+stime of a cmm master and each of its workers, in seconds. The master's cutime and
    cstime count too, so that a worker that died and was reaped keeps its share."""
    stat = proc_stat(pid)
    master = (int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])) / CLOCK_TICKS
    workers = {}
    for child in child_pids(pid):
        try:
            fields = proc_stat(child)
        except OSError:
            continue
        workers[str(child)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return {"master_s": master, "workers_s": workers, "total_s": master + sum(workers.values())}


def wait_workers(cmm: Cmm, count: int, deadline: float = 15.0) -> list[str]:
    """The workers that have reported to the master, once all ``count`` have (or ``deadline``
    passed). cmm listens before its workers are up; a run that started earlier would hand all
    its keep-alive connections to the first worker ready. A worker reports its first gauges a
    second after it adopted the sockets."""
    end = time.monotonic() + deadline
    while True:
        try:
            reported = sorted(name for name in worker_requests(cmm_status(cmm)) if name != "master")
        except OSError:  # the master listens before its control socket is there
            if time.monotonic() > end:
                raise
            reported = []
        if len(reported) >= count or time.monotonic() > end:
            return reported
        time.sleep(0.1)


def spread_run(cmm: Cmm, ends: dict[str, Endpoint], route: str, close: bool, plan: Plan) -> dict[str, Any]:
    """One wrk run via ``cmm``, with the requests each worker served and the CPU cmm spent."""
    body = small_body(ROUTE_MODELS[route])
    before = worker_requests(cmm_status(cmm))
    received_before = fake_request_count(ends["direct"])
    cpu_before = cpu_seconds(cmm.pid)
    run = run_wrk(ends["via"], body, *SPREAD_LOAD, plan.wrk_seconds, close=close)
    received_after = fake_request_count(ends["direct"])
    if received_before is not None and received_after is not None:
        run["upstream_received"] = received_after - received_before
    if "error" in run:
        return run
    after = settled_requests(cmm, sum(before.values()) + run["requests"])
    cpu_after = cpu_seconds(cmm.pid)  # after the master has logged the last records
    run["worker_requests"] = {name: count - before.get(name, 0) for name, count in sorted(after.items())}
    run["cpu_before"], run["cpu_after"] = cpu_before, cpu_after
    run["cpu_s"] = cpu_after["total_s"] - cpu_before["total_s"]
    run["master_cpu_s"] = cpu_after["master_s"] - cpu_before["master_s"]
    run["workers_restarted"] = sorted(cpu_before["workers_s"]) != sorted(cpu_after["workers_s"])
    return run


def measure_workers(stack: Stack, plan: Plan, log: Log) -> dict[str, Any]:
    """Each configuration of WORKER_CONFIGS in a cmm of its own: throughput, CPU, accept spread."""
    results: dict[str, Any] = {}
    for key, label, args in WORKER_CONFIGS:
        entry: dict[str, Any] = {"label": label, "args": args, "runs": {}, "problems": []}
        results[key] = entry
        cmm = None
        try:
            log(f"cmm {label}: starting")
            cmm = stack.start_cmm(f"cmm-{key}", args)
            entry.update(port=cmm.port, pid=cmm.pid)
            endpoints = stack.endpoints(cmm)
            count = int(args[args.index("--workers") + 1])
            if len(ready := wait_workers(cmm, count)) < count:
                raise RuntimeError(f"only {len(ready)} of {count} workers reported to the master: {ready}")
            entry["problems"] += route_check(endpoints)["problems"]
            for name, route, close in SPREAD_RUNS:
                log(f"wrk {name} via cmm {label} -t{SPREAD_LOAD[0]} -c{SPREAD_LOAD[1]} -d{plan.wrk_seconds}s")
                entry["runs"][name] = spread_run(cmm, endpoints[route], route, close, plan)
            entry["status"] = cmm_status(cmm)
            entry["worker_pids"] = child_pids(cmm.pid)
        except Exception as error:  # one broken configuration must not hide the others
            entry["error"] = error_text(error)
            log(f"cmm {label} failed: {error_text(error)}")
        finally:
            if cmm is not None:
                stack.stop(cmm)
                entry["cmm_output"] = scan_cmm_output(stack.log_path(cmm.name),
                                                      wrk_connections=SPREAD_LOAD[1] * len(SPREAD_RUNS))
    return results


# -- reading usage: what it costs passthrough throughput -------------------------------------------

USAGE_OFF = BENCH_DIR / "usage_off"  # its sitecustomize takes the usage reader out of a cmm
USAGE_ROUNDS = 8  # rounds of wrk runs, one through each cmm
USAGE_WAYS = ("with", "without", "control")
USAGE_TOKENS = re.compile(r" in=\d+ ")  # a request log line with the answer's token counts


def measure_usage_throughput(stack: Stack, plan: Plan, log: Log) -> dict[str, Any]:
    """Small passthrough requests/s through two fresh cmms that differ only in the usage reader
    (``without`` runs bench/usage_off), and through a third, ``control``, the same as ``with``:
    its ratio to ``with`` shows what two alike cmms differ by on this machine. The runs rotate
    through the three, a round at a time, so that a drifting machine moves all alike; each figure
    is the median of the rounds' ratios. The logs are checked: token counts in two, none in one."""
    rounds, seconds = (3, 2) if plan.wrk_seconds < 10 else (USAGE_ROUNDS, 3)
    off_env = {"CMM_BENCH_USAGE_OFF": "1",
               "PYTHONPATH": os.pathsep.join([str(USAGE_OFF), checkout_env()["PYTHONPATH"]])}
    cmms: dict[str, Cmm] = {}
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in USAGE_WAYS}
    try:
        for way in USAGE_WAYS:
            cmms[way] = stack.start_cmm(f"cmm-usage-{way}", [], env=off_env if way == "without" else None)
        for way, cmm in cmms.items():
            if len(ready := wait_workers(cmm, DEFAULT_WORKERS)) < DEFAULT_WORKERS:
                raise RuntimeError(f"{way}: only {len(ready)} of {DEFAULT_WORKERS} workers reported: {ready}")
        ends = {way: stack.endpoints(cmm)["passthrough"]["via"] for way, cmm in cmms.items()}
        body = small_body(PASSTHROUGH_MODEL)
        for number in range(rounds):
            for way in USAGE_WAYS[number % 3:] + USAGE_WAYS[:number % 3]:
                log(f"usage round {number + 1} of {rounds}, {way}: wrk passthrough -t2 -c8 -d{seconds}s")
                before = cpu_seconds(cmms[way].pid)["total_s"]
                run = run_wrk(ends[way], body, 2, 8, seconds)
                run["cmm_cpu_s"] = cpu_seconds(cmms[way].pid)["total_s"] - before
                runs[way].append(run)
    finally:
        for cmm in cmms.values():
            stack.stop(cmm)
    rps = {way: [run.get("rps") or 0.0 for run in each] for way, each in runs.items()}
    cpu_us = {way: [run["cmm_cpu_s"] / run["requests"] * 1e6 if run.get("requests") else 0.0 for run in each]
              for way, each in runs.items()}
    ratios = {"cost": [w / o for w, o in zip(rps["with"], rps["without"]) if o],
              "control": [c / w for c, w in zip(rps["control"], rps["with"]) if w]}
    # cmm's CPU per request, each round's with the reader less the same round's without it (and the control's)
    added = {"cost": [w - o for w, o in zip(cpu_us["with"], cpu_us["without"])],
             "control": [c - w for c, w in zip(cpu_us["control"], cpu_us["with"])]}
    counted = {way: sum(1 for line in (cmm.config / "cmm.log").read_text(errors="replace").splitlines()
                        if USAGE_TOKENS.search(line)) for way, cmm in cmms.items()}
    problems = [f"usage: wrk errors through the cmm {way} the reader" for way, each in runs.items()
                if any(run.get("error") or run.get("error_count") for run in each)]
    if not counted["with"] or not counted["control"] or counted["without"]:
        problems.append(f"usage: log lines with token counts: {counted} (expected none only without the reader)")
    return {"rounds": rounds, "seconds": seconds, "rps": rps, "ratios": ratios, "counted": counted,
            "cpu_us": cpu_us, "added_cpu_us": added, "median_cpu_us": {way: median(each) for way, each in cpu_us.items()},
            "median_added_cpu_us": {name: median(each) for name, each in added.items()},
            "median_rps": {way: median(each) for way, each in rps.items()},
            "ratio": {name: median(each) if each else None for name, each in ratios.items()}, "problems": problems}


def usage_throughput_report(u: dict[str, Any]) -> list[str]:
    def spread(values: list[float]) -> str:
        return f"{min(values):.3f}-{max(values):.3f}" if values else "n/a"

    rows = []
    for name, label, base in (("cost", "with / without", "without"), ("control", "control / with", "with")):
        ratio, added, cpu = u["ratio"][name], u["median_added_cpu_us"][name], u["median_cpu_us"][base]
        rows.append([label, fmt(ratio, ".3f"), spread(u["ratios"][name]),
                     f"{(1 - ratio) * 100:+.1f} %" if ratio is not None else "n/a", fmt(added, "+.1f"),
                     f"{added / cpu * 100:+.1f} %" if added is not None and cpu else "n/a"])
    rates = ", ".join(f"{way} {fmt(value)}" for way, value in u["median_rps"].items())
    cpus = ", ".join(f"{way} {fmt(value)}" for way, value in u["median_cpu_us"].items())
    return [f"   Reading usage, end to end: small passthrough requests (wrk -t2 -c8 -d{u['seconds']}s), {u['rounds']} "
            "rounds through three fresh cmms: with the reader, without it",
            f"   (bench/usage_off), and a control like the first. Median req/s: {rates}; median cmm CPU us/request "
            f"(master, workers, recorder): {cpus}",
            table(["ratio", "req/s ratio", "rounds' range", "throughput cost", "CPU us/req added", "CPU cost"], rows),
            ""]


# -- 6. opt-in: scaling, open streams, soak ----------------------------------------------------

# Not part of the default run (they take long or need many file descriptors); each has a flag.

FULL_STREAMS = (10, 100, 1000, 10000)
FULL_SOAK_S = 600
SCALING_CONNECTIONS = (1, 4, 16, 64)
SCALING_SECONDS = 3


@dataclass(frozen=True)
class Extras:
    """Which opt-in measurements to run: --scaling, --streams N[,N...], --soak SECONDS."""

    scaling: bool = False
    streams: tuple[int, ...] = ()
    soak_seconds: int = 0
    only: bool = False  # skip sections 1-5

    @property
    def any(self) -> bool:
        return self.scaling or bool(self.streams) or self.soak_seconds > 0

    def wrk_connections(self) -> int:
        """How many wrk connections these runs cut at their ends (for scan_cmm_output)."""
        scaling = sum(SCALING_CONNECTIONS) if self.scaling else 0
        soak = (2 + SOAK_CALIBRATIONS) * SOAK_LOAD[1] if self.soak_seconds else 0  # peak, calibrations, soak
        return scaling + soak


def measure_scaling(endpoints: Routes, log: Log) -> dict[str, Any]:
    """Small routed requests at 1 to 64 connections, direct and via cmm: how the cost grows with
    concurrency (a ratio that falls as connections rise points at per-connection cost in cmm)."""
    ends = endpoints["routed"]
    body = small_body(ROUTED_MODEL)
    results: dict[str, Any] = {"seconds": SCALING_SECONDS, "runs": {}}
    for connections in SCALING_CONNECTIONS:
        threads = min(2, connections)
        for way in ("direct", "via"):
            log(f"scaling routed {way} -t{threads} -c{connections} -d{SCALING_SECONDS}s")
            before = fake_request_count(ends["direct"])
            run = run_wrk(ends[way], body, threads, connections, SCALING_SECONDS)
            after = fake_request_count(ends["direct"])
            if before is not None and after is not None:
                run["upstream_received"] = after - before
            results["runs"].setdefault(str(connections), {})[way] = run
    results["sizes"] = measure_sizes(endpoints, log)
    return results


# Body sizes for latency against size, with the requests timed at each (after one warm-up).
SCALING_SIZES: tuple[tuple[int, int], ...] = ((1_000, 10), (64_000, 10), (1 * MB, 5), (8 * MB, 3), (32 * MB, 3))


def measure_sizes(endpoints: Routes, log: Log) -> dict[str, Any]:
    """Latency against body size, 1 KB to 32 MB, each route direct and via cmm: how the cost
    per byte grows (the thinking-block scan covers passthrough bodies up to 8 MiB)."""
    results: dict[str, Any] = {}
    for size, count in SCALING_SIZES:
        for route, ends in endpoints.items():
            body = large_body(ROUTE_MODELS[route], size)
            for way in ("direct", "via"):
                log(f"body size {size:,} bytes {route} {way} x{count}")
                entry = timed_requests(ends[way], route, way, body, count)
                results.setdefault(str(size), {}).setdefault(route, {})[way] = entry
    return results


# Each stream: message_start at once, then STREAM_DELTAS deltas STREAM_EVENT_DELAY s apart, so it
# stays open ~20 s: long enough for 2,000 to be open at the same time on this machine.
STREAM_DELTAS = 40
STREAM_EVENT_DELAY = 0.5
# Many streams take long to open (handshakes), and their events must not swamp the machine
# meanwhile: beyond STREAM_EVENT_RATE events a second in all, events come further apart, and a
# stream stays open one second per STREAMS_PER_SECOND streams (at least the 20 s above).
STREAM_EVENT_RATE = 2000
STREAMS_PER_SECOND = 100
STREAM_OPENING = 50  # TLS handshakes in flight at once: 2,000 at once only measure a handshake storm
STREAM_END = b'data: {"type":"message_stop"}'
FD_MARGIN = 64  # descriptors a process needs besides those of the streams
CMM_MAX_CONNECTIONS = 1024  # cmm's default --max-connections; the streams run raises it above its count


def stream_counts(text: str) -> tuple[int, ...]:
    """--streams: "2000" or "10,100,1000,2000"."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or a comma-separated list of numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"stream counts must be at least 1: {text!r}")
    return tuple(sorted(set(counts)))  # smallest first: memory a larger run leaves behind would hide a smaller one's


def stream_pacing(total: int) -> tuple[int, float]:
    """(deltas, seconds between events) per stream: the first stream still open when the last
    one starts, and all of them together sending at most STREAM_EVENT_RATE events a second."""
    delay = max(STREAM_EVENT_DELAY, total / STREAM_EVENT_RATE)
    hold = max(STREAM_DELTAS * STREAM_EVENT_DELAY, total / STREAMS_PER_SECOND)
    return max(1, round(hold / delay)), delay


def stream_connections(streams: tuple[int, ...]) -> int:
    """--max-connections for cmm: every stream may land on one worker."""
    return max(streams, default=0) + FD_MARGIN


def cmm_max_connections(streams: tuple[int, ...]) -> int:
    """--max-connections for the streams run: room for every stream in one worker where the
    open-file limit allows it, else what the limit allows (cmm's own reserve is 256)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return stream_connections(streams)
    return min(stream_connections(streams), (soft - 256) // 2)


def raise_fd_limit(streams: int = 0) -> tuple[int, int]:
    """RLIMIT_NOFILE up to what ``streams`` open streams need, before the stack starts so the fakes
    and cmm inherit it too (each open stream costs cmm two descriptors, the fake one; cmm asks
    for 2 x --max-connections + its reserve). The hard limit is raised where this process may
    (root); otherwise the soft one goes up to the hard one. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * stream_connections((streams,)) + 1024
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass  # not root: the hard limit stays
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def check_fd_limit(streams: int) -> str | None:
    """Why ``streams`` connections cannot stay open under this limit, or None. This process and the
    upstream need one descriptor per stream; cmm, which inherits the limit, two (client and
    upstream) per stream a process holds: its workers share the streams, so each needs its share
    of them (``cmm_max_connections`` caps each worker within the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    workers = max(1, DEFAULT_WORKERS)
    need = max(streams, 2 * -(-streams // workers)) + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < need:
        return (f"--streams {streams} needs {need} file descriptors but RLIMIT_NOFILE is {soft} (hard {hard}); "
                f"raise the hard limit (ulimit -Hn {need * 3}, as root) and run again")
    return None


def open_files_limit(pid: int) -> str | None:
    """The 'Max open files' soft limit of a process, as /proc shows it."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    except OSError:
        pass
    return None


@dataclass
class StreamCounts:
    """What the concurrent streams have got to, shared by their tasks (one event loop)."""

    streaming: int = 0  # first event (message_start) received
    finished: int = 0  # read to the end with message_stop
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    all_streaming: asyncio.Event = field(default_factory=asyncio.Event)


def stream_request(endpoint: Endpoint, deltas: int, delay: float) -> bytes:
    body = small_body(ROUTED_MODEL, stream=True)
    extra = (("x-fake-deltas", str(deltas)), ("x-fake-event-delay", f"{delay:g}"),
             ("connection", "close"))
    lines = ["POST /v1/messages HTTP/1.1", *(f"{k}: {v}" for k, v in endpoint.headers(extra)),
             f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_until(reader: asyncio.StreamReader, buffer: bytearray, marker: bytes) -> None:
    """Read into ``buffer`` until ``marker`` is in it; searching only the new tail keeps it linear."""
    while marker not in buffer[-(len(marker) + 65536):]:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError(f"closed by cmm before {marker[:40]!r}")
        buffer += chunk


async def one_stream(endpoint: Endpoint, request: bytes, gate: asyncio.Semaphore, total: int,
                     counts: StreamCounts) -> None:
    """One routed stream via cmm: open it (at most STREAM_OPENING at a time), note its first event,
    then read it to message_stop and the end of the chunked body (or cmm's close)."""
    writer = None
    try:
        async with gate:
            reader, writer = await asyncio.open_connection(LOOPBACK, endpoint.port, ssl=endpoint.tls,
                                                           server_hostname=ANTHROPIC_NAME, limit=1 << 20)
            writer.write(request)
            await writer.drain()
        buffer = bytearray()
        await read_until(reader, buffer, b"event: message_start")
        head = bytes(buffer[:buffer.find(b"\r\n\r\n")]).lower()
        if not head.startswith(b"http/1.1 200") or b"x-fake-provider: target" not in head:
            raise ValueError(f"unexpected reply head {head[:200]!r}")
        counts.streaming += 1
        if counts.streaming == total:
            counts.all_streaming.set()
        await read_until(reader, buffer, STREAM_END)
        while not buffer.endswith(b"\r\n0\r\n\r\n") and (chunk := await reader.read(65536)):
            buffer += chunk  # the rest of the last event and the end of the chunked body
        counts.finished += 1
    except (OSError, ValueError, ssl.SSLError, asyncio.IncompleteReadError) as error:
        counts.failed += 1
        counts.errors.append(error_text(error))
        if counts.streaming + counts.failed >= total:
            counts.all_streaming.set()  # no more will start: stop waiting
    finally:
        if writer is not None:
            writer.close()


async def hold_streams(endpoint: Endpoint, total: int, pid: int, upstream_pid: int, log: Log) -> dict[str, Any]:
    """Open ``total`` streams at once, read cmm's RSS (and the upstream's, for the direct figure)
    when all are streaming, then finish them."""
    counts = StreamCounts()
    gate = asyncio.Semaphore(STREAM_OPENING)
    deltas, delay = stream_pacing(total)
    request = stream_request(endpoint, deltas, delay)
    hold = deltas * delay
    entry: dict[str, Any] = {"streams": total, "deltas": deltas, "event_delay_s": delay, "idle_kib": tree_memory_kib(pid),
                             "upstream_idle_kib": memory_kib(upstream_pid)}
    started = time.monotonic()
    tasks = [asyncio.create_task(one_stream(endpoint, request, gate, total, counts)) for _ in range(total)]
    try:
        await asyncio.wait_for(counts.all_streaming.wait(), timeout=hold + 60)
    except asyncio.TimeoutError:
        pass
    entry["open_s"] = time.monotonic() - started
    entry["open_kib"] = tree_memory_kib(pid)
    entry["upstream_open_kib"] = memory_kib(upstream_pid)
    entry["streaming_at_read"] = counts.streaming
    entry["open_at_read"] = counts.streaming - counts.finished
    log(f"streams x{total}: {counts.streaming} streaming after {entry['open_s']:.1f} s "
        f"({entry['open_at_read']} open), RSS {entry['open_kib']['VmRSS'] / 1024:.1f} MiB")
    done, pending = await asyncio.wait(tasks, timeout=hold + 120)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    entry["all_s"] = time.monotonic() - started
    entry.update(finished=counts.finished, failed=counts.failed, timed_out=len(pending), errors=counts.errors[:50],
                 error_count=len(counts.errors))
    entry["after_kib"] = tree_memory_kib(pid)
    return entry


def measure_streams(endpoints: Routes, pid: int, upstream_pid: int, sizes: tuple[int, ...], log: Log) -> dict[str, Any]:
    """Memory per open stream: cmm's RSS (master + workers) with N routed streams open, over the
    idle RSS just before; then every stream must still finish with message_stop."""
    results: dict[str, Any] = {"deltas": STREAM_DELTAS, "event_delay_s": STREAM_EVENT_DELAY,
                               "opening": STREAM_OPENING, "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                               "cmm_open_files": {str(p): open_files_limit(p) for p in [pid, *child_pids(pid)]},
                               "sizes": {}}
    for total in sizes:
        if problem := check_fd_limit(total):
            raise RuntimeError(problem)
        log("streams x{} via cmm (routed, {} deltas {:g} s apart)".format(total, *stream_pacing(total)))
        results["sizes"][str(total)] = asyncio.run(hold_streams(endpoints["routed"]["via"], total, pid, upstream_pid,
                                                                log))
        time.sleep(1)  # let cmm drop the closed connections before the next idle reading
    return results


SOAK_LOAD = (2, 8)  # wrk threads, connections: the peak run and the paced soak alike
SOAK_SAMPLE_S = 10
SOAK_CALIBRATIONS = 3  # 3 s paced runs at most, to find the pause that gives half the peak rate


def soak_delay_ms(peak: dict[str, Any], trial: dict[str, Any], first_delay: float) -> float:
    """Per-request pause (post.lua's delay()) that should bring 8 connections to half the peak rate:
    each connection makes one request per latency + delay, so take the latency the trial run at
    ``first_delay`` implies and pause for what is left of connections / target."""
    target = peak["rps"] / 2
    per_request_s = SOAK_LOAD[1] / trial["rps"]
    latency_s = max(0.0, per_request_s - first_delay / 1000)
    return max(0.0, (SOAK_LOAD[1] / target - latency_s) * 1000)


def run_wrk_sampled(endpoint: Endpoint, body: bytes, seconds: int, delay_ms: float, pid: int,
                    log: Log) -> tuple[dict[str, Any], list[tuple[float, int]]]:
    """A paced wrk run of ``seconds`` while sampling cmm's RSS every SOAK_SAMPLE_S (first at 2 s)."""
    samples: list[tuple[float, int]] = []
    result: dict[str, Any] = {}
    started = time.monotonic()

    def sample() -> None:
        samples.append((time.monotonic() - started, tree_memory_kib(pid)["VmRSS"]))

    def sampler() -> None:
        next_at = 2.0
        while not stop.wait(max(0.0, next_at - (time.monotonic() - started))):
            sample()
            log(f"soak {samples[-1][0]:.0f} s: cmm RSS {samples[-1][1] / 1024:.1f} MiB")
            next_at = (int(next_at) // SOAK_SAMPLE_S + 1) * SOAK_SAMPLE_S

    stop = threading.Event()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        result = run_wrk(endpoint, body, *SOAK_LOAD, seconds, delay_ms=delay_ms)
    finally:
        stop.set()
        thread.join()
    sample()  # the end: wrk has stopped, nothing in flight
    return result, samples


def measure_soak(endpoints: Routes, pid: int, seconds: int, log: Log) -> dict[str, Any]:
    """The peak routed rate, then a long run at about half of it (wrk -R is not in Debian's wrk:
    post.lua pauses between requests instead): errors, the rate achieved, and cmm's RSS growth."""
    ends = endpoints["routed"]
    body = small_body(ROUTED_MODEL)
    log(f"soak: peak rate, wrk routed via -t{SOAK_LOAD[0]} -c{SOAK_LOAD[1]} -d3s")
    peak = run_wrk(ends["via"], body, *SOAK_LOAD, 3)
    if "error" in peak:
        return {"peak": peak, "error": f"peak run failed: {peak['error']}"}
    delay, trials = SOAK_LOAD[1] / (peak["rps"] / 2) * 1000, []
    for _ in range(SOAK_CALIBRATIONS):  # wrk's timers are coarse: correct the pause until it hits the rate
        log(f"soak: calibrating the pause, {delay:.1f} ms per request per connection, 3 s")
        trial = run_wrk(ends["via"], body, *SOAK_LOAD, 3, delay_ms=delay)
        trials.append(trial | {"delay_ms": delay})
        if "error" in trial or not trial["rps"] or abs(trial["rps"] / (peak["rps"] / 2) - 1) < 0.05:
            break
        delay = soak_delay_ms(peak, trial, delay)
    log(f"soak: {seconds} s at ~{peak['rps'] / 2:.0f} req/s (pause {delay:.1f} ms)")
    before = fake_request_count(ends["direct"])
    idle = tree_memory_kib(pid)["VmRSS"]
    run, samples = run_wrk_sampled(ends["via"], body, seconds, delay, pid, log)
    after = fake_request_count(ends["direct"])
    if before is not None and after is not None:
        run["upstream_received"] = after - before
    return {"peak": peak, "trials": trials, "delay_ms": delay, "target_rps": peak["rps"] / 2, "seconds": seconds,
            "run": run, "idle_kib": idle, "rss_samples": samples}


# -- the opt-in reports --


def scaling_report(scaling: dict[str, Any], problems: list[str]) -> str:
    rows = []
    for connections, ways in scaling["runs"].items():
        d, v = ways["direct"], ways["via"]
        rows.append([connections, fmt(d.get("rps")), fmt(v.get("rps")), fmt(ratio(v.get("rps"), d.get("rps")), ".2f"),
                     fmt(percentile_ms(d, 50), ".2f"), fmt(percentile_ms(v, 50), ".2f"), wrk_errors(d), wrk_errors(v)])
        for way, run in ways.items():
            problems += wrk_problems(run, f"scaling c{connections} {way}", "routed")
    size_rows = []
    for size, routes in scaling.get("sizes", {}).items():
        for route, ways in routes.items():
            d, v = ms(ways["direct"]["median_s"]), ms(ways["via"]["median_s"])
            size_rows.append([f"{int(size):,}", route, fmt(d, ".1f"), fmt(v, ".1f"), fmt(diff(v, d), "+.1f"),
                              fmt(ratio(v, d), ".2f"), f"{len(ways['direct']['errors'])} / {len(ways['via']['errors'])}"])
            for way in ("direct", "via"):
                for error in ways[way]["errors"][:3]:
                    problems.append(f"body size {size} {route} {way}: {error}")
    return "\n".join([
        f"6. Scaling: small routed request, wrk -t(min(2, c)) -c(c) -d{scaling['seconds']}s, keep-alive",
        table(["connections", "direct req/s", "via req/s", "via/direct", "direct p50 ms", "via p50 ms",
               "errors direct", "errors via"], rows),
        "",
        "   Latency against body size (model first; sequential requests on one connection after a warm-up: "
        + ", ".join(f"{count} at {size:,} B" for size, count in SCALING_SIZES) + "), median ms",
        table(["body bytes", "route", "direct", "via", "added", "via/direct", "errors d / v"], size_rows),
    ])


def wrk_problems(run: dict[str, Any], where: str, route: str) -> list[str]:
    if "error" in run:
        return [f"wrk {where}: {run['error']}"]
    found = []
    if run["error_count"]:
        found.append(f"wrk {where}: errors {run['errors']} in {run['requests']} requests")
    if run.get("upstream_received", run["requests"]) < run["requests"]:
        found.append(f"wrk {where}: {run['requests']} responses but the {route} upstream received only "
                     f"{run['upstream_received']} requests")
    return found


def upstream_kb_per_stream(entry: dict[str, Any]) -> float | None:
    """The upstream's own RSS per open stream (the direct figure beside cmm's), in KB."""
    if "upstream_open_kib" not in entry:
        return None
    return (entry["upstream_open_kib"]["VmRSS"] - entry["upstream_idle_kib"]["VmRSS"]) * 1.024 / entry["streams"]


def streams_report(streams: dict[str, Any], problems: list[str]) -> str:
    rows = []
    for total, e in streams["sizes"].items():
        n = int(total)
        idle, held = e["idle_kib"]["VmRSS"], e["open_kib"]["VmRSS"]
        rows.append([total, f"{e['open_s']:.1f}", str(e["open_at_read"]), f"{idle / 1024:.1f}", f"{held / 1024:.1f}",
                     f"{(held - idle) / n:.1f}", fmt(upstream_kb_per_stream(e), ".1f"),
                     f"{e['after_kib']['VmRSS'] / 1024:.1f}",
                     f"{e['finished']} / {n}", str(e["failed"] + e["timed_out"])])
        if e["open_at_read"] < n:
            problems.append(f"streams x{total}: only {e['open_at_read']} of {n} open when RSS was read "
                            f"({e['streaming_at_read']} had started, in {e['open_s']:.1f} s)")
        if e["finished"] < n:
            problems.append(f"streams x{total}: {e['finished']} of {n} completed with message_stop "
                            f"({e['failed']} failed, {e['timed_out']} timed out); e.g. {e['errors'][:2]}")
    limits = ", ".join(f"{v}" for v in streams["cmm_open_files"].values())
    return "\n".join([
        "7. Concurrent open streams via cmm (routed; each: " + ", ".join(
            f"x{n}: {e.get('deltas', '?')} deltas {e.get('event_delay_s', '?')} s apart" for n, e in streams["sizes"].items())
        + f"; at most {streams['opening']} handshakes at a time). RSS: master + workers, MiB;",
        f"   KiB/stream = (RSS with all open - idle RSS before) / streams. Open-files limit of cmm's processes: "
        f"{limits}.",
        table(["streams", "opened in s", "open at read", "idle RSS", "RSS all open", "KiB/stream", "upstream KB/stream",
               "RSS after",
               "message_stop", "failed"], rows),
    ])


def soak_report(soak: dict[str, Any], problems: list[str]) -> str:
    if "error" in soak:
        problems.append(f"soak: {soak['error']}")
        return f"8. Soak: {soak['error']}"
    run = soak["run"]
    problems += wrk_problems(run, "soak", "routed")
    samples = soak["rss_samples"]
    start, end = samples[0][1], samples[-1][1]
    growth = 100 * (end - start) / start
    peak_rss = max(s[1] for s in samples)
    row = [f"{soak['seconds']} s", fmt(soak["peak"]["rps"]), fmt(soak["target_rps"]), fmt(run.get("rps")),
           fmt(ratio(run.get("rps"), soak["peak"]["rps"]), ".2f"), str(run.get("requests", "n/a")), wrk_errors(run),
           f"{soak['idle_kib'] / 1024:.1f}", f"{start / 1024:.1f}", f"{end / 1024:.1f}", f"{peak_rss / 1024:.1f}",
           f"{growth:+.1f}%"]
    if growth >= 5:
        problems.append(f"soak: cmm's RSS grew {growth:.1f}% ({start / 1024:.1f} -> {end / 1024:.1f} MiB)")
    cells = [f"{t:.0f}s:{kib / 1024:.1f}" for t, kib in samples[:-1]] + [f"end:{end / 1024:.1f}"]
    trace = "\n     ".join("  ".join(cells[i:i + 10]) for i in range(0, len(cells), 10))  # 10 a line
    return "\n".join([
        f"8. Soak: small routed request via cmm at about half the peak rate (peak: wrk -t{SOAK_LOAD[0]} "
        f"-c{SOAK_LOAD[1]} -d3s; soak: the same connections, each pausing {soak['delay_ms']:.1f} ms",
        "   between requests (post.lua's delay(); Debian's wrk has no -R), calibrated by "
        f"{len(soak['trials'])} 3 s run(s)). "
        f"RSS: master + workers, MiB; start = {samples[0][0]:.0f} s into the run, end = after it.",
        table(["duration", "peak req/s", "target req/s", "achieved req/s", "of peak", "requests", "errors",
               "idle RSS", "RSS start", "RSS end", "RSS max", "growth"], [row]),
        f"   RSS samples (s: MiB):\n     {trace}",
    ])


# -- the report -------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Plain-text columns: the first ``left`` left-aligned (text), the rest right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def wrk_errors(run: dict[str, Any]) -> str:
    if "error" in run:
        return "FAILED"
    if not run["error_count"]:
        return "0"
    return "!! " + ",".join(f"{k}={v}" for k, v in run["errors"].items() if v)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def percentile_ms(run: dict[str, Any], q: int) -> float | None:
    return run["latency_us"]["percentiles"][str(q)] / 1000 if "latency_us" in run else None


STAGE_LABELS = {"mark_search_s": "mark search (floor)", "neutralise_agentic_s": "neutralise, agentic",
                "unmark_agentic_s": "unmark, agentic", "mark_search_agentic_s": "mark search, agentic (floor)"}


def report(results: dict[str, Any], plan: Plan) -> tuple[str, list[str]]:
    """The printed table, and the list of problems found (also part of the table)."""
    problems: list[str] = []
    out = [
        "cmm benchmark: one run on a shared machine "
        f"({os.cpu_count()} CPUs shared by wrk, the fakes and cmm).",
        "Latencies are medians unless marked; compare ratios and differences, not absolute numbers.",
    ]
    machine = results.get("machine", {})
    if "load_after" in machine:  # anything else running skews the figures: say how busy the machine was
        out.append("Load average (1, 5, 15 min) before the run: {}; after: {}.".format(
            *(", ".join(f"{x:.2f}" for x in machine[k]) for k in ("load_before", "load_after"))))
    out.append("")
    if "idle" in results:
        out.append(idle_report(results["idle"]))
        out.append("")
    m = results["measurements"]

    if "wrk" in m:
        rows, lat_rows = [], []
        for route, loads in m["wrk"].items():
            d, v = loads["c8"]["direct"], loads["c8"]["via"]
            rows.append([route, fmt(d.get("rps")), fmt(v.get("rps")), fmt(ratio(v.get("rps"), d.get("rps")), ".2f"),
                         fmt(d.get("server_cpu_ms_per_request"), ".2f"), fmt(v.get("server_cpu_ms_per_request"), ".2f"),
                         wrk_errors(d), wrk_errors(v)])
            d1, v1 = loads["c1"]["direct"], loads["c1"]["via"]
            p = {(w, q): percentile_ms(r, q) for w, r in (("d", d1), ("v", v1)) for q in (50, 99)}
            lat_rows.append([route])
            for q in (50, 99):
                lat_rows[-1] += [fmt(p["d", q], ".2f"), fmt(p["v", q], ".2f"), fmt(diff(p["v", q], p["d", q]), "+.2f")]
            lat_rows[-1] += [wrk_errors(d1), wrk_errors(v1)]
            for load in ("c8", "c1"):
                for way in ("direct", "via"):
                    run = loads[load][way]
                    if "error" in run:
                        problems.append(f"wrk {route} {way} {load}: {run['error']}")
                    elif run["error_count"]:
                        problems.append(f"wrk {route} {way} {load}: errors {run['errors']} "
                                        f"in {run['requests']} requests")
                    if run.get("upstream_received", run.get("requests", 0)) < run.get("requests", 0):
                        problems.append(f"wrk {route} {way} {load}: {run['requests']} responses but the "
                                        f"{route} upstream received only {run['upstream_received']} requests")
        problems += headroom_problems(m["wrk"])
        main = results.get("cmm", {})
        out.append(f"   Upstream: {results.get('upstream', 'fast')}; it must answer at least {UPSTREAM_HEADROOM:.0f}x "
                   "faster than cmm or the ratios measure the upstream: " + ", ".join(
                       f"{route} {fmt(headroom(loads), '.1f')}x" for route, loads in m["wrk"].items()))
        out.append(f"1. Throughput, small request (wrk -t2 -c8 -d{plan.wrk_seconds}s, keep-alive POST); "
                   f"cmm with its defaults ({main.get('workers', '?')} workers, --accept shared)")
        out.append("   CPU ms/request: the fake's own for direct, cmm's (master + workers) for via.")
        out.append(table(["route", "direct req/s", "via cmm req/s", "via/direct", "fake CPU ms/req", "cmm CPU ms/req",
                          "errors direct", "errors via"], rows))
        out.append("")
        out.append(f"   Latency at one connection (wrk -t1 -c1 -d{plan.wrk_seconds}s --latency), ms")
        out.append(table(["route", "direct p50", "via p50", "added p50", "direct p99", "via p99", "added p99",
                          "errors direct", "errors via"], lat_rows))
        out.append("")

    if "websocket" in m:
        out.append("WebSocket tunnel (echo on the voice path, one connection each way)")
        out.append(table(websocket_bench.HEADERS, websocket_bench.rows(m["websocket"])))
    if "streaming" in m:
        rows = []
        for route, ways in m["streaming"].items():
            d, v = ms(ways["direct"]["median_s"]), ms(ways["via"]["median_s"])
            rows.append([route, fmt(d, ".2f"), fmt(v, ".2f"), fmt(diff(v, d), "+.2f"),
                         f"{len(ways['direct']['errors'])} / {len(ways['via']['errors'])}"])
            for way in ("direct", "via"):
                for error in ways[way]["errors"][:3]:
                    problems.append(f"streaming {route} {way}: {error}")
        out.append(f"2. Streaming time to first event (message_start), {plan.ttfb_requests} sequential requests "
                   "on one keep-alive connection, ms")
        out.append(table(["route", "direct median", "via median", "added median", "errors d / v"], rows))
    if "pacing" in m:
        pacing = m["pacing"]
        expected = pacing["event_delay_s"] * 1000
        rows = []
        for route in ROUTE_MODELS:
            for way in ("direct", "via"):
                e = pacing[route][way]
                low = ms(e["min_gap_s"])
                verdict = "n/a" if low is None else ("ok" if low >= expected * 0.5 else "!! BATCHED")
                rows.append([f"{route} {way}", fmt(low, ".1f"), fmt(ms(e["median_gap_s"]), ".1f"),
                             ",".join(map(str, sorted(set(e["events"])))) or "0", verdict])
                if verdict.startswith("!!"):
                    problems.append(f"pacing {route} {way}: events batched, minimum gap {low:.1f} ms")
                for error in e["errors"][:3]:
                    problems.append(f"pacing {route} {way}: {error}")
        out.append("")
        out.append(f"   Event pacing (x-fake-event-delay {pacing['event_delay_s']} s, {pacing['deltas']} deltas; "
                   f"every gap should be ~{expected:.0f} ms)")
        out.append(table(["route", "min gap ms", "median gap ms", "events/reply", "verdict"], rows))
        out.append("")

    if "large_body" in m:
        rows = []
        for route in ROUTE_MODELS:
            plain_direct = ms(m["large_body"][route]["plain"]["direct"]["median_s"])
            for kind, ways in m["large_body"][route].items():
                d = ms(ways["direct"]["median_s"]) if "direct" in ways else None
                v = ms(ways["via"]["median_s"])
                against = d if d is not None else plain_direct  # foreign blocks: against the plain direct run
                samples = [x * 1000 for x in ways["via"]["latency_s"]]
                errors = f"{len(ways['direct']['errors']) if 'direct' in ways else '-'} / {len(ways['via']['errors'])}"
                rows.append([route, kind, f"{ways['via']['bytes']:,}", fmt(d, ".1f"), fmt(v, ".1f"),
                             fmt(diff(v, against), "+.1f"), fmt(ratio(v, against), ".2f"),
                             fmt(min(samples, default=None), ".1f"), fmt(max(samples, default=None), ".1f"),
                             fmt(ways.get("direct", {}).get("server_cpu_ms_per_request"), ".1f"),
                             fmt(ways["via"].get("server_cpu_ms_per_request"), ".1f"), errors])
                for way in ("direct", "via"):
                    for error in ways.get(way, {}).get("errors", [])[:3]:
                        problems.append(f"2 MB body ({kind}) {route} {way}: {error}")
        out.append(f"3. 2 MB body (2,000,000 bytes decoded, model first), {plan.large_requests} sequential requests, "
                   "request start to last response byte, ms. gzip: the same body compressed (cmm decodes it to find "
                   "the model). foreign thinking: a thinking block signed by the target, which cmm blanks and "
                   "re-signs on its way to Anthropic (no direct run: the fake rightly refuses it; compared with the "
                   "plain direct run)")
        out.append("   CPU ms/request: the fake's own for direct, cmm's (master + workers) for via.")
        out.append(table(["route", "body", "bytes sent", "direct median", "via median", "added", "via/direct",
                          "via min", "via max", "fake CPU ms/req", "cmm CPU ms/req", "errors d / v"], rows))
        out.append("")

    if "components" in m:
        costs = m["components"]
        rows = [[STAGE_LABELS.get(name, name.removesuffix("_s").replace("_", " ")), fmt(ms(seconds), ".2f")]
                for name, seconds in costs.items()]
        floors = ", ".join(f"{route} {sum(costs[k] for k in keys) * 1000:.1f} ms ({' + '.join(k[:-2] for k in keys)})"
                           for route, keys in ROUTE_STAGES.items())
        out.append("   Where a 2 MB body's time goes in cmm: each stage alone, in the benchmark's process, in "
                   "pieces of 256 KiB (what one socket read brings cmm at most: its TLS records go through together), "
                   "best of 5 (bench/components.py), ms")
        out.append(table(["stage", "ms per 2 MB"], rows))
        out.append(f"   Sum of the stages a body goes through (a floor for the added latency above): {floors}")
        if "neutralise_agentic_s" in costs:
            out.append("   Agentic: the scans on a body shaped like a long agentic session (bench/run.py agentic_body: a "
                       "tool result, a thinking block, a text and a tool call a turn), per 2 MB: its many blocks are "
                       "their usual case, section 3's one long text their cheapest. Mark search: bytes.find of the "
                       "mark, a floor no JSON-aware scan goes below.")
        out.append("")

    if "usage" in m:
        out += [usage_report(m["usage"]["path"]), serving_report(m["usage"]["serving"]), ""]
    if "usage_throughput" in m:
        out += usage_throughput_report(m["usage_throughput"])
        problems += m["usage_throughput"]["problems"]

    if "failover" in m:
        out.append("   Failover: medians, a new connection per request (bench/failover.py)")
        out += [table(FAILOVER_HEADERS, m["failover"]["rows"]), ""]

    if "rss" in m:
        rss = m["rss"]
        base = rss["before_kib"]["VmRSS"]
        rows = []
        for size_mb, e in rss["sizes"].items():
            peak = e["after_kib"]["VmHWM"]
            lat = {r: ms(median(v)) for r, v in e["latency_s"].items()}
            rows.append([f"{size_mb} MB", f"{base / 1024:.1f}", f"{e['start_kib']['VmRSS'] / 1024:.1f}",
                         f"{peak / 1024:.1f}", f"{(peak - base) / 1024:+.1f}",
                         f"{(peak - e['start_kib']['VmRSS']) / 1024:+.1f}", f"{e['after_kib']['VmRSS'] / 1024:.1f}",
                         fmt(lat.get("routed"), ".0f"), fmt(lat.get("passthrough"), ".0f"), str(len(e["errors"]))])
            for error in e["errors"][:3]:
                problems.append(f"RSS {size_mb} MB: {error}")
        reset = all(e["peak_reset"] for e in rss["sizes"].values())
        workers = len(rss.get("workers", []))
        whose = f"master pid {rss['pid']} + {workers} worker(s), summed" if workers else f"twistd pid {rss['pid']}"
        out.append(f"4. Peak RSS of cmm ({whose}), {plan.rss_requests} sequential request(s) per route "
                   "per size via cmm, model first; MiB")
        peak_note = "Peak (VmHWM) reset before each size." if reset else "Peak (VmHWM) not resettable: cumulative."
        out.append("   32 MB = 32,000,000 bytes, under cmm's default 32 MiB body limit. " + peak_note)
        out.append("   added = peak - RSS at start: what a body of that size costs; peak - before also counts what "
                   "earlier sizes left allocated.")
        out.append(table(["body", "RSS before", "RSS at start", "peak", "peak - before", "added", "RSS after",
                          "routed ms", "passthrough ms", "errors"], rows))
        out.append("")

    if "workers" in m:
        out.append(workers_report(m["workers"], m.get("wrk", {}), plan, problems))
        out.append("")

    for key in ("route_check", "cmm_output"):
        problems += results.get(key, {}).get("problems", [])
    for name, error in results.get("failed", {}).items():
        problems.append(f"{name} failed: {error}")
    for key, section in (("scaling", scaling_report), ("streams", streams_report), ("soak", soak_report)):
        if key in m:
            out.append(section(m[key], problems))
            out.append("")

    out.append(targets_report(m))
    out.append("")
    out.append("Problems: " + ("none" if not problems else ""))
    out += [f"  - {p}" for p in problems]
    return "\n".join(out), problems


def headroom(loads: dict[str, Any]) -> float | None:
    """How many times more requests/s the upstream answered directly than cmm did (c8)."""
    return ratio(loads.get("c8", {}).get("direct", {}).get("rps"), loads.get("c8", {}).get("via", {}).get("rps"))


def headroom_problems(wrk: dict[str, Any]) -> list[str]:
    """An upstream that is not much faster than cmm hides cmm's cost: such a run is a failed one."""
    found = []
    for route, loads in wrk.items():
        times = headroom(loads)
        if times is not None and times < UPSTREAM_HEADROOM:
            found.append(f"!! the {route} upstream answered only {times:.1f}x as many requests/s as cmm "
                         f"(needs {UPSTREAM_HEADROOM:.0f}x): the via/direct ratios of this run understate cmm's cost; "
                         "use the fast upstream (--upstream fast) on a quieter machine")
    return found


def verdict(met: bool | None) -> str:
    return "not run" if met is None else ("met" if met else "NOT MET")


def targets_report(m: dict[str, Any]) -> str:
    """The performance targets, each with this run's figure and the direct run beside it."""
    rows: list[list[str]] = []
    floors = {"routed": 0.11, "passthrough": 0.13}
    for route, floor in floors.items():
        c8 = m.get("wrk", {}).get(route, {}).get("c8", {})
        r = ratio(c8.get("via", {}).get("rps"), c8.get("direct", {}).get("rps"))
        rows.append([f"small {route} request, req/s via / direct (c8)", f">= {floor}", fmt(r, ".2f"),
                     f"{fmt(c8.get('direct', {}).get('rps'), '.0f')} req/s", verdict(None if r is None else r >= floor)])
    for route in floors:
        ways = m.get("large_body", {}).get(route, {}).get("plain", {})
        d, v = (ms(ways.get(w, {}).get("median_s")) for w in ("direct", "via"))
        added = diff(v, d)
        costs = m.get("components")
        floor = f" (stages alone: {sum(costs[k] for k in ROUTE_STAGES[route]) * 1000:.1f} ms)" if costs else ""
        rows.append([f"added latency, 2 MB body, {route}", "<= 5 ms", fmt(added, "+.1f", " ms") + floor,
                     fmt(d, ".1f", " ms"), verdict(None if added is None else added <= 5)])
    for route in floors:
        ways = m.get("streaming", {}).get(route, {})
        d, v = (ms(ways.get(w, {}).get("median_s")) for w in ("direct", "via"))
        added = diff(v, d)
        pacing = m.get("pacing", {}).get(route, {}).get("via", {})
        gap, expected = ms(pacing.get("min_gap_s")), 1000 * m.get("pacing", {}).get("event_delay_s", 0)
        batched = None if gap is None else gap < expected * 0.5
        rows.append([f"added time to first SSE event, p50, {route}", "<= 0.5 ms, never batched",
                     fmt(added, "+.2f", " ms") + ("" if batched is None else ", batched" if batched else ", not batched"),
                     fmt(d, ".2f", " ms"), verdict(None if added is None else added <= 0.5 and not batched)])
    sizes = m.get("streams", {}).get("sizes", {})
    if sizes:
        total = max(sizes, key=int)
        e = sizes[total]
        per = kb_per_stream(sizes, total)
        complete = e["finished"] == int(total)
        upstream = upstream_kb_per_stream(e)
        rows.append([f"{int(total):,} concurrent open streams", "10,000, all complete, <= 32 KB each",
                     f"{e['finished']:,} complete, {per:.1f} KB each",
                     "upstream " + fmt(upstream, ".1f", " KB each"),
                     verdict(int(total) >= 10_000 and complete and per <= 32)])
    else:
        rows.append(["10,000 concurrent open streams", "all complete, <= 32 KB each", "n/a", "-", verdict(None)])
    rss = m.get("rss", {}).get("sizes", {})
    if rss:
        added = {size: (e["after_kib"]["VmHWM"] - e["start_kib"]["VmRSS"]) * 1024 / MB for size, e in rss.items()}
        figure = " / ".join(f"{size} MB adds {value:.1f}" for size, value in added.items())
        largest = max(added, key=int)
        rows.append(["memory against body size (model first)", f"flat: {largest} MB adds <= 8 MB", figure + " MB", "-",
                     verdict(added[largest] <= 8)])
    soak = m.get("soak", {})
    if soak.get("rss_samples") and "run" in soak:
        samples, run = soak["rss_samples"], soak["run"]
        growth = 100 * (samples[-1][1] - samples[0][1]) / samples[0][1]
        errors = run.get("error_count", 1) if "error" not in run else 1
        rows.append([f"soak at half the peak rate, {soak['seconds']} s", "600 s, no errors, RSS growth < 5 %",
                     f"{errors} errors, {growth:+.1f} %", f"{fmt(soak['peak']['rps'], '.0f')} req/s peak",
                     verdict(soak["seconds"] >= 600 and errors == 0 and growth < 5)])
    else:
        rows.append(["10-minute soak at half the peak rate", "no errors, RSS growth < 5 %", "n/a", "-", verdict(None)])
    return "\n".join([
        "Targets; each figure against the direct run of this same run (--full runs every row)",
        table(["measure", "target", "this run", "direct", "verdict"], rows, left=5),
    ])


def spread_cells(run: dict[str, Any]) -> tuple[str, str]:
    """"48.2 / 51.8" (% of requests per worker) and max/min, or "-" with fewer than 2 workers."""
    counts = list(run.get("worker_requests", {}).values())
    total = sum(counts)
    if len(counts) < 2 or not total:
        return "-", "-"
    shares = " / ".join(f"{100 * c / total:.1f}" for c in counts)
    return shares, ("inf" if min(counts) == 0 else f"{max(counts) / min(counts):.2f}")


def workers_report(workers: dict[str, Any], wrk: dict[str, Any], plan: Plan, problems: list[str]) -> str:
    """Section 5's table; adds what went wrong to ``problems``."""
    rows = []
    for entry in workers.values():
        label = entry["label"]
        count = int(entry["args"][entry["args"].index("--workers") + 1])
        problems += [f"{label}: {p}" for p in entry["problems"] + entry.get("cmm_output", {}).get("problems", [])]
        if "error" in entry:
            problems.append(f"{label}: {entry['error']}")
        for name, route, close in SPREAD_RUNS:
            run = entry["runs"].get(name)
            if run is None:
                continue
            rps = run.get("rps")
            direct = None if close else wrk.get(route, {}).get("c8", {}).get("direct", {}).get("rps")
            requests = run.get("requests") or None
            cpu = run.get("cpu_s")
            shares, spread = spread_cells(run) if count >= 2 else ("-", "-")
            rows.append([label, name, fmt(rps), "-" if close else fmt(ratio(rps, direct), ".2f"),
                         fmt(ms(ratio(cpu, requests)), ".2f"), fmt(ratio(run.get("master_cpu_s"), cpu), ".0%"),
                         fmt(ratio(cpu, run["duration_us"] / 1e6 if "duration_us" in run else None), ".2f"),
                         shares, spread, wrk_errors(run)])
            where = f"{label}, {name}"
            if "error" in run:
                problems.append(f"wrk {where}: {run['error']}")
                continue
            if run["error_count"]:
                problems.append(f"wrk {where}: errors {run['errors']} in {run['requests']} requests")
            if run.get("upstream_received", run["requests"]) < run["requests"]:
                problems.append(f"wrk {where}: {run['requests']} responses but the {route} upstream received only "
                                f"{run['upstream_received']} requests")
            counted = sum(run["worker_requests"].values())
            if counted < run["requests"]:
                problems.append(f"{where}: the status socket counted {counted} requests, wrk completed "
                                f"{run['requests']}")
            served = sorted(run["worker_requests"])
            expected = ["master"] if count == 0 else [f"worker-{i + 1}" for i in range(count)]
            if served != expected:
                problems.append(f"{where}: the status socket lists {served}, expected {expected}")
            if run["workers_restarted"]:
                problems.append(f"{where}: a worker was restarted during the run (pids "
                                f"{sorted(run['cpu_before']['workers_s'])} -> {sorted(run['cpu_after']['workers_s'])})")
    head = [
        f"5. Workers and accept spread: a fresh cmm per configuration, wrk -t{SPREAD_LOAD[0]} -c{SPREAD_LOAD[1]} "
        f"-d{plan.wrk_seconds}s, small request",
        "   via/direct: against section 1's direct runs. \"close\": Connection: close, a new TLS connection per "
        "request (no ratio:",
        "   section 1 has no such direct run). CPU: utime+stime of the master and its workers (/proc) over the run, "
        "per request;",
        "   master: its share of that; cores: CPU seconds per second. Spread: % of requests per worker (status "
        "socket, worker-1 / worker-2).",
        table(["configuration", "run", "req/s", "via/direct", "CPU ms/req", "master", "cores", "spread %", "max/min",
               "errors"], rows),
    ]
    return "\n".join(head)


# -- checks around the run ----------------------------------------------------------------------


def route_check(endpoints: Routes) -> dict[str, Any]:
    """Before measuring: each route through cmm must reach the upstream it is meant to."""
    problems = []
    for route, ends in endpoints.items():
        for way in ("direct", "via"):
            connection = ends[way].connect(timeout=10)
            try:
                body = small_body(ROUTE_MODELS[route])
                response = connection.request("POST", "/v1/messages", ends[way].headers(), body)
                if problem := check_reply(response, route, way == "via"):
                    problems.append(f"route check {route} {way}: {problem}")
            except OSError as error:
                problems.append(f"route check {route} {way}: {error_text(error)}")
            finally:
                connection.close()
    return {"problems": problems}


def scan_cmm_output(path: Path, wrk_connections: int) -> dict[str, Any]:
    """Failed request lines (✗) and anything that looks like an error in cmm's own output.

    When a wrk run ends, wrk drops its connections with requests still in flight; cmm rightly
    logs those as "client closed the connection". Up to one per wrk connection is expected.
    """
    counts = {"ok": 0, "failed": 0, "client_closed": 0}
    failed: list[str] = []
    other: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as error:
        return {"problems": [f"cannot read cmm output: {error}"]}
    for line in lines:
        if " ✓ " in line:
            counts["ok"] += 1
        elif " ✗ " in line and line.endswith("(client closed the connection)"):
            counts["client_closed"] += 1
        elif " ✗ " in line:
            counts["failed"] += 1
            failed.append(line)
        elif re.search(r"Traceback|Unhandled|[Ee]rror|#critical|#warn", line):
            other.append(line)
    problems = [f"cmm logged {counts['failed']} failed request(s), e.g.: {line}" for line in failed[:1]]
    if counts["client_closed"] > wrk_connections:
        problems.append(f"cmm logged {counts['client_closed']} requests closed by the client, more than the "
                        f"{wrk_connections} wrk connections cut at the end of their runs")
    problems += [f"cmm output: {line}" for line in other[:10]]
    return {"counts": counts, "failed_lines": failed[:50], "other_lines": other[:200], "problems": problems}


# -- main -------------------------------------------------------------------------------------


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally clauses stop what we started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(stack: Stack, results: dict[str, Any], plan: Plan, extras: Extras, log: Log) -> None:
    """Start the stack, run every measurement into ``results``, and always stop the stack.
    With ``extras.only`` just the opt-in measurements that ``extras`` asks for."""
    try:
        log("starting the fakes and cmm")
        stack.start()
        cmm = stack.cmm
        assert cmm is not None
        results["ports"] = {"anthropic": stack.anthropic_port, "target": stack.target_port, "cmm": cmm.port}
        endpoints = stack.endpoints()
        results["route_check"] = route_check(endpoints)
        count = DEFAULT_WORKERS  # cmm's default --workers
        results["cmm"] = {"pid": cmm.pid, "workers": count, "reported": wait_workers(cmm, count),
                          "worker_pids": child_pids(cmm.pid)}
        results["idle"] = idle_footprint(cmm.pid, stack)
        if len(results["cmm"]["reported"]) < count:
            results["route_check"]["problems"].append(f"cmm: only {results['cmm']['reported']} of its {count} "
                                                      "default workers reported to the master")
        cpu_of: CpuOf = {
            "via": lambda: cpu_seconds(cmm.pid)["total_s"],
            "routed": lambda: process_cpu_seconds(stack.pid_of("fake-target")),
            "passthrough": lambda: process_cpu_seconds(stack.pid_of("fake-anthropic")),
        }
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("wrk", lambda: measure_wrk(endpoints, plan, log, cpu_of)),
            ("streaming", lambda: measure_streaming(endpoints, plan, log)),
            ("pacing", lambda: measure_pacing(endpoints, log)),
            ("large_body", lambda: measure_large_body(endpoints, plan, log, cpu_of)),
            ("rss", lambda: measure_rss(endpoints, cmm.pid, plan, log)),
            ("components", lambda: component_costs(large_body(PASSTHROUGH_MODEL, LARGE_BODY_BYTES),
                                                   agentic_body(PASSTHROUGH_MODEL, LARGE_BODY_BYTES))),
            ("usage", lambda: json.loads(subprocess.run([sys.executable, str(Path(__file__).with_name("usage.py")),
                                                         "--serving", "--json"], capture_output=True, check=True).stdout)),
            ("usage_throughput", lambda: measure_usage_throughput(stack, plan, log)),
            ("workers", lambda: measure_workers(stack, plan, log)),
            ("websocket", lambda: websocket_bench.measure({w: (e.port, e.tls) for w, e in endpoints["passthrough"].items()
                                                           if e.tls is not None}, 2 * plan.ttfb_requests)),
            ("failover", lambda: {"rows": failover_rows(plan.large_requests)}),  # its own fakes and worker
        ]
        if extras.only:
            steps = []
        if extras.scaling:
            steps.append(("scaling", lambda: measure_scaling(endpoints, log)))
        if extras.streams:
            steps.append(("streams", lambda: measure_streams(endpoints, cmm.pid, stack.pid_of("fake-target"),
                                                             extras.streams, log)))
        if extras.soak_seconds:
            steps.append(("soak", lambda: measure_soak(endpoints, cmm.pid, extras.soak_seconds, log)))
        for name, step in steps:
            if cmm.process.poll() is not None:
                results["failed"][name] = "cmm is no longer running:\n" + stack.tail("cmm")
                break
            try:
                results["measurements"][name] = step()
            except Exception as error:  # one broken measurement must not hide the others
                results["failed"][name] = error_text(error)
                log(f"{name} failed: {error_text(error)}")
    finally:
        log("stopping")
        if stack.cmm is not None:  # cmm first: requests it still has in flight must not meet dead fakes
            stack.stop(stack.cmm)
        stack.stop()
        cut = 0 if extras.only else 2 * (8 + 1)  # section 1's wrk runs via cmm
        results["cmm_output"] = scan_cmm_output(stack.log_path("cmm"), wrk_connections=cut + extras.wrk_connections())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark cmm against its fake upstreams, direct vs via cmm.")
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute and a half in all)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for the raw JSON results")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory (process output)")
    parser.add_argument("--scaling", action="store_true",
                        help="opt-in: routed req/s direct and via cmm at 1, 4, 16 and 64 connections")
    parser.add_argument("--streams", type=stream_counts, default=(), metavar="N[,N...]",
                        help="opt-in: cmm's memory per open stream with N concurrent routed streams (e.g. 2000 or "
                             "10,100,1000,2000), and that all complete")
    parser.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                        help="opt-in: run at about half the peak routed rate for SECONDS; errors and RSS growth")
    parser.add_argument("--only", action="store_true", help="run only the opt-in measurements asked for")
    parser.add_argument("--upstream", choices=("fast", "twisted"), default="fast",
                        help="fake upstreams: fast (bench/fast_upstream.py, asyncio on uvloop; the default) or "
                             "twisted (cmm.testing.fakes, too slow for the ratios to mean much)")
    parser.add_argument("--full", action="store_true",
                        help=f"every measurement: the default sections, --scaling, --streams "
                             f"{','.join(map(str, FULL_STREAMS))} and --soak {FULL_SOAK_S} (about 20 minutes)")
    args = parser.parse_args(argv)
    if args.full:
        args.scaling, args.streams, args.soak = True, args.streams or FULL_STREAMS, args.soak or FULL_SOAK_S
    extras = Extras(args.scaling, args.streams, args.soak, args.only)
    if args.only and not extras.any:
        parser.error("--only needs at least one of --scaling, --streams, --soak")
    if args.soak < 0:
        parser.error("--soak needs a number of seconds (at least 1)")

    if shutil.which("wrk") is None:
        print("bench: wrk is not installed; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.upstream == "fast" and importlib.util.find_spec("uvloop") is None:
        print("bench: the fast upstream needs uvloop: python3 -m pip install '.[bench]' (or uvloop), "
              "or run with --upstream twisted", file=sys.stderr)
        return 2

    plan = Plan.make(args.quick)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    if extras.streams:
        raise_fd_limit(max(extras.streams))  # before the stack starts: cmm and the fakes inherit it
        if problem := check_fd_limit(max(extras.streams)):
            print(f"bench: {problem}", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="cmm-bench-"))
    stack = Stack(work, upstream=args.upstream)
    if stream_connections(extras.streams) > CMM_MAX_CONNECTIONS:
        stack.cmm_args = ["--max-connections", str(cmm_max_connections(extras.streams))]
    results: dict[str, Any] = {
        "started": started.isoformat(),
        "upstream": args.upstream,
        "quick": args.quick,
        "extras": {"scaling": extras.scaling, "streams": list(extras.streams), "soak_s": extras.soak_seconds,
                   "only": extras.only},
        "plan": plan.__dict__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "load_before": os.getloadavg()},
        "measurements": {},
        "failed": {},
    }
    try:
        with terminate_as_interrupt():
            run_all(stack, results, plan, extras, log)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        results["elapsed_s"] = time.monotonic() - t0
        results["machine"]["load_after"] = os.getloadavg()
        if args.keep_work:
            print(f"bench: process output kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    text, problems = report(results, plan)
    results["problems"] = problems
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"\nRaw results: {path}   (run took {results['elapsed_s']:.0f} s)")
    if {"scaling", "streams"} & results["measurements"].keys():
        if reason := missing_dependency():
            print(reason)
        elif plot(results["measurements"], path.with_suffix(".png")):
            print(f"Plot: {path.with_suffix('.png')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
