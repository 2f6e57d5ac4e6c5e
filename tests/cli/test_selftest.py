"""``cmm test``: the judging of each answer, the temporary interceptor's plan, and whole runs against the fakes.

The whole runs start the fake Anthropic and the fake target, and a cmm from *this checkout*
(``cmm.testing.checkout``) on a free high port with ``--no-hosts``; ``cmm test`` itself runs in a child
process, as a user would run it, so the test process never starts a reactor.
"""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from cmm.cli import selftest, status

from cmm.machine import certs
from cmm.testing.checkout import REPO, twistd_command
from cmm.testing.processes import Fakes, Process, free_port
from cmm.cli.doctor import Check
from cmm.machine.hosts import add_block
from cmm.cli.selftest import Options, Reply, Target
from cmm.cli.status import Instance, MappingInfo, RunningState
from support import process_env

SOURCE = "claude-haiku-4-5"
TARGET_MODEL = "gemini-2.5-flash"


# --- pure judging ----------------------------------------------------------------------------------


def test_choose_models() -> None:
    assert selftest.choose_models(["claude-haiku"]) == ("claude-haiku", "claude-opus-5-5")
    assert selftest.choose_models(["claude-opus", "claude-sonnet"]) == ("claude-opus", "claude-3-5-haiku-latest")
    assert selftest.choose_models(["claude", "cmm"]) == ("claude", "cmm-selftest-xxxxxxxx")
    assert selftest.choose_models([]) == (None, "claude-opus-5-5")


def test_error_message() -> None:
    body = b'{"type":"error","error":{"type":"api_error","message":"Cannot reach x"}}'
    assert selftest.error_message(body) == "Cannot reach x"
    assert selftest.error_message(b"<html>") == "" and selftest.error_message(b'{"error": 1}') == ""


def test_target_url() -> None:
    assert Target("127.0.0.1", 443, Path("ca"), ()).url == "https://api.anthropic.com/v1/messages"
    assert Target("127.0.0.1", 8443, Path("ca"), ()).url == "https://api.anthropic.com:8443/v1/messages"


def test_judge_tls() -> None:
    target = Target("127.0.0.1", 443, Path("/c/ca.crt"), ())
    assert selftest.judge_tls(None, target).ok is True
    refused = selftest.judge_tls("connection refused", target)
    assert refused.ok is False and "cmm status" in refused.fix
    tls = selftest.judge_tls("TLS failed: certificate verify failed", target)
    assert tls.ok is False and "not from /c/ca.crt" in tls.detail and tls.fix.startswith("cmm setup")
    unreadable = selftest.judge_tls("cannot read /c/ca.crt (No such file or directory)", target)
    assert unreadable == Check("TLS", False, "cannot read /c/ca.crt (No such file or directory)", "cmm setup")
    v6 = selftest.judge_tls(None, Target("::1", 443, Path("ca"), ()))
    assert "[::1]:443" in v6.detail


@pytest.mark.parametrize(
    ("outcome", "ok", "needle"),
    [
        (Reply(200, "cliproxyapi", False), True, "HTTP 200 from the target, with x-cmm-provider: cliproxyapi"),
        (Reply(404, "cliproxyapi", False, "model not found"), True, "(model not found)"),
        (Reply(502, None, True, "Cannot reach http://localhost:8317: Connection refused"), False, "cmm answered 502"),
        (Reply(200, None, False), False, "it was not intercepted"),
        ("connection closed without an answer", False, "no response"),
    ],
)
def test_judge_intercepted(outcome: Reply | str, ok: bool, needle: str) -> None:
    check = selftest.judge_intercepted("claude-haiku-4-5", outcome)
    assert check.ok is ok and needle in check.detail
    if isinstance(outcome, Reply) and outcome.cmm_error:
        assert check.fix == selftest.TARGET_FIX
    assert selftest.judge_intercepted(None, outcome).ok is None


@pytest.mark.parametrize(
    ("outcome", "ok", "needle"),
    [
        (Reply(401, None, False, "invalid x-api-key"), True, "HTTP 401 from api.anthropic.com, untouched (expected"),
        (Reply(200, None, False), True, "HTTP 200 from api.anthropic.com, untouched"),
        (Reply(502, None, True, "x closed the connection before responding: TLS certificate verification failed"),
         False, "SSL_CERT_FILE"),
        (Reply(502, None, True, "DNS gave no usable address"), False, "--anthropic-ip"),
        (Reply(504, None, True, "Timed out connecting to https://api.anthropic.com:443"), False, "cmm doctor"),
        (Reply(200, "cliproxyapi", False), False, "bug"),
        ("connection refused", False, "see cmm's log"),
    ],
)
def test_judge_passthrough(outcome: Reply | str, ok: bool, needle: str) -> None:
    check = selftest.judge_passthrough("claude-opus-5-5", outcome)
    assert check.ok is ok
    assert needle in (check.detail if ok else check.detail + check.fix)


def test_judge_name_lookup() -> None:
    listen = ("127.0.0.1", "::1")
    assert selftest.judge_name_lookup(["127.0.0.1", "::1"], listen).ok is True
    stray = selftest.judge_name_lookup(["160.79.104.10"], listen)
    assert stray.ok is False and "160.79.104.10" in stray.detail and stray.fix.startswith("sudo cmm stop")
    assert selftest.judge_name_lookup("Name or service not known", listen).ok is False
    assert selftest.judge_name_lookup([], listen).ok is False


# --- the interceptor under test ------------------------------------------------------------------


def test_running_target(tmp_path: Path) -> None:
    state = RunningState(1, None, 8443, ("::1", "127.0.0.1"), (MappingInfo("a", "b", "u"),), None, tmp_path / "run")
    assert selftest.running_target(state, tmp_path) == Target("127.0.0.1", 8443, tmp_path / "run" / "ca.crt", ("a",), ("a",))
    bare = RunningState(1, None, None, ("::1",), (), None, None)
    assert selftest.running_target(bare, tmp_path) == Target("::1", 443, tmp_path / "ca.crt", ())


def test_twistd_argv_runs_twistd_with_this_python() -> None:
    argv = selftest.twistd_argv(["--port", "1"], python="/venv/bin/python")
    assert argv[:2] == ["/venv/bin/python", "-c"] and "twisted.scripts.twistd" in argv[2]
    assert argv[3:] == ["-n", "--pidfile=", "cmm", "--port", "1"]


def test_temporary_args() -> None:
    work = Path("/tmp/w")
    plain = selftest.temporary_args(Options(), work, 40000, fallback=False)
    assert plain == ["--port", "40000", "--listen", "127.0.0.1", "--no-hosts", "--workers", "1", "--grace", "1",
                     "--config-dir", "/tmp/w", "--log-file", "/tmp/w/cmm.log"]
    full = selftest.temporary_args(Options(source="s", target="t", proxy_url="http://x/m", anthropic_ip="127.0.0.1",
                                           anthropic_port=9), work, 40000, fallback=False)
    assert full[-10:] == ["--source", "s", "--target", "t", "--proxy-url", "http://x/m", "--anthropic-ip", "127.0.0.1",
                          "--anthropic-port", "9"]
    fallback = selftest.temporary_args(Options(), work, 40000, fallback=True)
    assert fallback[-4:] == ["--source", "claude-haiku", "--target", "gemini-2.5-flash"]


def test_needs_fallback() -> None:
    assert selftest.needs_fallback(Options(), {}, []) is True
    assert selftest.needs_fallback(Options(source="s"), {}, []) is False
    assert selftest.needs_fallback(Options(), {"DEFAULT_SOURCE_MODEL": "s", "DEFAULT_TARGET_MODEL": "t"}, []) is False
    assert selftest.needs_fallback(Options(), {"DEFAULT_SOURCE_MODEL": "s"}, []) is True
    assert selftest.needs_fallback(Options(), {}, ["from-file"]) is False


def test_plan_temporary_parses_like_twistd(tmp_path: Path) -> None:
    user, work = tmp_path / "user", tmp_path / "work"
    user.mkdir()
    work.mkdir()
    (user / ".env").write_text("DEFAULT_SOURCE_MODEL=claude-haiku-4-5\nDEFAULT_TARGET_MODEL=g\n")
    (work / ".env").write_text((user / ".env").read_text())
    plan = selftest.plan_temporary(Options(), user, work, 40000, {})
    assert plan.sources == ("claude-haiku-4-5",) and not plan.fallback
    assert "--source" not in plan.args  # the .env pair comes from the copied file, as twistd reads it

    (user / "mappings.toml").write_text('[[mapping]]\nsource = "claude-sonnet"\ntarget = "x"\n')
    (work / "mappings.toml").write_text((user / "mappings.toml").read_text())
    plan = selftest.plan_temporary(Options(source="claude-opus", target="y"), user, work, 40000, {})
    assert plan.sources == ("claude-opus", "claude-sonnet")


def test_plan_temporary_refusals(tmp_path: Path) -> None:
    with pytest.raises(selftest.ConfigProblem, match="http"):
        selftest.plan_temporary(Options(source="s", target="t", proxy_url="ftp://x/"), tmp_path, tmp_path, 40000, {})
    (tmp_path / "mappings.toml").write_text("[[mapping]]\nsource = 1\n")
    with pytest.raises(selftest.ConfigProblem):
        selftest.plan_temporary(Options(), tmp_path, tmp_path, 40000, {})


def test_run_reports_a_settings_problem_without_starting_anything(tmp_path: Path) -> None:
    out = io.StringIO()
    code = selftest.run(tmp_path, Options(source="s", target="t", proxy_url="ftp://x/"), environ={},
                        write=out.write, find=lambda d: Instance(False),
                        run_async=lambda work: pytest.fail("nothing may be sent"))  # type: ignore[arg-type,return-value]
    assert code == 1
    assert out.getvalue().startswith("✗ settings") and "fix: cmm config list; cmm map list" in out.getvalue()


def test_run_against_a_running_instance_checks_the_name_when_it_owns_the_hosts_file(tmp_path: Path) -> None:
    state = RunningState(4242, None, 443, ("127.0.0.1", "::1"), (MappingInfo("a", "b", "u"),), Path("/etc/hosts"),
                         tmp_path)
    sent: list[Any] = []

    def run_async(work: Any) -> list[Check]:
        sent.append(work)
        return [Check("TLS", True, "ok")]

    out = io.StringIO()
    code = selftest.run(tmp_path, Options(), environ={}, write=out.write, find=lambda d: Instance(True, 4242, state),
                        lookup_name=lambda name: ["160.79.104.10"], run_async=run_async)
    assert code == 1 and len(sent) == 1
    assert out.getvalue().splitlines()[:2] == [
        "Testing the running cmm (pid 4242) at 127.0.0.1:443",
        "✗ name lookup  api.anthropic.com resolves to 160.79.104.10, not to cmm",
    ]


# --- whole runs against the fakes ----------------------------------------------------------------


@attrs.frozen
class Stack:
    base: Path
    pki: Path
    anthropic_port: int
    target_port: int
    closed_port: int
    user: Path  # a config dir whose state file names the running cmm
    cmm_pid: int


def _env(**changes: str | None) -> dict[str, str]:
    return process_env(**{"NODE_EXTRA_CA_CERTS": None, **changes})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("selftest")
    pki = base / "pki"
    children: list[Process] = []
    closed = socket.socket()  # bound, never listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    try:
        fakes = Fakes(base, _env())
        children += [fakes.anthropic, fakes.target]
        a_port, t_port = fakes.anthropic_port, fakes.target_port
        instance_dir = base / "instance"
        port = free_port()
        running = Process("cmm", twistd_command(["--port", str(port), "--listen", "127.0.0.1", "--no-hosts", "--workers", "0",
                                        "--config-dir", str(instance_dir), "--source", SOURCE, "--target", TARGET_MODEL,
                                        "--proxy-url", f"http://127.0.0.1:{t_port}/v1/messages",
                                        "--anthropic-ip", "127.0.0.1", "--anthropic-port", str(a_port)]),
                        _env(SSL_CERT_FILE=str(pki / "ca.pem"), SSL_CERT_DIR=None), base / "cmm.out")
        children.append(running)
        running.wait_for(rf"cmm serving on port {port}\b")
        # The state file a running cmm writes, made here so the test does not depend on its details.
        user = base / "user"
        user.mkdir()
        (user / "cmm.state.json").write_text(json.dumps({
            "pid": running.proc.pid, "started": datetime.now(timezone.utc).isoformat(), "port": port,
            "listen": ["127.0.0.1"], "hosts_file": None, "config_dir": str(instance_dir),
            "mappings": [{"source": SOURCE, "target": TARGET_MODEL, "url": f"http://127.0.0.1:{t_port}/v1/messages"}],
        }))
        yield Stack(base, pki, a_port, t_port, closed.getsockname()[1], user, running.proc.pid)
    finally:
        for child in children:
            child.stop()
        closed.close()


def cmm(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys, cmm.cli.main; sys.exit(cmm.cli.main.main())", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def _temporary_port(stdout: str) -> int:
    match = re.search(r"Testing a temporary cmm at 127\.0\.0\.1:(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_running_instance_passes(stack: Stack) -> None:
    result = cmm(["test", "--config-dir", str(stack.user)], _env(HOME=str(stack.base)))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Testing the running cmm (pid {stack.cmm_pid}) at 127.0.0.1:")
    assert lines[1].startswith("✓ TLS") and f"{stack.base / 'instance' / 'ca.crt'}" in lines[1]
    assert lines[2].startswith("✓ intercepted  claude-haiku-4-5 → HTTP 200 from the target, with x-cmm-provider")
    assert lines[3].startswith("✓ passthrough  claude-opus-5-5 → HTTP 200 from api.anthropic.com, untouched")
    assert lines[-1] == "All checks passed."


def test_running_instance_with_the_wrong_ca_fails_tls(stack: Stack, tmp_path: Path) -> None:
    """A state file pointing at a config dir whose CA did not sign the served certificate."""
    state = json.loads((stack.user / "cmm.state.json").read_text())
    other = tmp_path / "other"
    certs.ensure_certificates(other)
    (tmp_path / "cmm.state.json").write_text(json.dumps({**state, "config_dir": str(other)}))
    result = cmm(["test", "--config-dir", str(tmp_path)], _env(HOME=str(stack.base)))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[1].startswith("✗ TLS") and "certificate verify failed" in lines[1]
    assert "fix: cmm setup, then restart cmm" in lines[2]
    assert "– intercepted  skipped: no TLS connection" in lines


def test_temporary_instance_passes_and_is_stopped(stack: Stack, tmp_path: Path) -> None:
    certs.ensure_certificates(tmp_path)
    result = cmm(["test", "--temporary", "--config-dir", str(tmp_path), "--source", SOURCE, "--target", TARGET_MODEL,
                  "--proxy-url", f"http://127.0.0.1:{stack.target_port}/v1/messages", "--anthropic-ip", "127.0.0.1",
                  "--anthropic-port", str(stack.anthropic_port)],
                 _env(HOME=str(tmp_path), SSL_CERT_FILE=str(stack.pki / "ca.pem"), SSL_CERT_DIR=None))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Testing a temporary cmm at 127.0.0.1:") and "--no-hosts" in lines[0]
    assert lines[1] == (f"✓ TLS          127.0.0.1:{_temporary_port(result.stdout)} proves it is api.anthropic.com "
                        f"with a certificate from {tmp_path / 'ca.crt'}")
    assert lines[2].startswith("✓ intercepted") and lines[3].startswith("✓ passthrough")
    assert _refused(_temporary_port(result.stdout))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]  # untouched


def test_temporary_instance_reports_broken_routes(stack: Stack, tmp_path: Path) -> None:
    """No certificates yet, the target down, and Anthropic's (fake) CA not trusted: every fix is named."""
    (tmp_path / ".env").write_text(f"PROXY_URL=http://127.0.0.1:{stack.closed_port}/v1/messages\n"
                                   f"DEFAULT_SOURCE_MODEL={SOURCE}\nDEFAULT_TARGET_MODEL={TARGET_MODEL}\n")
    result = cmm(["test", "--config-dir", str(tmp_path), "--anthropic-ip", "127.0.0.1",
                  "--anthropic-port", str(stack.anthropic_port), "--timeout", "20"],
                 _env(HOME=str(tmp_path), SSL_CERT_FILE=None, SSL_CERT_DIR=None))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"✗ certificates  none in {tmp_path}: the test used throwaway ones" in out
    assert "✓ TLS" in out
    assert f"✗ intercepted   {SOURCE}: cmm answered 502: Cannot reach http://127.0.0.1:{stack.closed_port}" in out
    assert "fix: start the target server" in out
    assert "✗ passthrough   claude-opus-5-5: cmm answered 502" in out and "SSL_CERT_FILE" in out
    assert "Log of the temporary cmm:" in out and "INTERCEPTED" in out
    assert _refused(_temporary_port(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]


def test_status_of_the_running_instance(stack: Stack) -> None:
    result = cmm(["status", "--config-dir", str(stack.user)], _env(HOME=str(stack.base)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"cmm is running (pid {stack.cmm_pid}, up ")
    assert f"http://127.0.0.1:{stack.target_port}/v1/messages answers (HTTP 404)" in result.stdout


@pytest.mark.parametrize("left", [True, False])
def test_temporary_run_reports_a_hosts_block_a_killed_cmm_left(tmp_path: Path, left: bool) -> None:
    """No cmm runs, yet the hosts file still sends api.anthropic.com to 127.0.0.1: Claude Code
    reaches nothing there, whatever a temporary cmm on another port proves."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n" + (add_block("") if left else ""))
    certs.ensure_certificates(tmp_path / "cfg")
    out = io.StringIO()
    code = selftest.run(tmp_path / "cfg", Options(source="claude-haiku-4-5", target="m", anthropic_ip="127.0.0.1"),
                        environ=_env(HOME=str(tmp_path)), write=out.write, find=lambda d: Instance(False),
                        run_async=lambda work: [Check("TLS", True, "ok")],  # type: ignore[arg-type,return-value]
                        hosts_file=hosts_file)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Testing a temporary cmm at 127.0.0.1:")
    problem = (f"✗ hosts file  {hosts_file} points api.anthropic.com at 127.0.0.1 but cmm is not running "
               "(left by a killed run): Claude Code cannot reach Anthropic")
    assert (problem in lines, "fix: sudo cmm stop" in out.getvalue(), code) == ((True, True, 1) if left else
                                                                                (False, False, 0)), out.getvalue()


def test_the_running_target_tests_a_hand_back_mapping_and_passes_no_model_a_fallback_rule_takes(tmp_path: Path) -> None:
    """Tried as a user: with `claude-haiku … --on-target-error anthropic` and a fallback rule for
    claude-opus in cool-down, `cmm test` had no mapping to test and sent claude-opus-5-5, which the
    rule took to its target."""
    state = status.parse_state(json.dumps({"pid": 7, "port": 443, "mappings": [
        {"source": "claude-haiku", "target": "g", "url": "http://x/m", "rule": "claude-haiku* → g (else anthropic)",
         "unconditioned": True, "intercepts": True},
        {"source": "*", "target": "p", "url": "http://x/m", "rule": "* [subagent] → p",
         "unconditioned": False, "intercepts": False},
        {"source": "claude-opus", "target": "gpt-5", "url": "http://x/m", "rule": "claude-opus* → gpt-5 (fallback)",
         "unconditioned": True, "intercepts": False}]}))
    target = selftest.running_target(state, tmp_path)
    assert (target.sources, target.taken) == (("claude-haiku",), ("claude-haiku", "claude-opus"))
    assert selftest.choose_models(target.sources, target.taken) == ("claude-haiku", "claude-sonnet-5-5")
    old = status.parse_state(json.dumps({"pid": 7, "mappings": [{"source": "a", "target": "b"},
                                                                {"source": "c", "target": "d", "rule": "c* [x] → d"}]}))
    assert [(m.unconditioned, m.intercepts) for m in old.mappings] == [(True, True), (False, False)]  # older state files
