"""Thinking blocks across providers: marked blocks are blanked on the way to Anthropic (same
length, the rest byte for byte), unmarked on the way to the target, and the target's signatures
are marked in its responses; every transform is independent of how its input is split."""

from __future__ import annotations

import copy
import json
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from cmm.core import cch, json_walk, thinking_marks, thinking_scan
from cmm.core.thinking_edits import OMITTED, OMITTED_SHORT, Neutraliser, Removed, Unmarker, neutralise, unmark
from cmm.core.thinking_marks import SseMarker, mark_event, mark_message
from cmm.core.thinking_scan import MARK

M = MARK.decode()
VECTORS = Path(__file__).resolve().parents[1] / "vectors"
REPLACEMENT_TEXTS = {json.loads(OMITTED)["text"], json.loads(OMITTED_SHORT)["text"]}
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- documents ---------------------------------------------------------------------------------

decoy_strings = st.sampled_from([
    '{"type":"thinking","signature":"cmm1.x"}',
    '{"type":"redacted_thinking","data":"cmm1.y"}',
    '"signature":"cmm1.', '"content":[', "\\", '"', "}]", "{[", "cmm1.", "\u00e9\u2603\U0001f600",
])
texts = st.one_of(
    st.text(max_size=12), decoy_strings, st.lists(decoy_strings | st.text(max_size=4), max_size=4).map("".join)
)
BASE64 = "ABCDEFabcdef0123456789+/="
signatures = st.one_of(
    st.text(alphabet=BASE64, max_size=16),
    st.text(alphabet=BASE64, min_size=30, max_size=60),  # longer than the prefix that is read
    st.sampled_from(["", "cmm1", "cmm", "xcmm1.", "CMM1.", "cmm1.", "cmm1.EqQB"]),
)
decoy_blocks = st.sampled_from([
    {"type": "thinking", "thinking": "t", "signature": M + "decoy"},
    {"type": "redacted_thinking", "data": M + "decoy"},
    {"signature": M + "z", "type": "thinking"},
])
nested_keys = st.sampled_from(["type", "signature", "data", "content", "messages", "a"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts | decoy_blocks,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nested_keys, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def thinking_blocks(draw, marks: bool = True) -> dict:
    marked = marks and draw(st.booleans())
    signature = draw(signatures)
    signature = M + signature if marked else signature.replace(M, "x")
    if draw(st.integers(0, 9)) == 0:  # odd shapes: no signature, a non-string one, a marked data key
        return draw(st.sampled_from([
            {"type": "thinking", "thinking": "x"},
            {"type": "thinking", "thinking": "x", "signature": None},
            {"type": "thinking", "thinking": "x", "signature": "s", "data": M + "d"},
            {"type": "redacted_thinking", "data": "d", "signature": M + "s"},
        ]))
    if draw(st.booleans()):
        return {"type": "thinking", "thinking": draw(texts), "signature": signature}
    return {"type": "redacted_thinking", "data": signature}


def blocks(marks: bool = True):
    return st.one_of(
        thinking_blocks(marks),
        st.builds(lambda t: {"type": "text", "text": t}, texts),
        st.builds(lambda v: {"type": "tool_use", "id": "t1", "name": "Read", "input": {"x": v}}, json_values),
        st.builds(
            lambda c: {"type": "tool_result", "tool_use_id": "t1", "content": c},
            texts | st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts) | decoy_blocks, max_size=2),
        ),
        st.integers() | texts,  # not blocks at all: kept
    )


def messages(marks: bool = True):
    return st.lists(
        st.builds(
            lambda role, content: {"role": role, "content": content},
            st.sampled_from(["user", "assistant"]),
            st.lists(blocks(marks), max_size=5) | texts,
        ),
        max_size=5,
    )


def bodies(marks: bool = True):
    return st.builds(
        lambda msgs, extra: {
            "model": "claude-opus-4-6",
            "messages": msgs,
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cch=00000;"},
                {"type": "thinking", "signature": M + "s"},
            ],
            "tools": [{"name": "t", "input_schema": {
                "messages": [{"role": "user", "content": [{"type": "thinking", "signature": M}]}],
            }}],
            "metadata": {"content": [{"type": "redacted_thinking", "data": M + "m"}], "v": extra},
            "max_tokens": 32000,
            "stream": True,
        },
        messages(marks),
        json_values,
    )


def encode_string(value: str, rnd: random.Random) -> str:
    """A JSON string literal, some characters spelled as \\u escapes."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char in '"\\/' or code < 0x20 or (code < 0x10000 and rnd.random() < 0.15):
            out.append("\\u%04x" % code if rnd.random() < 0.5 or char not in '"\\/' else "\\" + char)
        else:
            out.append(char)
    return "".join(out) + '"'


def dump_random(value, rnd: random.Random) -> str:
    """Random whitespace, key order and escapes: what json.loads accepts, not what Claude Code sends."""
    def ws() -> str:
        return rnd.choice(["", "", "", " ", "\n", "\t", "  ", "\r\n "])

    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        inner = ",".join(
            ws() + encode_string(k, rnd) + ws() + ":" + ws() + dump_random(v, rnd) + ws() for k, v in items
        )
        return "{" + (inner or ws()) + "}"
    if isinstance(value, list):
        inner = ",".join(ws() + dump_random(v, rnd) + ws() for v in value)
        return "[" + (inner or ws()) + "]"
    if isinstance(value, str):
        return encode_string(value, rnd)
    return json.dumps(value)


def serialise(document: dict, seed: int | None) -> bytes:
    if seed is None:  # Claude Code's form: JSON.stringify, insertion order
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return dump_random(document, random.Random(seed)).encode()


styles = st.none() | st.integers(0, 2**32)
splits = st.lists(st.integers(min_value=0, max_value=3000), max_size=8)


def foreign(block) -> bool:
    if not isinstance(block, dict):
        return False
    field = {"thinking": "signature", "redacted_thinking": "data"}.get(block.get("type"))
    return field is not None and isinstance(block.get(field), str) and block[field].startswith(M)


def expected_neutral(document: dict, output: dict) -> dict:
    """The document minus the marked blocks; an all-marked content gets the replacement block."""
    expected = copy.deepcopy(document)
    for index, message in enumerate(expected["messages"]):
        content = message["content"]
        if isinstance(content, list):
            kept = [block for block in content if not foreign(block)]
            if content and not kept:
                got = output["messages"][index]["content"]
                assert len(got) == 1 and got[0]["type"] == "text" and got[0]["text"] in REPLACEMENT_TEXTS
                kept = got
            message["content"] = kept
    return expected


def expected_unmarked(document: dict) -> dict:
    expected = copy.deepcopy(document)
    for message in expected["messages"]:
        for block in message["content"] if isinstance(message["content"], list) else ():
            if foreign(block):
                field = "signature" if block["type"] == "thinking" else "data"
                block[field] = block[field][len(M) :]
    return expected


def run_split(transform, body: bytes, points: list[int]) -> bytes:
    out, start = [], 0
    for point in sorted({p for p in points if 0 < p < len(body)}) + [len(body)]:
        out.append(transform.feed(body[start:point]))
        start = point
    out.append(transform.finish())
    return b"".join(out)


# -- neutralise ---------------------------------------------------------------------------------


@FAST
@given(bodies(), styles, splits)
def test_neutralise_removes_exactly_the_marked_blocks(document: dict, style, points: list[int]) -> None:
    body = serialise(document, style)
    transform = Neutraliser()
    out = run_split(transform, body, points)
    assert len(out) == len(body)
    parsed = json.loads(out)
    assert parsed == expected_neutral(document, parsed)
    assert out == neutralise(body)
    marked = [(m, b) for m, msg in enumerate(document["messages"]) if isinstance(msg["content"], list)
              for b, block in enumerate(msg["content"]) if foreign(block)]
    assert transform.changed == bool(marked)
    assert transform.removed == [Removed(m, b) for m, b in marked]
    if not marked:
        assert out == body


@FAST
@given(bodies(marks=False), styles, splits)
def test_bodies_without_marked_blocks_pass_byte_for_byte(document: dict, style, points: list[int]) -> None:
    body = serialise(document, style)
    transform = Neutraliser()
    assert run_split(transform, body, points) == body
    assert not transform.changed


@settings(max_examples=40, deadline=None)
@given(bodies(), styles)
def test_byte_by_byte_equals_one_shot(document: dict, style) -> None:
    body = serialise(document, style)
    assert run_split(Neutraliser(), body, list(range(len(body)))) == neutralise(body)
    assert run_split(Unmarker(), body, list(range(len(body)))) == unmark(body)


@FAST
@given(bodies(), splits)
@example(  # an all-marked content array whose one block is too short for OMITTED once compact
    {
        "model": "claude-opus-4-6",
        "messages": [{"role": "user", "content": [{"type": "redacted_thinking", "data": M}]}],
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cch=00000;"},
            {"type": "thinking", "signature": M + "s"},
        ],
        "tools": [{"name": "t", "input_schema": {
            "messages": [{"role": "user", "content": [{"type": "thinking", "signature": M}]}],
        }}],
        "metadata": {"content": [{"type": "redacted_thinking", "data": M + "m"}], "v": None},
        "max_tokens": 32000,
        "stream": True,
    },
    [],
)
def test_whole_blocks_decided_at_once_match_the_general_walk(document: dict, points: list[int]) -> None:
    """Claude Code's spelling, blocks whole in a piece: decided at once; split, or spelled with
    whitespace, they take the general walk. The edits must correspond, the replacement of an
    all-marked content array included (its text does not depend on whitespace)."""
    compact = serialise(document, None)
    spaced = json.dumps(document, indent=1, ensure_ascii=False).encode()  # never the fast path
    for kind in (Neutraliser, Unmarker):
        whole, split, other = kind(), kind(), kind()
        out = run_split(whole, compact, [])
        assert out == run_split(split, compact, points + list(range(0, len(compact), 5)))
        assert json.loads(out) == json.loads(run_split(other, spaced, points))
        assert whole.changed == split.changed == other.changed
        if kind is Neutraliser:
            assert whole.removed == split.removed == other.removed
            assert whole.tool_use_messages == split.tool_use_messages == other.tool_use_messages


def test_claude_code_blocks_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block of a Claude Code session in one piece is decided without the general walk."""
    body = claude_code_body(100_000, 2)
    walked: list[int] = []
    general = thinking_scan.Scanner._open_block
    monkeypatch.setattr(
        thinking_scan.Scanner, "_open_block", lambda self, data, pos: walked.append(pos) or general(self, data, pos)
    )
    for kind in (Neutraliser, Unmarker):
        transform = kind()
        out = run_split(transform, body, [])
        assert not walked and transform.changed
        assert out == run_split(kind(), body, list(range(0, len(body), 4096)))
        assert walked  # blocks cut by a piece boundary take the general walk
        walked.clear()


@FAST
@given(messages(), st.integers(0, 5), splits, splits)
def test_the_same_history_is_edited_the_same_way_every_turn(msgs: list, cut: int, a: list, b: list) -> None:
    """A later turn repeats the earlier messages: their edited bytes must not change."""
    def body(history: list) -> tuple[bytes, list[tuple[int, int]]]:
        head = b'{"model":"claude-opus-4-6","messages":['
        parts = [json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode() for m in history]
        spans, pos = [], len(head)
        for part in parts:
            spans.append((pos, pos + len(part)))
            pos += len(part) + 1
        return head + b",".join(parts) + b'],"stream":true}', spans

    early, spans = body(msgs[:cut])
    late, _ = body(msgs)
    out_early, out_late = run_split(Neutraliser(), early, a), run_split(Neutraliser(), late, b)
    for start, end in spans[:-1]:  # the last early message may lose its comma to a later block
        assert out_early[start:end] == out_late[start:end]
    assert run_split(Neutraliser(), late, a) == out_late


def test_claude_code_shapes() -> None:
    sig = "EqQBCkgIARABGAIiQJ" * 4
    body = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "plan", "signature": M + "abc"},
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "t", "name": "Read",
             "input": {"path": '{"type":"thinking","signature":"cmm1.x"}'}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "thinking", "signature": M}]},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "mine", "signature": sig},
            {"type": "text", "text": "x"},
        ]},
        {"role": "assistant", "content": [
            {"type": "redacted_thinking", "data": M + "r"},
            {"type": "thinking", "thinking": "a longer plan", "signature": M + "s"},
        ]},
    ]}, separators=(",", ":")).encode()
    out = neutralise(body)
    assert len(out) == len(body)
    first = b'{"type":"thinking","thinking":"plan","signature":"cmm1.abc"},'
    assert b"[" + b" " * len(first) + b'{"type":"text","text":"ok"}' in out
    assert b'\\"signature\\":\\"cmm1.x\\"' in out  # inside a string
    assert b'{"type":"thinking","signature":"cmm1."}' in out  # inside a tool result
    assert sig.encode() in out
    last = json.loads(out)["messages"][4]["content"]
    assert last == [{"type": "text", "text": "[thinking from another model omitted]"}]
    assert re.search(rb'\[ +' + re.escape(OMITTED) + rb' +\]\}\]\}$', out)


@pytest.mark.parametrize("name", ["cch-1.json", "cch-2.json"])
def test_real_claude_code_bodies_pass_untouched(name: str) -> None:
    body = (VECTORS / name).read_bytes()
    assert neutralise(body) == body and unmark(body) == body
    history = json.loads(body)
    history["messages"] += [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": M + "x"},
                                          {"type": "text", "text": "hi"}]},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]
    signed = cch.resign(json.dumps(history, separators=(",", ":"), ensure_ascii=False).encode())
    edited = Neutraliser()
    out = edited.feed(signed) + edited.finish()
    assert edited.changed and not cch.is_valid(out)
    assert cch.is_valid(cch.resign(out))  # what the caller does when ``changed``


def test_is_marked() -> None:
    assert thinking_marks.is_marked("cmm1.EqQB") and thinking_marks.is_marked(b"cmm1.")
    assert not thinking_marks.is_marked("EqQB") and not thinking_marks.is_marked(b"cmm1")


def test_short_all_marked_block_gets_the_short_replacement() -> None:
    body = b'{"messages":[{"role":"assistant","content":[{"type":"thinking","signature":"cmm1."}]}]}'
    out = neutralise(body)
    assert out == b'{"messages":[{"role":"assistant","content":[{"type":"text","text":"."}             ]}]}'


ESCAPED = b'{"type":"redacted_thinking","data":"cmm1. \\\\\\" '  # spaces, escaped backslash and quote


@pytest.mark.parametrize("block, text", [
    (b'{"type":"thinking","signature":"cmm1."}', "."),
    (ESCAPED + b"x" * (len(OMITTED) - 3 - len(ESCAPED)) + b'"}', "."),  # one byte short of OMITTED
    (ESCAPED + b"x" * (len(OMITTED) - 2 - len(ESCAPED)) + b'"}', "[thinking from another model omitted]"),
    (b'{"type":"thinking","thinking":"a longer plan","signature":"cmm1.s"}', "[thinking from another model omitted]"),
])
def test_the_replacement_text_does_not_depend_on_whitespace(block: bytes, text: str) -> None:
    """The text is chosen by the block's length without whitespace between tokens, whatever the
    spacing and however the body is split."""
    spaced = block.replace(b'":', b'" :\n  ').replace(b'",', b'"\t,\r\n ')
    assert json.loads(spaced) == json.loads(block)
    for spelling in (block, spaced, block.replace(b"{", b"{" + b" " * 5000)):
        body = b'{"messages":[{"role":"assistant","content":[ ' + spelling + b' ]}]}'
        for points in ([], list(range(len(body)))):
            out = run_split(Neutraliser(), body, points)
            assert len(out) == len(body)
            assert json.loads(out)["messages"][0]["content"] == [{"type": "text", "text": text}]


def test_any_key_order_whitespace_and_escapes() -> None:
    body = (b'{ "messages" : [ { "content" : [ {"type":"text","text":"a"} ,\n'
            b' { "signature" : "\\u0063mm1.zz" , "thinking":"t", "type" : "thinking" } ] ,'
            b' "role":"assistant" } ] }')
    out = neutralise(body)
    assert len(out) == len(body)
    assert json.loads(out) == {"messages": [{"content": [{"type": "text", "text": "a"}], "role": "assistant"}]}
    unmarked = unmark(body)
    assert json.loads(unmarked)["messages"][0]["content"][1]["signature"] == "zz"
    assert b'"signature" : ' + b" " * 10 + b'"zz"' in unmarked  # the 10-byte escaped mark became spaces


def test_not_json_passes_as_it_is() -> None:
    broken = b'{"messages":[{"content":[{"type":"thinking","signature":"cmm1.x"} x]}]}'
    for body in (b"", b"[1,2]", b"not json", broken):
        transform = Neutraliser()
        out = run_split(transform, body, [3, 7])
        assert len(out) == len(body)
        if b"cmm1" not in body:
            assert out == body


long_texts = st.text(alphabet='\\"a/\n\u00e9', max_size=40).map(lambda text: text * 80)


@settings(max_examples=60, deadline=None)
@given(long_texts, long_texts, st.booleans(), styles, splits)
def test_long_strings_full_of_escapes(text: str, thought: str, marked: bool, style, points: list[int]) -> None:
    document = {"messages": [{"role": "assistant", "content": [
        {"type": "text", "text": text},
        {"type": "thinking", "thinking": thought, "signature": (M if marked else "") + text[:40]},
        {"type": "tool_use", "id": "t", "name": "Edit", "input": {"old": thought, "new": text}},
    ]}]}
    body = serialise(document, style)
    out = run_split(Neutraliser(), body, points)
    assert len(out) == len(body)
    parsed = json.loads(out)
    assert parsed == expected_neutral(document, parsed)
    unmarked = run_split(Unmarker(), body, points)
    assert json.loads(unmarked) == expected_unmarked(document)


@FAST
@given(st.lists(st.sampled_from(["a", "\\\\", '\\"', "\\n", "\\u0022", "\u00e9", '\\\\\\"']), max_size=80))
def test_closing_quote_at_any_escape_density(parts: list[str]) -> None:
    """Quotes behind runs of backslashes: the candidate search, and the flattening past four."""
    raw = "".join(parts).encode()
    data = b'"' + raw + b'","x":"' + raw + b'"'
    assert json_walk.closing_quote(data, 1) == len(raw) + 2
    assert json_walk.closing_quote(data[: len(raw) + 1], 1) == -1
    assert json.loads(data[: len(raw) + 2]) == json.loads(b'"' + raw + b'"')


@st.composite
def damaged(draw) -> bytes:
    """Bodies cut short or with bytes changed: invalid JSON, or valid JSON of another shape."""
    body = serialise(draw(bodies()), draw(styles))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, max(0, len(body) - 1)))
        change = draw(st.sampled_from([b"", b"x", b"]", b"}", b",", b":", b'"', b"\\", b"{", b"["]))
        body = body[:at] + change + body[at + 1 :]
    return body


@FAST
@given(damaged() | st.binary(max_size=200), splits)
def test_damaged_bodies_keep_their_length_and_never_raise(body: bytes, points: list[int]) -> None:
    for transform, one_shot in ((Neutraliser, neutralise), (Unmarker, unmark)):
        out = run_split(transform(), body, points)
        assert len(out) == len(body)
        assert out == one_shot(body)
    assert run_split(thinking_marks._Marker(), body, points) == mark_message(body)


def test_odd_keys_are_read_like_json_loads() -> None:
    body = (b'{"messages":[{"role":"user","\\u0063ontent":null,"content":[{"' + b"k" * 100 + b'":1,'
            b'"type":"thinking","thinking":"x","signature":"cmm1.s"},'
            b'{"t\\u0079pe":"redacted_thinking","data":"cmm1.d"}]}]}')
    out = neutralise(body)
    assert len(out) == len(body)
    # The last block (52 bytes) is too short for OMITTED: the short text block stands in.
    assert json.loads(out)["messages"][0]["content"] == [{"type": "text", "text": "."}]
    bad = b'{"messages":[{"content":[{"t\\qpe":"thinking","signature":"cmm1.x"}]}]}'  # not JSON: kept
    assert neutralise(bad) == bad


def test_only_the_block_being_examined_is_held() -> None:
    text = {"type": "text", "text": "y" * 500}
    thought = {"type": "thinking", "thinking": "z" * 500, "signature": "S" * 40}
    document = {"model": "m", "messages": [{"role": "user", "content": [text, thought, text]}], "system": "s" * 300}
    body = json.dumps(document, separators=(",", ":")).encode()
    transform = Neutraliser()
    emitted = 0
    thinking_start = body.index(b',{"type":"thinking"')
    signature_ready = body.index(b'"signature":"') + len(b'"signature":"') + 30
    for i in range(len(body)):
        emitted += len(transform.feed(body[i : i + 1]))
        lag = i + 1 - emitted
        if thinking_start <= i < signature_ready - 1:
            assert emitted == thinking_start  # the comma and the block wait for the signature
        else:
            assert lag <= len(b',{"type":"text"')  # a text block is decided by its type
    assert emitted == len(body) and transform.finish() == b""


@FAST
@given(st.dictionaries(st.sampled_from(["model", "system", "content"]), json_values), st.integers(0, 2**32), splits)
def test_bodies_without_message_content_are_never_held(document: dict, seed: int, points: list[int]) -> None:
    body = dump_random(document, random.Random(seed)).encode()
    transform = Neutraliser()
    start = 0
    for point in sorted({p for p in points if 0 < p < len(body)}) + [len(body)]:
        assert transform.feed(body[start:point]) == body[start:point]
        start = point
    assert transform.finish() == b""


# -- unmark -------------------------------------------------------------------------------------


@FAST
@given(bodies(), styles, splits)
def test_unmark_restores_the_targets_signatures(document: dict, style, points: list[int]) -> None:
    body = serialise(document, style)
    transform = Unmarker()
    out = run_split(transform, body, points)
    assert len(out) == len(body)
    assert json.loads(out) == expected_unmarked(document)
    assert transform.changed == (json.loads(out) != document)
    assert out == unmark(body)
    if not transform.changed:
        assert out == body


def test_unmark_shape() -> None:
    body = (b'{"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"cmm1.XYZ"},'
            b'{"type":"redacted_thinking","data":"cmm1.D"},{"type":"thinking","thinking":"t","signature":"anth"}]}]}')
    assert unmark(body) == body.replace(b'"cmm1.XYZ"', b'     "XYZ"').replace(b'"cmm1.D"', b'     "D"')


# -- responses ----------------------------------------------------------------------------------

SIGNED_FIELD = {"thinking": "signature", "redacted_thinking": "data"}


@FAST
@given(st.lists(blocks(marks=False), max_size=6), styles)
def test_mark_message_marks_every_signature(content: list, style) -> None:
    document = {"id": "msg_1", "type": "message", "role": "assistant", "content": content,
                "stop_reason": "end_turn", "usage": {"input_tokens": 1}}
    body = serialise(document, style)
    out = mark_message(body)
    expected = copy.deepcopy(document)
    count = 0
    for block in expected["content"]:
        field = SIGNED_FIELD.get(block.get("type")) if isinstance(block, dict) else None
        if field and isinstance(block.get(field), str):
            block[field] = M + block[field]
            count += 1
    assert json.loads(out) == expected
    assert len(out) == len(body) + count * len(MARK)
    assert out.replace(MARK, b"") == body.replace(MARK, b"")  # only insertions


def sse_events(rnd: random.Random, crlf: bool) -> list[bytes]:
    """A streamed reply as Anthropic-compatible servers send it, with thinking and text blocks."""
    end = "\r\n" if crlf else "\n"

    def event(data: dict, spaced: bool = False) -> bytes:
        text = json.dumps(data) if spaced else json.dumps(data, separators=(",", ":"))
        return f"event: {data['type']}{end}data: {text}{end}{end}".encode()

    def start(index: int, block: dict, spaced: bool) -> bytes:
        return event({"type": "content_block_start", "index": index, "content_block": block}, spaced)

    def delta(index: int, delta: dict, spaced: bool) -> bytes:
        return event({"type": "content_block_delta", "index": index, "delta": delta}, spaced)

    out = [event({"type": "message_start", "message": {"id": "m", "content": []}})]
    for index in range(rnd.randint(1, 4)):
        spaced = rnd.random() < 0.3
        kind = rnd.choice(["thinking", "redacted_thinking", "text"])
        if kind == "thinking":
            signature = rnd.choice(["", "", "EqPre"])
            out.append(start(index, {"type": "thinking", "thinking": "", "signature": signature}, spaced))
            for _ in range(rnd.randint(0, 3)):
                thought = rnd.choice(["the signature_delta", "x\u00e9", "\\u"])
                out.append(delta(index, {"type": "thinking_delta", "thinking": thought}, spaced))
            out.append(delta(index, {"type": "signature_delta", "signature": "Eq" + str(rnd.random())}, spaced))
        elif kind == "redacted_thinking":
            out.append(start(index, {"type": "redacted_thinking", "data": "Rd" + str(index)}, spaced))
        else:
            out.append(start(index, {"type": "text", "text": ""}, spaced))
            out.append(delta(index, {"type": "text_delta", "text": '{"signature":"x"}'}, spaced))
        out.append(event({"type": "ping"}, spaced))
        out.append(event({"type": "content_block_stop", "index": index}, spaced))
    out.append(event({"type": "message_stop"}))
    return out


def should_mark(event: bytes) -> str | None:
    data = json.loads(event.split(b"data: ", 1)[1].split(b"\n")[0])
    if data["type"] == "content_block_delta" and data["delta"]["type"] == "signature_delta":
        return "signature"
    block = data.get("content_block", {})
    if block.get("type") == "thinking" and block.get("signature"):
        return "signature"
    if block.get("type") == "redacted_thinking":
        return "data"
    return None


@FAST
@given(st.integers(0, 2**32), st.booleans(), splits)
def test_sse_marker(seed: int, crlf: bool, points: list[int]) -> None:
    events = sse_events(random.Random(seed), crlf)
    stream = b"".join(events)
    marker = SseMarker()
    out = run_split(marker, stream, points)
    expected = []
    for event in events:
        field = should_mark(event)
        if field is None:
            expected.append(event)
        else:
            marked = re.sub(f'("{field}": ?")'.encode(), rb"\1" + MARK, event)
            assert marked != event and mark_event(event) == marked
            expected.append(marked)
    assert out == b"".join(expected)
    assert marker.marked == sum(a != b for a, b in zip(events, expected))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.booleans())
def test_sse_events_go_out_when_their_blank_line_arrives(seed: int, crlf: bool) -> None:
    events = sse_events(random.Random(seed), crlf)
    stream = b"".join(events)
    ends, total = [], 0
    for event in events:
        total += len(event)
        ends.append(total)
    marker = SseMarker()
    done = 0
    for i in range(len(stream)):
        emitted = marker.feed(stream[i : i + 1])
        if done < len(ends) and ends[done] == i + 1:
            assert emitted == mark_event(events[done])  # out with the last byte of its blank line
            done += 1
        else:
            assert emitted == b""
    assert marker.finish() == b""


def test_sse_multi_line_data_is_rewritten_on_one_line() -> None:
    event = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,\n'
             b'data: "delta":{"type":"signature_delta","signature":"S"}}\nid: 7\n\n')
    assert mark_event(event) == (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                                 b'"delta":{"type":"signature_delta","signature":"cmm1.S"}}\nid: 7\n\n')


def test_sse_events_that_only_look_like_signatures_pass() -> None:
    for event in (b": signature comment\n\n", b"data: {signature\n\n", b'data: ["signature_delta"]\n\n',
                  b'data: {"type":"content_block_delta","delta":{"type":"signature_delta","signature":7}}\n\n'):
        assert mark_event(event) is event
    # A key spelled with an escape cannot be edited in place: the data is written again.
    event = b'data: {"type":"content_block_delta","delta":{"type":"signature_delta","si\\u0067nature":"S"}}\n\n'
    assert mark_event(event) == (
        b'data: {"type":"content_block_delta","delta":{"type":"signature_delta","signature":"cmm1.S"}}\n\n'
    )
    assert SseMarker().feed(b"") == b""


def test_sse_unterminated_tail_goes_out_at_finish() -> None:
    marker = SseMarker()
    assert marker.feed(b"event: ping\ndata: {}\n\nevent: pi") == b"event: ping\ndata: {}\n\n"
    assert marker.finish() == b"event: pi"


# -- speed --------------------------------------------------------------------------------------


def claude_code_body(size: int, foreign_every: int) -> bytes:
    """A long tool-using session as Claude Code serialises it: thinking, tool calls, file reads."""
    rnd = random.Random(7)
    source = (Path(thinking_scan.__file__).parents[1] / "serve" / "proxy.py").read_text()
    reads = [source[i : i + 6000] for i in range(0, len(source) - 6000, 1000)]
    msgs, turn, total = [{"role": "user", "content": [{"type": "text", "text": "fix the bug"}]}], 0, 0
    while total < size:
        turn += 1
        marked = foreign_every and turn % foreign_every == 0
        signature = (M if marked else "") + "".join(rnd.choices(BASE64, k=600))
        tool_id = f"toolu_{turn}"
        msgs.append({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Let me look at the file. " * 20, "signature": signature},
            {"type": "text", "text": "Reading the file."},
            {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": f"/src/m{turn}.py"}},
        ]})
        msgs.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": reads[turn % len(reads)]},
        ]})
        total += len(json.dumps(msgs[-2:], ensure_ascii=False))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    tools = [{"name": f"T{i}", "description": "d" * 200, "input_schema": schema} for i in range(30)]
    document = {"model": "claude-opus-4-6", "messages": msgs, "system": [{"type": "text", "text": "cch=00000;"}],
                "tools": tools, "max_tokens": 32000, "stream": True}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def best_of(runs: int, transform, body: bytes, size: int) -> tuple[float, bytes]:
    best, out = float("inf"), b""
    for _ in range(runs):
        began = time.perf_counter()
        out = b"".join(transform.feed(body[i : i + size]) for i in range(0, len(body), size)) + transform.finish()
        best = min(best, time.perf_counter() - began)
        transform = type(transform)()
    return best, out


def test_speed(capsys: pytest.CaptureFixture) -> None:
    """Printed, not asserted: the cost of a passthrough body of 2 MB, with and without foreign blocks."""
    lines = []
    for label, every in (("no foreign blocks", 0), ("1 in 2 thinking blocks foreign", 2)):
        body = claude_code_body(2_000_000, every)
        mb = len(body) / 1e6
        for chunking, size in (("one feed", len(body)), ("64 KiB feeds", 65536)):
            seconds, out = best_of(3, Neutraliser(), body, size)
            assert len(out) == len(body) and (out == body) == (not every)
            lines.append(f"neutralise {mb:.1f} MB, {label}, {chunking}: {seconds * 1e3:.1f} ms = {mb / seconds:.0f} MB/s")
        seconds, out = best_of(3, Unmarker(), body, 65536)
        lines.append(f"unmark     {mb:.1f} MB, {label}, 64 KiB feeds: {seconds * 1e3:.1f} ms = {mb / seconds:.0f} MB/s")
        began = time.perf_counter()
        json.loads(body)
        lines.append(f"  (json.loads of the same body: {(time.perf_counter() - began) * 1e3:.1f} ms)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_foreign_tool_turn_is_only_the_final_tool_use_turn_that_lost_its_first_block() -> None:
    import json as _json

    def run(history: list) -> Neutraliser:
        body = _json.dumps({"model": "m", "messages": history}, separators=(",", ":")).encode()
        neutraliser = Neutraliser()
        neutraliser.feed(body)
        neutraliser.finish()
        return neutraliser

    foreign = {"type": "thinking", "thinking": "t", "signature": "cmm1.tgt-x"}
    own = {"type": "thinking", "thinking": "t", "signature": "anthropic-sig"}
    tool = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}
    user = {"role": "user", "content": "hi"}
    assert run([user, {"role": "assistant", "content": [foreign, tool]}, result]).foreign_tool_turn
    assert not run([user, {"role": "assistant", "content": [own, tool]}, result]).foreign_tool_turn
    assert not run([user, {"role": "assistant", "content": [foreign, {"type": "text", "text": "x"}]}, user]).foreign_tool_turn
    earlier = [user, {"role": "assistant", "content": [foreign, tool]}, result,
               {"role": "assistant", "content": [own, {"type": "text", "text": "done"}]}, user]
    assert not run(earlier).foreign_tool_turn  # an older tool turn: Anthropic only checks the final one


def test_thinking_off_blanks_the_top_level_member_only() -> None:
    from cmm.core.thinking_edits import thinking_off_if

    class Foreign:
        foreign_tool_turn = True

    tail = b'cch=12345;"}],"tools":[{"input_schema":{"properties":{"thinking":{"type":"string"}}}}],' \
           b'"max_tokens":32000,"thinking":{"budget_tokens":31999,"type":"enabled","display":"omitted"},"stream":true}'
    out = thinking_off_if(Foreign(), tail)
    assert len(out) == len(tail) and b'"type":"enabled"' not in out and b'"thinking":{"type":"string"}' in out
    prefix = b'{"system":[{"type":"text","text":"x '
    assert _json_ok(prefix + tail) and _json_ok(prefix + out)
    assert "thinking" not in __import__("json").loads(prefix + out)
    last = b'"max_tokens":1,"thinking":{"type":"enabled","budget_tokens":1}}'
    assert thinking_off_if(Foreign(), last) == b'"max_tokens":1' + b" " * (len(last) - 15) + b"}"


def _json_ok(data: bytes) -> bool:
    import json as _json

    try:
        _json.loads(data)
    except ValueError:
        return False
    return True


def test_bodies_that_cannot_hold_a_mark_need_no_scan() -> None:
    from cmm.core.thinking_edits import cannot_hold_a_mark, neutralise, unmark
    from cmm.core.thinking_marks import mark_message

    plain = b'{"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"sig"}]}]}'
    assert cannot_hold_a_mark(plain) and neutralise(plain) == plain and unmark(plain) == plain
    assert cannot_hold_a_mark(b'{"text":"\\u001b[31mred\\u001b[0m"}')  # control escapes are common and harmless
    marked = plain.replace(b'"sig"', b'"cmm1.sig"')
    escaped = plain.replace(b'"sig"', b'"\\u0063mm1.sig"')
    assert not cannot_hold_a_mark(marked) and not cannot_hold_a_mark(escaped)
    assert neutralise(escaped) != escaped  # the scan really was needed
    no_thinking = b'{"content":[{"type":"text","text":"hi"}],"model":"x"}'
    assert mark_message(no_thinking) is no_thinking
    assert b"cmm1." in mark_message(b'{"content":[{"type":"thinking","thinking":"t","signature":"s"}]}')


# -- SSE: the bound on what is held ----------------------------------------------------------------


SIGNATURE_EVENT = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                   b'"delta":{"type":"signature_delta","signature":"sig"}}\n\n')


@pytest.mark.parametrize("piece", [b"x" * 4096, b'"signature":"' + b"y" * 4083], ids=["plain", "signature"])
def test_sse_marker_holds_no_more_than_one_bounded_event(piece: bytes) -> None:
    """A stream that never sends a newline: what is held never exceeds the bound, the bytes go
    out unchanged and in order, and the next event after a blank line is marked again."""
    marker = SseMarker()
    fed = sent = 0
    out = []
    for _ in range(3 * thinking_marks.MAX_SSE_EVENT // len(piece)):
        out.append(marker.feed(piece))
        fed, sent = fed + len(piece), sent + len(out[-1])
        assert fed - sent <= thinking_marks.MAX_SSE_EVENT
    assert marker.passed_unmarked == 1 and marker.marked == 0
    out.append(marker.feed(b"\n\n" + SIGNATURE_EVENT[:50]))
    out.append(marker.feed(SIGNATURE_EVENT[50:]) + marker.finish())
    expected = (piece * (3 * thinking_marks.MAX_SSE_EVENT // len(piece)) + b"\n\n"
                + SIGNATURE_EVENT.replace(b'"sig"', b'"cmm1.sig"'))
    assert b"".join(out) == expected and marker.marked == 1


@given(st.lists(st.integers(0, 600), max_size=12), st.booleans())
@settings(max_examples=100, deadline=None)
def test_sse_oversized_events_pass_unmarked_whatever_the_split(points: list[int], crlf: bool) -> None:
    """Events held over the bound (here made small) pass as they are; the others are marked, and
    the blank line that ends an oversized event is found wherever the pieces cut it. (An event
    that arrives whole in one piece is never held, so the bound does not apply to it.)"""
    newline = b"\r\n" if crlf else b"\n"
    big = b"data: " + b"z" * 300 + b"signature" + newline + newline
    small = SIGNATURE_EVENT.replace(b"\n", newline)
    stream = small + big + small + big + big + small
    marked = small.replace(b'"sig"', b'"cmm1.sig"')
    for cuts in (points, list(range(len(stream)))):
        marker = SseMarker(max_event=200)
        assert run_split(marker, stream, cuts) == marked + big + marked + big + big + marked
        assert marker.marked == 3
    assert marker.passed_unmarked == 3  # byte by byte, each big event outgrew the bound
