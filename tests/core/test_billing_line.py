"""The billing line in gateway form: only its stable fields, the same on every turn, whatever the split."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings, strategies as st

from claude_code_turns import GATEWAY_LINE, billing_line, turn_body
from cmm.core import cch
from cmm.core.billing_line import LINE_MAX, BillingLine, gateway_form, to_gateway_form
from cmm.core.decoding import BodyDecoder
from cmm.core.exchange import ModelSniffer, RequestBody, UpstreamRequest, edits_for, plan_request, route
from cmm.core.framing import LAST_CHUNK, encode_chunk
from cmm.core.http_head import HeadCollector, parse_request_head
from cmm.core.router import BodySize, Mapping, Pending, Router, Upstream

HAIKU = "claude-haiku-5-5"
LIMIT = 4 * 1024 * 1024
ROUTER = Router((Mapping("claude-haiku", "gemini-2.5-flash", Upstream.from_url("http://127.0.0.1:8317/v1/messages")),))

cuts = st.lists(st.integers(0, 1 << 20), max_size=12)


def split(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:]) if b > a]


TOO_LONG = json.dumps({"model": "m", "system": [{"text": "x-anthropic-billing-header: " + "cc_x=1; " * (LINE_MAX // 8)
                                                  + "cch=00000;"}]}).encode()
ESCAPES = json.dumps({"model": "m", "messages": [{"content": "\\\"]}{[" * 40}],
                      "system": [{"type": "text", "text": billing_line(2)}]}).encode()


def run(pieces: list[bytes]) -> bytes:
    stage = BillingLine()
    return b"".join(stage.feed(piece) for piece in pieces) + stage.finish()


# -- the line --------------------------------------------------------------------------------------

def test_every_per_request_field_goes_known_or_not() -> None:
    line = (b"x-anthropic-billing-header: cc_version=2.1.330.a1b; cc_entrypoint=cli; cch=6d822; "
            b"cc_prev_req=req_011CVabc; cc_prompt_id=4f1c7a3e-0000-4000-8000-00000000c0de; cc_turn_origin=user; "
            b"cc_prompt_index=12; cc_turn_index=40; cc_workload=cron; cc_is_subagent=true; cc_added_next_year=7;")
    assert gateway_form(line) == b"x-anthropic-billing-header: cc_version=2.1.330.a1b; cc_entrypoint=cli;"


@pytest.mark.parametrize("line", [
    b"x-anthropic-billing-header: cc_version=2.1.330.a1b; cc_entrypoint=cli;",  # the gateway form already
    b"x-anthropic-billing-header: cc_version=2.1.330.a1b; cch=00000; and some prose",  # not its form
    b"x-anthropic-billing-header: cc_version=2.1.330.a1b; cch=0\\u0030000;",  # escaped: not its form
    b"You are Claude Code; cch=00000;",
    b"",
])
def test_lines_not_in_the_known_form_stay_as_they_are(line: bytes) -> None:
    assert gateway_form(line) == line


# -- the body ---------------------------------------------------------------------------------------

def system_of(body: bytes) -> list[dict[str, object]]:
    return json.loads(body)["system"]  # type: ignore[no-any-return]


def test_successive_turns_get_the_same_system_blocks_and_nothing_else_changes() -> None:
    turns = [turn_body(HAIKU, n) for n in (1, 2, 3)]
    assert len({json.dumps(system_of(body)) for body in turns}) == 3  # as sent, every turn differs
    outs = [to_gateway_form(body) for body in turns]
    assert len({json.dumps(system_of(out)) for out in outs}) == 1
    for body, out in zip(turns, outs):
        assert len(out) == len(body)  # the length, so the framing, is kept
        assert system_of(out)[0] == {"type": "text", "text": GATEWAY_LINE}
        before, after = json.loads(body), json.loads(out)
        before["system"][0]["text"] = GATEWAY_LINE
        assert after == before
        start = body.index(billing_line(1)[:40].encode())
        assert out[:start] == body[:start]  # bytes before the line pass untouched


@pytest.mark.parametrize("body", [
    # the line elsewhere: in a message, as the second system block, system as a string
    json.dumps({"model": "m", "messages": [{"role": "user", "content": billing_line(1)}], "system": "x"}).encode(),
    json.dumps({"model": "m", "system": [{"type": "text", "text": "You are"}, {"type": "text", "text": billing_line(1)}]}
               ).encode(),
    json.dumps({"model": "m", "system": billing_line(1)}).encode(),
    json.dumps({"model": "m", "metadata": {"system": [{"text": billing_line(1)}]}}).encode(),
    # not JSON, or cut inside the line
    b"[" + json.dumps({"system": [{"text": billing_line(1)}]}).encode() + b"]",
    turn_body(HAIKU, 2)[: turn_body(HAIKU, 2).index(b"cc_prompt_index")],
])
def test_only_the_first_system_block_of_a_whole_body_is_touched(body: bytes) -> None:
    assert to_gateway_form(body) == body


def test_any_spacing_and_key_order_is_understood() -> None:
    payload = json.loads(turn_body(HAIKU, 2))
    reordered = {"system": [{"cache_control": {"type": "ephemeral"}, "te\\u0078t": 1, "text": billing_line(2),
                             "type": "text"}], **payload}
    reordered["system"] = reordered.pop("system")
    body = json.dumps(reordered, indent=2, ensure_ascii=True).encode().replace(b'"te\\\\u0078t": 1', b'"te\\u0078t": 1')
    out = to_gateway_form(body)
    assert len(out) == len(body)
    assert json.loads(out)["system"][0]["text"] == GATEWAY_LINE


def test_a_first_block_too_long_to_be_the_line_is_let_go() -> None:
    assert to_gateway_form(TOO_LONG) == TOO_LONG
    assert json.loads(to_gateway_form(ESCAPES))["system"][0]["text"] == GATEWAY_LINE


@settings(max_examples=150, deadline=None)
@given(points=cuts, turn=st.integers(1, 3), indent=st.sampled_from([None, 1]), other=st.sampled_from([b"", TOO_LONG,
                                                                                                     ESCAPES]))
def test_the_output_does_not_depend_on_the_split(points: list[int], turn: int, indent: int | None,
                                                 other: bytes) -> None:
    body = other or turn_body(HAIKU, turn, filler=40)
    if indent is not None:
        body = json.dumps(json.loads(body), indent=indent).encode()
    assert run(split(body, points)) == to_gateway_form(body)


def test_only_the_line_is_held_back() -> None:
    body = turn_body(HAIKU, 2, filler=40)
    whole = to_gateway_form(body)
    line_start = body.index(b"x-anthropic-billing-header:")
    line_end = body.index(b'"', line_start)
    stage, out = BillingLine(), b""
    for n, byte in enumerate(body):
        out += stage.feed(bytes([byte]))
        assert whole.startswith(out)
        assert len(out) == (n + 1 if not line_start <= n < line_end else line_start)
    assert out + stage.finish() == whole and stage.changed


# -- on its way to the target -------------------------------------------------------------------------

def request(body: bytes, coding: str = "", chunked: bool = False) -> bytes:
    head = b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\n"
    if coding:
        head += b"Content-Encoding: %s\r\n" % coding.encode()
        body = gzip.compress(body, mtime=0)
    if chunked:
        framed = b"".join(encode_chunk(body[i:i + 999]) for i in range(0, len(body), 999)) + LAST_CHUNK
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def forward(pieces: list[bytes], keep_billing_line: bool) -> tuple[bytes, bytes]:
    """The head and the body (de-chunked) a request arriving in ``pieces`` goes upstream with."""
    collector, pieces = HeadCollector(), list(pieces)
    while (done := collector.feed(pieces.pop(0))) is None:
        pass
    raw, data = done
    head = parse_request_head(raw)
    plan = plan_request(head, LIMIT)
    decoder = BodyDecoder(list(plan.codings), LIMIT) if plan.codings else None
    sniffer, body = ModelSniffer(decoder), RequestBody(head, LIMIT)
    while (sniffed := sniffer.feed(part := body.feed(data))) is None:
        data = pieces.pop(0)
    mapping = route(sniffed.result, ROUTER, head, BodySize(0, complete=False))
    assert not isinstance(mapping, Pending)
    edits = edits_for(plan.endpoint, mapping is not None, head.framing, LIMIT, sniffed.payload if part.done else None)
    upstream = UpstreamRequest(head, edits, decoder, mapping, LIMIT, keep_billing_line=keep_billing_line)
    out = upstream.first(sniffed, plan.endpoint, part.done)
    remaining = ([part.rest] if part.rest else []) + pieces
    while not part.done:
        part = body.feed(remaining.pop(0))
        out += upstream.feed(part)
    sent_raw, sent_rest = HeadCollector().feed(out)  # type: ignore[misc]
    sent_head = parse_request_head(sent_raw)
    progress = RequestBody(sent_head, LIMIT).feed(sent_rest)
    assert progress.done and not progress.rest
    return sent_raw, b"".join(progress.payload)


@pytest.mark.parametrize("coding, chunked", [("", False), ("", True), ("gzip", False)], ids=["plain", "chunked", "gzip"])
@settings(max_examples=25, deadline=None)
@given(points=cuts)
def test_intercepted_turns_reach_the_target_with_one_system(coding: str, chunked: bool, points: list[int]) -> None:
    systems = []
    for turn in (1, 2):
        body = turn_body(HAIKU, turn, filler=300)
        sent_head, sent = forward(split(request(body, coding, chunked), points), keep_billing_line=False)
        assert json.loads(sent)["model"] == "gemini-2.5-flash"
        if not coding and not chunked:
            assert b"Content-Length: %d\r\n" % len(sent) in sent_head
        systems.append(system_of(sent))
    assert systems[0] == systems[1] and systems[0][0]["text"] == GATEWAY_LINE


def test_keep_billing_line_and_passthrough_leave_the_line_alone() -> None:
    body = turn_body(HAIKU, 2)
    _, kept = forward([request(body)], keep_billing_line=True)
    assert kept == body.replace(HAIKU.encode(), b"gemini-2.5-flash", 1)
    assert cch.is_valid(kept)  # the model rewrite keeps Claude Code's hash right
    opus = cch.resign(body.replace(HAIKU.encode(), b"claude-opus-5-5", 1))
    _, passed = forward([request(opus)], keep_billing_line=False)
    assert passed == opus


@settings(max_examples=25, deadline=None)
@given(points=cuts)
def test_a_body_without_the_line_in_its_first_block_goes_as_it_came(points: list[int]) -> None:
    """Whole in the first piece or not: no billing line to rewrite (the whole body's check skips
    the walk), or the line only quoted in a message, which stays as it is."""
    for system, quoted in (("You are Claude Code.", "hi"), ("You are Claude Code.", billing_line(2))):
        body = json.dumps({"model": HAIKU, "max_tokens": 5, "messages": [{"role": "user", "content": quoted}],
                           "system": [{"type": "text", "text": system}]}, separators=(",", ":")).encode()
        _, sent = forward(split(request(body), points), keep_billing_line=False)
        assert sent == body.replace(HAIKU.encode(), b"gemini-2.5-flash", 1)
