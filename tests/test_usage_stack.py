"""Token usage through the real serving stack: ``twistd cmm --log-format json`` (master and worker)
between a TLS client and the shipped fakes, streamed and JSON answers, plain and gzipped, on both
routes; each request's JSON log line carries what its answer said it cost."""

from __future__ import annotations

import gzip
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmm.testing.checkout import twistd_command
from cmm.testing.fakes import fake_usage
from cmm.testing.processes import Fakes, Process, free_port
from support import process_env
from test_integration import Conn, http_request, json_body

SOURCE = "claude-haiku-4-5-20251001"
TARGET = "gemini-2.5-flash"
PASS = "claude-opus-4-6"


class Stack:
    def __init__(self, base: Path) -> None:
        env = process_env()
        self.fakes = Fakes(base, env)
        self.config_dir = base / "cfg"
        self.port = free_port()
        args = ["--port", str(self.port), "--config-dir", str(self.config_dir), "--no-hosts", "--listen", "127.0.0.1",
                "--source", "claude-haiku-4-5", "--target", TARGET, "--proxy-api-key", "sk-proxy",
                "--proxy-url", self.fakes.target_url, "--anthropic-ip", "127.0.0.1",
                "--anthropic-port", str(self.fakes.anthropic_port), "--log-format", "json"]
        trusted = process_env(SSL_CERT_FILE=str(self.fakes.ca), SSL_CERT_DIR=None)
        self.cmm = Process("cmm", twistd_command(args), trusted, base / "cmm.out")
        self.cmm.wait_for(rf"cmm serving on port {self.port}\b")

    def stop(self) -> None:
        self.cmm.stop()
        self.fakes.stop()

    def ask(self, model: str, stream: bool, gzipped: bool, port: int | None = None, ca: Path | None = None) -> tuple[Any, str]:
        """One messages request; the response and the tag its JSON log line can be found by."""
        tag = uuid.uuid4().hex
        body = json_body(model, stream=stream, text=tag)
        headers = [("Host", "api.anthropic.com"), ("x-api-key", "sk-ant-user"), ("content-type", "application/json"),
                   ("x-claude-code-request-class", "main"), ("x-test-id", tag), ("Content-Length", str(len(body)))]
        if gzipped:
            headers.append(("x-fake-gzip", "1"))
        with Conn(port or self.port, ca or self.config_dir / "ca.crt",
                  server_hostname="api.anthropic.com") as conn:
            conn.send(http_request("POST", "/v1/messages?beta=true", headers, body))
            return conn.response(), tag

    def record(self, started: float, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The JSON log lines of the messages requests, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            records = [json.loads(line) for line in self.cmm.output().splitlines() if line.startswith("{")]
            records = [r for r in records if r["path"].startswith("/v1/messages") and r["started"] >= started]
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("usage"))
    try:
        yield running
    finally:
        running.stop()


def decoded(response: Any) -> bytes:
    body: bytes = response.body
    return gzip.decompress(body) if response.header("content-encoding") == "gzip" else body


def same_but_numbers(data: bytes) -> bytes:
    """The fakes number their requests and messages; the rest of their answer is the same."""
    return re.sub(rb"_\d{6}", b"_N", data)


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("model", [SOURCE, PASS], ids=["intercepted", "passthrough"])
def test_json_log_carries_the_answer_s_usage(stack: Stack, model: str, stream: bool, gzipped: bool) -> None:
    started = time.time() - 1
    before = len(stack.record(started, 0, timeout=0))
    response, tag = stack.ask(model, stream, gzipped)
    assert response.status == 200
    assert (response.header("content-encoding") == "gzip") == gzipped  # the answer as the upstream sent it
    text = decoded(response)
    served = TARGET if model == SOURCE else model
    records = stack.record(started, before + 1)
    assert len(records) == before + 1, stack.cmm.output()[-3000:]
    record = records[-1]
    # The fakes count a request's prompt as its body's length / 4 (the routed body says the target).
    sent = json_body(served if model == SOURCE else model, stream=stream, text=tag)
    expected = fake_usage(len(sent) // 4, 3 if stream else 5)
    assert {name: record[name] for name in expected} == expected, record
    assert record["served_model"] == served and record["model"] == model
    assert record["route"] == ("intercepted" if model == SOURCE else "passthrough")
    assert record["upstream"] == (f"127.0.0.1:{stack.fakes.target_port}" if model == SOURCE else "anthropic")
    assert record["request_class"] == "main" and 0 < record["ttfb"] <= record["duration"]
    if stream:
        assert text.count(b"event: message_delta") == 1
    else:
        assert json.loads(text)["usage"] == expected


def test_passthrough_answer_is_what_anthropic_sent(stack: Stack) -> None:
    """The usage reader only looks: the gzipped stream through cmm is the fake Anthropic's own."""
    through, _ = stack.ask(PASS, stream=True, gzipped=True)
    direct, _ = stack.ask(PASS, stream=True, gzipped=True, port=stack.fakes.anthropic_port, ca=stack.fakes.ca)
    assert through.header("content-encoding") == direct.header("content-encoding") == "gzip"
    assert same_but_numbers(decoded(through)) == same_but_numbers(decoded(direct))


def test_the_counts_reach_the_usage_store(stack: Stack) -> None:
    """Each JSON log line's counts are what ``cmm usage`` then reports from the store, per upstream."""
    import io

    from cmm.cli.main import main

    before = len(stack.record(0, 0, timeout=0))
    for model in (SOURCE, PASS):
        stack.ask(model, stream=True, gzipped=False)
    logged: dict[str, int] = {}
    for record in stack.record(0, before + 2):
        logged[record["upstream"]] = logged.get(record["upstream"], 0) + record["output_tokens"]
    deadline = time.monotonic() + 10
    while True:
        out = io.StringIO()
        code = main(["usage", "--config-dir", str(stack.config_dir), "--json", "--by", "upstream", "--since", "1h"],
                    environ={"HOME": "/nonexistent"}, stdout=out, stderr=io.StringIO())
        stored = {group["key"]: group["output_tokens"] for group in json.loads(out.getvalue())["groups"]} \
            if code == 0 else {}
        if stored == logged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stored == logged
    assert set(stored) == {"anthropic", f"127.0.0.1:{stack.fakes.target_port}"}
