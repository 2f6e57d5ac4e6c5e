"""The ``NODE_EXTRA_CA_CERTS`` line cmm keeps in shell profiles, as a pure text transform.

Claude Code is a Node program, and Node (unless started with ``--use-system-ca``) ignores the
system trust store: it trusts cmm's CA through ``NODE_EXTRA_CA_CERTS``.  So ``cmm setup`` puts one
marked line in each of the user's shell profiles that exist::

    export NODE_EXTRA_CA_CERTS="/home/me/.cmm/ca.crt" # cmm-managed          (sh, bash, zsh)
    set -gx NODE_EXTRA_CA_CERTS "/home/me/.cmm/ca.crt" # cmm-managed         (fish)

That is the prior art's line, so lines it wrote are recognised (updated, removed) too.  As with
the hosts block, the edit is a pure text transform: :func:`add_line` then :func:`remove_line`
gives back the original text, byte for byte.  Reading and writing the profiles is
:mod:`cmm.machine.profiles`.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import attrs

from cmm.config.textfile import split_lines


VARIABLE = "NODE_EXTRA_CA_CERTS"
MARKER = "# cmm-managed"
# Ends the marker when add_line had to end the file's last line first; remove_line then takes
# that line break away again (the same trick as the hosts block's note).
ADDED_NEWLINE_NOTE = "; cmm also ended the line above"

# --- shell syntax ------------------------------------------------------------------------------


class Syntax(enum.Enum):
    """How a profile sets an environment variable."""

    POSIX = "sh"  # sh, bash, zsh: export NAME="value"
    FISH = "fish"  # set -gx NAME "value"


_SPECIAL = {Syntax.POSIX: '\\"$`', Syntax.FISH: '\\"$'}  # escaped inside "..."


def _double_quoted(value: str, syntax: Syntax) -> str:
    special = _SPECIAL[syntax]
    return '"' + "".join("\\" + ch if ch in special else ch for ch in value) + '"'


def syntax_of(shell: str) -> Syntax:
    """fish for a fish shell (by its path or name), else POSIX."""
    return Syntax.FISH if Path(shell).name.startswith("fish") else Syntax.POSIX


def export_line(syntax: Syntax, ca_cert: Path | str) -> str:
    """The command that sets NODE_EXTRA_CA_CERTS in this syntax (without cmm's marker)."""
    value = str(ca_cert)
    if "\n" in value or "\r" in value:
        raise ValueError(f"a path with a line break cannot go in a shell profile: {value!r}")
    quoted = _double_quoted(value, syntax)
    if syntax is Syntax.FISH:
        return f"set -gx {VARIABLE} {quoted}"
    return f"export {VARIABLE}={quoted}"


def unset_line(syntax: Syntax) -> str:
    return f"set -e {VARIABLE}" if syntax is Syntax.FISH else f"unset {VARIABLE}"


# --- reading assignments back ------------------------------------------------------------------

_MANAGED = re.compile(
    rf"\s*(?:export\s+{VARIABLE}=|set\s+-gx\s+{VARIABLE}\s+)(?P<value>.*?)\s+"
    rf"{re.escape(MARKER)}(?P<note>{re.escape(ADDED_NEWLINE_NOTE)})?"
)
_POSIX_ASSIGNMENT = re.compile(rf"\s*(?P<export>(?:export|declare\s+-x|typeset\s+-x)\s+)?{VARIABLE}=(?P<value>.*)")
_FISH_ASSIGNMENT = re.compile(rf"\s*set\s+(?P<flags>(?:-\S+\s+)*){VARIABLE}(?:\s+(?P<value>.*))?")


@attrs.frozen
class Assignment:
    """One line of a profile that sets NODE_EXTRA_CA_CERTS; ``managed`` when cmm wrote it."""

    value: str
    managed: bool
    line: int  # 1-based


def _content(line: str) -> str:
    """A line without its line end; a last line's lone ``\\r`` goes too, so that ending that line
    cannot turn it into one of cmm's (as in cmm.machine.hosts)."""
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def _managed_match(line: str) -> re.Match[str] | None:
    return _MANAGED.fullmatch(_content(line))


_HOME_REFERENCE = re.compile(r"\$(?:HOME(?![A-Za-z0-9_])|\{HOME\})")


def _home_reference(raw: str, at: int) -> int:
    """Length of an unescaped ``$HOME``/``${HOME}`` at ``raw[at]`` (``$HOMEDIR`` is not one), else 0."""
    match = _HOME_REFERENCE.match(raw, at)
    return match.end() - at if match else 0


def _word(raw: str, syntax: Syntax, home: Path | None) -> tuple[str, str]:
    """The first shell word of ``raw`` with quotes removed, and the rest of the line.

    Good enough to compare a profile's value with a path: double and single quotes, backslash
    escapes, ``$HOME`` and a leading ``~``; other variables are left as written.
    """
    raw = raw.lstrip()
    out: list[str] = []
    i = 0
    if raw.startswith("~") and (len(raw) == 1 or raw[1] in "/\"' \t;"):
        out.append(str(home) if home is not None else "~")
        i = 1
    special = _SPECIAL[syntax]
    while i < len(raw):
        ch = raw[i]
        if ch in " \t;&|":
            break
        if ch == '"':
            j = i + 1
            piece: list[str] = []
            while j < len(raw) and raw[j] != '"':
                if raw[j] == "\\" and j + 1 < len(raw) and raw[j + 1] in special:
                    piece.append(raw[j + 1])
                    j += 2
                elif home is not None and (length := _home_reference(raw, j)):
                    piece.append(str(home))
                    j += length
                else:
                    piece.append(raw[j])
                    j += 1
            out.append("".join(piece))
            i = j + 1
        elif ch == "'":
            j = raw.find("'", i + 1)
            j = len(raw) if j < 0 else j
            piece_text = raw[i + 1 : j]
            if syntax is Syntax.FISH:
                piece_text = piece_text.replace("\\'", "'").replace("\\\\", "\\")
            out.append(piece_text)
            i = j + 1
        elif ch == "\\" and i + 1 < len(raw):
            out.append(raw[i + 1])
            i += 2
        elif home is not None and (length := _home_reference(raw, i)):
            out.append(str(home))
            i += length
        else:
            out.append(ch)
            i += 1
    return "".join(out), raw[i:]


def assignments(text: str, home: Path | None = None) -> tuple[Assignment, ...]:
    """Every line of ``text`` that sets NODE_EXTRA_CA_CERTS, in file order (the last one wins).

    ``home`` expands ``$HOME`` and ``~``.  A one-command prefix (``NODE_EXTRA_CA_CERTS=x node``)
    does not count: it sets nothing for the shell.
    """
    found: list[Assignment] = []
    for number, line in enumerate(split_lines(text), start=1):
        content = _content(line)
        managed = _MANAGED.fullmatch(content)
        if managed is not None:
            syntax = Syntax.POSIX if content.lstrip().startswith("export") else Syntax.FISH
            value, _ = _word(managed.group("value"), syntax, home)
            found.append(Assignment(value, True, number))
            continue
        posix = _POSIX_ASSIGNMENT.fullmatch(content)
        if posix is not None:
            value, rest = _word(posix.group("value"), Syntax.POSIX, home)
            rest = rest.strip()
            if posix.group("export") or not rest or rest.startswith(("#", ";", "&&", "||")):
                found.append(Assignment(value, False, number))
            continue
        fish = _FISH_ASSIGNMENT.fullmatch(content)
        if fish is not None and fish.group("value") is not None:
            flags = fish.group("flags")
            if "--export" in flags or re.search(r"(?:^|\s)-[a-zA-Z]*x", flags):
                found.append(Assignment(_word(fish.group("value"), Syntax.FISH, home)[0], False, number))
    return tuple(found)


def has_line(text: str) -> bool:
    """Whether cmm's marked line is in ``text``."""
    return any(_managed_match(line) for line in split_lines(text))


# --- the pure edit -----------------------------------------------------------------------------


def _render(syntax: Syntax, ca_cert: Path | str, note: bool) -> str:
    return f"{export_line(syntax, ca_cert)} {MARKER}" + (ADDED_NEWLINE_NOTE if note else "")


def remove_line(text: str) -> str:
    """Take out every line cmm added; text without one comes back unchanged."""
    lines = split_lines(text)
    kept: list[str] = []
    for index, line in enumerate(lines):
        match = _managed_match(line)
        if match is None:
            kept.append(line)
            continue
        if index == len(lines) - 1 and match.group("note") and kept:
            eol = "\r\n" if line.endswith("\r\n") else "\n"
            if not kept[-1].endswith(eol):
                eol = "\n"
            if kept[-1].endswith(eol):
                ended = kept[-1][: -len(eol)]
                if _managed_match(ended) is None:  # never turn a line of the user's into one of cmm's
                    kept[-1] = ended
    return "".join(kept)


def add_line(text: str, syntax: Syntax, ca_cert: Path | str) -> str:
    """Point cmm's line at ``ca_cert``: updated where it is, or appended at the end.

    Several cmm lines (hand copies) become one, at the end.  Idempotent, and
    ``remove_line(add_line(t)) == remove_line(t)``.
    """
    lines = split_lines(text)
    marked = [index for index, line in enumerate(lines) if _managed_match(line)]
    if len(marked) == 1:
        index = marked[0]
        line = lines[index]
        content = _content(line)
        match = _MANAGED.fullmatch(content)
        assert match is not None
        lines[index] = _render(syntax, ca_cert, bool(match.group("note"))) + line[len(content) :]
        return "".join(lines)
    text = remove_line(text)
    last_newline = text.rfind("\n")
    eol = "\r\n" if last_newline > 0 and text[last_newline - 1] == "\r" else "\n"
    if text and not text.endswith("\n"):
        return text + eol + _render(syntax, ca_cert, True) + eol
    return text + _render(syntax, ca_cert, False) + eol
