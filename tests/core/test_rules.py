"""Choosing a routing rule: conditions first in file order, then the longest plain prefix; a size
condition asks for more of the body only while it can decide; labels; the settings' merge."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given, strategies as st

from cmm.core.decoding import BodyDecoder
from cmm.core.exchange import BodyPart, ModelSniffer, RequestBody, SizeHold, body_size, route
from cmm.core.http_head import RequestHead, parse_request_head
from cmm.core.model_finder import Found, NotFound
from cmm.core.router import (DEFAULT_FALLBACK_ON, REQUEST_CLASSES, BodySize, Mapping, Pending, Router, Upstream,
                             request_class_of, rule_label)
from cmm.core.settings import ConfigError, build_config

UP = Upstream.from_url("http://127.0.0.1:8317/v1/messages")
COMPLETE_SMALL = BodySize(10, complete=True)


def head(*fields: tuple[str, str], framing: str = "Content-Length: 10") -> RequestHead:
    lines = ["POST /v1/messages HTTP/1.1", "Host: api.anthropic.com", *(f"{k}: {v}" for k, v in fields), framing]
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode())


def rule(source: str, target: str = "t", **conditions: object) -> Mapping:
    return Mapping(source, target, UP, **conditions)  # type: ignore[arg-type]


SUBAGENTS = rule("*", "gemini-2.5-pro", request_class=("subagent", "compaction"))
LONG = rule("claude-sonnet", "long", min_body_bytes=600_000)
EXPLORE = rule("claude-opus", "explore", headers=(("X-Claude-Code-Agent-Type", "Explore*"),))
HAIKU = rule("claude-haiku", "flash")
HAIKU_45 = rule("claude-haiku-4-5", "flash-45")
EVERYTHING = rule("*", "catch-all")
ROUTER = Router((HAIKU, SUBAGENTS, LONG, EXPLORE, HAIKU_45))


# --- the order ------------------------------------------------------------------------------------


def test_a_condition_beats_any_plain_prefix_however_long() -> None:
    subagent = head(("x-claude-code-request-class", "subagent"))
    assert ROUTER.choose("claude-haiku-4-5-20251001", subagent, COMPLETE_SMALL) is SUBAGENTS
    assert ROUTER.choose("claude-haiku-4-5-20251001", head(), COMPLETE_SMALL) is HAIKU_45  # longest plain prefix
    assert ROUTER.choose("claude-haiku-3", head(), COMPLETE_SMALL) is HAIKU
    assert ROUTER.choose("claude-opus-5-5", head(("x-claude-code-request-class", "main")), COMPLETE_SMALL) is None


def test_rules_with_conditions_are_tried_in_file_order() -> None:
    first = rule("claude", "first", request_class=("subagent",))
    second = rule("claude-opus", "second", request_class=("subagent",))
    subagent = head(("x-claude-code-request-class", "subagent"))
    assert Router((first, second)).choose("claude-opus-4", subagent, COMPLETE_SMALL) is first
    assert Router((second, first)).choose("claude-opus-4", subagent, COMPLETE_SMALL) is second
    assert Router((second, first)).choose("claude-sonnet-4", subagent, COMPLETE_SMALL) is first  # prefix too


def test_a_star_matches_any_model_and_loses_to_every_plain_prefix() -> None:
    router = Router((EVERYTHING, HAIKU))
    assert router.choose("anything-at-all", head(), COMPLETE_SMALL) is EVERYTHING
    assert router.choose("claude-haiku-4-5", head(), COMPLETE_SMALL) is HAIKU
    assert router.match("claude-haiku-4-5") is HAIKU and router.match("gpt") is EVERYTHING


def test_request_class_is_read_from_claude_codes_header() -> None:
    for value in REQUEST_CLASSES:
        chosen = ROUTER.choose("claude-opus-4", head(("x-claude-code-request-class", value)), COMPLETE_SMALL)
        assert (chosen is SUBAGENTS) == (value in ("subagent", "compaction")), value
    assert ROUTER.choose("claude-opus-4", head(("X-Claude-Code-Request-Class", " subagent ")), COMPLETE_SMALL) \
        is SUBAGENTS
    assert ROUTER.choose("claude-opus-4", head(("x-claude-code-request-class", "Subagent")), COMPLETE_SMALL) is None
    assert request_class_of(head()) is None
    assert request_class_of(head(("x-claude-code-request-class", "side_reply"))) == "side_reply"


def test_header_names_ignore_case_and_values_match_the_glob_exactly() -> None:
    def chosen(*fields: tuple[str, str]) -> Mapping | None | Pending:
        return ROUTER.choose("claude-opus-4", head(*fields), COMPLETE_SMALL)

    assert chosen(("x-claude-code-agent-type", "Explore")) is EXPLORE
    assert chosen(("X-CLAUDE-CODE-AGENT-TYPE", "Explorer-7")) is EXPLORE
    assert chosen(("x-claude-code-agent-type", "explore")) is None  # the glob is case-sensitive
    assert chosen(("x-claude-code-agent-type", "Plan"), ("x-claude-code-agent-type", "Explore")) is EXPLORE  # any value
    assert chosen() is None  # an absent header matches no glob, not even "*"
    present = rule("*", "present", headers=(("x-claude-code-agent-id", "*"),))
    assert Router((present,)).choose("m", head(("x-claude-code-agent-id", "")), COMPLETE_SMALL) is present
    assert Router((present,)).choose("m", head(), COMPLETE_SMALL) is None


def test_every_condition_of_a_rule_must_hold() -> None:
    both = rule("*", "both", request_class=("subagent",), headers=(("x-claude-code-agent-type", "Explore*"),),
                min_body_bytes=100)
    router = Router((both,))
    fields = (("x-claude-code-request-class", "subagent"), ("x-claude-code-agent-type", "Explore"))
    assert router.choose("m", head(*fields), BodySize(100, True)) is both
    assert router.choose("m", head(*fields), BodySize(99, True)) is None
    assert router.choose("m", head(fields[0]), BodySize(100, True)) is None
    assert router.choose("m", head(fields[1]), BodySize(100, True)) is None


# --- the body's size ------------------------------------------------------------------------------


def test_a_size_condition_decides_with_a_known_size_and_waits_on_an_unknown_one() -> None:
    assert ROUTER.choose("claude-sonnet-4", head(), BodySize(600_000, True)) is LONG
    assert ROUTER.choose("claude-sonnet-4", head(), BodySize(599_999, True)) is None
    assert ROUTER.choose("claude-sonnet-4", head(), BodySize(1000, False)) is Pending.SIZE
    assert ROUTER.choose("claude-sonnet-4", head(), BodySize(600_000, False)) is LONG  # enough, before the end


def test_no_wait_when_no_size_condition_can_apply() -> None:
    unknown = BodySize(0, complete=False)
    assert ROUTER.choose("claude-haiku-4-5", head(), unknown) is HAIKU_45  # no size rule for this model
    assert ROUTER.choose("claude-sonnet-4", head(("x-claude-code-request-class", "subagent")), unknown) \
        is SUBAGENTS  # an earlier rule wins first
    gated = rule("claude-sonnet", "gated", headers=(("x-big", "yes"),), min_body_bytes=10)
    assert Router((gated,)).choose("claude-sonnet-4", head(), unknown) is None  # its header does not hold


def test_body_size_reads_content_length_only_for_a_plain_body() -> None:
    assert body_size(head(framing="Content-Length: 700000"), False, 12, False) == BodySize(700_000, True)
    assert body_size(head(framing="Content-Length: 700000"), True, 12, False) == BodySize(12, False)  # compressed
    assert body_size(head(framing="Transfer-Encoding: chunked"), False, 12, True) == BodySize(12, True)


names = st.sampled_from(["claude", "claude-opus", "claude-opus-4", "claude-sonnet", "*", "gpt"])
classes = st.lists(st.sampled_from(REQUEST_CLASSES), max_size=2, unique=True).map(tuple)
globs = st.sampled_from(["Explore*", "*", "Plan", "[EP]*"])
rules = st.builds(
    lambda source, target, request_class, header, size: Mapping(
        source, target, UP, request_class=request_class,
        headers=((("x-claude-code-agent-type", header),) if header else ()), min_body_bytes=size),
    names, st.sampled_from(["a", "b", "c"]), classes, st.none() | globs, st.none() | st.integers(1, 5000))
heads = st.builds(
    lambda request_class, agent: head(*([("x-claude-code-request-class", request_class)] if request_class else []),
                                      *([("x-claude-code-agent-type", agent)] if agent else [])),
    st.none() | st.sampled_from(REQUEST_CLASSES), st.none() | st.sampled_from(["Explore", "Plan", "explore", ""]))
models = st.sampled_from(["claude-opus-4-6", "claude-sonnet-4-5", "claude-haiku", "gpt-5", "x"])


@given(st.lists(rules, max_size=6), models, heads, st.integers(0, 6000), st.integers(0, 6000))
def test_a_decision_taken_early_is_the_one_the_whole_body_gets(mappings: list[Mapping], model: str,
                                                                request: RequestHead, seen: int, more: int) -> None:
    """Whatever is decided on part of the body holds for the whole of it; the whole never waits."""
    router = Router(tuple(mappings))
    final = router.choose(model, request, BodySize(seen + more, complete=True))
    assert final is not Pending.SIZE
    early = router.choose(model, request, BodySize(seen, complete=False))
    if early is not Pending.SIZE:
        assert early is final


@given(st.lists(rules, max_size=6), models, heads, st.integers(0, 6000))
def test_the_chosen_rule_is_the_first_that_holds(mappings: list[Mapping], model: str, request: RequestHead,
                                                 size: int) -> None:
    router = Router(tuple(mappings))
    chosen = router.choose(model, request, BodySize(size, complete=True))

    def holds(m: Mapping) -> bool:
        return model.startswith(m.prefix) and m.head_holds(request) and (
            m.min_body_bytes is None or size >= m.min_body_bytes)

    conditioned = [m for m in mappings if m.conditioned and holds(m)]
    if conditioned:
        assert chosen is conditioned[0]
    else:
        plain = [m for m in mappings if not m.conditioned and holds(m)]
        assert chosen is (max(plain, key=lambda m: len(m.prefix)) if plain else None)
        if plain:
            assert isinstance(chosen, Mapping) and len(chosen.prefix) == max(len(m.prefix) for m in plain)


@given(st.lists(rules.filter(lambda m: not m.conditioned), max_size=6), models, heads, st.integers(0, 10))
def test_plain_mappings_route_by_model_alone(mappings: list[Mapping], model: str, request: RequestHead,
                                             size: int) -> None:
    router = Router(tuple(mappings))
    assert router.choose(model, request, BodySize(size, False)) is router.match(model)


def test_route_passes_requests_without_a_model() -> None:
    assert route(NotFound("no model"), ROUTER, head(), COMPLETE_SMALL) is None
    assert route(None, ROUTER, head(), COMPLETE_SMALL) is None
    assert route(Found("claude-haiku-4-5", 10, 28), ROUTER, head(), COMPLETE_SMALL) is HAIKU_45


def test_size_hold_gives_what_the_sniffer_would_have_with_the_model_last() -> None:
    body = b'{"model":"claude-sonnet-4","messages":[{"role":"user","content":"' + b"x" * 5000 + b'"}]}'
    compressed = gzip.compress(body)
    request = head(("Content-Encoding", "gzip"), framing=f"Content-Length: {len(compressed)}")
    decoder = BodyDecoder(["gzip"], 1 << 20)
    tracker, sniffer = RequestBody(request, 1 << 20), ModelSniffer(decoder)
    pieces = [compressed[i:i + 700] for i in range(0, len(compressed), 700)]
    parts: list[BodyPart] = [tracker.feed(piece) for piece in pieces]
    sniffed = None
    while sniffed is None:
        sniffed = sniffer.feed(parts.pop(0))
    hold = SizeHold(sniffed, decoder)
    assert isinstance(hold.result, Found) and hold.result.model == "claude-sonnet-4"
    for part in parts:
        hold.feed(part)
    whole = hold.sniffed()
    assert whole.raw == compressed and whole.payload == body and hold.size == len(body)
    assert body_size(request, True, hold.size, True) == BodySize(len(body), True)


# --- labels --------------------------------------------------------------------------------------


def test_labels_name_source_conditions_and_target() -> None:
    assert rule_label(HAIKU) == "claude-haiku* → flash"
    assert rule_label(SUBAGENTS) == "* [subagent,compaction] → gemini-2.5-pro"
    assert rule_label(LONG) == "claude-sonnet* [min_body_bytes≥600000] → long"
    assert rule_label(EXPLORE) == "claude-opus* [X-Claude-Code-Agent-Type=Explore*] → explore"
    assert rule_label(EVERYTHING) == "* → catch-all"


def test_a_mapping_refuses_unknown_modes_and_sizes() -> None:
    with pytest.raises(ValueError, match="mode must be one of always, fallback"):
        rule("a", mode="sometimes")
    with pytest.raises(ValueError, match="on_target_error must be one of error, anthropic"):
        rule("a", on_target_error="retry")
    with pytest.raises(ValueError, match="min_body_bytes must be positive"):
        rule("a", min_body_bytes=0)


# --- the settings' merge --------------------------------------------------------------------------


class Spec:
    """A file mapping as cmm.config.mappings gives it (duck-typed here: the core does not import it)."""

    def __init__(self, source: str, target: str, **keys: object) -> None:
        self.source, self.target, self.url, self.api_key = source, target, None, None
        self.request_class: tuple[str, ...] = ()
        self.headers: tuple[tuple[str, str], ...] = ()
        self.min_body_bytes: int | None = None
        self.mode, self.fallback_on, self.on_target_error = "always", None, "error"
        for name, value in keys.items():
            setattr(self, name, value)


def config_mappings(options: dict[str, object], env: dict[str, str], specs: list[Spec]) -> tuple[Mapping, ...]:
    from pathlib import Path
    return build_config(options, env, Path("/nonexistent"), specs).proxy.router.mappings


def test_rule_keys_reach_the_router_and_fallback_gets_its_default_causes() -> None:
    specs = [Spec("*", "g", request_class=("subagent",)), Spec("claude-opus", "gpt-5", mode="fallback"),
             Spec("claude-haiku", "f", on_target_error="anthropic", headers=(("x-a", "b*"),), min_body_bytes=5),
             Spec("claude-sonnet", "s", mode="fallback", fallback_on=(429, "unreachable"))]
    subagents, opus, haiku, sonnet = config_mappings({}, {}, specs)
    assert subagents.request_class == ("subagent",) and subagents.mode == "always" and subagents.fallback_on == ()
    assert opus.mode == "fallback" and opus.fallback_on == DEFAULT_FALLBACK_ON
    assert (haiku.on_target_error, haiku.headers, haiku.min_body_bytes) == ("anthropic", (("x-a", "b*"),), 5)
    assert sonnet.fallback_on == (429, "unreachable")


def test_a_flag_replaces_the_plain_mapping_of_its_source_but_not_its_rules() -> None:
    specs = [Spec("claude-haiku", "file-plain"), Spec("claude-haiku", "file-rule", request_class=("subagent",))]
    found = config_mappings({"source": ["claude-haiku"], "target": ["flag"]}, {}, specs)
    assert [(m.source, m.target) for m in found] == [("claude-haiku", "flag"), ("claude-haiku", "file-rule")]


def test_the_env_pair_still_applies_next_to_a_rule_of_its_source() -> None:
    env = {"DEFAULT_SOURCE_MODEL": "claude-haiku", "DEFAULT_TARGET_MODEL": "env"}
    found = config_mappings({}, env, [Spec("claude-haiku", "rule", min_body_bytes=10)])
    assert [(m.target, m.conditioned) for m in found] == [("rule", True), ("env", False)]
    found = config_mappings({}, env, [Spec("claude-haiku", "plain")])
    assert [m.target for m in found] == ["plain"]


def test_a_bad_rule_value_from_elsewhere_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mapping claude-opus: mode must be one of"):
        config_mappings({}, {}, [Spec("claude-opus", "x", mode="never")])
