"""Claude Code's cch body hash, checked against bodies signed by the real CLI (tests/vectors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cmm.core import cch
from cmm.core.model_finder import find_model
from cmm.core.router import rewrite_model

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SIGNED = {"cch-1.json": "bdaf7", "cch-2.json": "9cf06"}


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_real_bodies_verify(name: str) -> None:
    body = vector(name)
    assert cch.current(body) == SIGNED[name]
    assert cch.compute(body) == SIGNED[name]
    assert cch.is_valid(body)


@pytest.mark.parametrize("name", sorted(SIGNED))
@given(target=st.text(min_size=1, max_size=40))
def test_rewriting_only_the_model_keeps_the_hash(name: str, target: str) -> None:
    body = vector(name)
    found = find_model(body)
    assert cch.is_valid(rewrite_model(body, found.start, found.end, target))


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_any_other_change_needs_resigning(name: str) -> None:
    body = vector(name).replace(b'"stream":true', b'"stream":false')
    assert not cch.is_valid(body)
    signed = cch.resign(body)
    assert len(signed) == len(body) and cch.is_valid(signed)
    assert signed.replace(cch.current(signed).encode(), b"") == body.replace(cch.current(body).encode(), b"")


def test_signing_form_edits() -> None:
    body = vector("cch-2.json")
    form = cch.signing_form(body)
    assert b"cch=00000" in form
    assert b'"input":{"model":"","prompt":"x"}' in form  # nested string model emptied
    assert b'"properties":{"model":{"type":"string"}}' in form  # a model that is not a string stays
    assert b"max_tokens" not in form and b'}}}],"stream":true}' in form
    assert json.loads(form)  # still JSON


def test_unsigned_members_go_with_the_right_comma() -> None:
    first = cch.signing_form(b'{"max_tokens":5,"model":"m","fallbacks":["a"],"x":1,"fallback_credit_token":"t"}')
    assert first == b'{"model":"","x":1}'
    assert cch.resign(b'{"no":"signature"}') == b'{"no":"signature"}'


@pytest.mark.parametrize("name", sorted(SIGNED))
@given(splits=st.lists(st.integers(min_value=0, max_value=800), max_size=8), changed=st.booleans())
def test_resigner_streams_up_to_the_placeholder_and_signs_at_the_end(name: str, splits: list[int],
                                                                      changed: bool) -> None:
    original = vector(name)
    edited = original.replace(b'"stream":true', b'"stream":    1') if changed else original
    stage = cch.Resigner(lambda: changed)
    out = b""
    start = 0
    for point in sorted(set(splits)) + [len(edited)]:
        piece = stage.feed(edited[start:point])
        if b"cch=" not in edited[:point]:
            assert len(out + piece) >= max(0, point - 3)  # nothing before the placeholder waits
        out += piece
        start = point
    out += stage.finish()
    assert len(out) == len(edited)
    assert cch.is_valid(out)
    assert (out == edited) == (not changed or cch.compute(edited) == cch.current(edited))


def test_resigner_passes_unsigned_bodies_through() -> None:
    stage = cch.Resigner(lambda: True)
    assert stage.feed(b'{"a":') + stage.feed(b'"cc') + stage.feed(b'x"}') + stage.finish() == b'{"a":"ccx"}'


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_resigner_finds_a_placeholder_split_anywhere(name: str) -> None:
    edited = vector(name).replace(b'"stream":true', b'"stream":    1')
    at = edited.index(b"cch=")
    for split in range(at - 1, at + 6):
        stage = cch.Resigner(lambda: True)
        first = stage.feed(edited[:split])
        assert first == edited[: min(split, at)][: len(first)] and len(first) >= min(split, at) - 3
        out = first + stage.feed(edited[split:]) + stage.finish()
        assert len(out) == len(edited) and cch.is_valid(out), split


def test_resigner_passes_pieces_on_uncopied() -> None:
    """A piece with no placeholder in it goes on as the same object: no copy per piece."""
    stage = cch.Resigner(lambda: False)
    piece = b'{"messages":[{"role":"user","content":"' + b"x" * 65536
    assert stage.feed(piece) is piece


def test_resigner_lets_go_of_the_body_when_it_ends() -> None:
    """The stage outlives the request body (the answer may stream for minutes): nothing kept."""
    edited = vector(sorted(SIGNED)[0]).replace(b'"stream":true', b'"stream":    1')
    stage = cch.Resigner(lambda: True)
    out = stage.feed(edited[:100]) + stage.feed(edited[100:]) + stage.finish()
    assert cch.is_valid(out) and stage._sent == [] and stage._held == []


# -- the key search against a token-by-token walk ---------------------------------------------------

_REF_TOKEN = re.compile(rb'[ \t\r\n]*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([{}\[\],:])|([^ \t\r\n{}\[\],:"]+))')


def reference_signing_form(body: bytes) -> bytes:
    """The edits by a plain walk over every token (slow, obviously right): what the key search
    must agree with on JSON and on JSON cut short."""
    body = re.sub(rb"cch=[0-9a-f]{5}", b"cch=00000", body, count=1)
    edits: list[tuple[int, int, bytes]] = []
    stack: list[list] = []  # [is_object, expecting_key, key, member_start, comma_before]

    def member_done(top: list, value_end: int) -> None:
        key, member_start, comma = top[2], top[3], top[4]
        if key in cch.UNSIGNED_MEMBERS and member_start is not None:
            if comma is not None:
                start, end = comma, value_end
            else:
                after = re.compile(rb"[ \t\r\n]*,").match(body, value_end)
                start, end = member_start, after.end() if after else value_end
            edits[:] = [e for e in edits if not start <= e[0] < end] + [(start, end, b"")]
        top[2:5] = [None, None, None]

    pos = 0
    while pos < len(body):
        match = _REF_TOKEN.match(body, pos)
        if match is None or match.end() == pos:
            break
        start, pos = match.start(match.lastindex), match.end()
        string, punct, _ = match.groups()
        if punct in (b"{", b"["):
            stack.append([punct == b"{", True, None, None, None])
        elif punct in (b"}", b"]"):
            stack.pop() if stack else None
            if stack and stack[-1][0] and not stack[-1][1]:
                member_done(stack[-1], pos)
        elif punct == b",":
            if stack and stack[-1][0]:
                stack[-1][1], stack[-1][4] = True, start
        elif punct != b":" and stack and stack[-1][0]:
            top = stack[-1]
            if top[1]:
                top[1], top[2], top[3] = False, string[1:-1] if string else None, start
            else:
                if top[2] == b"model" and string is not None:
                    edits.append((start, pos, b'""'))
                member_done(top, pos)
    out, last = bytearray(), 0
    for start, end, replacement in sorted(edits):
        if start < last:  # overlapping (a duplicate key's comma went with the member before)
            continue
        out += body[last:start] + replacement
        last = end
    return bytes(out + body[last:])


_keys = st.sampled_from(["model", "max_tokens", "fallbacks", "fallback_credit_token", "a", "\\u006dodel",
                         "model ", 'max_tokens\\"', ""])
_strings = st.sampled_from(["m", 'x\\"y', "\\\\", '\\"model\\":\\"q\\"', "model", "max_tokens", "{[", "\u00e9", "\\n"])
_spaces = st.sampled_from(["", "", " ", "\n ", "\t", "\r\n"])


@st.composite
def _json_text(draw, depth: int = 0) -> str:
    kind = draw(st.integers(0, 2 if depth < 4 else 0))
    if kind == 0:
        return draw(st.sampled_from(["1", "null", "true", "-2.5e3"]) | _strings.map(lambda s: f'"{s}"'))
    items = draw(st.lists(st.tuples(_keys, _json_text(depth + 1), _spaces, _spaces), max_size=4))
    if kind == 1:
        return "[" + ",".join(f"{a}{value}{b}" for _, value, a, b in items) + "]"
    return "{" + ",".join(f'{a}"{key}"{b}:{a}{value}{b}' for key, value, a, b in items) + "}"


@settings(max_examples=500, deadline=None)
@given(_json_text(), st.integers(0, 2000))
def test_key_search_agrees_with_a_token_walk(text: str, cut: int) -> None:
    body = text.encode()
    json.loads(body)  # the strategy makes JSON
    assert cch.signing_form(body) == reference_signing_form(body)
    cut_short = cch.signing_form(body[:cut])  # not JSON: no error, and the length never grows
    assert len(cut_short) <= len(body[:cut])


def test_key_search_on_real_bodies() -> None:
    for name in sorted(SIGNED):
        body = vector(name)
        assert cch.signing_form(body) == reference_signing_form(body)
