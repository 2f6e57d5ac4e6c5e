"""What hostile input and a dead network cost a real cmm, measured in one run.

    python bench/hostile.py [--rounds 3] [--only bombs|dns]

1. Decompression bombs: a real ``twistd -n cmm --workers 0`` on loopback gets three bodies that
   decode to far more than the 32 MiB body limit (zstd 16 KiB -> 512 MiB, br under 1 KiB -> 1 GiB,
   ``gzip, gzip`` under 2 KiB -> 1 GiB), each answered 413. Printed: the serving process's peak
   RSS growth (VmHWM) per request and its RSS afterwards, beside a plain request of the same
   route ("direct": no decoding at all).
2. DNS down at start: seconds from launching cmm to "cmm serving", with the name server a
   loopback UDP port that never answers and an ``anthropic-ip.cache`` present, beside the same
   start with ``--anthropic-ip`` (no DNS at all: the direct run), and with neither.

Everything listens on and talks to 127.0.0.1 only; the process group is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import brotli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cmm, not an installed one

from cmm.testing.checkout import checkout_env, twistd_command  # noqa: E402
from cmm.testing.processes import free_port, memory_kib, reset_peak  # noqa: E402

HOST = "api.anthropic.com"


def zstd_bomb(blocks: int = 4096) -> bytes:
    """A zstd frame of RLE blocks: 4 bytes each on the wire, 128 KiB each decoded."""
    head = b"\x28\xb5\x2f\xfd" + bytes([0x00, (17 - 10) << 3])  # no content size, 128 KiB window
    block = ((128 << 10) << 3 | 1 << 1).to_bytes(3, "little") + b"\0"
    last = ((128 << 10) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\0"
    return head + block * (blocks - 1) + last


def brotli_bomb(mib: int = 1024) -> bytes:
    compressor = brotli.Compressor(quality=5, lgwin=24)
    return b"".join(compressor.process(b"\0" * (1 << 20)) for _ in range(mib)) + compressor.finish()


def gzip_gzip_bomb(mib: int = 1024) -> bytes:
    inner = zlib.compressobj(9, wbits=31)
    layer = b"".join(inner.compress(b"\0" * (1 << 20)) for _ in range(mib)) + inner.flush()
    outer = zlib.compressobj(9, wbits=31)
    return outer.compress(layer) + outer.flush()


def make_certificates(config_dir: Path) -> None:
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    code = f"from pathlib import Path; from cmm.machine import certs; certs.ensure_certificates(Path({str(config_dir)!r}))"
    subprocess.run([sys.executable, "-c", code], env=checkout_env(), check=True)


@contextmanager
def cmm(config_dir: Path, args: list[str], out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``twistd -n cmm`` in its own process group, stopped on the way out."""
    with out.open("wb") as sink:
        process = subprocess.Popen(twistd_command(["--config-dir", str(config_dir), "--no-hosts", "--workers", "0",
                                                   "--listen", "127.0.0.1", *args]),
                                   stdout=sink, stderr=subprocess.STDOUT, env=checkout_env(), start_new_session=True)
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_serving(out: Path, port: int, started: float, limit: float = 180.0) -> float:
    pattern = re.compile(rf"cmm serving on port {port}\b")
    while time.monotonic() - started < limit:
        if pattern.search(out.read_text(errors="replace")):
            return time.monotonic() - started
        time.sleep(0.01)
    raise SystemExit(f"cmm never served:\n{out.read_text(errors='replace')}")


def post(port: int, ca: Path, body: bytes, coding: str | None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if coding:
        head += f"Content-Encoding: {coding}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as tls:
        tls.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            piece = tls.recv(4096)
            if not piece:
                break
            answer += piece
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def bombs(work: Path, rounds: int) -> list[str]:
    config_dir = work / "bombs"
    make_certificates(config_dir)
    port, closed = free_port(), free_port()
    plain = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi " * 5000}]}).encode()
    cases = [("direct: plain 15 KB body", plain, None), ("zstd bomb", zstd_bomb(), "zstd"),
             ("br bomb", brotli_bomb(), "br"), ("gzip, gzip bomb", gzip_gzip_bomb(), "gzip, gzip")]
    lines = ["Decompression bombs through cmm --workers 0 (body limit 32 MiB), median of "
             f"{rounds} rounds:", f"  {'body':<26}{'bytes':>8}  {'status':>6}  {'peak RSS +MiB':>13}  "
             f"{'RSS after MiB':>13}  {'seconds':>7}"]
    args = ["--port", str(port), "--source", "claude-haiku", "--target", "t",
            "--proxy-url", f"http://127.0.0.1:{closed}/v1/messages",
            "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(closed)]
    with cmm(config_dir, args, work / "bombs.out") as process:
        wait_serving(work / "bombs.out", port, time.monotonic())
        time.sleep(0.5)
        for name, body, coding in cases:
            growth, after, took, statuses = [], [], [], set()
            for _ in range(rounds):
                if not reset_peak(process.pid):
                    raise SystemExit("cannot reset the peak RSS (/proc/PID/clear_refs): each peak would include the last")
                before = memory_kib(process.pid)["VmRSS"] / 1024
                started = time.monotonic()
                statuses.add(post(port, config_dir / "ca.crt", body, coding))
                took.append(time.monotonic() - started)
                time.sleep(0.3)
                memory = memory_kib(process.pid)
                growth.append(memory["VmHWM"] / 1024 - before)
                after.append(memory["VmRSS"] / 1024)
            lines.append(f"  {name:<26}{len(body):>8}  {'/'.join(map(str, sorted(statuses))):>6}  "
                         f"{statistics.median(growth):>13.1f}  {statistics.median(after):>13.1f}  "
                         f"{statistics.median(took):>7.2f}")
    return lines


def dns_down(work: Path, rounds: int) -> list[str]:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # a name server that never answers
    dns = f"127.0.0.1:{silent.getsockname()[1]}"
    runs = {"direct: --anthropic-ip": [], "DNS down, cache present": [], "DNS down, no cache": []}
    for round_ in range(rounds):
        for number, name in enumerate(runs):
            config_dir = work / f"dns-{round_}-{number}"
            make_certificates(config_dir)
            port = free_port()
            args = ["--port", str(port), "--source", "claude-haiku", "--target", "t"]
            if name.startswith("direct"):
                args += ["--anthropic-ip", "192.0.2.1"]
            else:
                args += ["--dns-server", dns]
                if "present" in name:
                    (config_dir / "anthropic-ip.cache").write_text("192.0.2.1\n")
            out = config_dir.with_suffix(".out")
            started = time.monotonic()
            with cmm(config_dir, args, out):
                runs[name].append(wait_serving(out, port, started))
    silent.close()
    direct = statistics.median(runs["direct: --anthropic-ip"])
    lines = [f"Time from launch to serving, median of {rounds} starts:"]
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        lines.append(f"  {name:<26}{median:>6.2f} s   {median / direct:>5.2f}x the direct run")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["bombs", "dns"], help="one section")
    args = parser.parse_args(argv)
    sections = [bombs, dns_down] if args.only is None else [{"bombs": bombs, "dns": dns_down}[args.only]]
    with tempfile.TemporaryDirectory(prefix="cmm-hostile.") as work:
        for section in sections:
            for line in section(Path(work), args.rounds):
                print(line, flush=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
