"""Request log lines that cannot be forged: whatever a client or an upstream sent is escaped, one
record is one line, and undecodable text is written with replacement characters, never dropped."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from support import record

from cmm.core.records import escaped, format_json, format_line
from cmm.serve.request_log import RequestLog

FORGED = "x\n[2026-01-01 00:00:00] claude-opus → PASSTHROUGH ✓"


def test_a_model_with_a_newline_cannot_forge_a_second_line() -> None:
    line = format_line(record(model=FORGED, intercepted=False, target=None), localtime=time.gmtime)
    assert "\n" not in line and line.count("[") == 2  # its own stamp, and the forged one inline
    assert line.startswith("[1970-01-01 00:00:00] x\\n[2026-01-01 00:00:00] claude-opus → PASSTHROUGH ✓ ")
    assert line.endswith("→ PASSTHROUGH ✓ 200 12ms ↑300 ↓500")


@pytest.mark.parametrize("text, shown", [
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # ANSI colours
    ("a\rb", "a\\rb"),  # a carriage return overwrites the line on a terminal
    ("\x9b31m", "\\x9b31m"),  # the one-byte CSI
    ("a\u2028b\u2029c\x85d", "a\\u2028b\\u2029c\\x85d"),  # line separators
    ("tab\there\x00\x7f", "tab\\there\\x00\\x7f"),
    ("back\\n", "back\\\\n"),  # a real backslash cannot pass for an escape
    ("bad \udcff\ud800 bytes", "bad \ufffd\ufffd bytes"),  # surrogateescape, lone \ud800
    ("claude-opus-4-6 é ✓ 😀", "claude-opus-4-6 é ✓ 😀"),  # printable text stays as it is
])
def test_escaped(text: str, shown: str) -> None:
    assert escaped(text) == shown


def test_every_field_from_outside_is_escaped_in_the_line() -> None:
    line = format_line(record(method="GET", path="/v1/x\x1b[2J", model=None, target="t\nx", status=502,
                              error="Cannot reach \x1b]0;title\x07"), localtime=time.gmtime)
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line
    assert "GET /v1/x\\x1b[2J" in line and "INTERCEPTED → t\\nx ✗" in line and "(Cannot reach \\x1b]0;title\\x07)" in line


def test_content_lines_stay_indented_and_escaped() -> None:
    content = "POST /v1/messages HTTP/1.1\nhost: a\x1b[31m\r\n\n{\"model\":\"m\"}\u2028[2026-01-01] forged"
    lines = format_line(record(content=content), localtime=time.gmtime).split("\n")
    assert all(line.startswith("    ") for line in lines[1:]) and len(lines) == 6  # \r\n: one break
    assert "    host: a\\x1b[31m" in lines and "    [2026-01-01] forged" in lines


def test_json_lines_are_one_valid_object_each() -> None:
    nasty = FORGED + "\x1b[31m\x9b\u2028\x7f\udcff\ud800"
    line = format_json(record(model=nasty, error="e\n", content="a\nb\udcfe"))
    assert "\n" not in line and "\x1b" not in line and "\x9b" not in line and "\u2028" not in line
    line.encode("utf-8")  # no surrogate left
    document = json.loads(line)
    assert document["model"] == FORGED + "\x1b[31m\x9b\u2028\x7f\ufffd\ufffd"
    assert document["content"] == "a\nb\ufffd" and document["route"] == "intercepted"


any_text = st.text(st.characters(blacklist_categories=()))  # surrogates included


@settings(max_examples=200, deadline=None)
@given(any_text, any_text, any_text)
def test_any_text_gives_one_line_of_utf8(model: str, path: str, error: str) -> None:
    entry = record(model=model or None, path=path, error=error or None, status=500)
    line = format_line(entry, localtime=time.gmtime)
    assert len(line.splitlines()) == 1 and "\x1b" not in line
    line.encode("utf-8")
    json_line = format_json(entry)
    assert len(json_line.splitlines()) == 1 and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in json_line)
    assert json.loads(json_line)["path"] == "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in path)


@pytest.mark.parametrize("json_format", [False, True])
def test_undecodable_records_are_written_not_dropped(tmp_path: Path, json_format: bool) -> None:
    console = io.StringIO()
    log = RequestLog.to_file(tmp_path / "cmm.log", console=console, json=json_format)
    log(record(model="bad\udcff\udcfe model"))
    log(record(model=FORGED))
    log(record(model="after"))
    log.close()
    written = (tmp_path / "cmm.log").read_bytes().decode("utf-8")  # strict: all of it is UTF-8
    lines = written.splitlines()
    assert len(lines) == 3 and "bad\ufffd\ufffd model" in lines[0] and "after" in lines[2]
    assert console.getvalue().splitlines() == lines
    if json_format:
        assert [json.loads(line)["model"] for line in lines] == ["bad\ufffd\ufffd model", FORGED, "after"]
