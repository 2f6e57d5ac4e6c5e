"""Child processes for tests and the benchmark: a free loopback port, a process in its own group
with its output in a file, and the command lines of the fakes and of ``twistd cmm``.

Each child gets a process group of its own, so stopping it also stops whatever it started
(a master's workers); its output goes to a file, so a failure can quote all of it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cmm.testing.checkout import REPO

STARTUP_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (loopback; IPv6 when ``host`` is)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each measurement gets its own peak;
    False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fake_command(kind: str, *args: str, python: str = sys.executable) -> list[str]:
    """``python -m cmm.testing.fakes KIND --port 0 ARGS``: it prints ``listening on PORT``."""
    return [python, "-m", "cmm.testing.fakes", kind, "--port", "0", *args]


class Process:
    """A subprocess in its own process group, its stdout+stderr going to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], out: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.out = out
        self._file = out.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)

    def output(self) -> str:
        return self.out.read_bytes().decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
        """Poll the output for ``pattern``; fail with the whole output if it never shows."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} after {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def port(self) -> int:
        """The port a fake announced with ``listening on PORT``."""
        return int(self.wait_for(r"listening on (\d+)").group(1))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL it if still there after ``timeout`` seconds."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=timeout)
        self._file.close()


class Fakes:
    """The two fakes every stack starts first: the fake Anthropic (TLS; its test CA is ``ca``) and
    the fake target (plain HTTP), each on a port it chose, output in ``base``."""

    def __init__(self, base: Path, env: dict[str, str], *extra: str) -> None:
        pki = base / "pki"
        self.ca = pki / "ca.pem"
        self.anthropic = Process("fake anthropic", fake_command("anthropic", "--cert-dir", str(pki), *extra), env,
                                 base / "fake-anthropic.out")
        try:
            self.target = Process("fake target", fake_command("target", *extra), env, base / "fake-target.out")
            self.anthropic_port = self.anthropic.port()
            self.target_port = self.target.port()
        except BaseException:
            self.stop()
            raise

    @property
    def target_url(self) -> str:
        return f"http://127.0.0.1:{self.target_port}/v1/messages"

    def stop(self) -> None:
        for process in (getattr(self, "target", None), self.anthropic):
            if process is not None:
                process.stop()
