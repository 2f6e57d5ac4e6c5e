"""The real-root system tests: the real ``twistd -n cmm`` on port 443 with the real hosts-file
path, and every ``cmm`` command as a subprocess, inside a private network + mount namespace so the
machine's own /etc/hosts, ports, routes, trust store and shell profiles are never touched.

Inside the namespace (``unshare --net --mount``) only a loopback interface exists, and
/etc/hosts (and for the commands more: see CLI_DRIVER) is a bind mount of a scratch file. A driver
runs there and reports what it saw as JSON; the tests assert on the report. They are skipped, with
the reason, where namespaces cannot be made.
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


NAMESPACE_PROBLEM = namespace_problem()

# Both drivers start with this: loopback up, the scratch hosts file over /etc/hosts, and a way to
# start the fakes and twistd with their output in <work>/<name>.out.
PRELUDE = textwrap.dedent(r'''
    import atexit, json, os, shutil, signal, socket, ssl, subprocess, sys, time
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

    started = []

    @atexit.register
    def end_everything():  # also when the driver fails half-way: nothing outlives it
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()

    def start(args, name, environ=None):
        out = open(work / f"{name}.out", "wb")
        process = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                   env=environ or env, cwd=repo, start_new_session=True)
        started.append(process)
        return process

    def wait_for(name, text, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            data = (work / f"{name}.out").read_text(errors="replace")
            if text in data:
                return data
            time.sleep(0.05)
        raise SystemExit(f"{name} never said {text!r}:\n" + (work / f"{name}.out").read_text(errors="replace"))

    fakes = [start(["-m", "cmm.testing.fakes", "anthropic", "--port", "8443", "--cert-dir", str(work / "pki")], "anthropic"),
             start(["-m", "cmm.testing.fakes", "target", "--port", "8317"], "target")]
    wait_for("anthropic", "listening on"); wait_for("target", "listening on")
''')

DRIVER = PRELUDE + textwrap.dedent(r'''
    from cmm.testing.checkout import twistd_command
    twistd = twistd_command(["--source", "claude-haiku", "--target", "gemini-2.5-flash",
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
        report["haiku"] = ask("claude-haiku-5-5")
        report["opus"] = ask("claude-opus-5-5")
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
        stop = subprocess.run([sys.executable, "-c", "import sys; from cmm.cli.main import main; sys.exit(main(sys.argv[1:]))",
                               "stop", "--config-dir", str(work / "cfg")], env=env, cwd=repo, capture_output=True, text=True)
        report["stop_exit"] = stop.returncode
        report["stop_output"] = stop.stdout + stop.stderr
        report["restored_after_stop"] = hosts_now() == original
    finally:
        for process in fakes:
            process.terminate()
    print("REPORT " + json.dumps(report))
''')


# Every `cmm` command as a subprocess, the way README.md has people type it: as the user (uid
# 65534, "cmmuser", home /home/cmmuser) or under sudo (root with SUDO_*), against the real twistd
# started the sudo way, and with none running. Scratch folders cover /home, /root (where Python
# may live), the trust store's folders (so `--system-trust` and `uninstall` run the real
# update-ca-certificates on copies) and /etc/passwd, /etc/resolv.conf, /etc/hosts; a fake name
# server answers for api.anthropic.com and a fake systemctl writes down what it was asked.
DNS_SERVER = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from twisted.names import dns, hosts, server
    factory = server.DNSServerFactory(authorities=[hosts.Resolver(file=sys.argv[1].encode())])
    reactor.listenUDP(53, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(53, factory, interface="127.0.0.1")
    print("listening on 127.0.0.1:53", flush=True)
    reactor.run()
""")

CLI_DRIVER = PRELUDE + f"DNS_SERVER = {DNS_SERVER!r}\n" + textwrap.dedent(r"""
    from cmm.daemon.launch import TWISTD_CODE
    # The user, uid 65534, runs cmm as themselves with their home in /home/cmmuser, and reaches the
    # checkout (/home/src) and this Python: scratch folders go over /home (and /root, where Python
    # lives under it), so nothing of the real ones is seen or changed.
    cover = work / "home-cover"
    for name in ("cmmuser", "src", "units", "bin"):
        (cover / name).mkdir(parents=True)
    cover.chmod(0o755)
    subprocess.run(["mount", "--bind", repo, str(cover / "src")], check=True)
    python_home = Path(sys.prefix).resolve()
    if Path("/root") in python_home.parents:
        top = python_home.relative_to("/root").parts[0]
        (work / "python").mkdir()
        subprocess.run(["mount", "--bind", f"/root/{top}", str(work / "python")], check=True)
        (work / "root-cover" / top).mkdir(parents=True)
        (work / "root-cover").chmod(0o755)
        subprocess.run(["mount", "--bind", str(work / "root-cover"), "/root"], check=True)
        subprocess.run(["mount", "--bind", str(work / "python"), f"/root/{top}"], check=True)
    subprocess.run(["mount", "--rbind", str(cover), "/home"], check=True)  # with /home/src
    home, units, src = Path("/home/cmmuser"), Path("/home/units"), "/home/src"
    os.chown(home, 65534, 65534)
    shutil.copy(work / "pki" / "ca.pem", "/home/anthropic-ca.pem")  # the fake Anthropic's CA
    anchors = Path("/usr/local/share/ca-certificates")
    store = shutil.which("update-ca-certificates") is not None and anchors.is_dir()
    if store:
        (work / "anchors").mkdir()
        shutil.copytree("/etc/ssl/certs", work / "etc-ssl-certs", symlinks=True)
        (work / "no-hooks").mkdir()
        for source, target in ((work / "anchors", anchors), (work / "etc-ssl-certs", Path("/etc/ssl/certs")),
                               (work / "no-hooks", Path("/etc/ca-certificates/update.d"))):
            if target.is_dir():
                subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    report["system_store"] = store
    report["home"], report["units"] = str(home), str(units)
    # A name server that knows api.anthropic.com (at a documentation address, never contacted).
    (work / "dns-hosts").write_text("192.0.2.10 api.anthropic.com\n2001:db8::10 api.anthropic.com\n")
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    subprocess.run(["mount", "--bind", str(work / "resolv.conf"), "/etc/resolv.conf"], check=True)
    fakes.append(start(["-c", DNS_SERVER, str(work / "dns-hosts")], "dns"))
    wait_for("dns", "listening on")
    # sudo's view: root, with the user in SUDO_* (and HOME root's own, where nothing may land).
    passwd = work / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text() + f"cmmuser:x:65534:65534:cmm test:{home}:/bin/bash\n")
    subprocess.run(["mount", "--bind", str(passwd), "/etc/passwd"], check=True)
    (work / "root-home").mkdir()
    user_env = {"PATH": os.environ["PATH"], "HOME": str(home), "SHELL": "/bin/bash", "LANG": "C.UTF-8",
                "PYTHONPATH": src, "SSL_CERT_FILE": "/home/anthropic-ca.pem"}
    sudo = {"HOME": str(work / "root-home"), "SHELL": "/bin/sh", "SUDO_USER": "cmmuser", "SUDO_UID": "65534",
            "SUDO_GID": "65534"}
    # Every service command gets a systemctl that only writes down how it was called.
    systemctl_log = Path("/home/systemctl.log")
    systemctl_log.write_text("")
    systemctl_log.chmod(0o666)
    Path("/home/bin/systemctl").write_text(
        f"#!/bin/sh\necho \"$*\" >> {systemctl_log}\n"
        "[ \"$1\" = status ] && echo '* cmm.service - active (running)'\nexit 0\n")
    Path("/home/bin/systemctl").chmod(0o755)
    fake_systemctl = {"PATH": f"/home/bin:{os.environ['PATH']}"}
    systemd = dict(sudo, **fake_systemctl)
    ca = home / ".cmm" / "ca.crt"
    runs = report["runs"] = []

    def cmm(label, *args, extra=None):  # as the user, unless under sudo
        environ = dict(user_env, **(extra or {}))
        user = [] if "SUDO_USER" in environ else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        started = time.monotonic()
        done = subprocess.run([*user, sys.executable, "-m", "cmm.cli", *args], env=environ, cwd=src,
                              capture_output=True, text=True, timeout=60)
        runs.append({"label": label, "argv": list(args), "code": done.returncode, "out": done.stdout,
                     "err": done.stderr, "seconds": round(time.monotonic() - started, 2)})

    def profile():
        path = home / ".bashrc"
        return path.read_text() if path.exists() else None

    def ask(model, text="hi", headers=()):  # a request through the hosts block, as Claude Code sends one
        context = ssl.create_default_context(cafile=str(ca))
        body = json.dumps({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": text}]}).encode()
        fields = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers)
        with socket.create_connection(("api.anthropic.com", 443), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="api.anthropic.com") as tls:
                tls.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-user\r\n%s"
                            b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (fields, len(body), body))
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        answer = json.loads(payload)
        return {"model": model, "status": head.split(b" ")[1].decode(), "answer": answer.get("model"),
                "provider": b"x-cmm-provider: cliproxyapi" in head.lower(), "usage": answer.get("usage")}

    def websocket_echo():  # Claude Code's voice dictation: a WebSocket through the same name and port
        from cmm.testing.websocket import Opcode, WebSocketClient, close_payload
        context = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("api.anthropic.com", 443), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="api.anthropic.com") as tls:
                client = WebSocketClient(tls)
                head = client.handshake()
                client.send(Opcode.TEXT, "héllo through cmm".encode())
                echo = client.receive()
                client.send(Opcode.CLOSE, close_payload(1000, "done"))
                closed = client.receive()
        return {"head": head.split(b"\r\n")[0].decode(), "echo": [int(echo.opcode), echo.text],
                "close": [int(closed.opcode), closed.payload.hex()]}

    def usage_rows(expected, *models):  # the recorder commits within about a second
        import sqlite3
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                with sqlite3.connect(f"file:{home / '.cmm' / 'usage.sqlite3'}?mode=ro", uri=True) as db:
                    found = db.execute(f"SELECT count(*) FROM requests WHERE model IN ({','.join('?' * len(models))})"
                                       " OR route = 'tunnel'", models).fetchone()[0]
                if found >= expected:
                    return found
            except sqlite3.Error:
                pass
            time.sleep(0.2)
        raise SystemExit("the usage database never got the requests")

    def usage_files():
        return {path.name: [path.stat().st_uid, path.stat().st_gid, oct(path.stat().st_mode & 0o777)]
                for path in sorted((home / ".cmm").glob("usage.sqlite3*"))}

    def dashboard(label):  # `cmm dashboard` in the background, as the user, until Ctrl-C
        import urllib.error, urllib.request
        argv = ["dashboard", "--no-browser", "--port", "0"]
        out, err = work / "dashboard.out", work / "dashboard.err"
        with open(out, "wb") as out_file, open(err, "wb") as err_file:
            process = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                        sys.executable, "-m", "cmm.cli", *argv], env=user_env, cwd=src,
                                       stdout=out_file, stderr=err_file, start_new_session=True)
        started.append(process)
        begun = time.monotonic()
        while "Ctrl-C stops it" not in out.read_text() and process.poll() is None and time.monotonic() < begun + 20:
            time.sleep(0.05)
        url = next((line.removeprefix("cmm dashboard: ") for line in out.read_text().splitlines()
                    if line.startswith("cmm dashboard: http://127.0.0.1:")), "")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def fetch(address):
            try:
                with opener.open(address, timeout=10) as response:
                    return [response.status, response.headers.get("Content-Type"), response.read().decode()]
            except urllib.error.HTTPError as error:
                return [error.code, error.headers.get("Content-Type"), error.read().decode()]

        fetched = {}
        if url:
            base, _, query = url.partition("/?")
            fetched = {"page": fetch(url), "summary": fetch(f"{base}/api/summary?{query}"),
                       "page without token": fetch(f"{base}/"),
                       "summary without token": fetch(f"{base}/api/summary"),
                       "summary with a wrong token": fetch(f"{base}/api/summary?token=wrong")}
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        runs.append({"label": label, "argv": argv, "code": process.returncode, "out": out.read_text(),
                     "err": err.read_text(), "seconds": round(time.monotonic() - begun, 2)})
        return {"url": url, **fetched}

    def each_command(phase):  # the ones that work alike with or without cmm, then status, test and doctor
        cmm(f"{phase} config list", "config", "list")
        cmm(f"{phase} config get", "config", "get", "PROXY_URL")
        cmm(f"{phase} config set key", "config", "set", "PROXY_API_KEY", "sk-secret-9876")
        cmm(f"{phase} config delete key", "config", "delete", "PROXY_API_KEY")
        cmm(f"{phase} config delete unset", "config", "delete", "PROXY_API_KEY")
        cmm(f"{phase} config get unknown", "config", "get", "NO_SUCH_KEY")
        cmm(f"{phase} map add", "map", "add", "claude-sonnet-4-5", "gpt-5",
            "--url", "http://127.0.0.1:8317/v1/messages")
        cmm(f"{phase} map list", "map", "list")
        cmm(f"{phase} map remove", "map", "remove", "claude-sonnet-4-5")
        cmm(f"{phase} map remove missing", "map", "remove", "claude-sonnet-4-5")
        cmm(f"{phase} service print", "service", "install", "--print", "--unit-dir", str(units),
            "--anthropic-ip", "127.0.0.1", extra=fake_systemctl)
        cmm(f"{phase} service status", "service", "status", "--unit-dir", str(units), extra=fake_systemctl)
        cmm(f"{phase} service uninstall", "service", "uninstall", "--unit-dir", str(units), extra=fake_systemctl)
        cmm(f"{phase} status", "status")
        cmm(f"{phase} test", "test", "--anthropic-ip", "127.0.0.1", "--anthropic-port", "8443", "--timeout", "10")
        cmm(f"{phase} doctor", "doctor", extra={"NODE_EXTRA_CA_CERTS": str(ca)})

    twistd = ["-c", TWISTD_CODE,
              "-n", "--pidfile=", "cmm", "--anthropic-ip", "127.0.0.1", "--anthropic-port", "8443"]
    try:
        cmm("help", "--help")
        cmm("no command")
        cmm("sudo setup", "setup", extra=sudo)
        report["profile_after_setup"] = profile()
        report["owners_after_setup"] = sorted({(path.stat().st_uid, path.stat().st_gid)
                                               for path in [home / ".bashrc", *(home / ".cmm").iterdir()]})
        cmm("setup again", "setup")
        cmm("config set url", "config", "set", "PROXY_URL", "http://127.0.0.1:8317/v1/messages")
        cmm("config set source", "config", "set", "DEFAULT_SOURCE_MODEL", "claude-haiku")
        cmm("config set target", "config", "set", "DEFAULT_TARGET_MODEL", "gemini-2.5-flash")
        report["env_owner"] = [(home / ".cmm" / ".env").stat().st_uid, (home / ".cmm" / ".env").stat().st_gid]
        cmm("stop none", "stop")
        cmm("usage none", "usage")  # no cmm has run yet: no database
        cmm("usage bad since", "usage", "--since", "yesterday")
        each_command("none")

        running = start(twistd, "cmm1", dict(user_env, **sudo))  # sudo twistd -n cmm
        wait_for("cmm1", "/etc/hosts: api.anthropic.com")
        report["pid"] = running.pid
        each_command("running")  # cmm test has written to the request log by now
        report["owners_while_running"] = {
            path.name: [path.lstat().st_uid, path.lstat().st_gid]
            for path in (home / ".cmm" / name for name in ("cmm.pid", "cmm.state.json", "cmm.sock", "cmm.log"))
            if path.exists()}
        # Rules from the command line, applied by SIGHUP while cmm serves, then requests that meet them.
        cmm("running map add class rule", "map", "add", "*", "gemini-2.5-pro",
            "--request-class", "subagent", "--request-class", "compaction")
        cmm("running map add header rule", "map", "add", "claude-sonnet", "gpt-5", "--header",
            "x-claude-code-agent-type=Explore*", "--min-body-bytes", "100", "--on-target-error", "anthropic")
        cmm("running map add workflow rule", "map", "add", "claude-sonnet", "gpt-5", "--request-class", "workflow")
        cmm("running map add fallback rule", "map", "add", "claude-opus", "gpt-5", "--mode", "fallback",
            "--fallback-on", "429,529,unreachable")
        cmm("running map list rules", "map", "list")
        cmm("running map remove shared source", "map", "remove", "claude-sonnet")
        cmm("running map remove number", "map", "remove", "claude-sonnet", "--number", "3")
        cmm("running map list after remove", "map", "list")
        os.kill(running.pid, signal.SIGHUP)
        wait_for("cmm1", "Reloaded: ")
        deadline = time.time() + 15  # every worker has the new rules once a probe meets one
        while not ask("claude-probe-reload", headers=[("x-claude-code-request-class", "subagent")])["provider"]:
            if time.time() > deadline:
                raise SystemExit("the workers never took the reloaded rules")
            time.sleep(0.2)
        time.sleep(1)  # the master told every worker at once: the others are not far behind the probe's
        report["asked"] = [
            ask("claude-opus-4-6", headers=[("x-claude-code-request-class", "subagent")]),
            ask("claude-sonnet-4-5", "a long enough question for the body-size rule",
                headers=[("x-claude-code-agent-type", "Explore-3")]),
            ask("claude-opus-4-6", "the fallback rule keeps this on Anthropic"),
            ask("claude-haiku-4-5-20251001")]
        report["websocket"] = websocket_echo()
        usage_rows(len(report["asked"]) + 1, *{asked["model"] for asked in report["asked"]})  # and the tunnel
        report["usage_files_while_running"] = usage_files()
        report["tunnel_log"] = [line for line in (home / ".cmm" / "cmm.log").read_text().splitlines() if "TUNNEL" in line]
        cmm("running status rules", "status")
        cmm("running usage", "usage")
        cmm("running usage json", "usage", "--json")
        cmm("running usage by route", "usage", "--by", "route", "--json")
        cmm("running usage by mapping", "usage", "--by", "mapping", "--since", "30m")
        cmm("running usage csv", "usage", "--csv")
        cmm("running usage by class", "usage", "--by", "class")
        cmm("running usage by day", "usage", "--by", "day", "--csv")
        cmm("running sudo usage json", "usage", "--json", extra=sudo)
        report["dashboard"] = dashboard("running dashboard")
        for source in ("*", "claude-sonnet", "claude-opus"):
            cmm(f"running map remove rule {source}", "map", "remove", source)
        os.kill(running.pid, signal.SIGHUP)  # back to the plain mapping; a second reload serves on too
        deadline = time.time() + 15
        while (work / "cmm1.out").read_text(errors="replace").count("Reloaded: ") < 2 and time.time() < deadline:
            time.sleep(0.05)
        report["after_second_reload"] = ask("claude-haiku-after-reload")
        if store:
            cmm("running sudo setup system trust", "setup", "--system-trust", extra=sudo)
            report["anchors_after_setup"] = sorted(path.name for path in (work / "anchors").iterdir())
        # What needs root says so to the user, and leaves everything as it was.
        cmm("running user stop", "stop")
        cmm("running user uninstall", "uninstall", "--unit-dir", str(units))
        cmm("running user service install", "service", "install", "--unit-dir", str(units))
        if store:
            cmm("running user setup system trust", "setup", "--system-trust")
        cmm("running sudo service install", "service", "install", "--unit-dir", str(units),
            "--anthropic-ip", "127.0.0.1", extra=systemd)
        cmm("running sudo stop", "stop", extra=sudo)
        report["exit_after_stop"] = running.wait(timeout=20)
        report["hosts_restored_by_stop"] = scratch.read_bytes() == original
        cmm("stopped status", "status")
        cmm("stopped usage json", "usage", "--json")  # the recorder wrote the last requests before it ended
        report["usage_files_after_stop"] = usage_files()

        # The service commands for real against the scratch unit folder and the fake systemctl.
        cmm("stopped sudo service install", "service", "install", "--unit-dir", str(units),
            "--anthropic-ip", "127.0.0.1", "--anthropic-port", "8443", extra=systemd)
        report["unit"] = (units / "cmm.service").read_text() if (units / "cmm.service").exists() else None
        cmm("stopped service status", "service", "status", "--unit-dir", str(units), extra=fake_systemctl)
        for action in ("stop", "start", "restart"):
            cmm(f"stopped sudo service {action}", "service", action, "--unit-dir", str(units), extra=systemd)
        cmm("stopped sudo uninstall with a service", "uninstall", "--unit-dir", str(units), extra=systemd)
        cmm("stopped sudo service uninstall", "service", "uninstall", "--unit-dir", str(units), extra=systemd)
        report["unit_left"] = (units / "cmm.service").exists()
        report["systemctl"] = systemctl_log.read_text().splitlines()

        # kill -9 leaves the hosts block behind with nothing serving: Claude Code reaches nothing.
        killed = start(twistd, "cmm-killed", dict(user_env, **sudo))
        wait_for("cmm-killed", "/etc/hosts: api.anthropic.com")
        report["killed_pid"] = killed.pid
        killed.kill()
        killed.wait()
        cmm("killed status", "status")
        cmm("killed test", "test", "--anthropic-ip", "127.0.0.1", "--anthropic-port", "8443", "--timeout", "10")
        cmm("killed sudo stop", "stop", extra=sudo)
        report["hosts_restored_after_kill"] = scratch.read_bytes() == original

        running = start(twistd, "cmm2", dict(user_env, **sudo))
        wait_for("cmm2", "/etc/hosts: api.anthropic.com")
        report["pid2"] = running.pid
        cmm("running sudo uninstall", "uninstall", "--unit-dir", str(units), extra=sudo)
        report["exit_after_uninstall"] = running.wait(timeout=20)
        report["hosts_restored_by_uninstall"] = scratch.read_bytes() == original
        report["profile_after_uninstall"] = profile()
        report["config_dir_left"] = (home / ".cmm").exists()
        if store:
            report["anchors_after_uninstall"] = sorted(path.name for path in (work / "anchors").iterdir())
        cmm("uninstall again", "uninstall", "--unit-dir", str(units))
        report["root_home_after"] = sorted(path.name for path in (work / "root-home").iterdir())
    except Exception:  # the commands run so far tell what went wrong
        import traceback
        report["driver_error"] = traceback.format_exc()
    finally:
        for process in fakes:
            process.terminate()
    print("REPORT " + json.dumps(report))
""")


@pytest.mark.skipif(NAMESPACE_PROBLEM is not None, reason=str(NAMESPACE_PROBLEM))
def test_real_twistd_on_port_443_with_a_private_hosts_file(tmp_path: Path) -> None:
    report = run_driver(DRIVER, tmp_path)
    assert "# cmm-managed begin" in report["hosts_while_running"]
    assert "127.0.0.1 api.anthropic.com" in report["hosts_while_running"].replace("\t", " ")
    assert report["haiku"] == {"status": "200", "provider": True, "answer": "gemini-2.5-flash",
                               "peer": report["haiku"]["peer"]}
    assert report["haiku"]["peer"] in ("127.0.0.1", "::1")
    assert report["opus"]["provider"] is False and report["opus"]["answer"] == "claude-opus-5-5"
    # twistd shuts down cleanly, then re-raises the signal so its parent sees how it ended.
    assert report["exit_after_term"] == -15 and report["clean_shutdown"] is True
    assert report["restored_after_term"] is True
    assert report["log_lines"] == 2
    assert report["block_left_by_kill"] is True
    assert report["stop_exit"] == 0, report["stop_output"]
    assert report["restored_after_stop"] is True



def run_driver(driver: str, work: Path) -> dict:
    script = work / "driver.py"
    script.write_text(driver)
    done = subprocess.run(
        ["unshare", "--net", "--mount", "--fork", sys.executable, str(script), str(work), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, f"driver failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1][len("REPORT "):])


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of every command (the driver takes about 25 s); the tests below judge its report."""
    if NAMESPACE_PROBLEM is not None:
        pytest.skip(NAMESPACE_PROBLEM)
    report = run_driver(CLI_DRIVER, tmp_path_factory.mktemp("commands"))
    assert "driver_error" not in report, report["driver_error"] + "\n".join(
        f"cmm {' '.join(run['argv'])} -> {run['code']}\n{run['out']}{run['err']}" for run in report["runs"])
    return report


# label -> (exit code, pieces of output); "err:" marks a piece that must be on stderr, the rest on
# stdout. {home}, {units}, {pid} and {pid2} are filled in from the report.
PHASE = {
    "config list": (0, ["PROXY_URL             http://127.0.0.1:8317/v1/messages",
                        "DEFAULT_SOURCE_MODEL  claude-haiku", "DEFAULT_TARGET_MODEL  gemini-2.5-flash"]),
    "config get": (0, ["http://127.0.0.1:8317/v1/messages\n"]),
    "config set key": (0, ["Set PROXY_API_KEY=****9876 in {home}/.cmm/.env"]),
    "config delete key": (0, ["Deleted PROXY_API_KEY from {home}/.cmm/.env; now (default: empty)"]),
    "config delete unset": (0, ["PROXY_API_KEY is not set in {home}/.cmm/.env"]),
    "config get unknown": (2, ["err:cmm: unknown key 'NO_SUCH_KEY'; valid keys: PROXY_URL"]),
    "map add": (0, ["Added claude-sonnet-4-5 → gpt-5 via http://127.0.0.1:8317/v1/messages",
                    "sudo kill -HUP $(cat {home}/.cmm/cmm.pid)"]),
    "map list": (0, ["claude-sonnet-4-5 → gpt-5  http://127.0.0.1:8317/v1/messages  key (PROXY_API_KEY)"]),
    "map remove": (0, ["Removed #1 claude-sonnet-4-5* → gpt-5 from {home}/.cmm/mappings.toml"]),
    "map remove missing": (2, ["err:cmm: no mapping with source 'claude-sonnet-4-5'"]),
    "service print": (0, ["[Service]", " cmm --config-dir {home}/.cmm --anthropic-ip 127.0.0.1\n", "[Install]"]),
    "service status": (1, ["err:cmm: cmm service is not installed (no {units}/cmm.service)"]),
    "service uninstall": (0, ["cmm service is not installed (no {units}/cmm.service)."]),
}
# The rules written by `cmm map add`, applied by SIGHUP, as `cmm map list` and `cmm status` say them.
CLASS_RULE = "* [subagent,compaction] → gemini-2.5-pro"
HEADER_RULE = "claude-sonnet* [x-claude-code-agent-type=Explore* min_body_bytes≥100] → gpt-5 (else anthropic)"
FALLBACK_RULE = "claude-opus* → gpt-5 (fallback)"
ADDED = "Added {rule} via (PROXY_URL) (key (PROXY_API_KEY)) ({conditions}) in {{home}}/.cmm/mappings.toml"
HEADER_CONDITIONS = ("when header x-claude-code-agent-type matches Explore*; when the body has ≥ 100 bytes; "
                     "Anthropic answers when the target fails")
RULES_EXPECTED = {
    "running map add class rule": (0, [ADDED.format(rule="* → gemini-2.5-pro",
                                                    conditions="when request class is subagent or compaction")]),
    "running map add header rule": (0, [ADDED.format(rule="claude-sonnet → gpt-5", conditions=HEADER_CONDITIONS)]),
    "running map add workflow rule": (0, [ADDED.format(rule="claude-sonnet → gpt-5",
                                                       conditions="when request class is workflow")]),
    "running map add fallback rule": (0, [ADDED.format(rule="claude-opus → gpt-5",
                                                       conditions="only when Anthropic answers 429, 529, unreachable"),
                                          "sudo kill -HUP $(cat {home}/.cmm/cmm.pid)"]),
    "running map list rules": (0, [
        "#1 *             → gemini-2.5-pro  (PROXY_URL)  key (PROXY_API_KEY)    when request class is subagent or "
        "compaction\n",
        f"#2 claude-sonnet → gpt-5           (PROXY_URL)  key (PROXY_API_KEY)    {HEADER_CONDITIONS}\n",
        "#3 claude-sonnet → gpt-5           (PROXY_URL)  key (PROXY_API_KEY)    when request class is workflow\n",
        "#4 claude-opus   → gpt-5           (PROXY_URL)  key (PROXY_API_KEY)    only when Anthropic answers 429, 529, "
        "unreachable\n",
        "and from .env (DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL): claude-haiku → gemini-2.5-flash"]),
    "running map remove shared source": (2, ["err:cmm: 2 mappings have source 'claude-sonnet' (#2, #3); say which "
                                             "with `cmm map remove claude-sonnet --number N`"]),
    "running map remove number": (0, ["Removed #3 claude-sonnet* [workflow] → gpt-5 from {home}/.cmm/mappings.toml"]),
    "running map list after remove": (0, [
        f"#2 claude-sonnet → gpt-5           (PROXY_URL)  key (PROXY_API_KEY)    {HEADER_CONDITIONS}\n",
        "#3 claude-opus   → gpt-5           (PROXY_URL)  key (PROXY_API_KEY)    only when Anthropic answers"]),
    # Requests per rule after the requests that met each (the class rule's count has the reload probe).
    "running status rules": (0, [f"mapping      {CLASS_RULE} via http://127.0.0.1:8317/v1/messages; last match",
                                 f"mapping      {HEADER_RULE} via http://127.0.0.1:8317/v1/messages; last match",
                                 f"mapping      {FALLBACK_RULE} via http://127.0.0.1:8317/v1/messages; last match",
                                 f"requests     {CLASS_RULE}: 2, ↑", f"requests     {HEADER_RULE}: 1, ↑",
                                 f"requests     {FALLBACK_RULE}: 1, ↑",
                                 "requests     claude-haiku* → gemini-2.5-flash: 2, ↑", "requests     tunnel: 1, ↑"]),
    **{f"running map remove rule {source}": (0, [f"Removed #1 {label} from {{home}}/.cmm/mappings.toml"])
       for source, label in (("*", CLASS_RULE), ("claude-sonnet", HEADER_RULE), ("claude-opus", FALLBACK_RULE))},
}
USAGE_HEAD = "MODEL                      REQUESTS  ERRORS  INPUT  OUTPUT  CACHE WRITE  CACHE READ  CACHE HIT  "
USAGE_EXPECTED = {
    "usage none": (1, ["err:cmm: no usage recorded yet: {home}/.cmm/usage.sqlite3 does not exist. A running cmm "
                       "(sudo twistd cmm) records every request there."]),
    "usage bad since": (2, ["err:cmm: --since: 'yesterday' is neither a span (30m, 24h, 7d, 2w) nor a date"]),
    "running usage": (0, ["Requests since ", " (24h), by model\n", USAGE_HEAD, "\nclaude-opus-4-6                   2 ",
                          "\nclaude-sonnet-4-5                 1 ", "\nclaude-haiku-4-5-20251001         1 ",
                          "\n(none)                            1 ", "\nTOTAL "]),
    "running usage json": (0, ['"by": "model"']),  # and the numbers: test_cmm_usage_*
    "running sudo usage json": (0, ['"by": "model"']),
    "running usage by route": (0, ['"by": "route"']),
    "running usage by mapping": (0, ["(30m), by mapping\n", "MAPPING ", f"\n{CLASS_RULE}   ", f"\n{HEADER_RULE}   ",
                                     f"\n{FALLBACK_RULE}   ", "\nclaude-haiku* → gemini-2.5-flash   "]),
    "running usage csv": (0, ["model,requests,errors,input_tokens,output_tokens,cache_creation_input_tokens,"
                              "cache_read_input_tokens,cache_hit_rate,p50_seconds,p99_seconds\n",
                              "\nclaude-opus-4-6,2,0,"]),
    "running usage by class": (0, ["(24h), by class\n", "CLASS ", "\nsubagent         2 ", "\n(none) ", "\nTOTAL "]),
    "running usage by day": (0, ["day,requests,errors,input_tokens,"]),
    "stopped usage json": (0, ['"by": "model"']),
    "running dashboard": (0, ["cmm dashboard: http://127.0.0.1:", "/?token=",
                              "reading {home}/.cmm/usage.sqlite3; Ctrl-C stops it"]),
}
INTERCEPTED = "✓ intercepted  claude-haiku → HTTP 200 from the target, with x-cmm-provider: cliproxyapi"
PASSED_THROUGH = "✓ passthrough  claude-opus-5-5 → HTTP 200 from api.anthropic.com, untouched"
EXPECTED = {
    "help": (0, ["usage: cmm", *(f"    {name} " for name in
                                   ("setup", "uninstall", "config", "stop", "map", "status", "test", "doctor",
                                    "service"))]),
    "no command": (2, ["err:cmm: error: the following arguments are required: COMMAND"]),
    "sudo setup": (0, ["Created a local certificate authority: {home}/.cmm/ca.crt",
                       "Issued a server certificate for api.anthropic.com",
                       "shell profile ~/.bashrc: created it with the NODE_EXTRA_CA_CERTS line",
                       'export NODE_EXTRA_CA_CERTS="{home}/.cmm/ca.crt"']),
    "setup again": (0, ["Certificates are in place in {home}/.cmm", "NODE_EXTRA_CA_CERTS line already there"]),
    "config set url": (0, ["Set PROXY_URL=http://127.0.0.1:8317/v1/messages in {home}/.cmm/.env"]),
    "config set source": (0, ["Set DEFAULT_SOURCE_MODEL=claude-haiku"]),
    "config set target": (0, ["Set DEFAULT_TARGET_MODEL=gemini-2.5-flash"]),
    "stop none": (0, ["cmm is not running (no pid file at {home}/.cmm/cmm.pid).", "/etc/hosts has no cmm block."]),
    **{f"{phase} {label}": expected for phase in ("none", "running") for label, expected in PHASE.items()},
    "none status": (1, ["cmm is not running (no pid file in {home}/.cmm)",
                        "mapping      claude-haiku* → gemini-2.5-flash via http://127.0.0.1:8317/v1/messages",
                        "hosts        /etc/hosts has no cmm block"]),
    "none test": (0, ["Testing a temporary cmm at 127.0.0.1:", INTERCEPTED, PASSED_THROUGH, "All checks passed."]),
    "running status": (0, ["cmm is running (pid {pid}, up", "listening    127.0.0.1:443, [::1]:443",
                           "mapping      claude-haiku* → gemini-2.5-flash",
                           "hosts        /etc/hosts points api.anthropic.com at cmm"]),
    "running test": (0, ["Testing the running cmm (pid {pid}) at 127.0.0.1:443",
                         "✓ name lookup  api.anthropic.com resolves to ::1, 127.0.0.1 (cmm)",
                         INTERCEPTED, PASSED_THROUGH, "All checks passed."]),
    "running user stop": (1, ["err:cmm: permission denied stopping the process named in {home}/.cmm/cmm.pid; "
                              "use `sudo cmm stop`"]),
    "running user uninstall": (1, ["err:cmm: permission denied stopping", "err:cmm: nothing else was removed"]),
    "running user service install": (1, ["err:cmm: `cmm service install` changes {units} and the systemd services, "
                                         "which needs root"]),
    "running sudo service install": (1, ["err:cmm: a cmm started by hand is running (pid {pid})"]),
    "running sudo stop": (0, ["Stopped cmm (pid {pid}).", "/etc/hosts has no cmm block."]),
    "stopped status": (1, ["cmm is not running (no pid file in {home}/.cmm)"]),
    "stopped sudo service install": (0, ["Wrote {units}/cmm.service", "$ systemctl daemon-reload",
                                         "$ systemctl enable --now cmm.service",
                                         "cmm runs as a systemd service now and at every boot."]),
    "stopped service status": (0, ["$ systemctl status --no-pager cmm.service", "* cmm.service - active (running)"]),
    "stopped sudo service stop": (0, ["$ systemctl stop cmm.service"]),
    "stopped sudo service start": (0, ["$ systemctl start cmm.service"]),
    "stopped sudo service restart": (0, ["$ systemctl restart cmm.service"]),
    "stopped sudo uninstall with a service": (1, ["err:cmm: cmm runs as a boot service ({units}/cmm.service)",
                                                  "err:nothing was removed"]),
    "stopped sudo service uninstall": (0, ["$ systemctl disable --now cmm.service", "Removed {units}/cmm.service"]),
    "killed status": (1, ["cmm is not running (pid {killed_pid} from a previous run is gone)",
                          "⚠ /etc/hosts still points api.anthropic.com at 127.0.0.1 (left by a killed run)"]),
    "killed test": (1, ["Testing a temporary cmm at 127.0.0.1:",
                        "✗ hosts file   /etc/hosts points api.anthropic.com at 127.0.0.1 but cmm is not running",
                        "fix: sudo cmm stop", INTERCEPTED, PASSED_THROUGH, "1 of 4 checks failed."]),
    "killed sudo stop": (0, ["cmm is not running (stale pid file {home}/.cmm/cmm.pid named pid {killed_pid}).",
                             "Removed the leftover cmm block from /etc/hosts."]),
    "running sudo uninstall": (0, ["Stopped cmm (pid {pid2}).",
                                   "Shell profile ~/.bashrc: removed the NODE_EXTRA_CA_CERTS line.",
                                   "Removed {home}/.cmm (", "cmm is uninstalled."]),
    "uninstall again": (0, ["cmm is not running (no pid file at {home}/.cmm/cmm.pid).",
                            "{home}/.cmm does not exist.", "cmm is uninstalled."]),
    **RULES_EXPECTED, **USAGE_EXPECTED,
}
STORE_EXPECTED = {
    "running user setup system trust": (1, ["err:cmm: --system-trust needs root: run `sudo cmm setup --system-trust`"]),
    "running sudo setup system trust": (0, ["system trust store: added cmm's CA to update-ca-certificates"]),
}
DOCTOR_EXPECTED = {
    "none doctor": (0, ["✓ port 443             free on 127.0.0.1 and ::1",
                        "✓ hosts file           /etc/hosts has no cmm block (cmm is not running)",
                        "✓ DNS                  api.anthropic.com is at 192.0.2.10, 2001:db8::10",
                        "All checks passed."]),
    "running doctor": (0, ["✓ port 443             held by cmm (pid {pid})",
                           "✓ hosts file           /etc/hosts points api.anthropic.com at cmm",
                           "✓ DNS                  api.anthropic.com is at 192.0.2.10, 2001:db8::10",
                           "All checks passed."]),
}


def problems_with(run: dict, expected: tuple[int, list[str]], report: dict) -> list[str]:
    code, pieces = expected
    found = []
    if run["code"] != code:
        found.append(f"exit {run['code']}, expected {code}")
    for piece in pieces:
        stream = "err" if piece.startswith("err:") else "out"
        text = piece.removeprefix("err:").format(**report)
        if text not in run[stream]:
            found.append(f"std{stream} lacks {text!r}")
    if "Traceback" in run["out"] + run["err"]:
        found.append("printed a traceback")
    return found


def judge(report: dict, expected: dict[str, tuple[int, list[str]]]) -> None:
    runs = {run["label"]: run for run in report["runs"] if run["label"] in expected}
    assert sorted(runs) == sorted(expected), "commands that did not run"
    failures = {label: found for label, run in runs.items() if (found := problems_with(run, expected[label], report))}
    assert not failures, "\n\n".join(
        f"cmm {' '.join(runs[label]['argv'])}  [{label}]: {'; '.join(found)}\n"
        f"--- stdout:\n{runs[label]['out']}--- stderr:\n{runs[label]['err']}" for label, found in failures.items())


def test_every_cmm_command_with_and_without_a_running_cmm(commands: dict) -> None:
    expected = dict(EXPECTED, **(STORE_EXPECTED if commands["system_store"] else {}))
    judge(commands, expected)
    labels = {run["label"] for run in commands["runs"]}
    assert labels <= set(expected) | set(DOCTOR_EXPECTED), "a command this test does not judge"
    assert all(run["seconds"] < 20 for run in commands["runs"]), "a command took 20 s: did it wait for a timeout?"
    # No command shows the API key it was given.
    assert not any("sk-secret" in run["out"] + run["err"] for run in commands["runs"])


def test_what_the_commands_did_to_the_machine(commands: dict) -> None:
    home = commands["home"]
    assert commands["profile_after_setup"] == f'export NODE_EXTRA_CA_CERTS="{home}/.cmm/ca.crt" # cmm-managed\n'
    # `sudo cmm setup` leaves the user's files to the user.
    assert commands["owners_after_setup"] == [[65534, 65534]]
    assert commands["env_owner"] == [65534, 65534]  # the commands without sudo ran as the user
    # So do the files `sudo twistd cmm` makes there: `cmm status` and `cmm test` work without sudo.
    assert commands["owners_while_running"] == {name: [65534, 65534] for name in
                                                ("cmm.pid", "cmm.state.json", "cmm.sock", "cmm.log")}
    assert commands["exit_after_stop"] == -15 and commands["hosts_restored_by_stop"] is True
    assert "Environment=SUDO_USER=cmmuser SUDO_UID=65534 SUDO_GID=65534\n" in commands["unit"]
    assert f" cmm --config-dir {home}/.cmm --anthropic-ip 127.0.0.1 --anthropic-port 8443\n" in commands["unit"]
    assert commands["systemctl"] == ["daemon-reload", "enable --now cmm.service", "status --no-pager cmm.service",
                                     "stop cmm.service", "start cmm.service", "restart cmm.service",
                                     "disable --now cmm.service", "daemon-reload"]
    assert commands["unit_left"] is False
    assert commands["hosts_restored_after_kill"] is True
    assert commands["exit_after_uninstall"] == -15 and commands["hosts_restored_by_uninstall"] is True
    assert commands["profile_after_uninstall"] == "" and commands["config_dir_left"] is False
    if commands["system_store"]:
        assert commands["anchors_after_setup"] == ["cmm-local-ca.crt"]
        assert commands["anchors_after_uninstall"] == []
    # Under sudo, HOME is root's: nothing may land there.
    assert commands["root_home_after"] == []


def test_cmm_doctor_with_and_without_a_running_cmm(commands: dict) -> None:
    judge(commands, DOCTOR_EXPECTED)


def output_of(commands: dict, label: str) -> str:
    [run] = [run for run in commands["runs"] if run["label"] == label]
    return run["out"]


def usage_groups(commands: dict, label: str) -> dict:
    """`cmm usage --json`'s groups by key, without the latencies (which vary from run to run)."""
    document = json.loads(output_of(commands, label))
    return {group["key"]: {name: value for name, value in group.items() if name not in ("p50_seconds", "p99_seconds")}
            for group in document["groups"]}


def test_rules_from_cmm_map_are_applied_by_sighup_and_cmm_keeps_serving(commands: dict) -> None:
    assert "when request class is workflow" not in output_of(commands, "running map list after remove")
    # Each request met the rule meant for it, through the hosts block, after the reload.
    assert [(asked["model"], asked["status"], asked["answer"], asked["provider"]) for asked in commands["asked"]] == [
        ("claude-opus-4-6", "200", "gemini-2.5-pro", True),  # request class subagent
        ("claude-sonnet-4-5", "200", "gpt-5", True),  # header and body size
        ("claude-opus-4-6", "200", "claude-opus-4-6", False),  # the fallback rule: Anthropic answered
        ("claude-haiku-4-5-20251001", "200", "gemini-2.5-flash", True)]  # the .env pair, still there
    # The rules removed and a second SIGHUP: the plain mapping serves on.
    after = commands["after_second_reload"]
    assert (after["status"], after["answer"], after["provider"]) == ("200", "gemini-2.5-flash", True)


def test_a_websocket_passes_through_the_running_cmm(commands: dict) -> None:
    assert commands["websocket"] == {"head": "HTTP/1.1 101 Switching Protocols", "echo": [1, "héllo through cmm"],
                                     "close": [8, "03e8"]}  # close code 1000, echoed
    [line] = commands["tunnel_log"]
    assert "GET /api/ws/speech_to_text/voice_stream" in line and "→ TUNNEL ✓ 101" in line


def test_cmm_usage_reads_what_the_running_cmm_recorded(commands: dict) -> None:
    groups = usage_groups(commands, "running usage json")
    for model, requests in (("claude-opus-4-6", 2), ("claude-sonnet-4-5", 1), ("claude-haiku-4-5-20251001", 1),
                            (None, 1)):  # None: the WebSocket, which names no model
        assert groups[model]["requests"] == requests and groups[model]["errors"] == 0, (model, groups)
    routes = usage_groups(commands, "running usage by route")
    assert set(routes) == {"intercepted", "passthrough", "tunnel"}
    # cmm test's, the probe that met the reloaded rules, and three of the requests above
    assert routes["intercepted"]["requests"] == 5 and routes["tunnel"]["requests"] == 1
    # Under sudo it reads the same file, as the user; after `cmm stop` the same rows are there, and
    # the one sent after the second reload.
    assert usage_groups(commands, "running sudo usage json") == groups
    stopped = usage_groups(commands, "stopped usage json")
    assert stopped.pop("claude-haiku-after-reload")["requests"] == 1
    assert stopped == groups
    # The recorder, as the user, made the database: the user's alone.
    home = commands["home"]
    for when in ("usage_files_while_running", "usage_files_after_stop"):
        files = commands[when]
        assert {"usage.sqlite3", "usage.sqlite3-wal"} <= set(files), (when, files)
        assert all(state == [65534, 65534, "0o600"] for state in files.values()), (when, files)
    assert json.loads(output_of(commands, "running usage json"))["database"] == f"{home}/.cmm/usage.sqlite3"


def test_cmm_usage_counts_the_tokens_the_fakes_returned(commands: dict) -> None:
    groups = usage_groups(commands, "running usage json")
    for model in ("claude-opus-4-6", "claude-sonnet-4-5", "claude-haiku-4-5-20251001"):
        answers = [asked["usage"] for asked in commands["asked"] if asked["model"] == model]
        assert groups[model]["input_tokens"] == sum(usage["input_tokens"] for usage in answers) > 0, model
        assert groups[model]["output_tokens"] == sum(usage["output_tokens"] for usage in answers) > 0, model


def test_cmm_dashboard_serves_the_recorded_requests_only_with_its_token(commands: dict) -> None:
    dashboard = commands["dashboard"]
    status, kind, page = dashboard["page"]
    assert (status, kind) == (200, "text/html; charset=utf-8") and "<title>cmm dashboard</title>" in page
    status, kind, text = dashboard["summary"]
    assert (status, kind) == (200, "application/json; charset=utf-8")
    summary = json.loads(text)
    assert summary["requests"] == json.loads(output_of(commands, "running usage json"))["total"]["requests"]
    rules = {(route["route"], route["rule"]): route["requests"] for route in summary["routes"]}
    assert rules[("intercepted", CLASS_RULE)] == 2 and rules[("intercepted", HEADER_RULE)] == 1
    assert rules[("passthrough", FALLBACK_RULE)] == 1 and rules[("tunnel", None)] == 1
    for name in ("page without token", "summary without token", "summary with a wrong token"):
        assert dashboard[name][0] == 403 and "requests" not in dashboard[name][2], name
