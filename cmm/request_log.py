"""The per-request log: one line a request in the prior art's format, to the console and a
rotating file.

The line keeps the seed tool's shape so its users can read (and grep) it as before:
``[2026-02-28 18:01:45] claude-haiku-4-5-20251001           → INTERCEPTED → gemini-2.5-flash ✓``
and adds status, duration and byte counts after it. Request contents are never logged.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import attrs
from twisted.python import threadable
from twisted.python.logfile import LogFile

from cmm.userfiles import FILE_MODE, UserDir

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


def format_line(record: RequestRecord, localtime: Callable[[float], time.struct_time] = time.localtime) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", localtime(record.started))
    subject = record.model if record.model is not None else f"{record.method} {record.path}"
    route = f"INTERCEPTED → {record.target}" if record.intercepted else "PASSTHROUGH"
    ok = record.status is not None and record.status < 400 and record.error is None
    mark = "✓" if ok else "✗"
    status = "-" if record.status is None else str(record.status)
    detail = f"{status} {record.duration * 1000:.0f}ms ↑{record.bytes_in} ↓{record.bytes_out}"
    if record.error:
        detail += f" ({record.error})"
    line = f"[{stamp}] {subject:<{COLUMN}} → {route} {mark} {detail}"
    if record.content:
        line += "".join(f"\n    {part}" for part in record.content.splitlines())
    return line


def format_json(record: RequestRecord) -> str:
    """One JSON object a line, for machines (``--log-format json``)."""
    fields = attrs.asdict(record)
    fields["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started))
    fields["route"] = "intercepted" if record.intercepted else "passthrough"
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


class UserLogFile(LogFile):
    """Twisted's size-rotating ``LogFile`` whose opening and renaming run as the log directory's
    owner (see :mod:`cmm.userfiles`), never through a symbolic link, with mode 0600: the log names
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
