"""The one real-root system test: the real ``twistd -n cmm`` on port 443 with the real hosts-file
path, inside a private network + mount namespace so the machine's own /etc/hosts, ports and
routes are never touched.

Inside the namespace (``unshare --net --mount``) only a loopback interface exists, and
/etc/hosts is a bind mount of a scratch file. The driver below runs there and reports what it
saw as JSON; this test asserts on the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def namespace_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a private network + mount namespace"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "--net", "--mount", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


DRIVER = textwrap.dedent(r'''
    import json, os, signal, socket, ssl, subprocess, sys, time
    from pathlib import Path

    work = Path(sys.argv[1]); repo = sys.argv[2]
    sys.path.insert(0, repo)
    report = {}
    env = dict(os.environ, PYTHONPATH=repo, SSL_CERT_FILE=str(work / "pki" / "ca.pem"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    original = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n# no trailing newline here ->"
    scratch = work / "hosts"
    scratch.write_bytes(original)
    subprocess.run(["mount", "--bind", str(scratch), "/etc/hosts"], check=True)

    def start(args, name):
        out = open(work / f"{name}.out", "wb")
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=repo,
                                start_new_session=True)

    def wait_for(name, text, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            data = (work / f"{name}.out").read_text(errors="replace")
            if text in data:
                return data
            time.sleep(0.05)
        raise SystemExit(f"{name} never said {text!r}:\n" + (work / f"{name}.out").read_text(errors="replace"))

    fakes = [start(["-m", "cmm.fakes", "anthropic", "--port", "8443", "--cert-dir", str(work / "pki")], "anthropic"),
             start(["-m", "cmm.fakes", "target", "--port", "8317"], "target")]
    wait_for("anthropic", "listening on"); wait_for("target", "listening on")
    from cmm.checkout import twistd_command
    twistd = twistd_command(["--source", "claude-haiku-4-5", "--target", "gemini-2.5-flash",
                             "--config-dir", str(work / "cfg"), "--anthropic-ip", "127.0.0.1",
                             "--anthropic-port", "8443"])[1:]  # start() adds the interpreter

    def ask(model):
        context = ssl.create_default_context(cafile=str(work / "cfg" / "ca.crt"))
        body = json.dumps({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("api.anthropic.com", 443), timeout=10) as raw:
            peer = raw.getpeername()[0]
            with context.wrap_socket(raw, server_hostname="api.anthropic.com") as tls:
                tls.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-user\r\n"
                            b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        return {"status": head.split(b" ")[1].decode(), "provider": b"x-cmm-provider: cliproxyapi" in head,
                "answer": json.loads(payload)["model"], "peer": peer}

    def hosts_now():
        return Path("/etc/hosts").read_bytes()

    try:
        cmm = start(twistd, "cmm1")
        wait_for("cmm1", "/etc/hosts: api.anthropic.com")
        report["hosts_while_running"] = hosts_now().decode()
        report["haiku"] = ask("claude-haiku-4-5-20251001")
        report["opus"] = ask("claude-opus-4-6")
        cmm.send_signal(signal.SIGTERM)
        report["exit_after_term"] = cmm.wait(timeout=20)
        report["clean_shutdown"] = "Server Shut Down." in (work / "cmm1.out").read_text()
        report["restored_after_term"] = hosts_now() == original
        report["log_lines"] = (work / "cfg" / "cmm.log").read_text().count("\n")

        cmm = start(twistd, "cmm2")
        wait_for("cmm2", "/etc/hosts: api.anthropic.com")
        cmm.send_signal(signal.SIGKILL)
        cmm.wait(timeout=20)
        report["block_left_by_kill"] = b"cmm-managed" in hosts_now()
        stop = subprocess.run([sys.executable, "-c", "import sys; from cmm.cli import main; sys.exit(main(sys.argv[1:]))",
                               "stop", "--config-dir", str(work / "cfg")], env=env, cwd=repo, capture_output=True, text=True)
        report["stop_exit"] = stop.returncode
        report["stop_output"] = stop.stdout + stop.stderr
        report["restored_after_stop"] = hosts_now() == original
    finally:
        for process in fakes:
            process.terminate()
    print("REPORT " + json.dumps(report))
''')


@pytest.mark.skipif(namespace_problem() is not None, reason=str(namespace_problem()))
def test_real_twistd_on_port_443_with_a_private_hosts_file(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run(
        ["unshare", "--net", "--mount", "--fork", sys.executable, str(driver), str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, f"driver failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(lines[-1][len("REPORT "):])
    assert "# cmm-managed begin" in report["hosts_while_running"]
    assert "127.0.0.1 api.anthropic.com" in report["hosts_while_running"].replace("\t", " ")
    assert report["haiku"] == {"status": "200", "provider": True, "answer": "gemini-2.5-flash",
                               "peer": report["haiku"]["peer"]}
    assert report["haiku"]["peer"] in ("127.0.0.1", "::1")
    assert report["opus"]["provider"] is False and report["opus"]["answer"] == "claude-opus-4-6"
    # twistd shuts down cleanly, then re-raises the signal so its parent sees how it ended.
    assert report["exit_after_term"] == -15 and report["clean_shutdown"] is True
    assert report["restored_after_term"] is True
    assert report["log_lines"] == 2
    assert report["block_left_by_kill"] is True
    assert report["stop_exit"] == 0, report["stop_output"]
    assert report["restored_after_stop"] is True
