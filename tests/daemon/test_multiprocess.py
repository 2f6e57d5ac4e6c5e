"""Master and workers as real processes: sockets handed over, unprivileged workers, a worker killed
under load, SIGHUP with streams open, an invalid reload, log rotation, and the master's death."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmm.testing.checkout import twistd_command
from cmm.testing.processes import Fakes, Process, free_port
from test_integration import Conn, _env, json_body, new_tag, simple_post

SOURCE = "claude-haiku-4-5-20251001"
PASS = "claude-opus-4-6"


def children(pid: int, module: str = "cmm.daemon.worker") -> list[int]:
    """The master's child processes running ``module`` (its workers, unless told otherwise)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid and module.encode() in command:
                found.append(int(entry.name))
    return found


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def status(config_dir: Path) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(config_dir / "cmm.sock"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def wait_until(check, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def write_mappings(config_dir: Path, target: str, url: str) -> None:
    (config_dir / "mappings.toml").write_text(
        f'[[mapping]]\nsource = "claude-haiku-4-5"\ntarget = "{target}"\nurl = "{url}"\n')


class Stack:
    def __init__(self, base: Path) -> None:
        self.base = base
        fakes = Fakes(base, _env())
        self.processes: list[Process] = [fakes.anthropic, fakes.target]
        self.anthropic = fakes.anthropic_port
        self.target = fakes.target_port
        self.ca_bundle = fakes.ca
        self.master: Process | None = None

    @property
    def target_url(self) -> str:
        return f"http://127.0.0.1:{self.target}/v1/messages"

    def start(self, name: str, *args: str, workers: int = 2) -> tuple[Process, Path, int]:
        config_dir = self.base / name
        config_dir.mkdir(exist_ok=True)
        port = free_port()
        argv = twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--config-dir", str(config_dir),
                               "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(self.anthropic), "--no-hosts",
                               "--workers", str(workers), "--grace", "10", *args])
        process = Process(f"cmm {name}", argv, _env(SSL_CERT_FILE=str(self.ca_bundle)), self.base / f"{name}.out")
        self.processes.append(process)
        process.wait_for(rf"cmm serving on port {port}\b")
        wait_until(lambda: len(status(config_dir)["workers"]) == workers or None, what="workers reporting")
        return process, config_dir, port

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("multiprocess"))
    try:
        yield stack
    finally:
        stack.stop()


def ask(port: int, config_dir: Path, model: str, extra: list[tuple[str, str]] = ()) -> tuple[int, str | None, str]:
    with Conn(port, config_dir / "ca.crt") as conn:
        conn.send(simple_post(model, new_tag(), extra=list(extra)))
        response = conn.response()
    return response.status, response.header("x-fake-provider"), response.body.decode()


@pytest.fixture(scope="module")
def pair(stack: Stack) -> tuple[Process, Path, int]:
    """Two workers, the mapping from mappings.toml (so a reload can change it)."""
    config_dir = stack.base / "pair"
    config_dir.mkdir()
    write_mappings(config_dir, "gemini-2.5-flash", stack.target_url)
    return stack.start("pair", "--log-max-bytes", "4000", "--log-backups", "2")


def test_workers_adopt_the_sockets_and_run_unprivileged(pair: tuple[Process, Path, int]) -> None:
    master, config_dir, port = pair
    workers = children(master.proc.pid)
    assert len(workers) == 2
    assert uid_of(master.proc.pid) == 0 or os.geteuid() != 0
    if os.geteuid() == 0:
        assert all(uid_of(pid) != 0 for pid in workers), "workers must not serve as root"
    threads = [threading.Thread(target=lambda: [ask(port, config_dir, PASS) for _ in range(10)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert settled_count(config_dir) >= 40  # records reach the master after their responses
    served = {name: values["requests"] for name, values in status(config_dir)["workers"].items()}
    # The master binds; only workers accept (the master never serves with workers running).
    assert set(served) == {"worker-1", "worker-2"}


def test_a_killed_worker_costs_only_its_own_requests(pair: tuple[Process, Path, int]) -> None:
    master, config_dir, port = pair
    results: list[bool] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(ask(port, config_dir, SOURCE)[0] == 200)
            except (OSError, AssertionError, Exception):
                results.append(False)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    victim = children(master.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(lambda: len([p for p in children(master.proc.pid) if p != victim]) == 2 or None,
                          timeout=10, what="a replacement worker")
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert replaced
    failures = results.count(False)
    assert len(results) > 40
    assert failures <= 4, f"{failures} of {len(results)} failed: more than the killed worker's in-flight requests"
    assert results[-10:] == [True] * 10  # serving normally again
    assert "starting it again" in master.output()


def test_sighup_keeps_open_streams_and_routes_new_requests_by_the_new_config(stack: Stack,
                                                                              pair: tuple[Process, Path, int]) -> None:
    master, config_dir, port = pair
    streams: list[bytes | Exception] = []
    lock = threading.Lock()
    body = json_body(SOURCE, stream=True)

    def stream() -> None:
        try:
            with Conn(port, config_dir / "ca.crt", timeout=30) as conn:
                conn.send(simple_post(SOURCE, new_tag(), body=body, extra=[("x-fake-deltas", "15"),
                                                                          ("x-fake-event-delay", "0.1")]))
                response = conn.head()
                data = b"".join(conn.chunks())
            with lock:
                streams.append(data if response.status == 200 else RuntimeError(response.status))
        except Exception as error:  # noqa: BLE001 - recorded, asserted below
            with lock:
                streams.append(error)

    threads = [threading.Thread(target=stream) for _ in range(50)]
    for thread in threads:
        thread.start()
    time.sleep(0.8)  # all 50 are streaming
    write_mappings(config_dir, "gpt-5", stack.target_url)
    os.kill(master.proc.pid, signal.SIGHUP)
    master.wait_for(r"Reloaded: claude-haiku-4-5\* → gpt-5")
    after = ask(port, config_dir, SOURCE)
    for thread in threads:
        thread.join()
    assert after[0] == 200 and '"model":"gpt-5"' in after[2]
    assert len(streams) == 50
    errors = [s for s in streams if isinstance(s, Exception)]
    assert not errors, errors[:3]
    normalised = {re.sub(rb"_\d{6}", b"_N", s) for s in streams}  # message ids differ, nothing else may
    assert len(normalised) == 1
    [one] = normalised
    assert one.count(b"event: content_block_delta") == 15
    assert one.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    assert b'"model":"gemini-2.5-flash"' in one  # they finished on the configuration they began with


def test_invalid_mappings_file_on_sighup_keeps_the_running_config(stack: Stack, pair: tuple[Process, Path, int]) -> None:
    master, config_dir, port = pair
    before = ask(port, config_dir, SOURCE)
    (config_dir / "mappings.toml").write_text('[[mapping]]\nsource = "claude-haiku-4-5"\ntaget = "oops"\n')
    os.kill(master.proc.pid, signal.SIGHUP)
    line = master.wait_for(r"Reload refused.*").group(0)
    assert "taget" in line and "mapping #1" in line
    after = ask(port, config_dir, SOURCE)
    assert after[0] == 200 and after[1] == before[1] == "target"
    assert re.search(r'"model":"([^"]+)"', after[2]).group(1) == re.search(r'"model":"([^"]+)"', before[2]).group(1)
    write_mappings(config_dir, "gpt-5", stack.target_url)


def settled_count(config_dir: Path, quiet: float = 0.5) -> int:
    """Requests the master has counted, once no record has arrived for ``quiet`` seconds: records
    travel worker → master after their responses, so a count read at once can still grow."""
    def count() -> int:
        return sum(w["requests"] for w in status(config_dir)["workers"].values())

    last, since = count(), time.monotonic()
    deadline = since + 10
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError("the master's request count never settled")


def test_request_log_rotates_at_the_configured_size_and_on_sigusr1(pair: tuple[Process, Path, int]) -> None:
    master, config_dir, port = pair
    for _ in range(300):  # until two rotations (about 40 lines each), whatever earlier tests logged
        ask(port, config_dir, PASS)
        if (config_dir / "cmm.log.2").exists():
            break
    for _ in range(40):  # and one more file's worth: the oldest backup must then be dropped
        ask(port, config_dir, PASS)
    names = sorted(p.name for p in config_dir.glob("cmm.log*"))
    assert names == ["cmm.log", "cmm.log.1", "cmm.log.2"]  # two backups kept, no third
    # LogFile counts characters; "→ ✓ ↑ ↓" take 3 bytes each, and the line that crosses the limit stays.
    assert all(p.stat().st_size <= 4000 * 1.1 + 200 for p in config_dir.glob("cmm.log*"))
    served = settled_count(config_dir)  # every record so far has reached the master
    ask(port, config_dir, PASS)
    # The record travels worker → master after the response: wait until the master has it.
    wait_until(lambda: sum(w["requests"] for w in status(config_dir)["workers"].values()) == served + 1,
               what="the last record")
    before = (config_dir / "cmm.log").read_text()
    os.kill(master.proc.pid, signal.SIGUSR1)
    master.wait_for(r"Request log rotated")
    assert (config_dir / "cmm.log.1").read_text() == before
    assert (config_dir / "cmm.log").read_text() == ""


def test_sigterm_lets_a_stream_finish_then_stops(stack: Stack) -> None:
    master, config_dir, port = stack.start("graceful", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                                           "--proxy-url", stack.target_url, workers=1)
    with Conn(port, config_dir / "ca.crt", timeout=30) as conn:
        conn.send(simple_post(SOURCE, new_tag(), body=json_body(SOURCE, stream=True),
                              extra=[("x-fake-deltas", "10"), ("x-fake-event-delay", "0.1")]))
        response = conn.head()
        time.sleep(0.3)
        os.kill(master.proc.pid, signal.SIGTERM)
        data = b"".join(conn.chunks())
    assert response.status == 200 and data.count(b"event: content_block_delta") == 10 and b"message_stop" in data
    master.proc.wait(timeout=15)
    assert not (config_dir / "cmm.pid").exists() and not (config_dir / "cmm.sock").exists()


def test_workers_exit_when_the_master_is_killed(stack: Stack) -> None:
    master, config_dir, port = stack.start("orphans", "--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                                           "--proxy-url", stack.target_url, workers=2)
    workers = children(master.proc.pid)
    assert len(workers) == 2
    os.killpg(master.proc.pid, 0)  # the group exists
    os.kill(master.proc.pid, signal.SIGKILL)
    master.proc.wait(timeout=5)

    def gone() -> bool:
        return all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in workers)

    wait_until(gone, timeout=10, what="workers to exit after the master's death")


def test_drop_privileges_is_for_good() -> None:
    """In a child: after the drop the worker cannot become root again (both code paths)."""
    import sys as _sys

    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")  # CI runs as root; a developer may not
    import subprocess

    script = ("import os, sys; from cmm.daemon import worker; hide = sys.argv[1] == 'mac'\n"
              "if hide: del os.setresuid, os.setresgid\n"
              "worker.drop_privileges(65534, 65534)\n"
              "print(os.getuid(), os.geteuid(), os.getgid(), worker._can_regain_root())")
    for flavour in ("linux", "mac"):
        done = subprocess.run([_sys.executable, "-c", script, flavour], capture_output=True, text=True, env=_env(),
                              cwd="/")
        assert done.stdout.split() == ["65534", "65534", "65534", "False"], done.stderr
