"""Failover end to end: cmm's serving stack on real sockets between a TLS client and the fakes.

Anthropic refuses (429/529, with and without retry-after), cannot be reached or stays silent: a
fallback rule's request is answered by its target. The target is down or failing: a rule with
on_target_error = "anthropic" hands the original request to Anthropic. Never two answers, never
a byte twice, and conversations keep working on either side afterwards.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cmm.testing.fakes import verify_signature
from failover_stack import PROXY_KEY, SOURCE, TARGET, Live, Serving
from test_integration import USER_KEY, Conn, json_body, new_tag, simple_post, sse_parse, sse_text

ANTHROPIC_ONLY = ("x-fake-for", "anthropic")
TARGET_ONLY = ("x-fake-for", "target")
THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    stack = Live(tmp_path_factory.mktemp("failover"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def fallback(live: Live) -> Serving:
    """A fallback rule with the default causes."""
    return live.serve(live.settings(live.rule(mode="fallback")))


def fresh(live: Live, **changes: Any) -> Serving:
    """A serving unit of its own (its own cool-down table) for a fallback rule."""
    return live.serve(live.settings(live.rule(mode="fallback"), **changes))


def refused(status: int, retry_after: str | None = None) -> list[tuple[str, str]]:
    headers = [ANTHROPIC_ONLY, ("x-fake-status", str(status))]
    return headers + ([("x-fake-retry-after", retry_after)] if retry_after is not None else [])


def assert_from_target(live: Live, response: Any, tag: str, why: str) -> None:
    assert response.status == 200, response.body[:300]
    assert response.header("x-fake-provider") == "target"
    assert response.header("x-cmm-provider") == "cliproxyapi"
    assert response.header_all("x-cmm-fallback") == [why]
    [sent] = live.seen(live.target, tag)
    assert json.loads(sent.body)["model"] == TARGET  # as an intercepted request: model rewritten,
    assert sent.header("x-api-key") is None and sent.header("authorization") == f"Bearer {PROXY_KEY}"  # key swapped


@pytest.mark.parametrize("status", [429, 529])
def test_a_refusal_without_retry_after_fails_over_once_and_starts_no_cool_down(live: Live, status: int) -> None:
    serving = fresh(live)
    tag = new_tag()
    response = serving.post(tag, *refused(status))
    assert_from_target(live, response, tag, f"anthropic {status}")
    assert len(live.seen(live.anthropic, tag)) == 1  # asked once, refused, never again
    record = serving.record()
    assert (record.route, record.fallback, record.mapping, record.target) == ("fallback", f"anthropic {status}",
                                                                               SOURCE, TARGET)
    assert record.intercepted and record.upstream == f"127.0.0.1:{live.target.port}" and record.status == 200
    assert serving.context.cooldowns.current() == []
    tag = new_tag()  # no cool-down: the next request goes to Anthropic first, and Anthropic answers
    response = serving.post(tag)
    assert response.status == 200 and response.header("x-fake-provider") == "anthropic"
    assert response.header("x-cmm-fallback") is None and serving.record().route == "passthrough"


@pytest.mark.parametrize("status", [429, 529])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_refusal_with_retry_after_sends_the_rule_straight_to_the_target_until_then(live: Live, status: int,
                                                                                     form: str) -> None:
    serving = fresh(live)
    reported: list[Any] = []
    serving.context.report_cooldown = reported.append
    value = "30" if form == "seconds" else email.utils.formatdate(time.time() + 30, usegmt=True)
    tag = new_tag()
    started = time.time()
    response = serving.post(tag, *refused(status, value))
    assert_from_target(live, response, tag, f"anthropic {status}")
    [cooldown] = reported
    assert cooldown.cause == f"anthropic {status}" and started + 25 < cooldown.until < time.time() + 31
    assert serving.context.cooldowns.current() == [cooldown]
    for _ in range(3):  # no wasted round trips: Anthropic is not asked while the cool-down runs
        tag = new_tag()
        response = serving.post(tag)
        assert_from_target(live, response, tag, f"anthropic {status} cool-down")
        assert live.seen(live.anthropic, tag) == []
        assert serving.record().fallback == f"anthropic {status} cool-down"
    serving.context.cooldowns.clock = lambda: time.time() + 31  # the time is up
    tag = new_tag()
    response = serving.post(tag)
    assert response.header("x-fake-provider") == "anthropic" and response.header("x-cmm-fallback") is None


def test_a_status_the_rule_does_not_list_reaches_the_client_as_anthropic_sent_it(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(mode="fallback", fallback_on=(529,))))
    tag = new_tag()
    response = serving.post(tag, *refused(429, "30"))
    assert response.status == 429 and response.header("x-fake-provider") == "anthropic"
    assert response.header("retry-after") == "30" and response.header("x-cmm-fallback") is None
    assert live.seen(live.target, tag) == [] and serving.context.cooldowns.current() == []


def test_an_unreachable_anthropic_fails_over(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(mode="fallback"), anthropic_port=live.closed_port))
    tag = new_tag()
    response = serving.post(tag)
    assert_from_target(live, response, tag, "anthropic unreachable")
    assert serving.record().fallback == "anthropic unreachable"


def test_a_silent_anthropic_fails_over_after_the_upstream_timeout(live: Live) -> None:
    serving = fresh(live, upstream_timeout=0.5)
    tag = new_tag()
    started = time.monotonic()
    response = serving.post(tag, ANTHROPIC_ONLY, ("x-fake-delay", "30"))
    assert time.monotonic() - started < 5
    assert_from_target(live, response, tag, "anthropic timeout")
    assert len(live.seen(live.anthropic, tag)) == 1


def test_a_body_over_the_bound_is_not_kept_so_not_failed_over(live: Live) -> None:
    serving = fresh(live, fallback_body_max=2000)
    tag = new_tag()
    body = json_body(SOURCE, text="x" * 5000)
    response = serving.post(tag, *refused(429), body=body)
    assert response.status == 429 and response.header("x-fake-provider") == "anthropic"
    assert response.header("x-cmm-fallback") is None and live.seen(live.target, tag) == []
    assert serving.context.unkept == 1 and serving.context.gauges()["fallback_unkept"] == 1
    [sent] = live.seen(live.anthropic, tag)
    assert sent.body == body  # passed through as it came


def test_a_chunked_body_growing_over_the_bound_is_let_go(live: Live) -> None:
    serving = fresh(live, fallback_body_max=2000)
    tag = new_tag()
    body = json_body(SOURCE, text="x" * 5000)
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: {USER_KEY}\r\nx-test-id: {tag}\r\n"
            "x-fake-for: anthropic\r\nx-fake-status: 529\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    pieces = [body[:100], body[100:]]
    response = serving.exchange(head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
    assert response.status == 529 and response.header("x-cmm-fallback") is None
    assert serving.context.unkept == 1


def test_a_streamed_failover_sends_one_stream_and_the_connection_goes_on(fallback: Serving) -> None:
    live = fallback.live
    tag = new_tag()
    with Conn(fallback.port, live.ca) as conn:
        conn.send(simple_post(SOURCE, tag, stream=True, extra=[*refused(529), ("x-fake-deltas", "5")]))
        response = conn.response()
        assert response.header("x-cmm-fallback") == "anthropic 529"
        events = sse_parse(response.body)
        kinds = [kind for kind, _ in events]
        assert kinds.count("message_start") == 1 and kinds.count("message_stop") == 1 and kinds[-1] == "message_stop"
        assert sse_text(events) and events[0][1]["message"]["model"] == TARGET
        # Nothing of Anthropic's refusal and nothing twice: the next request on this connection
        # starts exactly where the answer ended.
        tag2 = new_tag()
        conn.send(simple_post(SOURCE, tag2))
        again = conn.response()
        assert again.status == 200 and again.header("x-fake-provider") == "anthropic"


def test_a_gzipped_request_fails_over_decoded_and_rewritten(fallback: Serving) -> None:
    live = fallback.live
    tag = new_tag()
    body = gzip.compress(json_body(SOURCE, text="compressed"))
    response = fallback.post(tag, *refused(429), ("Content-Encoding", "gzip"), body=body)
    assert_from_target(live, response, tag, "anthropic 429")
    [first] = live.seen(live.anthropic, tag)
    assert first.body == body and first.header("content-encoding") == "gzip"  # Anthropic: byte for byte
    [sent] = live.seen(live.target, tag)
    assert sent.header("content-encoding") is None
    assert json.loads(sent.body)["messages"] == [{"role": "user", "content": "compressed"}]


def turn(serving: Serving, messages: list[dict[str, Any]], *extra: tuple[str, str]) -> tuple[Any, str]:
    tag = new_tag()
    body = json.dumps({"model": SOURCE, "messages": messages, "max_tokens": 2000, "thinking": THINKING},
                      separators=(",", ":")).encode()
    return serving.post(tag, *extra, body=body), tag


def test_a_conversation_that_failed_over_goes_on_at_anthropic_and_fails_over_again(fallback: Serving) -> None:
    live = fallback.live
    history: list[dict[str, Any]] = [{"role": "user", "content": "plan"}]
    # 1. Anthropic refuses: the target thinks, and its signature comes back marked as the target's.
    response, _ = turn(fallback, history, *refused(529))
    assert response.header("x-cmm-fallback") == "anthropic 529"
    target_blocks = response.json()["content"]
    assert target_blocks[0]["type"] == "thinking" and target_blocks[0]["signature"].startswith("cmm1.")
    history += [{"role": "assistant", "content": target_blocks}, {"role": "user", "content": "go on"}]
    # 2. A normal turn: Anthropic (strict about signatures) takes the history without the target's block.
    response, tag = turn(fallback, history)
    assert response.status == 200 and response.header("x-fake-provider") == "anthropic", response.body[:300]
    [seen] = live.seen(live.anthropic, tag)
    assert b"cmm1." not in seen.body
    anthropic_blocks = response.json()["content"]
    history += [{"role": "assistant", "content": anthropic_blocks}, {"role": "user", "content": "and now?"}]
    # 3. Refused again: the target gets its own signature back unmarked, Anthropic's untouched.
    response, tag = turn(fallback, history, *refused(429))
    assert response.status == 200 and response.header("x-cmm-fallback") == "anthropic 429"
    [sent] = live.seen(live.target, tag)
    messages = json.loads(sent.body)["messages"]
    first = messages[1]["content"][0]
    assert verify_signature("target", first["thinking"], first["signature"])
    assert messages[3]["content"][0] == anthropic_blocks[0]


# -- on_target_error = "anthropic" -------------------------------------------------------------------

def test_a_target_that_is_down_hands_the_original_request_to_anthropic(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(on_target_error="anthropic",
                                                 url=f"http://127.0.0.1:{live.closed_port}/v1/messages")))
    tag = new_tag()
    request = simple_post(SOURCE, tag)
    response = serving.exchange(request)
    assert response.status == 200 and response.header("x-fake-provider") == "anthropic"
    assert response.header_all("x-cmm-fallback") == ["target unreachable"] and response.header("x-cmm-provider") is None
    [seen] = live.seen(live.anthropic, tag)
    assert seen.header("x-api-key") == USER_KEY and json.loads(seen.body)["model"] == SOURCE  # original credentials
    head, body = request.split(b"\r\n\r\n", 1)
    assert seen.body == body
    record = serving.record()
    assert (record.route, record.fallback, record.intercepted, record.upstream) == (
        "fallback", "target unreachable", False, "anthropic")


@pytest.mark.parametrize("stream", [False, True])
def test_a_target_answering_503_hands_the_request_to_anthropic(live: Live, stream: bool) -> None:
    serving = live.serve(live.settings(live.rule(on_target_error="anthropic")))
    tag = new_tag()
    response = serving.post(tag, TARGET_ONLY, ("x-fake-status", "503"), stream=stream)
    assert response.status == 200 and response.header("x-cmm-fallback") == "target 503"
    assert response.header("x-fake-provider") == "anthropic"
    if stream:
        assert [kind for kind, _ in sse_parse(response.body)].count("message_start") == 1
    assert len(live.seen(live.target, tag)) == 1 and len(live.seen(live.anthropic, tag)) == 1


def test_a_target_429_after_its_retries_hands_the_request_to_anthropic(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(on_target_error="anthropic"), retries=2))
    tag = new_tag()
    response = serving.post(tag, TARGET_ONLY, ("x-fake-status", "429"), ("x-fake-retry-after", "0"))
    assert response.status == 200 and response.header("x-cmm-fallback") == "target 429"
    assert len(live.seen(live.target, tag)) == 2  # both tries first
    assert len(live.seen(live.anthropic, tag)) == 1


def test_a_target_4xx_is_the_target_s_answer(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(on_target_error="anthropic")))
    tag = new_tag()
    response = serving.post(tag, TARGET_ONLY, ("x-fake-status", "400"))
    assert response.status == 400 and response.header("x-cmm-fallback") is None
    assert live.seen(live.anthropic, tag) == []


def test_a_gzipped_request_goes_to_anthropic_as_it_came(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(on_target_error="anthropic")))
    tag = new_tag()
    body = gzip.compress(json_body(SOURCE, text="zipped"))
    response = serving.post(tag, TARGET_ONLY, ("x-fake-status", "502"), ("Content-Encoding", "gzip"), body=body)
    assert response.status == 200 and response.header("x-cmm-fallback") == "target 502"
    [seen] = live.seen(live.anthropic, tag)
    assert seen.body == body and seen.header("content-encoding") == "gzip"


def test_a_conversation_anthropic_answered_for_the_target_goes_on_at_the_target(live: Live) -> None:
    serving = live.serve(live.settings(live.rule(on_target_error="anthropic")))
    history: list[dict[str, Any]] = [{"role": "user", "content": "plan"}]
    response, _ = turn(serving, history, TARGET_ONLY, ("x-fake-status", "500"))
    assert response.header("x-cmm-fallback") == "target 500"
    blocks = response.json()["content"]
    assert verify_signature("anthropic", blocks[0]["thinking"], blocks[0]["signature"])
    history += [{"role": "assistant", "content": blocks}, {"role": "user", "content": "go on"}]
    response, tag = turn(serving, history)
    assert response.status == 200 and response.header("x-fake-provider") == "target"
    [sent] = live.seen(live.target, tag)
    assert json.loads(sent.body)["messages"][1]["content"][0] == blocks[0]
