"""Line handling shared by the edits cmm makes to users' text files (/etc/hosts, ~/.cmm/.env):
both must leave every line they do not own exactly as it was."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


def split_lines(text: str) -> list[str]:
    """Split on ``\\n`` only, keeping line ends (``str.splitlines`` also splits on \\f, \\x1c, ...)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def rewrite_in_place(path: Path, transform: Callable[[str], str]) -> bool:
    """Apply ``transform`` to the file's text, writing only from the first changed byte on.

    In place, not by rename: /etc/hosts is a bind mount in containers (rename fails there) and
    dotfiles may be symlinks; the file keeps its inode, mode and owner. Odd bytes survive
    (surrogateescape). True if the file changed; a file that needs no change is only read, so that
    a user's `cmm stop` without root finds nothing to do instead of "permission denied".
    Only a regular file is read: a FIFO or device swapped in would otherwise block or never end."""
    with _open_regular(path, os.O_RDONLY) as handle:
        old = handle.read()
    if transform(old.decode(_ENCODING, _ERRORS)).encode(_ENCODING, _ERRORS) == old:
        return False
    with _open_regular(path, os.O_RDWR) as handle:
        old = handle.read()
        new = transform(old.decode(_ENCODING, _ERRORS)).encode(_ENCODING, _ERRORS)
        if new == old:
            return False
        same = 0
        limit = min(len(old), len(new))
        while same < limit and old[same] == new[same]:
            same += 1
        handle.seek(same)
        handle.write(new[same:])
        handle.truncate(len(new))
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _open_regular(path: Path, flags: int) -> BinaryIO:
    """A binary file object of the regular file at ``path`` (links followed), opened without
    blocking on a FIFO; OSError(EINVAL) for anything else."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb")
