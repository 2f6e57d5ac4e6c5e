"""The NODE_EXTRA_CA_CERTS line as a pure text transform (Hypothesis), and that the line it
writes sets the variable in bash and fish."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from cmm.machine import profile_lines
from cmm.machine.profile_lines import ADDED_NEWLINE_NOTE, MARKER, Syntax, add_line, assignments, has_line, remove_line

from support import AWKWARD_TEXT_PIECES
from machine_fakes import CA, FISH_LINE, POSIX_LINE


# --- the pure transform ------------------------------------------------------------------------

_pieces = st.sampled_from(
    [
        POSIX_LINE,
        FISH_LINE,
        POSIX_LINE + ADDED_NEWLINE_NOTE,
        f'export NODE_EXTRA_CA_CERTS="/elsewhere.pem" {MARKER}',
        "export NODE_EXTRA_CA_CERTS=/etc/corp.pem",
        f"# {MARKER}",
        MARKER,
        "alias ll='ls -l'",
        *AWKWARD_TEXT_PIECES,
    ]
)
texts = st.one_of(st.text(), st.lists(st.one_of(_pieces, st.text(max_size=5)), max_size=12).map("".join))
syntaxes = st.sampled_from(list(Syntax))
ca_paths = st.one_of(
    st.just(str(CA)),
    st.sampled_from(["/x/$HOME/ca.crt", "/x/${HOME}", "/$HOMEDIR/a b", '/q"\\`$x', "/~/'it'"]),
    st.text(st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), min_size=1, max_size=30).map(
        lambda name: "/tmp/" + name
    ),
)


@given(texts, syntaxes, ca_paths)
@example("", Syntax.POSIX, str(CA))
@example("alias x=y", Syntax.POSIX, str(CA))
@example("a\r\nb", Syntax.FISH, str(CA))
@example("a\r", Syntax.POSIX, str(CA))
@example(POSIX_LINE + "\r", Syntax.POSIX, str(CA))
def test_remove_undoes_add(text: str, syntax: Syntax, ca: str) -> None:
    assume(not has_line(text))
    added = add_line(text, syntax, ca)
    assert has_line(added)
    assert remove_line(added) == text


@given(texts, syntaxes, ca_paths)
def test_add_is_idempotent(text: str, syntax: Syntax, ca: str) -> None:
    once = add_line(text, syntax, ca)
    assert add_line(once, syntax, ca) == once


@given(texts, syntaxes, ca_paths)
def test_add_then_remove_equals_remove(text: str, syntax: Syntax, ca: str) -> None:
    assert remove_line(add_line(text, syntax, ca)) == remove_line(text)


@given(texts)
def test_remove_leaves_no_line(text: str) -> None:
    assert not has_line(remove_line(text))


@given(texts, syntaxes, ca_paths)
def test_added_line_reads_back_as_the_path(text: str, syntax: Syntax, ca: str) -> None:
    for home in (None, Path("/home/me")):  # the written path is quoted: nothing in it expands
        found = [a for a in assignments(add_line(text, syntax, ca), home) if a.managed]
        assert [a.value for a in found] == [ca]


def test_appended_at_the_end() -> None:
    assert add_line("alias ll='ls -l'\n", Syntax.POSIX, CA) == f"alias ll='ls -l'\n{POSIX_LINE}\n"
    assert add_line("", Syntax.FISH, CA) == f"{FISH_LINE}\n"


def test_missing_final_newline_is_added_and_noted() -> None:
    added = add_line("alias ll='ls -l'", Syntax.POSIX, CA)
    assert added == f"alias ll='ls -l'\n{POSIX_LINE}{ADDED_NEWLINE_NOTE}\n"
    assert remove_line(added) == "alias ll='ls -l'"
    # the user wrote below it since: the line goes, their line break stays
    assert remove_line(added + "echo hi\n") == "alias ll='ls -l'\necho hi\n"


def test_crlf_profile_gets_crlf_line() -> None:
    added = add_line("a\r\n", Syntax.POSIX, CA)
    assert added == f"a\r\n{POSIX_LINE}\r\n"
    assert remove_line(added) == "a\r\n"


def test_changed_path_is_updated_where_it_is() -> None:
    text = f"a\n{POSIX_LINE}\nb\n"
    updated = add_line(text, Syntax.POSIX, "/new/ca.crt")
    assert updated == f'a\nexport NODE_EXTRA_CA_CERTS="/new/ca.crt" {MARKER}\nb\n'
    assert remove_line(updated) == "a\nb\n"


def test_prior_art_line_is_recognised() -> None:
    """The Node tool appended "\\n<line>\\n" to ~/.zshrc with exactly this line."""
    zshrc = 'export PATH=x\n\nexport NODE_EXTRA_CA_CERTS="/Users/me/.cmm/ca.crt" # cmm-managed\n'
    assert has_line(zshrc)
    assert remove_line(zshrc) == "export PATH=x\n\n"


def test_duplicates_become_one_line_at_the_end() -> None:
    text = f"{POSIX_LINE}\na\n{POSIX_LINE}\n"
    assert add_line(text, Syntax.POSIX, CA) == f"a\n{POSIX_LINE}\n"


def test_mentions_of_the_marker_are_not_lines() -> None:
    text = f"# {POSIX_LINE}\necho '{MARKER}'\nexport NODE_EXTRA_CA_CERTS=/x # cmm-managed-not\n"
    assert not has_line(text)
    assert remove_line(text) == text


def test_path_with_line_break_is_refused() -> None:
    with pytest.raises(ValueError):
        add_line("", Syntax.POSIX, "/a\nb")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_written_line_sets_the_variable_in_bash(tmp_path: Path) -> None:
    odd = str(tmp_path / 'we"ird $dir `x` \\ é')
    profile = tmp_path / "profile"
    profile.write_text(add_line("", Syntax.POSIX, odd))
    printed = subprocess.run(
        ["bash", "-c", f'. "{profile}"; printf %s "$NODE_EXTRA_CA_CERTS"'], capture_output=True, text=True
    )
    assert printed.stdout == odd
    assert [a.value for a in assignments(profile.read_text())] == [odd]


def test_written_line_quotes_for_fish(tmp_path: Path) -> None:
    """fish reads a double-quoted string with only \\", \\$ and \\\\ as escapes (fish-shell docs,
    "Quotes"); the line must escape exactly those. (fish itself is not on the test machines.)"""
    odd = '/tmp/we"ird $dir \\ x'
    line = add_line("", Syntax.FISH, odd)
    assert line == 'set -gx NODE_EXTRA_CA_CERTS "/tmp/we\\"ird \\$dir \\\\ x" # cmm-managed\n'
    assert [a.value for a in assignments(line)] == [odd]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("export NODE_EXTRA_CA_CERTS=/etc/corp.pem", "/etc/corp.pem"),
        ("  export NODE_EXTRA_CA_CERTS='/etc/a b.pem'  # corp", "/etc/a b.pem"),
        ('NODE_EXTRA_CA_CERTS="$HOME/.cmm/ca.crt"', "/home/me/.cmm/ca.crt"),
        ("export NODE_EXTRA_CA_CERTS=${HOME}/x.pem", "/home/me/x.pem"),
        ("export NODE_EXTRA_CA_CERTS=$HOMEDIR/x.pem", "$HOMEDIR/x.pem"),  # another variable
        ('export NODE_EXTRA_CA_CERTS="\\$HOME/x.pem"', "$HOME/x.pem"),  # escaped: literal
        ("export NODE_EXTRA_CA_CERTS=~/x.pem", "/home/me/x.pem"),
        ("declare -x NODE_EXTRA_CA_CERTS=/d.pem", "/d.pem"),
        ("set -gx NODE_EXTRA_CA_CERTS /f.pem", "/f.pem"),
        ("set -Ux NODE_EXTRA_CA_CERTS '/g.pem'", "/g.pem"),
        ("set --global --export NODE_EXTRA_CA_CERTS ~/h.pem", "/home/me/h.pem"),
    ],
)
def test_assignments_of_other_tools_and_users(line: str, value: str) -> None:
    found = assignments(f"# x\n{line}\n", Path("/home/me"))
    assert found == (profile_lines.Assignment(value, False, 2),)


@pytest.mark.parametrize(
    "line",
    [
        "# export NODE_EXTRA_CA_CERTS=/x",
        "NODE_EXTRA_CA_CERTS=/x node app.js",  # one command's environment, not the shell's
        "unset NODE_EXTRA_CA_CERTS",
        "set -g NODE_EXTRA_CA_CERTS /x",  # fish without -x: not exported
        "echo $NODE_EXTRA_CA_CERTS",
    ],
)
def test_lines_that_set_nothing(line: str) -> None:
    assert assignments(line + "\n") == ()


def test_shell_syntax_and_export_lines() -> None:
    assert profile_lines.syntax_of("/usr/bin/fish") is Syntax.FISH and profile_lines.syntax_of("/bin/zsh") is Syntax.POSIX
    assert profile_lines.export_line(Syntax.POSIX, "/a") == 'export NODE_EXTRA_CA_CERTS="/a"'
    assert profile_lines.unset_line(Syntax.FISH) == "set -e NODE_EXTRA_CA_CERTS"
