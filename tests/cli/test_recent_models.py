"""A stale mapping at a glance: the master counts which mapping matched lately and which models
none matched; ``cmm status`` shows both, ``cmm doctor`` warns when a mapping's family is asked
under another name."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cmm.cli import doctor, status
from cmm.cli.status import (CertInfo, HostsInfo, Instance, MappingInfo, ModelSeen, RecentModels, StatusReport,
                            match_note)
from cmm.core.model_names import family, same_family
from cmm.daemon.stats import MODEL_NAME_MAX, UNMATCHED_MAX, LiveStats
from support import record

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
T = NOW.timestamp()
HAIKU_4 = MappingInfo("claude-haiku-4-5", "gemini-2.5-flash", "http://localhost:8317/v1/messages")
SONNET = MappingInfo("claude-sonnet", "gpt-5", "http://localhost:8317/v1/messages")


def test_families() -> None:
    assert [family(m) for m in ("claude-haiku-5-5", "claude-haiku-4-5-20251001", "claude-haiku", "claude-fable-5-1",
                                "gpt-5", "*")] == ["claude-haiku"] * 3 + ["claude-fable", "gpt", "*"]
    assert same_family("claude-haiku-4-5", "claude-haiku-5-5") and not same_family("claude-haiku", "claude-opus-5-5")
    assert not same_family("*", "*")


def stats_with(*records: object, now: float = T) -> dict[str, object]:
    stats = LiveStats(clock=lambda: now)
    for item in records:
        stats.add(item, "worker-1")  # type: ignore[arg-type]
    return stats.snapshot()


def test_the_master_counts_matches_by_mapping_and_unmatched_models() -> None:
    snapshot = stats_with(
        record(started=T - 30, model="claude-haiku-4-5-20251001", mapping="claude-haiku-4-5"),
        record(started=T - 20, model="claude-haiku-5-5", intercepted=False, target=None),
        record(started=T - 10, model="claude-haiku-5-5", intercepted=False, target=None),
        record(started=T - 7200, model="claude-opus-4-6", intercepted=False, target=None),  # long ago
        record(started=T - 5, model=None, method="GET", path="/v1/models", intercepted=False, target=None),
    )
    assert snapshot["recent"] == {
        "window_s": 3600.0,
        "matched": {"claude-haiku-4-5": {"last": T - 30, "count": 1}},
        "unmatched": {"claude-haiku-5-5": {"last": T - 10, "count": 2}},
    }


def test_what_clients_name_cannot_grow_the_master() -> None:
    records = [record(started=T - 1000 + n, model=f"m-{n}" + "x" * 500, intercepted=False, target=None)
               for n in range(200)]
    unmatched = stats_with(*records)["recent"]["unmatched"]  # type: ignore[index]
    assert len(unmatched) == UNMATCHED_MAX
    assert all(len(name) == MODEL_NAME_MAX for name in unmatched)
    assert min(seen["last"] for seen in unmatched.values()) == T - 1000 + 200 - UNMATCHED_MAX  # the newest kept


def test_status_reads_the_recent_models_and_skips_junk() -> None:
    data = json.loads(json.dumps(stats_with(
        record(started=T - 30, model="claude-opus-5-5", intercepted=False, target=None),
        record(started=T - 10, model="claude-haiku-5-5", intercepted=False, target=None))))
    data["recent"]["unmatched"]["junk"] = {"last": "soon"}
    assert status.parse_recent(data) == RecentModels(3600.0, (), (ModelSeen("claude-haiku-5-5", T - 10, 1),
                                                                  ModelSeen("claude-opus-5-5", T - 30, 1)))
    assert status.parse_recent({"routes": {}}) is None and status.parse_recent({"recent": {"window_s": "x"}}) is None


STALE = RecentModels(3600.0, (ModelSeen("claude-sonnet", T - 125, 4),),
                     (ModelSeen("claude-haiku-5-5", T - 10, 12), ModelSeen("claude-opus-5-5", T - 40, 3)))


def test_a_stale_mapping_shows_at_a_glance_in_status() -> None:
    state = status.RunningState(4242, NOW - timedelta(hours=2), 443, ("127.0.0.1",), (HAIKU_4, SONNET), None, None)
    report = StatusReport(config_dir=Path("/home/me/.cmm"), now=NOW, instance=Instance(True, 4242, state),
                          configured=(), hosts=HostsInfo(None, None),
                          certificate=CertInfo(Path("/c/server.crt"), NOW + timedelta(days=200)), trust=None,
                          targets=(), routes=(), recent=STALE)
    lines = status.format_report(report).splitlines()
    assert ("  mapping      claude-haiku-4-5* → gemini-2.5-flash via http://localhost:8317/v1/messages; ⚠ no match in "
            "the last 60 min, while claude-haiku-5-5 went to Anthropic: map the family, "
            "`cmm map add claude-haiku gemini-2.5-flash`") in lines
    assert ("  mapping      claude-sonnet* → gpt-5 via http://localhost:8317/v1/messages; last match 2m 5s ago") in lines
    assert ("  unmatched    claude-haiku-5-5 ×12 (10s ago), claude-opus-5-5 ×3 (40s ago): passed to Anthropic"
            in lines)


def test_a_mapping_without_matches_and_no_sibling_is_no_warning() -> None:
    quiet = RecentModels(3600.0)
    assert match_note(HAIKU_4, quiet, NOW, NOW - timedelta(minutes=5)) == "; no match since start"
    assert match_note(HAIKU_4, quiet, NOW, NOW - timedelta(hours=5)) == "; no match in the last 60 min"
    assert status._unmatched_line(quiet, NOW) == "none in the last 60 min"


def test_doctor_warns_of_a_mapping_its_family_passed_by() -> None:
    [stale] = doctor.check_recent_models((HAIKU_4, SONNET), STALE, NOW, NOW - timedelta(hours=2))
    assert stale.name == "mapping claude-haiku-4-5*" and stale.ok is False
    assert stale.detail == ("matched no request in the last 60 min, but claude-haiku-5-5 (its family) "
                            "went to Anthropic")
    assert "`cmm map add claude-haiku gemini-2.5-flash`" in stale.fix and "--source claude-haiku" in stale.fix
    [fine] = doctor.check_recent_models((SONNET,), STALE, NOW, NOW - timedelta(minutes=2))
    assert fine == doctor.Check("recent models", True, "no model of a mapped family went to Anthropic since start")
    assert doctor.check_recent_models((), STALE, NOW, None) == []


def test_a_family_prefix_or_a_rule_that_did_not_match_is_not_called_stale() -> None:
    """The advice "map the family" is for a source naming one generation: a family prefix already
    matches them all, and a rule whose conditions did not hold (a small body for a size rule) is
    working as written."""
    recent = RecentModels(3600.0, (), (ModelSeen("claude-sonnet-5-5", T - 5, 1),))
    rule = MappingInfo("claude-sonnet", "gemini-2.5-pro", "http://localhost:8317/v1/messages",
                       rule="claude-sonnet* [min_body_bytes≥600000] → gemini-2.5-pro")
    sonnet_4 = MappingInfo("claude-sonnet-4-5", "gemini-2.5-pro", "http://localhost:8317/v1/messages")
    assert recent.stale_hint("claude-sonnet") == () and recent.stale_hint("claude-sonnet-4-5") == ("claude-sonnet-5-5",)
    assert "⚠" not in match_note(SONNET, recent, NOW, None) and "⚠" not in match_note(rule, recent, NOW, None)
    assert "⚠" in match_note(sonnet_4, recent, NOW, None)
    assert doctor.check_recent_models([rule, SONNET], recent, NOW, None)[0].ok
    assert not doctor.check_recent_models([rule, sonnet_4], recent, NOW, None)[0].ok
