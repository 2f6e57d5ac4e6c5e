"""What a worker loads: only what serving needs. Every worker is a whole Python process, so a
module it loads for nothing (certificate building, the CLI, the fakes, DNS, the usage store) is
paid for once per worker; the list below is checked in a fresh interpreter that has imported the
worker and taken a configuration, as a started worker has."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from cmm.core.settings import build_config
from cmm.daemon import wire
from cmm.machine import certs
from cmm.testing.checkout import checkout_env

FORBIDDEN = (
    "cmm.machine",  # certificate building, trust stores, the hosts file: the master's work
    "cmm.cli", "cmm.testing", "cmm.usage", "cmm.dashboard",
    "cmm.daemon.master", "cmm.daemon.service", "cmm.daemon.tap", "cmm.daemon.stats",
    "twisted.names",  # the master resolves and sends the addresses
    "twisted.web", "twisted.application", "twisted.scripts", "treq", "sqlite3",
    "hypothesis", "pytest",
)

CONFIGURED_WORKER = """
import json, sys
from twisted.internet import reactor
from cmm.daemon.worker import WorkerControl
control = WorkerControl(reactor, [], grace=1.0)
control.lineReceived(sys.stdin.buffer.readline().rstrip(b"\\n"))
assert control.context is not None, "the configuration was not taken"
print(json.dumps(sorted(sys.modules)))
"""


def test_a_configured_worker_loads_none_of_the_forbidden_modules(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    ca = certs.make_ca(now)
    server = certs.make_server_certificate(ca, now, hostnames=("api.anthropic.com",))
    config = build_config({"source": ["claude-haiku-4-5"], "target": ["gemini-2.5-flash"]}, {}, tmp_path)
    line = wire.encode(wire.config_message(wire.WorkerConfig(
        proxy=config.proxy, cert_pem=server.cert_pem, key_pem=server.key_pem,
        anthropic_addresses=("192.0.2.1",), connect_timeout=5.0)))
    done = subprocess.run([sys.executable, "-c", CONFIGURED_WORKER], input=line, capture_output=True,
                          env=checkout_env(), cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    loaded = json.loads(done.stdout)
    assert "cmm.serve.proxy" in loaded  # it did load the serving stack
    found = [name for name in loaded if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)]
    assert found == []
