"""The /etc/hosts block: pure transform properties plus the in-place file writer (on temp files)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from cmm.config import textfile
from cmm.machine.hosts import (
    ADDED_NEWLINE_NOTE,
    BEGIN_MARK,
    END_MARK,
    add_block,
    has_block,
    install,
    remove_block,
    restore,
)

from support import AWKWARD_TEXT_PIECES

BLOCK = f"{BEGIN_MARK}\n127.0.0.1 api.anthropic.com\n::1 api.anthropic.com\n{END_MARK}\n"

# Line fragments that make collisions with the markers and odd line ends likely.
_pieces = st.sampled_from(
    [
        BEGIN_MARK,
        END_MARK,
        ADDED_NEWLINE_NOTE,
        "127.0.0.1 localhost",
        "::1 ip6-localhost",
        *AWKWARD_TEXT_PIECES,
    ]
)
texts = st.one_of(
    st.text(),
    st.lists(st.one_of(_pieces, st.text(max_size=5)), max_size=12).map("".join),
)


@given(texts)
@example("")
@example("127.0.0.1 localhost")
@example("127.0.0.1 localhost\r\n::1 localhost")
@example(f"x {BEGIN_MARK}\n{END_MARK} y\n")
@example(f"{END_MARK}\n{BEGIN_MARK}")
@example(f"{BEGIN_MARK}\nfoo\n{END_MARK}\r")
def test_remove_undoes_add(text: str) -> None:
    assume(not has_block(text))
    added = add_block(text)
    assert has_block(added)
    assert remove_block(added) == text


@given(texts)
def test_add_is_idempotent(text: str) -> None:
    once = add_block(text)
    assert add_block(once) == once


@given(texts)
def test_remove_without_block_is_identity(text: str) -> None:
    assume(not has_block(text))
    assert remove_block(text) == text


@given(texts)
def test_remove_leaves_no_block(text: str) -> None:
    assert not has_block(remove_block(text))


def test_block_appended_at_end() -> None:
    assert add_block("127.0.0.1 localhost\n") == "127.0.0.1 localhost\n" + BLOCK


def test_missing_final_newline_is_added_and_noted() -> None:
    added = add_block("127.0.0.1 localhost")
    assert added == (
        f"127.0.0.1 localhost\n{BEGIN_MARK}\n{ADDED_NEWLINE_NOTE}\n"
        f"127.0.0.1 api.anthropic.com\n::1 api.anthropic.com\n{END_MARK}\n"
    )
    assert remove_block(added) == "127.0.0.1 localhost"


def test_empty_text() -> None:
    assert add_block("") == BLOCK
    assert remove_block(BLOCK) == ""


def test_crlf_file_gets_crlf_block() -> None:
    added = add_block("127.0.0.1 localhost\r\n")
    assert added == "127.0.0.1 localhost\r\n" + BLOCK.replace("\n", "\r\n")
    assert remove_block(added) == "127.0.0.1 localhost\r\n"


def test_custom_addresses_and_stale_block_replaced() -> None:
    stale = "a\n" + BLOCK
    fresh = add_block(stale, addresses=("127.0.0.2",), hostname="example.test")
    assert fresh == f"a\n{BEGIN_MARK}\n127.0.0.2 example.test\n{END_MARK}\n"


def test_stale_block_in_the_middle_is_removed() -> None:
    text = "a\n" + BLOCK + "b\n"
    assert remove_block(text) == "a\nb\n"
    assert add_block(text) == "a\nb\n" + BLOCK


def test_markers_not_on_their_own_line_are_not_blocks() -> None:
    text = f"# see {BEGIN_MARK}\n1.2.3.4 x # {END_MARK}\n{BEGIN_MARK} \n{END_MARK}x\n"
    assert not has_block(text)
    assert remove_block(text) == text


def test_unfinished_block_is_left_alone() -> None:
    text = f"{BEGIN_MARK}\n127.0.0.1 api.anthropic.com\n"
    assert not has_block(text)
    assert remove_block(text) == text


def test_rejects_fields_that_would_break_the_file() -> None:
    with pytest.raises(ValueError):
        add_block("", hostname="a b")
    with pytest.raises(ValueError):
        add_block("", addresses=("127.0.0.1\n",))


# --- the file writer ---------------------------------------------------------------------------


def test_install_and_restore_file_byte_identical(tmp_path: Path) -> None:
    original = b"127.0.0.1 localhost\n\xff\xfe odd bytes\r\n10.0.0.1 caf\xc3\xa9"
    path = tmp_path / "hosts"
    path.write_bytes(original)
    path.chmod(0o640)
    inode = path.stat().st_ino

    assert install(path) is True
    changed = path.read_bytes()
    assert changed.startswith(original + b"\r\n" + BEGIN_MARK.encode())  # follows the last line end
    assert b"127.0.0.1 api.anthropic.com\r\n" in changed
    assert install(path) is False  # already there

    assert restore(path) is True
    assert path.read_bytes() == original
    assert restore(path) is False
    st_ = path.stat()
    assert st_.st_ino == inode  # rewritten in place, never replaced
    assert stat.S_IMODE(st_.st_mode) == 0o640


def test_restore_removes_stale_block_from_killed_run(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n" + BLOCK + "10.1.1.1 later\n")
    assert restore(path) is True
    assert path.read_text() == "127.0.0.1 localhost\n10.1.1.1 later\n"


def test_writes_in_place_through_symlink(tmp_path: Path) -> None:
    """A bind mount cannot be shown here, but a symlink has the same failure mode for rename."""
    target = tmp_path / "real-hosts"
    target.write_text("127.0.0.1 localhost\n")
    link = tmp_path / "hosts"
    link.symlink_to(target)
    assert install(link)
    assert link.is_symlink()
    assert target.read_text().endswith(BLOCK)


def test_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(textfile.os, "fsync", synced.append)
    path = tmp_path / "hosts"
    path.write_text("")
    install(path)
    assert len(synced) == 1


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        restore(tmp_path / "nope")


def test_read_only_file_raises_permission_error() -> None:
    """As an ordinary user (root drops to nobody in a child, since root may write anything)."""
    directory = Path(tempfile.mkdtemp(prefix="cmm-hosts-"))
    try:
        directory.chmod(0o755)
        path = directory / "hosts"
        path.write_text("x\n")
        path.chmod(0o444)
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                install(path)
            return
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                install(path)
                code = 1
            except PermissionError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "install() did not raise PermissionError"
        assert path.read_text() == "x\n"
    finally:
        shutil.rmtree(directory)


def _as_ordinary_user(action: Callable[[], object]) -> str:
    """``repr`` of what ``action`` returns, or the name of what it raises, run as an ordinary user
    (root drops to nobody in a child, since root may write anything)."""

    def outcome() -> str:
        try:
            return repr(action())
        except OSError as error:
            return type(error).__name__

    if os.geteuid() != 0:
        return outcome()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, outcome().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        return pipe.read()


def test_restore_of_a_file_without_a_block_needs_no_write_permission() -> None:
    """So that `cmm stop` as a user, with nothing to clean up, says so instead of "permission denied"."""
    directory = Path(tempfile.mkdtemp(prefix="cmm-hosts-"))
    try:
        directory.chmod(0o755)
        path = directory / "hosts"
        path.write_text("127.0.0.1 localhost\n")
        path.chmod(0o444)
        assert _as_ordinary_user(lambda: restore(path)) == "False"
        path.chmod(0o644)
        path.write_text("127.0.0.1 localhost\n" + BLOCK)
        path.chmod(0o444)
        assert _as_ordinary_user(lambda: restore(path)) == "PermissionError"
        assert path.read_text() == "127.0.0.1 localhost\n" + BLOCK
    finally:
        shutil.rmtree(directory)
