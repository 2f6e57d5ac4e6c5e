"""~/.cmm/.env: lenient parsing, edits that keep the rest of the file, validation, 0600 writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cmm.config.userfiles import UserDir
from cmm.config.envfile import (
    KEYS,
    SETTINGS,
    delete_value,
    load_from,
    load_text,
    parse_env,
    save_text,
    set_value,
    validate,
)

SAMPLE = """\
# cmm settings
PROXY_URL=http://localhost:9000/v1/messages

export PROXY_API_KEY="sk-abc 123"   # quoted, with a comment
DEFAULT_SOURCE_MODEL='claude-haiku-4-5'
DEFAULT_TARGET_MODEL = gemini-2.5-flash # trailing comment
# DEFAULT_TARGET_MODEL=commented-out
not an assignment
EMPTY=
HASH=a#b
"""


def test_parse_sample() -> None:
    assert parse_env(SAMPLE) == {
        "PROXY_URL": "http://localhost:9000/v1/messages",
        "PROXY_API_KEY": "sk-abc 123",
        "DEFAULT_SOURCE_MODEL": "claude-haiku-4-5",
        "DEFAULT_TARGET_MODEL": "gemini-2.5-flash",
        "EMPTY": "",
        "HASH": "a#b",
    }


def test_parse_crlf_and_last_wins() -> None:
    assert parse_env("A=1\r\nA=2\r\nB='x'\r\n") == {"A": "2", "B": "x"}


def test_set_replaces_in_place_and_keeps_everything_else() -> None:
    edited = set_value(SAMPLE, "PROXY_API_KEY", "sk-new")
    assert edited == SAMPLE.replace(
        'export PROXY_API_KEY="sk-abc 123"   # quoted, with a comment', "export PROXY_API_KEY=sk-new"
    )


def test_set_appends_new_key() -> None:
    assert set_value("# hi\nA=1", "PROXY_URL", "https://h/v1") == "# hi\nA=1\nPROXY_URL=https://h/v1\n"
    assert set_value("", "A", "1") == "A=1\n"
    assert set_value("X=1\r\n", "A", "1") == "X=1\r\nA=1\r\n"


def test_set_drops_duplicates() -> None:
    assert set_value("A=1\nB=2\nA=3\n", "A", "4") == "A=4\nB=2\n"


def test_set_quotes_when_needed() -> None:
    assert set_value("", "K", "a b") == "K='a b'\n"
    assert set_value("", "K", "it's") == 'K="it\'s"\n'
    with pytest.raises(ValueError):
        set_value("", "K", "a\nb")


def test_delete_keeps_other_lines() -> None:
    edited = delete_value(SAMPLE, "DEFAULT_TARGET_MODEL")
    assert "DEFAULT_TARGET_MODEL = gemini" not in edited
    assert "# DEFAULT_TARGET_MODEL=commented-out" in edited
    assert edited == SAMPLE.replace("DEFAULT_TARGET_MODEL = gemini-2.5-flash # trailing comment\n", "")
    assert delete_value(SAMPLE, "NOT_THERE") == SAMPLE


values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
texts = st.lists(
    st.one_of(
        st.sampled_from(["# c", "", "A=1", "export B='2'", "C = \"3\" # x", "junk", "\r", " "]),
        st.text(max_size=10),
    ),
    max_size=8,
).map("\n".join)


@given(texts, st.sampled_from(KEYS + ("A", "B")), values)
def test_set_then_parse_round_trips(text: str, key: str, value: str) -> None:
    assume(validate("PROXY_API_KEY", value) is None)  # storable at all
    before = parse_env(text)
    after = parse_env(set_value(text, key, value))
    assert after[key] == value
    assert {k: v for k, v in after.items() if k != key} == {k: v for k, v in before.items() if k != key}


@given(texts, st.sampled_from(KEYS + ("A", "B")))
def test_delete_then_parse(text: str, key: str) -> None:
    before = parse_env(text)
    after = parse_env(delete_value(text, key))
    before.pop(key, None)
    assert after == before


def test_validate() -> None:
    assert validate("PROXY_URL", "http://localhost:8317/v1/messages") is None
    assert validate("PROXY_URL", "https://proxy.example:8443/v1/messages") is None
    assert "http" in validate("PROXY_URL", "ftp://x/")
    assert "host" in validate("PROXY_URL", "http:///v1/messages")
    assert validate("PROXY_URL", "http://x:99999999/") is not None
    assert validate("PROXY_URL", "http://x /") is not None
    assert validate("PROXY_API_KEY", "") is None
    assert validate("PROXY_API_KEY", "sk-anything goes") is None
    assert validate("PROXY_API_KEY", "two\nlines") is not None
    assert validate("DEFAULT_SOURCE_MODEL", "claude-haiku-4-5") is None
    assert validate("DEFAULT_SOURCE_MODEL", "") is None
    assert "whitespace" in validate("DEFAULT_TARGET_MODEL", "gemini 2.5")
    assert all(validate("KEEP_BILLING_LINE", value) is None for value in ("true", "false", "1", "0", "Yes", "off"))
    assert validate("KEEP_BILLING_LINE", "maybe") == "KEEP_BILLING_LINE must be true or false (got 'maybe')"
    message = validate("NOPE", "x")
    assert message is not None and all(key in message for key in KEYS)


def test_defaults() -> None:
    assert SETTINGS["PROXY_URL"].default == "http://localhost:8317/v1/messages"
    assert all(SETTINGS[key].default == "" for key in KEYS if key not in ("PROXY_URL", "KEEP_BILLING_LINE"))
    assert SETTINGS["KEEP_BILLING_LINE"].default == "false"
    assert set(KEYS) == {"PROXY_URL", "PROXY_API_KEY", "DEFAULT_SOURCE_MODEL", "DEFAULT_TARGET_MODEL",
                         "KEEP_BILLING_LINE"}


def test_save_creates_0600_file_in_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / ".env"
    assert load_text(path) == ""
    folder = UserDir.open(path.parent)
    save_text(folder, "A=1\n")
    assert load_text(path) == "A=1\n" == load_from(folder)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [".env"]  # no temporary left


def test_save_tightens_existing_mode(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    path.chmod(0o644)
    save_text(UserDir.open(tmp_path), "A=2\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "A=2\n"


def test_load_text_does_not_follow_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("PROXY_API_KEY=stolen\n")
    (tmp_path / ".env").symlink_to(secret)
    with pytest.raises(OSError, match="symbolic link"):
        load_text(tmp_path / ".env")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_save_as_root_writes_as_the_folders_owner(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, 23456)
    save_text(UserDir.open(folder), "A=1\n")
    info = (folder / ".env").stat()
    assert (info.st_uid, info.st_gid) == (12345, 23456)
