"""The rule keys of mappings.toml: every bad key, type and value named precisely (file, entry,
key), all at once; the writer round-trips them; `cmm map` reads and writes them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cmm.cli import main as cli
from cmm.config.mappings import (MappingsError, MappingSpec, add_mapping, format_mappings, load, parse_mappings,
                                 remove_mapping, to_router_mappings)
from cmm.core.router import DEFAULT_FALLBACK_ON, DEFAULT_PROXY_URL, REQUEST_CLASSES

ISSUE_EXAMPLE = """\
[[mapping]]                      # subagents and compaction go to Gemini, whatever model they ask for
source = "*"                     # a model prefix, or "*" for any model
target = "gemini-2.5-pro"
request_class = ["subagent", "compaction"]

[[mapping]]                      # very long requests go to a long-context model
source = "claude-sonnet"
target = "gemini-2.5-pro"
min_body_bytes = 600000          # the decoded request body's size

[[mapping]]                      # opus stays on Anthropic; only when Anthropic refuses, GPT answers
source = "claude-opus"
target = "gpt-5"
url = "http://localhost:8317/v1/messages"
mode = "fallback"                # "always" (default) | "fallback"
fallback_on = [429, 529, 500, 502, 503, 504, "unreachable"]   # the default for mode = "fallback"

[[mapping]]                      # haiku goes to Gemini; if Gemini is down, Anthropic answers as asked
source = "claude-haiku"
target = "gemini-2.5-flash"
on_target_error = "anthropic"    # "error" (default) | "anthropic"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(MappingsError) as caught:
        parse_mappings(text, "m.toml")
    assert list(caught.value.problems) == str(caught.value).splitlines()
    return str(caught.value).splitlines()


def entry(**keys: str) -> str:
    keys = {"source": '"claude-opus"', "target": '"gpt-5"', **keys}
    return "[[mapping]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


PREFIX = "m.toml: mapping #1 (source 'claude-opus'): "


def test_the_documented_example_parses_and_keeps_its_meaning() -> None:
    subagents, long, opus, haiku = parse_mappings(ISSUE_EXAMPLE)
    assert subagents == MappingSpec("*", "gemini-2.5-pro", request_class=("subagent", "compaction"))
    assert long == MappingSpec("claude-sonnet", "gemini-2.5-pro", min_body_bytes=600000)
    assert opus == MappingSpec("claude-opus", "gpt-5", "http://localhost:8317/v1/messages", mode="fallback",
                               fallback_on=DEFAULT_FALLBACK_ON)
    assert haiku == MappingSpec("claude-haiku", "gemini-2.5-flash", on_target_error="anthropic")
    router = to_router_mappings((subagents, long, opus, haiku), DEFAULT_PROXY_URL)
    assert [m.conditioned for m in router] == [True, True, False, False]
    assert router[2].fallback_on == DEFAULT_FALLBACK_ON and router[3].on_target_error == "anthropic"


def test_fallback_without_causes_gets_the_default_ones_in_the_router_only() -> None:
    [spec] = parse_mappings(entry(mode='"fallback"'))
    assert spec.fallback_on is None  # the file does not say: it is not written back either
    assert "\nfallback_on" not in format_mappings([spec])
    [mapping] = to_router_mappings([spec], DEFAULT_PROXY_URL)
    assert mapping.fallback_on == DEFAULT_FALLBACK_ON


@pytest.mark.parametrize(("keys", "expected"), [
    ({"request_class": '"subagent"'}, 'request_class must be an array of strings such as ["subagent"], not a string'),
    ({"request_class": '["subagent", 3]'}, "request_class must be an array of strings such as [\"subagent\"], not "
                                           "an array with other values"),
    ({"request_class": "[]"}, "request_class is empty; leave it out to match every class, or name some of "
                              + ", ".join(REQUEST_CLASSES)),
    ({"request_class": '["subagents"]'}, "request_class: 'subagents' is not a request class (did you mean "
                                         "'subagent'?); use " + ", ".join(REQUEST_CLASSES)),
    ({"request_class": '["main", "main"]'}, "request_class names 'main' twice"),
    ({"header": '"x-a=b"'}, 'header must be a table of header name = "glob", such as { "x-claude-code-agent-type" '
                            '= "Explore*" }, not a string'),
    ({"header": "{}"}, "header is empty; leave it out, or name header = glob pairs"),
    ({"header": '{ "x-a" = 1 }'}, "header x-a: the glob must be a string, not an integer"),
    ({"header": '{ "x a" = "b" }'}, "header: 'x a' is not a header name (letters, digits and -, no spaces)"),
    ({"header": '{ "x-a" = "" }'}, "header x-a: the glob must be non-empty printable text, not ''"),
    ({"header": '{ "x-a" = "b\\nc" }'}, "header x-a: the glob must be non-empty printable text, not 'b\\nc'"),
    ({"header": '{ "X-A" = "b", "x-a" = "c" }'}, "header names 'x-a' twice"),
    ({"min_body_bytes": '"600k"'}, "min_body_bytes must be an integer (bytes), not a string"),
    ({"min_body_bytes": "true"}, "min_body_bytes must be an integer (bytes), not a boolean"),
    ({"min_body_bytes": "1.5"}, "min_body_bytes must be an integer (bytes), not a number"),
    ({"min_body_bytes": "0"}, "min_body_bytes must be a positive number of bytes, not 0"),
    ({"min_body_bytes": "-5"}, "min_body_bytes must be a positive number of bytes, not -5"),
    ({"mode": "1"}, "mode must be a string, not an integer"),
    ({"mode": '"fallbak"'}, "mode must be one of 'always', 'fallback', not 'fallbak' (did you mean 'fallback'?)"),
    ({"on_target_error": '"anthropik"'}, "on_target_error must be one of 'error', 'anthropic', not 'anthropik' "
                                         "(did you mean 'anthropic'?)"),
    ({"on_target_error": "false"}, "on_target_error must be a string, not a boolean"),
    ({"mode": '"fallback"', "on_target_error": '"anthropic"'},
     'on_target_error = "anthropic" does not go with mode = "fallback": there the target answers only when '
     'Anthropic has refused already'),
    ({"fallback_on": "[429]"}, 'fallback_on applies only with mode = "fallback"'),
    ({"mode": '"fallback"', "fallback_on": "429"}, 'fallback_on must be an array of statuses and "unreachable", '
                                                   'not an integer'),
    ({"mode": '"fallback"', "fallback_on": "[]"}, 'fallback_on is empty; leave it out for the default '
                                                  '[429, 529, 500, 502, 503, 504, "unreachable"]'),
    ({"mode": '"fallback"', "fallback_on": "[200]"}, "fallback_on: 200 is neither a status from 400 to 599 nor "
                                                     "'unreachable'"),
    ({"mode": '"fallback"', "fallback_on": '["down"]'}, "fallback_on: 'down' is neither a status from 400 to 599 "
                                                        "nor 'unreachable'"),
    ({"mode": '"fallback"', "fallback_on": "[4.29]"}, "fallback_on: a number 4.29 is neither a status nor "
                                                      "'unreachable'"),
    ({"mode": '"fallback"', "fallback_on": "[429, 429]"}, "fallback_on names 429 twice"),
    ({"target": '"*"'}, 'target must be a model name; "*" is for source only'),
])
def test_each_bad_key_type_or_value_is_named(keys: dict[str, str], expected: str) -> None:
    assert problems(entry(**keys)) == [PREFIX + expected]


def test_unknown_rule_key_gets_a_suggestion() -> None:
    [line] = problems(entry(request_classes='["subagent"]'))
    assert line.startswith(PREFIX + "unknown key 'request_classes' (did you mean 'request_class'?)")
    [line] = problems(entry(headers='{ "a" = "b" }'))
    assert "(did you mean 'header'?)" in line


def test_every_problem_of_an_entry_shows_at_once_badly_typed_keys_or_not() -> None:
    lines = problems(entry(min_body_bytes='"big"', request_class='["subagnet"]', mode='"sometimes"'))
    assert lines == [PREFIX + "min_body_bytes must be an integer (bytes), not a string",
                     PREFIX + "request_class: 'subagnet' is not a request class (did you mean 'subagent'?); use "
                     + ", ".join(REQUEST_CLASSES),
                     PREFIX + "mode must be one of 'always', 'fallback', not 'sometimes'"]


def test_a_source_may_repeat_with_other_conditions_but_not_with_the_same() -> None:
    text = (entry() + entry(request_class='["subagent"]') + entry(min_body_bytes="10")
            + entry(request_class='["subagent", "main"]'))
    assert len(parse_mappings(text)) == 4
    same = entry(request_class='["main", "subagent"]', target='"other"')  # the same set, in another order
    assert problems(text + same) == [
        "m.toml: mapping #5 (source 'claude-opus'): the same source and conditions as mapping #4; keep one of them"]
    headers = entry(header='{ "X-A" = "b" }') + entry(header='{ "x-a" = "b" }', mode='"fallback"')
    assert problems(headers) == [
        "m.toml: mapping #2 (source 'claude-opus'): the same source and conditions as mapping #1; keep one of them"]
    assert problems(entry() + entry(target='"x"', mode='"fallback"')) == [
        "m.toml: mapping #2 (source 'claude-opus'): the same source as mapping #1; keep one of them"]


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mappings.toml"
    path.write_text(entry(request_class='["nope"]'))
    with pytest.raises(MappingsError, match=f"^{path}: mapping #1 \\(source 'claude-opus'\\): request_class: "):
        load(path)


# --- writing and editing --------------------------------------------------------------------------

_TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=8).filter(str.isprintable)
rule_specs = st.builds(
    MappingSpec,
    st.sampled_from(["*", "claude", "claude-opus", "claude-sonnet-4"]),
    st.sampled_from(["gpt-5", "gemini-2.5-pro"]),
    st.none() | st.just("http://localhost:8317/v1/messages"),
    st.none() | st.just("sk-x"),
    request_class=st.lists(st.sampled_from(REQUEST_CLASSES), max_size=3, unique=True).map(tuple),
    headers=st.lists(st.tuples(st.sampled_from(["x-a", "X-Claude-Code-Agent-Type", "x_b"]), _TEXT), max_size=2,
                     unique_by=lambda pair: pair[0].lower()).map(tuple),
    min_body_bytes=st.none() | st.integers(1, 10**9),
    on_target_error=st.sampled_from(["error", "anthropic"]),
).flatmap(lambda spec: st.sampled_from([spec] if spec.on_target_error == "anthropic" else [
    spec, MappingSpec(**{**_fields(spec), "mode": "fallback"}),
    MappingSpec(**{**_fields(spec), "mode": "fallback", "fallback_on": (503, "unreachable", 429)})]))


def _fields(spec: MappingSpec) -> dict[str, object]:
    import attrs
    return attrs.asdict(spec, recurse=False)


@given(st.lists(rule_specs, max_size=6, unique_by=lambda spec: spec.identity))
def test_rules_round_trip_through_the_file(specs: list[MappingSpec]) -> None:
    assert parse_mappings(format_mappings(specs)) == tuple(specs)


def test_rule_keys_are_written_readably() -> None:
    text = format_mappings(parse_mappings(ISSUE_EXAMPLE) + (
        MappingSpec("claude", "x", headers=(("x-claude-code-agent-type", 'Ex"plore*'),)),))
    body = text.split("\n\n[[mapping]]", 1)[1]
    assert 'request_class = ["subagent", "compaction"]' in body
    assert "min_body_bytes = 600000" in body and 'mode = "fallback"' in body
    assert 'fallback_on = [429, 529, 500, 502, 503, 504, "unreachable"]' in body
    assert 'on_target_error = "anthropic"' in body
    assert 'header = { "x-claude-code-agent-type" = "Ex\\"plore*" }' in body
    assert "always" not in body and 'on_target_error = "error"' not in body  # defaults are left out


def test_add_replaces_only_the_rule_with_the_same_conditions() -> None:
    plain, sub = MappingSpec("claude", "a"), MappingSpec("claude", "b", request_class=("subagent",))
    assert add_mapping((plain,), sub) == (plain, sub)
    newer = MappingSpec("claude", "c", request_class=("subagent",), mode="fallback")
    assert add_mapping((plain, sub), newer) == (plain, newer)
    with pytest.raises(MappingsError, match="min_body_bytes must be a positive number of bytes, not 0"):
        add_mapping((), MappingSpec("claude", "x", min_body_bytes=0))


def test_remove_by_source_or_number() -> None:
    plain, sub, other = MappingSpec("claude", "a"), MappingSpec("claude", "b", request_class=("main",)), \
        MappingSpec("gpt", "c")
    specs = (plain, sub, other)
    with pytest.raises(MappingsError) as caught:
        remove_mapping(specs, "claude")
    assert str(caught.value) == ("2 mappings have source 'claude' (#1, #2); say which with `cmm map remove claude "
                                 "--number N` (numbers as `cmm map list` shows them)")
    assert remove_mapping(specs, "claude", 2) == (plain, other)
    assert remove_mapping(specs, None, 1) == (sub, other)
    assert remove_mapping(specs, "gpt") == (plain, sub)
    with pytest.raises(MappingsError, match="mapping #3 has source 'gpt', not 'claude'"):
        remove_mapping(specs, "claude", 3)
    with pytest.raises(MappingsError, match=r"no mapping #4: there are 3 \(see `cmm map list`\)"):
        remove_mapping(specs, None, 4)


# --- cmm map --------------------------------------------------------------------------------------


def run(argv: list[str], home: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, environ={"HOME": str(home)}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_round_trip_of_every_rule_key(tmp_path: Path) -> None:
    path = tmp_path / ".cmm" / "mappings.toml"
    adds = [
        ["*", "gemini-2.5-pro", "--request-class", "subagent", "--request-class", "compaction"],
        ["claude-sonnet", "gemini-2.5-pro", "--min-body-bytes", "600000"],
        ["claude-opus", "gpt-5", "--url", "http://localhost:8317/v1/messages", "--mode", "fallback"],
        ["claude-haiku", "gemini-2.5-flash", "--on-target-error", "anthropic"],
        ["claude-sonnet", "gpt-5", "--header", "x-claude-code-agent-type=Explore*", "--mode", "fallback",
         "--fallback-on", "429, 529,unreachable"],
    ]
    for argv in adds:
        code, out, err = run(["map", "add", *argv], tmp_path)
        assert code == 0 and out.startswith("Added "), err
    assert parse_mappings(ISSUE_EXAMPLE.replace(
        '\nfallback_on = [429, 529, 500, 502, 503, 504, "unreachable"]', "")) == load(path)[:4]
    assert load(path)[4] == MappingSpec("claude-sonnet", "gpt-5", headers=(("x-claude-code-agent-type", "Explore*"),),
                                        mode="fallback", fallback_on=(429, 529, "unreachable"))

    code, out, err = run(["map", "list"], tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("#1 *             → gemini-2.5-pro") and lines[0].endswith(
        "when request class is subagent or compaction")
    assert lines[1].endswith("when the body has ≥ 600000 bytes")
    assert lines[2].endswith("only when Anthropic answers 429, 529, 500, 502, 503, 504, unreachable")
    assert lines[3].endswith("Anthropic answers when the target fails")
    assert lines[4].endswith("when header x-claude-code-agent-type matches Explore*; only when Anthropic answers "
                             "429, 529, unreachable")

    code, out, err = run(["map", "add", "claude-sonnet", "o3", "--min-body-bytes", "600000"], tmp_path)
    assert code == 0 and out.startswith("Replaced claude-sonnet → o3"), err  # the same source and conditions

    code, out, err = run(["map", "remove", "claude-sonnet"], tmp_path)
    assert (code, out) == (2, "")
    assert err == ("cmm: 2 mappings have source 'claude-sonnet' (#2, #5); say which with `cmm map remove "
                   "claude-sonnet --number N` (numbers as `cmm map list` shows them)\n")
    code, out, err = run(["map", "remove", "claude-sonnet", "--number", "5"], tmp_path)
    assert code == 0 and out.startswith("Removed the mapping for claude-sonnet from"), err
    assert [spec.target for spec in load(path)] == ["gemini-2.5-pro", "o3", "gpt-5", "gemini-2.5-flash"]
    code, out, err = run(["map", "remove"], tmp_path)
    assert code == 2 and "say which mapping to remove: its SOURCE, or --number N" in err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--header", "x-claude-code-agent-type"], "cmm: --header must be NAME=GLOB, e.g. "
                                               "x-claude-code-agent-type=Explore*, not 'x-claude-code-agent-type'"),
    (["--request-class", "subagnet"], "cmm: request_class: 'subagnet' is not a request class (did you mean "
                                      "'subagent'?)"),
    (["--min-body-bytes", "0"], "cmm: min_body_bytes must be a positive number of bytes, not 0"),
    (["--fallback-on", "429"], 'cmm: fallback_on applies only with mode = "fallback"'),
    (["--mode", "fallback", "--fallback-on", "429,oops"], "cmm: fallback_on: 'oops' is neither a status"),
    (["--mode", "fallback", "--on-target-error", "anthropic"], 'cmm: on_target_error = "anthropic" does not go '
                                                               'with mode = "fallback"'),
])
def test_cli_bad_rule_flags_exit_2_and_change_nothing(tmp_path: Path, argv: list[str], expected: str) -> None:
    assert run(["map", "add", "kept", "model"], tmp_path)[0] == 0
    path = tmp_path / ".cmm" / "mappings.toml"
    before = path.read_bytes()
    code, out, err = run(["map", "add", "claude-opus", "gpt-5", *argv], tmp_path)
    assert (code, out) == (2, "")
    assert err.startswith(expected)
    assert path.read_bytes() == before
