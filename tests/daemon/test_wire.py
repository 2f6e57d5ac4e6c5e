"""The master → worker configuration survives its trip through the pipe whole."""

from __future__ import annotations

from pathlib import Path

from cmm.daemon import wire
from cmm.core.settings import build_config


def test_a_config_round_trips_through_a_line(tmp_path: Path) -> None:
    config = build_config({"source": "claude-haiku-4-5", "target": "gemini-2.5-flash"}, {}, tmp_path)
    sent = wire.WorkerConfig(proxy=config.proxy, cert_pem=b"cert", key_pem=b"key",
                             anthropic_addresses=("192.0.2.1", "2001:db8::1"), connect_timeout=2.5)
    line = wire.encode(wire.config_message(sent))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    message = wire.decode(line)
    # Workers take the addresses the master sends and never resolve themselves: no such switch.
    assert set(message) == {"type", "proxy", "cert_pem", "key_pem", "anthropic_addresses", "connect_timeout"}
    assert wire.config_from_message(message) == sent
