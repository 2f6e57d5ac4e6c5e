"""The per-request log: one line a request in the prior art's format, to the console and a
rotating file.

The line keeps the seed tool's shape so its users can read (and grep) it as before:
``[2026-02-28 18:01:45] claude-haiku-4-5-20251001           → INTERCEPTED → gemini-2.5-flash ✓``
and adds status, duration and byte counts after it. Request contents are never logged.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import attrs
from twisted.python import threadable
from twisted.python.logfile import LogFile

from cmm.config.userfiles import FILE_MODE, UserDir

COLUMN = 35


@attrs.frozen
class RequestRecord:
    started: float  # wall-clock seconds since the epoch
    method: str
    path: str
    model: str | None
    intercepted: bool
    target: str | None
    status: int | None  # None: no response reached the client
    duration: float
    bytes_in: int
    bytes_out: int
    error: str | None = None
    mapping: str | None = None  # the source prefix of the mapping that routed it
    content: str | None = None  # only with --log-content: head (credentials redacted) + body start


# What a client or upstream could use to forge or hide a log line: control characters (C0, DEL,
# C1, whose 0x9b starts a terminal escape too) and the separators that split lines. A
# surrogate (an undecodable byte or a lone \ud800 escape) cannot be written as UTF-8 at all.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]|[\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if "\ud800" <= char <= "\udfff":
        return "\ufffd"
    return _SHORT_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escaped(text: str) -> str:
    """``text`` on one line, safe for a terminal and for UTF-8: control characters, line
    separators and backslashes spelled as escapes, surrogates replaced by U+FFFD."""
    return _UNSAFE.sub(_escape_one, text)


def format_line(record: RequestRecord, localtime: Callable[[float], time.struct_time] = time.localtime) -> str:
    """The seed's line; whatever came from a client or an upstream is :func:`escaped`, so one
    record is one line (plus the indented content lines of ``--log-content``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", localtime(record.started))
    subject = escaped(record.model if record.model is not None else f"{record.method} {record.path}")
    route = f"INTERCEPTED → {escaped(str(record.target))}" if record.intercepted else "PASSTHROUGH"
    ok = record.status is not None and record.status < 400 and record.error is None
    mark = "✓" if ok else "✗"
    status = "-" if record.status is None else str(record.status)
    detail = f"{status} {record.duration * 1000:.0f}ms ↑{record.bytes_in} ↓{record.bytes_out}"
    if record.error:
        detail += f" ({escaped(record.error)})"
    line = f"[{stamp}] {subject:<{COLUMN}} → {route} {mark} {detail}"
    if record.content:
        line += "".join(f"\n    {escaped(part)}" for part in record.content.splitlines())
    return line


_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")  # json.dumps escapes the rest itself
_NO_SURROGATE = re.compile("[\ud800-\udfff]")


def format_json(record: RequestRecord) -> str:
    """One JSON object a line, for machines (``--log-format json``); surrogates become U+FFFD,
    and control characters and line separators are ``\\u`` escapes, so the line is valid UTF-8
    JSON that a terminal shows as it is."""
    fields = {
        key: _NO_SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value
        for key, value in attrs.asdict(record).items()
    }
    fields["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started))
    fields["route"] = "intercepted" if record.intercepted else "passthrough"
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


class UserLogFile(LogFile):
    """Twisted's size-rotating ``LogFile`` whose opening and renaming run as the log directory's
    owner (see :mod:`cmm.config.userfiles`), never through a symbolic link, with mode 0600: the log names
    the models and hosts a user asked for, and root must not be steered into another file."""

    synchronized = ["rotate"]  # write is LogFile's, synchronized already

    def __init__(self, directory: UserDir, name: str, rotate_length: int = 1_000_000,
                 max_rotated_files: int | None = None) -> None:
        self.user_dir = directory
        LogFile.__init__(self, name, str(directory.path), rotateLength=rotate_length, defaultMode=FILE_MODE,
                         maxRotatedFiles=max_rotated_files)

    def _openFile(self) -> None:
        fd = self.user_dir.open_file(self.name, os.O_RDWR | os.O_CREAT)
        self._file = os.fdopen(fd, "rb+", 0)
        self._file.seek(0, 2)
        self.closed = False
        self.size = self._file.tell()

    def rotate(self) -> None:
        """As ``LogFile.rotate``, but by names relative to the directory, as its owner."""
        with self.user_dir.acting() as fd:
            numbers = []
            for entry in os.listdir(fd):
                number = entry[len(self.name) + 1:] if entry.startswith(self.name + ".") else ""
                if number.isdigit() and int(number) > 0:
                    numbers.append(int(number))
            for number in sorted(numbers, reverse=True):
                if self.maxRotatedFiles is not None and number >= self.maxRotatedFiles:
                    os.unlink(f"{self.name}.{number}", dir_fd=fd)
                else:
                    os.rename(f"{self.name}.{number}", f"{self.name}.{number + 1}", src_dir_fd=fd, dst_dir_fd=fd)
            self._file.close()
            os.rename(self.name, f"{self.name}.1", src_dir_fd=fd, dst_dir_fd=fd)
            self._openFile()


threadable.synchronize(UserLogFile)


@attrs.define
class RequestLog:
    """Writes request lines; the rotating file is Twisted's ``LogFile`` (size-based rotation)."""

    console: TextIO | None = attrs.field(factory=lambda: sys.stdout)
    file: LogFile | None = None
    formatter: Callable[[RequestRecord], str] = format_line

    @classmethod
    def to_file(cls, path: Path, max_bytes: int = 1_000_000, backups: int = 3, console: TextIO | None = sys.stdout,
                json: bool = False, directory: UserDir | None = None) -> RequestLog:
        """``directory``: ``path``'s folder, already checked (else it is checked, and made if missing)."""
        if directory is None:
            directory = UserDir.open(path.parent)
        log_file = UserLogFile(directory, path.name, rotate_length=max_bytes, max_rotated_files=backups)
        return cls(console=console, file=log_file, formatter=format_json if json else format_line)

    def __call__(self, record: RequestRecord) -> None:
        line = self.formatter(record) + "\n"
        if self.console is not None:
            self.console.write(line)
            self.console.flush()
        if self.file is not None:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
