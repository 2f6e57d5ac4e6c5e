"""A body held while a size condition decides its route, in the serving protocol (in memory): it
goes nowhere before, at once after, and a client that stalls meanwhile gets a 408 that says so.
Each request's record names the rule that routed it and Claude Code's request class."""

from __future__ import annotations

import gzip
import json

import attrs

from cmm.core.framing import LAST_CHUNK, encode_chunk
from cmm.core.router import Mapping, Router, Upstream, rule_label
from memory_harness import TARGET_URL, Harness, make_pki, responses, settings

PKI = make_pki()
LONG = Mapping("claude-sonnet", "long-context", Upstream.from_url(TARGET_URL, "sk-proxy"), min_body_bytes=1000)
SUBAGENTS = Mapping("*", "sub", Upstream.from_url(TARGET_URL, "sk-proxy"), request_class=("subagent",))
START = b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"'


def rules_harness() -> Harness:
    base = settings()
    return Harness(PKI, attrs.evolve(base, router=Router((SUBAGENTS, LONG, *base.router.mappings))))


def chunked_head(extra: bytes = b"") -> bytes:
    return b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\n%sTransfer-Encoding: chunked\r\n\r\n" % extra


def test_a_body_goes_nowhere_until_its_size_decides_then_at_once() -> None:
    harness = rules_harness()
    client, _ = harness.client()
    harness.send(client, chunked_head(b"x-claude-code-request-class: main\r\n") + encode_chunk(START))
    assert harness.upstreams["target"].servers == [] and harness.upstreams["anthropic"].servers == []
    harness.send(client, encode_chunk(b"x" * 600))  # still short of 1000 bytes
    assert harness.upstreams["target"].servers == [] and harness.upstreams["anthropic"].servers == []
    harness.send(client, encode_chunk(b"x" * 600))  # past it, the body not yet ended
    assert len(harness.upstreams["target"].servers) == 1 and harness.upstreams["anthropic"].servers == []
    harness.send(client, encode_chunk(b'"}]}') + LAST_CHUNK)
    [(head, _)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 200")
    [exchange] = harness.upstreams["target"].exchanges
    assert json.loads(exchange.body) == {**json.loads(START + b"x" * 1200 + b'"}]}'), "model": "long-context"}
    [record] = harness.records
    assert record.rule == rule_label(LONG) and record.request_class == "main" and record.target == "long-context"


def test_a_short_gzip_body_is_decided_at_its_end_and_passes_as_it_came() -> None:
    harness = rules_harness()
    client, _ = harness.client()
    body = gzip.compress(START + b'short"}]}')
    harness.send(client, b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:-10])
    assert harness.upstreams["anthropic"].servers == []  # the decoded size is not known yet
    harness.send(client, body[-10:])
    [exchange] = harness.upstreams["anthropic"].exchanges
    assert exchange.body == body  # as it came, compressed
    [record] = harness.records
    assert record.status == 200 and not record.intercepted and record.rule is None
    assert record.request_class is None


def test_a_stalled_held_body_gets_a_408_that_says_why() -> None:
    harness = rules_harness()
    client, _ = harness.client()
    harness.send(client, chunked_head() + encode_chunk(START))
    harness.advance(31)
    [(head, body)] = responses(bytes(client.received))
    assert head.startswith(b"HTTP/1.1 408")
    assert "the request body as far as its size decides its route" in json.loads(body)["error"]["message"]
    assert harness.upstreams["target"].servers == [] and harness.upstreams["anthropic"].servers == []


def test_a_subagent_is_routed_on_its_model_without_waiting_for_the_size() -> None:
    harness = rules_harness()
    client, _ = harness.client()
    harness.send(client, chunked_head(b"x-claude-code-request-class: subagent\r\n") + encode_chunk(START))
    assert len(harness.upstreams["target"].servers) == 1  # an earlier rule decided on the head alone
    harness.send(client, encode_chunk(b'"}]}') + LAST_CHUNK)
    [record] = harness.records
    assert record.rule == "* [subagent] → sub" and record.request_class == "subagent"


def test_the_text_log_line_names_a_rule_with_conditions_only() -> None:
    from cmm.core.records import RequestRecord, format_line

    def line(rule: str | None, mapping: str | None, target: str | None) -> str:
        return format_line(RequestRecord(0.0, "POST", "/v1/messages", "claude-opus-5-5", target is not None, target,
                                         200, 0.01, 1, 2, mapping=mapping, rule=rule))

    assert line("* [subagent,compaction] → sub\n", "*", "sub").endswith(
        "→ INTERCEPTED → sub ✓ 200 10ms ↑1 ↓2 (rule * [subagent,compaction] → sub\\n)")
    assert line("claude-opus* → gpt-5", "claude-opus", "gpt-5").endswith("✓ 200 10ms ↑1 ↓2")  # as it always was
    assert line(None, None, None).endswith("→ PASSTHROUGH ✓ 200 10ms ↑1 ↓2")
