"""The marked ``/etc/hosts`` block that points api.anthropic.com at cmm.

The transform is pure text: :func:`add_block` appends one marked block, :func:`remove_block`
takes it out again and gives back exactly the text it started from, so a restore never changes
a byte that cmm did not add.  Markers only count as whole lines, so a comment that merely
mentions them is left alone.

:func:`install` and :func:`restore` rewrite the file **in place** (open ``r+``, write, truncate,
fsync) instead of writing a temporary file and renaming it over the original: in containers
``/etc/hosts`` is a bind mount, and renaming onto a mount point fails (``EBUSY``) or would
replace the bind-mounted file with one the host never sees.  In-place writing also keeps the
inode and hence mode, owner, ACLs and SELinux labels.  Because the block lives at the end, only
the bytes after the first difference are rewritten: usually an append or a truncate, so a crash
half-way cannot damage the entries before it.
"""

from __future__ import annotations

from pathlib import Path

from cmm.config.textfile import rewrite_in_place, split_lines
from cmm.core.values import ANTHROPIC_HOST

BEGIN_MARK = "# cmm-managed begin"
END_MARK = "# cmm-managed end"
HOSTNAME = ANTHROPIC_HOST
DEFAULT_ADDRESSES = ("127.0.0.1", "::1")

# Present as the block's first line when add_block had to end the file's last line first;
# remove_block then takes that line break away again.
ADDED_NEWLINE_NOTE = "# (cmm ended the line above; restoring the file removes that line break)"


def _content(line: str) -> str:
    """A line without its ``\\n``/``\\r\\n`` end; a last line's lone ``\\r`` goes too, so that
    ending that line cannot turn it into a marker."""
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def _eol(line: str) -> str:
    if line.endswith("\r\n"):
        return "\r\n"
    return "\n" if line.endswith("\n") else ""


def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(begin, end) line indexes of every complete block, each end paired with the nearest begin."""
    found: list[tuple[int, int]] = []
    begin: int | None = None
    for index, line in enumerate(lines):
        content = _content(line)
        if content == BEGIN_MARK:
            begin = index
        elif content == END_MARK and begin is not None:
            found.append((begin, index))
            begin = None
    return found


def has_block(text: str) -> bool:
    return bool(_blocks(split_lines(text)))


def remove_block(text: str) -> str:
    """Take out every cmm block; text without one comes back unchanged."""
    lines = split_lines(text)
    blocks = _blocks(lines)
    if not blocks:
        return text
    kept: list[str] = []
    start = 0
    for begin, end in blocks:
        kept.extend(lines[start:begin])
        at_end = end == len(lines) - 1
        added_newline = begin + 1 < end and _content(lines[begin + 1]) == ADDED_NEWLINE_NOTE
        if at_end and added_newline and kept:
            eol = _eol(lines[begin]) or "\n"
            if not kept[-1].endswith(eol):
                eol = "\n"
            if kept[-1].endswith(eol):
                kept[-1] = kept[-1][: -len(eol)]
        start = end + 1
    kept.extend(lines[start:])
    return "".join(kept)


def _check_field(value: str, what: str) -> None:
    if not value or any(ch.isspace() for ch in value) or "#" in value:
        raise ValueError(f"invalid {what} for the hosts file: {value!r}")


def add_block(
    text: str,
    addresses: tuple[str, ...] = DEFAULT_ADDRESSES,
    hostname: str = HOSTNAME,
) -> str:
    """Append the block (replacing any earlier one, e.g. left by a killed run)."""
    _check_field(hostname, "hostname")
    for address in addresses:
        _check_field(address, "address")
    text = remove_block(text)
    last_newline = text.rfind("\n")
    eol = "\r\n" if last_newline > 0 and text[last_newline - 1] == "\r" else "\n"
    body = [BEGIN_MARK]
    prefix = ""
    if text and not text.endswith("\n"):
        prefix = eol
        body.append(ADDED_NEWLINE_NOTE)
    body.extend(f"{address} {hostname}" for address in addresses)
    body.append(END_MARK)
    return text + prefix + "".join(line + eol for line in body)


def install(
    path: Path,
    addresses: tuple[str, ...] = DEFAULT_ADDRESSES,
    hostname: str = HOSTNAME,
) -> bool:
    """Add (or refresh) the block in ``path``; True if the file changed."""
    return rewrite_in_place(path, lambda text: add_block(text, addresses, hostname))


def restore(path: Path) -> bool:
    """Remove any block, including a stale one from a killed run; True if the file changed."""
    return rewrite_in_place(path, remove_block)
