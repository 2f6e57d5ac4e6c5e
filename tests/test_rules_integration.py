"""Routing rules end to end: cmm started through twistd from this checkout with a mappings.toml of
rules, between raw TLS clients and the fake upstreams (all on loopback).

Each kind of condition is exercised as Claude Code would send it: a subagent's request class, a
header glob, and a long body (plain, gzip-compressed, chunked) against a short one; then a
SIGHUP with a broken file (the running rules stay) and with an edited one (they change).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmm.testing.processes import Fakes
from support import process_env
from test_integration import (ANTHROPIC_HOST, PROXY_KEY, USER_KEY, Cmm, Conn, Fake, chunk_encode, http_request, json_body,
                              new_tag, simple_post)

SUBAGENT_TARGET = "gemini-2.5-pro"
LONG_TARGET = "gemini-2.5-pro-long"
HEADER_TARGET = "gpt-5-explore"
HAIKU_TARGET = "gemini-2.5-flash"
MIN_BODY = 600_000

RULES = f"""\
[[mapping]]                      # subagents and compaction go to Gemini, whatever model they ask for
source = "*"
target = "{SUBAGENT_TARGET}"
request_class = ["subagent", "compaction"]

[[mapping]]                      # very long requests go to a long-context model
source = "claude-sonnet"
target = "{LONG_TARGET}"
min_body_bytes = {MIN_BODY}

[[mapping]]
source = "claude-opus"
target = "{HEADER_TARGET}"
header = {{ "X-Claude-Code-Agent-Type" = "Explore*" }}

[[mapping]]
source = "claude-haiku"
target = "{HAIKU_TARGET}"
"""

# Rules whose upstream is a bare socket in the test: it shows when cmm decides a route, i.e.
# whether it held the body first.
LISTEN_MODEL = "claude-3-5-listen-1"
LISTEN_RULES = """
[[mapping]]
source = "claude-3-5-listen"
target = "listen-workflow"
url = "{url}"
request_class = ["workflow"]

[[mapping]]
source = "claude-3-5-listen"
target = "listen-long"
url = "{url}"
min_body_bytes = 1000

[[mapping]]
source = "claude-3-5-listen"
target = "listen-plain"
url = "{url}"
"""


@dataclass
class RulesStack:
    anthropic: Fake
    target: Fake
    cmm: Cmm
    listener: socket.socket

    @property
    def rules_file(self) -> Path:
        return self.cmm.config_dir / "mappings.toml"

    def hup(self) -> None:
        assert self.cmm.process is not None
        os.kill(self.cmm.process.proc.pid, signal.SIGHUP)


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RulesStack]:
    base = tmp_path_factory.mktemp("rules")
    env = process_env()
    fakes = Fakes(base, env)
    config_dir = base / "cfg"
    config_dir.mkdir(mode=0o700)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listen_url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/messages"
    (config_dir / "mappings.toml").write_text(RULES + LISTEN_RULES.format(url=listen_url))
    (config_dir / "mappings.toml").chmod(0o600)
    args = ["--proxy-url", fakes.target_url, "--proxy-api-key", PROXY_KEY, "--anthropic-ip", "127.0.0.1",
            "--anthropic-port", str(fakes.anthropic_port), "--listen", "127.0.0.1", "--log-format", "json"]
    cmm = Cmm("rules", args, process_env(SSL_CERT_FILE=str(fakes.ca), SSL_CERT_DIR=None), config_dir, base)
    try:
        cmm.launch()
        cmm.wait_ready()
        yield RulesStack(Fake(fakes.anthropic, fakes.anthropic_port, fakes.ca),
                         Fake(fakes.target, fakes.target_port, None), cmm, listener)
    finally:
        cmm.stop()
        fakes.stop()
        listener.close()


def _went_to(stack: RulesStack, tag: str, target_model: str | None) -> None:
    """Exactly one request tagged ``tag`` reached the target as ``target_model`` (and none Anthropic),
    or, with None, Anthropic alone, with the user's key as sent."""
    at_target, at_anthropic = stack.target.find(tag), stack.anthropic.find(tag)
    if target_model is None:
        assert (len(at_target), len(at_anthropic)) == (0, 1)
        assert at_anthropic[0].header("x-api-key") == USER_KEY
    else:
        assert (len(at_target), len(at_anthropic)) == (1, 0)
        assert at_target[0].json()["model"] == target_model
        assert at_target[0].header_all("authorization") == [f"Bearer {PROXY_KEY}"]
        assert at_target[0].header("x-api-key") is None


def _record(stack: RulesStack, offset: int, model: str) -> dict:
    """The JSON request record of ``model`` logged after ``offset``."""
    match = stack.cmm.wait_log(r'\{"started".*"model":"' + re.escape(model) + r'".*\}', offset)
    return json.loads(match.group())


def _long_body(model: str, size: int) -> bytes:
    return json_body(model, text="x" * size)


def test_a_subagent_goes_to_the_target_while_the_main_thread_passes_through(rules: RulesStack) -> None:
    model = "claude-opus-5-5"
    offset = len(rules.cmm.log())
    sub, main = new_tag(), new_tag()
    response = rules.cmm.exchange(simple_post(model, sub, extra=[("x-claude-code-request-class", "subagent"),
                                                                   ("x-claude-code-agent-id", "a1")]))
    assert response.status == 200 and response.header("x-cmm-provider") == "cliproxyapi"
    _went_to(rules, sub, SUBAGENT_TARGET)
    record = _record(rules, offset, model)
    assert record["rule"] == f"* [subagent,compaction] → {SUBAGENT_TARGET}"
    assert record["request_class"] == "subagent" and record["target"] == SUBAGENT_TARGET

    offset = len(rules.cmm.log())
    response = rules.cmm.exchange(simple_post(model, main, extra=[("x-claude-code-request-class", "main")]))
    assert response.status == 200 and response.header("x-cmm-provider") is None
    _went_to(rules, main, None)
    record = _record(rules, offset, model)
    assert record["rule"] is None and record["request_class"] == "main" and record["route"] == "passthrough"


def test_compaction_of_a_mapped_model_takes_the_rule_before_the_plain_mapping(rules: RulesStack) -> None:
    tag = new_tag()
    rules.cmm.exchange(simple_post("claude-haiku-4-5", tag, extra=[("x-claude-code-request-class", "compaction")]))
    _went_to(rules, tag, SUBAGENT_TARGET)
    tag = new_tag()
    rules.cmm.exchange(simple_post("claude-haiku-4-5", tag, extra=[("x-claude-code-request-class", "main")]))
    _went_to(rules, tag, HAIKU_TARGET)


def test_a_header_glob_routes_and_is_case_insensitive_in_its_name(rules: RulesStack) -> None:
    tag = new_tag()
    rules.cmm.exchange(simple_post("claude-opus-4-6", tag, extra=[("x-claude-code-agent-type", "Explore-fast")]))
    _went_to(rules, tag, HEADER_TARGET)
    tag = new_tag()  # the glob itself is case-sensitive
    rules.cmm.exchange(simple_post("claude-opus-4-6", tag, extra=[("x-claude-code-agent-type", "explore")]))
    _went_to(rules, tag, None)


@pytest.mark.parametrize("coding", ["plain", "gzip", "chunked", "gzip+chunked"])
def test_a_long_body_goes_to_the_long_context_target_and_a_short_one_does_not(rules: RulesStack,
                                                                               coding: str) -> None:
    model = "claude-sonnet-4-5"
    for size, expected in ((MIN_BODY + 10, LONG_TARGET), (MIN_BODY - 1000, None)):
        plain = _long_body(model, size)
        tag = new_tag()
        body = gzip.compress(plain) if "gzip" in coding else plain
        headers = [("Host", ANTHROPIC_HOST), ("Content-Type", "application/json"), ("x-api-key", USER_KEY),
                   ("x-test-id", tag)]
        if "gzip" in coding:
            headers.append(("Content-Encoding", "gzip"))
        if "chunked" in coding:
            pieces = [body[i:i + 50_000] for i in range(0, len(body), 50_000)]
            request = http_request("POST", "/v1/messages", [*headers, ("Transfer-Encoding", "chunked")],
                                   b"".join(chunk_encode(pieces)))
        else:
            request = http_request("POST", "/v1/messages", [*headers, ("Content-Length", str(len(body)))], body)
        response = rules.cmm.exchange(request)
        assert response.status == 200, response.body[:300]
        _went_to(rules, tag, expected)
        if expected is not None:
            [seen] = rules.target.find(tag)
            assert seen.json() == {**json.loads(plain), "model": LONG_TARGET}  # the whole body, model rewritten
        else:
            [seen] = rules.anthropic.find(tag)
            assert seen.body == body or seen.json() == json.loads(plain)  # passed as it came


def _accepted(listener: socket.socket, within: float) -> socket.socket | None:
    listener.settimeout(within)
    try:
        return listener.accept()[0]
    except (socket.timeout, TimeoutError):
        return None


def _received_until(conn: socket.socket, marker: bytes) -> bytes:
    conn.settimeout(5.0)
    data = b""
    while marker not in data:
        piece = conn.recv(65536)
        assert piece, f"closed before {marker!r}; got {data[:300]!r}"
        data += piece
    return data


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _open_chunked(rules: RulesStack, request_class: str) -> tuple[Conn, bytes]:
    """A connection with a chunked request's head and the body's start (its model) sent."""
    prefix = b'{"model":"' + LISTEN_MODEL.encode() + b'","max_tokens":8,"messages":[{"role":"user","content":"'
    headers = [("Host", ANTHROPIC_HOST), ("Content-Type", "application/json"), ("x-api-key", USER_KEY),
               ("x-claude-code-request-class", request_class), ("Transfer-Encoding", "chunked")]
    conn = rules.cmm.connect()
    conn.send(http_request("POST", "/v1/messages", headers) + _chunk(prefix))
    return conn, prefix


def test_a_body_is_not_held_when_no_size_condition_can_decide(rules: RulesStack) -> None:
    """A rule without a size condition wins first: cmm routes on the model and sends the start
    of the body while the rest has not even been sent."""
    conn, _ = _open_chunked(rules, "workflow")
    with conn:
        upstream = _accepted(rules.listener, within=5.0)
        assert upstream is not None, "cmm held a body no size condition could route"
        with upstream:
            assert b'"model":"listen-workflow"' in _received_until(upstream, b"listen-workflow")


def test_a_body_is_held_until_its_size_decides_and_no_longer(rules: RulesStack) -> None:
    """A size condition may decide: nothing goes upstream with the model alone; once the body
    passes the size (before its end) it goes to that rule's target at once."""
    conn, _ = _open_chunked(rules, "main")
    with conn:
        assert _accepted(rules.listener, within=1.0) is None, "routed before the size was known"
        conn.send(_chunk(b"x" * 2000))
        upstream = _accepted(rules.listener, within=5.0)
        assert upstream is not None, "still held past min_body_bytes"
        with upstream:
            received = _received_until(upstream, b"x" * 2000)
            assert b'"model":"listen-long"' in received and b"\r\n0\r\n\r\n" not in received


def test_a_short_chunked_body_takes_the_plain_mapping_once_it_ends(rules: RulesStack) -> None:
    conn, _ = _open_chunked(rules, "main")
    with conn:
        assert _accepted(rules.listener, within=0.5) is None
        conn.send(_chunk(b'x"}]}') + b"0\r\n\r\n")
        upstream = _accepted(rules.listener, within=5.0)
        assert upstream is not None
        with upstream:
            assert b'"model":"listen-plain"' in _received_until(upstream, b"listen-plain")


def test_sighup_with_a_broken_file_keeps_the_rules_and_an_edited_one_replaces_them(rules: RulesStack) -> None:
    path = rules.rules_file
    good = path.read_text()
    offset = len(rules.cmm.log())
    path.write_text(good + '\n[[mapping]]\nsource = "claude-sonnet"\ntarget = "x"\nmin_body_bytes = "big"\n'
                    'request_class = ["subagnet"]\n')
    try:
        rules.hup()
        rules.cmm.wait_log(r"Reload refused, still serving the previous configuration: ", offset)
        logged = rules.cmm.log()[offset:]
        assert f"{path}: mapping #8 (source 'claude-sonnet'): min_body_bytes must be an integer (bytes), " \
               "not a string" in logged
        assert f"{path}: mapping #8 (source 'claude-sonnet'): request_class: 'subagnet' is not a request class " \
               "(did you mean 'subagent'?)" in logged
        tag = new_tag()
        rules.cmm.exchange(simple_post("claude-opus-5-5", tag, extra=[("x-claude-code-request-class", "subagent")]))
        _went_to(rules, tag, SUBAGENT_TARGET)  # the running rules stay

        offset = len(rules.cmm.log())
        path.write_text(good.replace('request_class = ["subagent", "compaction"]', 'request_class = ["workflow"]'))
        rules.hup()
        rules.cmm.wait_log(r"Reloaded: \* \[workflow\] → " + SUBAGENT_TARGET, offset)
        tag = new_tag()
        rules.cmm.exchange(simple_post("claude-opus-5-5", tag, extra=[("x-claude-code-request-class", "subagent")]))
        _went_to(rules, tag, None)
        tag = new_tag()
        rules.cmm.exchange(simple_post("claude-opus-5-5", tag, extra=[("x-claude-code-request-class", "workflow")]))
        _went_to(rules, tag, SUBAGENT_TARGET)
    finally:
        path.write_text(good)
        offset = len(rules.cmm.log())
        rules.hup()
        rules.cmm.wait_log(r"Reloaded: ", offset)

