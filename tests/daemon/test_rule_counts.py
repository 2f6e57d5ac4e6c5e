"""Rules on their way to the workers, and back as counts per rule in ``cmm status``."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cmm.cli import status
from cmm.cli.status import CertInfo, HostsInfo, Instance, MappingInfo, RunningState, StatusReport
from cmm.config.mappings import parse_mappings, save
from cmm.config.userfiles import UserDir
from cmm.core.records import RequestRecord
from cmm.core.router import DEFAULT_FALLBACK_ON
from cmm.core.settings import build_config
from cmm.daemon import wire
from cmm.daemon.stats import LiveStats

RULES = """\
[[mapping]]
source = "*"
target = "gemini-2.5-pro"
request_class = ["subagent", "compaction"]

[[mapping]]
source = "claude-sonnet"
target = "gemini-2.5-pro"
min_body_bytes = 600000
header = { "x-claude-code-agent-type" = "Explore*", "x-b" = "?" }

[[mapping]]
source = "claude-opus"
target = "gpt-5"
mode = "fallback"

[[mapping]]
source = "claude-haiku"
target = "gemini-2.5-flash"
on_target_error = "anthropic"
"""

SUBAGENTS = "* [subagent,compaction] → gemini-2.5-pro"
LONG = "claude-sonnet* [x-claude-code-agent-type=Explore* x-b=? min_body_bytes≥600000] → gemini-2.5-pro"


def test_rules_round_trip_through_the_pipe_to_the_workers(tmp_path: Path) -> None:
    config = build_config({}, {}, tmp_path, parse_mappings(RULES))
    sent = wire.WorkerConfig(proxy=config.proxy, cert_pem=b"cert", key_pem=b"key", anthropic_addresses=(),
                             connect_timeout=2.5)
    received = wire.config_from_message(wire.decode(wire.encode(wire.config_message(sent))))
    assert received == sent
    subagents, long, opus, haiku = received.proxy.router.mappings
    assert subagents.request_class == ("subagent", "compaction") and isinstance(subagents.request_class, tuple)
    assert long.headers == (("x-claude-code-agent-type", "Explore*"), ("x-b", "?")) and long.min_body_bytes == 600000
    assert opus.mode == "fallback" and opus.fallback_on == DEFAULT_FALLBACK_ON
    assert haiku.on_target_error == "anthropic"


def record(rule: str | None, intercepted: bool, status_code: int = 200, request_class: str | None = "main"
           ) -> RequestRecord:
    return RequestRecord(started=0.0, method="POST", path="/v1/messages", model="claude-sonnet-4-5",
                         intercepted=intercepted, target="gemini-2.5-pro" if intercepted else None, status=status_code,
                         duration=0.01, bytes_in=10, bytes_out=20, mapping="claude-sonnet" if intercepted else None,
                         rule=rule, request_class=request_class)


def test_each_rule_counts_apart_and_the_label_survives_the_pipe() -> None:
    stats = LiveStats()
    for item in [record(SUBAGENTS, True, request_class="subagent"), record(SUBAGENTS, True, 529),
                 record(LONG, True), record(None, False), record(None, False)]:
        stats.add(wire.record_from_message(wire.decode(wire.encode(wire.request_message(item)))), "worker-1")
    routes = stats.snapshot()["routes"]
    assert {name: counts["requests"] for name, counts in routes.items()} == {SUBAGENTS: 2, LONG: 1, "passthrough": 2}
    assert routes[SUBAGENTS]["errors"] == {"529": 1}


def test_a_record_without_a_rule_label_counts_by_its_mapping_as_before() -> None:
    stats = LiveStats()
    stats.add(record(None, True), "master")
    assert list(stats.snapshot()["routes"]) == ["claude-sonnet* → gemini-2.5-pro"]


def test_cmm_status_shows_requests_per_rule_and_the_rules_running() -> None:
    stats = LiveStats()
    stats.add(record(SUBAGENTS, True), "worker-1")
    stats.add(record(LONG, True), "worker-1")
    now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    state = RunningState(pid=7, started=now, port=443, listen=("127.0.0.1",), hosts_file=None, config_dir=None,
                         mappings=(MappingInfo("*", "gemini-2.5-pro", "http://localhost:8317/v1/messages", SUBAGENTS),
                                   MappingInfo("claude-haiku", "g", "http://h:1/m")))
    report = StatusReport(config_dir=Path("/home/me/.cmm"), now=now, instance=Instance(True, pid=7, state=state),
                          configured=(), hosts=HostsInfo(None, None),
                          certificate=CertInfo(Path("/home/me/.cmm/server.crt"), now), trust=None, targets=(),
                          routes=status.parse_live(json.loads(json.dumps(stats.snapshot()))))
    lines = status.format_report(report).splitlines()
    assert f"  mapping      {SUBAGENTS} via http://localhost:8317/v1/messages" in lines
    assert "  mapping      claude-haiku* → g via http://h:1/m" in lines  # a plain one, as it always showed
    assert any(line.startswith(f"  requests     {SUBAGENTS}: 1, ") for line in lines), lines
    assert any(line.startswith(f"  requests     {LONG}: 1, ") for line in lines), lines


def test_the_state_file_and_the_configured_file_carry_the_rule_labels(tmp_path: Path) -> None:
    parsed = status.parse_state(json.dumps({"pid": 3, "mappings": [
        {"source": "*", "target": "gemini-2.5-pro", "url": "http://x/m", "rule": SUBAGENTS},
        {"source": "a", "target": "b", "url": "http://x/m"}]}))
    assert [m.rule for m in parsed.mappings] == [SUBAGENTS, ""]
    save(UserDir.open(tmp_path), parse_mappings(RULES))
    configured = status.configured_mappings(tmp_path, {"PROXY_URL": "http://p/m",
                                                       "DEFAULT_SOURCE_MODEL": "claude-sonnet",
                                                       "DEFAULT_TARGET_MODEL": "env-target"})
    # A fallback rule and one that hands failures back are named for it: their counts are not the target's alone.
    assert [m.rule for m in configured] == [SUBAGENTS, LONG, "claude-opus* → gpt-5 (fallback)",
                                           "claude-haiku* → gemini-2.5-flash (else anthropic)", ""]
    assert configured[-1] == MappingInfo("claude-sonnet", "env-target", "http://p/m")  # a rule is not its pair


def test_cmm_test_checks_interception_with_a_plain_mapping_not_a_rule(tmp_path: Path) -> None:
    """A rule needs its conditions (a subagent's header, a long body) that the self-test's
    plain request has not: only plain mappings say which model must be intercepted."""
    from cmm.cli import selftest

    state = RunningState(pid=7, started=None, port=443, listen=("127.0.0.1",), hosts_file=None, config_dir=tmp_path,
                         mappings=(MappingInfo("*", "gemini-2.5-pro", "http://x/m", SUBAGENTS, unconditioned=False,
                                               intercepts=False),
                                   MappingInfo("claude-haiku", "g", "http://x/m")))
    target = selftest.running_target(state, tmp_path)
    assert target.sources == ("claude-haiku",)
    assert selftest.choose_models(target.sources) == ("claude-haiku", "claude-opus-5-5")


def test_a_bad_rules_file_stops_the_start_with_every_problem(tmp_path: Path) -> None:
    from twisted.python import usage

    from cmm.daemon.tap import Options

    (tmp_path / "mappings.toml").write_text(RULES + '[[mapping]]\nsource = "x"\ntarget = "y"\nmode = "fallbak"\n'
                                            'header = { "bad name" = "*" }\n')
    options = Options(environ={})
    with pytest.raises(usage.UsageError) as caught:
        options.parseOptions(["--config-dir", str(tmp_path)])
    assert str(caught.value).splitlines() == [
        f"{tmp_path}/mappings.toml: mapping #5 (source 'x'): header: 'bad name' is not a header name (letters, "
        "digits and -, no spaces)",
        f"{tmp_path}/mappings.toml: mapping #5 (source 'x'): mode must be one of 'always', 'fallback', not "
        "'fallbak' (did you mean 'fallback'?)"]
