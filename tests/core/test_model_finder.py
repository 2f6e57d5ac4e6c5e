"""The model finder agrees with json.loads, reads little when model comes first, and never
mistakes a nested "model" key for the top-level one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cmm.core.model_finder import Found, ModelFinder, NotFound, find_model

VECTORS = Path(__file__).resolve().parents[1] / "vectors"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["model", "a", "type", "m\"odel", "é"]) | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
top_level = st.dictionaries(
    st.sampled_from(["model", "messages", "system", "tools", "max_tokens", "modell", "Model"]) | st.text(max_size=8),
    json_values, max_size=6)
styles = st.sampled_from([
    {"separators": (",", ":")},  # JSON.stringify, as Claude Code sends
    {},
    {"indent": 2},
    {"ensure_ascii": False},
    {"indent": "\t", "ensure_ascii": False},
])


def feed_split(body: bytes, splits: list[int]):
    finder = ModelFinder()
    start = 0
    for point in sorted(set(splits)) + [len(body)]:
        result = finder.feed(body[start:point])
        start = point
        if result is not None:
            return result, finder
    return finder.finish(), finder


@given(top_level, styles, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=300)
def test_agrees_with_json_loads(document: dict, style: dict, splits: list[int]) -> None:
    body = json.dumps(document, **style).encode()
    result, _ = feed_split(body, splits)
    expected = json.loads(body).get("model")
    if isinstance(expected, str):
        assert isinstance(result, Found)
        assert result.model == expected
        assert json.loads(body[result.start : result.end]) == expected
    else:
        assert isinstance(result, NotFound)


@given(st.text(), st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_any_model_string_with_escapes(model: str, splits: list[int]) -> None:
    body = json.dumps({"model": model, "messages": []}).encode()
    result, _ = feed_split(body, splits)
    assert isinstance(result, Found) and result.model == model


def test_escaped_key_spelling_counts() -> None:
    body = rb'{"\u006d\u006fdel" : "claude-haiku-4-5"}'
    start = body.index(b'"claude')
    assert find_model(body) == Found("claude-haiku-4-5", start, len(body) - 1)


def test_nested_model_keys_are_not_it() -> None:
    body = json.dumps({
        "messages": [{"role": "user", "content": [{"type": "tool_result", "content": '{"model": "x"}'}]}],
        "tools": [{"input_schema": {"properties": {"model": {"type": "string"}}}}],
        "metadata": {"model": "nested"},
        "model": "claude-opus-4-6",
    }).encode()
    assert find_model(body) == Found("claude-opus-4-6", body.rindex(b'"claude'), len(body) - 1)


def test_model_first_reads_only_the_first_bytes() -> None:
    head = b'{"model":"claude-haiku-4-5-20251001","messages":['
    finder = ModelFinder()
    assert finder.feed(head) == Found("claude-haiku-4-5-20251001", 9, 36)
    assert finder.feed(b"anything at all" * 1000) == Found("claude-haiku-4-5-20251001", 9, 36)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"[1,2]", "not a JSON object"),
        (b'"model"', "not a JSON object"),
        (b"\xef\xbb\xbf{}", "not a JSON object"),
        (b'{"model": 4}', "not a string"),
        (b'{"model": null}', "not a string"),
        (b'{"model": ["a"]}', "not a string"),
        (b'{"a": 1}', "no top-level model"),
        (b"{}", "no top-level model"),
        (b'{"a" 1}', "not valid JSON"),
        (b'{"a": 1 "model": "x"}', "not valid JSON"),
        (b'{"model": "bad \\x escape"}', "not valid JSON"),
        (b'{"messages": [', "body ended"),
        (b"", "body ended"),
    ],
)
def test_not_routable(body: bytes, reason: str) -> None:
    result = find_model(body)
    assert isinstance(result, NotFound)
    assert reason in result.reason


def test_late_model_in_a_large_body() -> None:
    big = {"messages": [{"role": "user", "content": "x" * 1000 + '"model":"no"'} for _ in range(2000)], "model": "late"}
    body = json.dumps(big).encode()
    result, _ = feed_split(body, list(range(0, len(body), 16384)))
    assert result == Found("late", len(body) - 7, len(body) - 1)


@pytest.mark.parametrize("name", ["cch-1.json", "cch-2.json"])
def test_real_claude_code_bodies(name: str) -> None:
    body = (VECTORS / name).read_bytes()
    result = find_model(body)
    assert isinstance(result, Found)
    assert result.model == json.loads(body)["model"]
    assert result.start == len(b'{"model":')


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
       st.integers(min_value=1, max_value=60))
def test_claude_code_spelling_is_decided_at_once_as_the_general_walk_would(model: str, split: int) -> None:
    """A body opening with ``{"model":"..."`` is decided from its first piece; the same model,
    quotes and offsets as when the opening comes in pieces (the general walk)."""
    body = b'{"model":' + json.dumps(model).encode() + b',"messages":[]}'
    whole = ModelFinder().feed(body)
    finder = ModelFinder()
    pieces = finder.feed(body[:split]) or finder.feed(body[split:]) or finder.finish()
    assert whole == pieces == Found(model, 9, 9 + len(json.dumps(model)))
