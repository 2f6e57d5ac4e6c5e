"""The failover decisions as values: which answers fail over, retry-after in both forms, the
cool-down table, the kept body's bound, and the second send built from the kept bytes."""

from __future__ import annotations

import email.utils
import gzip
import json

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from cmm.core.exchange import ModelSniffer, RequestBody, UpstreamRequest, edits_for
from cmm.core.decoding import BodyDecoder
from cmm.core.failover import (DEFAULT_FALLBACK_ON, MAX_COOLDOWN, Cooldown, CooldownTable, KeptBody, cause,
                               cooldown_for, fails_over, keepable, next_cause, resend, retry_after_seconds,
                               ruled, target_failed, with_fallback_header)
from cmm.core.records import RequestRecord
from cmm.core.framing import tracker_for
from cmm.core.http_head import parse_request_head
from cmm.core.router import Mapping, Upstream, rule_label

NOW = 1_800_000_000.0
RULE = Mapping("claude-opus", "gpt-5", Upstream.from_url("http://127.0.0.1:8317/v1/messages", "sk-proxy"),
               mode="fallback")
BODY = json.dumps({"model": "claude-opus-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hé"}]},
                  separators=(",", ":")).encode()


def head(*fields: str) -> bytes:
    return ("POST /v1/messages?beta=true HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: sk-ant-user\r\n"
            + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode()


def parsed(request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """A request's first line, its fields (lower-cased) and its body payload, whatever its framing."""
    raw_head, body = request.split(b"\r\n\r\n", 1)
    request_head = parse_request_head(raw_head + b"\r\n\r\n")
    progress = tracker_for(request_head.framing).feed(body)
    assert progress.done and progress.consumed == len(body)
    fields = {name.lower(): value for name, value in request_head.headers.fields}
    return raw_head.split(b"\r\n", 1)[0], fields, b"".join(progress.payload)


# -- which answers fail over ----------------------------------------------------------------------

def test_the_default_causes_are_the_documented_ones() -> None:
    assert DEFAULT_FALLBACK_ON == (429, 529, 500, 502, 503, 504, "unreachable")
    assert all(fails_over(status, ()) for status in (429, 529, 500, 502, 503, 504, None))
    assert not any(fails_over(status, ()) for status in (200, 400, 401, 404, 413, 501))


def test_a_rule_s_own_list_replaces_the_default() -> None:
    assert fails_over(529, (529,)) and not fails_over(429, (529,)) and not fails_over(None, (529,))
    assert fails_over(None, ("unreachable",))


def test_a_target_fails_on_no_answer_5xx_and_a_429_left_after_retries() -> None:
    assert all(target_failed(status) for status in (None, 429, 500, 503, 529))
    assert not any(target_failed(status) for status in (200, 400, 401, 404))
    assert cause("anthropic", 429) == "anthropic 429" and cause("target", None) == "target unreachable"
    assert cause("anthropic", None, "timeout") == "anthropic timeout"


def test_which_way_a_failure_sends_the_request() -> None:
    assert next_cause(True, (), 429) == "anthropic 429" and next_cause(True, (), 400) is None
    assert next_cause(True, (), None, "timeout") == "anthropic timeout"
    assert next_cause(True, (529,), None) is None  # the rule does not list "unreachable"
    assert next_cause(False, (529,), 503) == "target 503" and next_cause(False, (), 404) is None
    assert next_cause(False, (), None, "closed") == "target closed"


def test_a_cool_down_starts_only_for_a_listed_429_or_529_with_a_future_retry_after() -> None:
    assert cooldown_for(RULE, 429, b"30", NOW) == Cooldown("claude-opus* → gpt-5 (fallback)", NOW + 30, "anthropic 429")
    assert cooldown_for(RULE, 529, b"5", NOW) == Cooldown("claude-opus* → gpt-5 (fallback)", NOW + 5, "anthropic 529")
    assert cooldown_for(RULE, 429, None, NOW) is None and cooldown_for(RULE, 429, b"0", NOW) is None
    assert cooldown_for(RULE, 503, b"30", NOW) is None  # fails over, but no cool-down
    assert cooldown_for(attrs.evolve(RULE, fallback_on=(529,)), 429, b"30", NOW) is None


def test_a_failover_rule_s_record_says_the_rule_and_who_answered_why() -> None:
    record = RequestRecord(started=NOW, method="POST", path="/v1/messages", model="claude-opus-4-6",
                           intercepted=True, target="gpt-5", status=200, duration=0.1, bytes_in=1, bytes_out=2)
    assert ruled(record, RULE, None, None) == attrs.evolve(record, mapping="claude-opus")
    to_target = ruled(record, RULE, "anthropic 429", RULE.upstream)
    assert (to_target.route, to_target.fallback, to_target.upstream) == ("fallback", "anthropic 429", "127.0.0.1:8317")
    back = ruled(attrs.evolve(record, intercepted=False, target=None), RULE, "target 503", None)
    assert (back.route, back.upstream, back.target, back.intercepted) == ("fallback", "anthropic", "gpt-5", False)


# -- retry-after ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [(b"30", 30.0), (b" 7 ", 7.0), (b"1.5", 1.5), (b"0", 0.0),
                                            (b"999999999", MAX_COOLDOWN)])
def test_retry_after_in_seconds(value: bytes, seconds: float) -> None:
    assert retry_after_seconds(value, NOW) == seconds


def test_retry_after_as_an_http_date() -> None:
    future = email.utils.formatdate(NOW + 90, usegmt=True).encode()
    assert retry_after_seconds(future, NOW) == pytest.approx(90, abs=1)
    past = email.utils.formatdate(NOW - 90, usegmt=True).encode()
    assert retry_after_seconds(past, NOW) == 0.0


@pytest.mark.parametrize("value", [None, b"", b"soon", b"-5", b"nan", b"inf", b"Wed, 99 Foo 2026", "é".encode(),
                                   b"\xff\xfe", b"Wed, 02 Dec 2026 10:00:00"])
def test_an_unreadable_retry_after_is_none(value: bytes | None) -> None:
    assert retry_after_seconds(value, NOW) is None


# -- the cool-down table --------------------------------------------------------------------------

def test_a_cool_down_runs_until_its_time_then_is_gone() -> None:
    now = [NOW]
    table = CooldownTable(lambda: now[0])
    cooldown = Cooldown("claude-opus* → gpt-5", NOW + 30, "anthropic 429")
    assert table.extend(cooldown) and table.active(cooldown.rule) == cooldown
    assert table.active("other* → rule") is None
    now[0] = NOW + 29.9
    assert table.current() == [cooldown]
    now[0] = NOW + 30
    assert table.active(cooldown.rule) is None and table.current() == [] and table.entries == {}


def test_a_cool_down_is_only_ever_lengthened_so_reports_in_any_order_agree() -> None:
    early = Cooldown("r", NOW + 10, "anthropic 529")
    late = Cooldown("r", NOW + 60, "anthropic 429")
    for order in ([early, late], [late, early]):
        table = CooldownTable(lambda: NOW)
        changed = [table.extend(c) for c in order]
        assert table.current() == [late]
        assert changed == ([True, True] if order[0] is early else [True, False])
    assert not CooldownTable(lambda: NOW).extend(Cooldown("r", NOW - 1, "anthropic 429"))  # over already


@pytest.mark.parametrize("fields", [("", NOW, "x"), ("r", float("nan"), "x"), ("r", NOW, "")])
def test_a_malformed_cool_down_is_refused(fields: tuple) -> None:
    with pytest.raises(ValueError):
        Cooldown(*fields)


def test_a_rule_is_named_by_its_prefix_target_and_conditions() -> None:
    assert rule_label(RULE) == "claude-opus* → gpt-5 (fallback)"
    conditioned = Mapping("*", "gpt-5", RULE.upstream, request_class=("subagent",), headers=(("x-a", "b*"),),
                          min_body_bytes=10)
    assert rule_label(conditioned) == "* [subagent x-a=b* min_body_bytes≥10] → gpt-5"


# -- keeping the body -----------------------------------------------------------------------------

def test_a_kept_body_lets_go_of_everything_past_its_bound() -> None:
    kept = KeptBody(10)
    assert kept.add(b"12345") and kept.add(b"") and kept.add(b"67890") and kept.raw == b"1234567890"
    assert not kept.add(b"x") and kept.pieces == [] and kept.over
    assert not kept.add(b"")  # and stays let go


def test_a_declared_length_over_the_bound_is_not_kept_at_all() -> None:
    assert keepable(parse_request_head(head("Content-Length: 10")), 10)
    assert not keepable(parse_request_head(head("Content-Length: 11")), 10)
    assert keepable(parse_request_head(head("Transfer-Encoding: chunked")), 10)  # found out while it comes


# -- the second send --------------------------------------------------------------------------------

def first_send(request_head: bytes, raw_body: bytes, mapping: Mapping | None, codings: tuple[str, ...],
               cuts: list[int]) -> bytes:
    """What a first send of the request produces when its body arrives cut at ``cuts``."""
    parsed_head = parse_request_head(request_head)
    body = RequestBody(parsed_head, 1 << 30)
    decoder = BodyDecoder(list(codings), 1 << 30) if codings else None
    sniffer = ModelSniffer(decoder)
    pieces = [raw_body[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw_body)])]
    out: list[bytes] = []
    forward = None
    for piece in pieces:
        part = body.feed(piece)
        if forward is None:
            sniffed = sniffer.feed(part)
            if sniffed is None:
                continue
            edits = edits_for("messages", mapping is not None, parsed_head.framing, 1 << 23,
                              sniffed.payload if part.done else None)
            forward = UpstreamRequest(parsed_head, edits, decoder, mapping, 1 << 23)
            out.append(forward.first(sniffed, "messages", part.done))
        else:
            out.append(forward.feed(part))
    return b"".join(out)


FORMS = {
    "length": (head(f"Content-Length: {len(BODY)}"), BODY, ()),
    "chunked": (head("Transfer-Encoding: chunked"),
                b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (BODY[:9], BODY[9:40], BODY[40:])) + b"0\r\n\r\n", ()),
    "gzip": (head("Content-Encoding: gzip", f"Content-Length: {len(gzip.compress(BODY, mtime=0))}"),
             gzip.compress(BODY, mtime=0), ("gzip",)),
}


@pytest.mark.parametrize("form", sorted(FORMS))
@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=4))
def test_the_second_send_to_the_target_is_what_a_first_send_would_have_been(form: str, cuts: list[int]) -> None:
    request_head, raw_body, codings = FORMS[form]
    cuts = sorted({c for c in cuts if c < len(raw_body)})
    again = resend(parse_request_head(request_head), raw_body, "messages", codings, RULE, 1 << 30, 1 << 23)
    assert again.done
    line, fields, payload = parsed(again.first)
    line_1, fields_1, payload_1 = parsed(first_send(request_head, raw_body, RULE, codings, cuts))
    assert (line, fields, payload) == (line_1, fields_1, payload_1)
    assert line == b"POST /v1/messages?beta=true HTTP/1.1"
    assert b"x-api-key" not in fields and fields[b"authorization"] == b"Bearer sk-proxy"
    assert b"content-encoding" not in fields
    assert json.loads(payload) == {**json.loads(BODY), "model": "gpt-5"}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_second_send_to_anthropic_is_the_request_as_it_came(form: str) -> None:
    request_head, raw_body, codings = FORMS[form]
    again = resend(parse_request_head(request_head), raw_body, "messages", codings, None, 1 << 30, 1 << 23)
    assert again.done and again.first == request_head + raw_body


def test_a_second_send_of_a_body_still_coming_goes_on_with_the_parts_to_come() -> None:
    request_head, raw_body, _ = FORMS["chunked"]
    cut = raw_body.index(b"\r\n", raw_body.index(b"claude-opus")) + 2  # the model's chunk is in, the rest to come
    parsed_head = parse_request_head(request_head)
    again = resend(parsed_head, raw_body[:cut], "messages", (), RULE, 1 << 30, 1 << 23)
    assert not again.done
    body = RequestBody(parsed_head, 1 << 30)
    body.feed(raw_body[:cut])
    rest = again.forward.feed(body.feed(raw_body[cut:]))
    _, _, payload = parsed(again.first + rest)
    assert json.loads(payload)["model"] == "gpt-5"


def test_kept_bytes_without_their_model_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="model"):
        resend(parse_request_head(head("Content-Length: 40")), b'{"max_tokens": 5, ', "messages", (), RULE,
               1 << 30, 1 << 23)


def test_the_fallback_header_is_added_once_at_the_head_s_end() -> None:
    marked = with_fallback_header(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "anthropic 429")
    assert marked == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-cmm-fallback: anthropic 429\r\n\r\n"


@settings(max_examples=60, deadline=None)
@given(reports=st.lists(st.tuples(st.sampled_from(["a* → x", "b* → y"]), st.floats(NOW - 100, NOW + 100)),
                        max_size=8),
       order=st.randoms(use_true_random=False))
def test_the_table_is_the_same_whatever_order_the_reports_come_in(reports: list, order) -> None:
    cooldowns = [Cooldown(rule, until, "anthropic 429") for rule, until in reports]
    shuffled = list(cooldowns)
    order.shuffle(shuffled)
    tables = []
    for sequence in (cooldowns, shuffled):
        table = CooldownTable(lambda: NOW)
        for cooldown in sequence:
            table.extend(cooldown)
        tables.append({c.rule: c.until for c in table.current()})
    expected = {}
    for rule, until in reports:
        if until > NOW:
            expected[rule] = max(until, expected.get(rule, until))
    assert tables[0] == tables[1] == expected
