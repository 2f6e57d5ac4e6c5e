"""The per-request log: each record's line (:mod:`cmm.core.records`) to the console and a
rotating file the user owns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence, TextIO

import attrs
from twisted.python import threadable
from twisted.python.logfile import LogFile

from cmm.config.userfiles import FILE_MODE, UserDir
from cmm.core.records import RequestRecord, format_json, format_line


class UserLogFile(LogFile):
    """Twisted's size-rotating ``LogFile`` whose opening and renaming run as the log directory's
    owner (see :mod:`cmm.config.userfiles`), never through a symbolic link, with mode 0600: the log
    names the models and hosts a user asked for, and root must not be steered into another file."""

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
                suffix = entry[len(self.name) + 1:] if entry.startswith(self.name + ".") else ""
                if suffix.isdigit() and int(suffix) > 0:
                    numbers.append(int(suffix))
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
        self.write_all((record,))

    def write_all(self, records: Sequence[RequestRecord]) -> None:
        """Their lines in one write to each output: a busy worker's batch costs two writes, not two
        per request."""
        if not records:
            return
        formatter = self.formatter
        lines = [formatter(record) + "\n" for record in records]
        text = "".join(lines)
        if self.console is not None:
            self.console.write(text)
            self.console.flush()
        if self.file is not None:
            limit = self.file.rotateLength
            if limit and self.file.size + len(text) > limit:
                for line in lines:  # it rotates within the batch: line by line, at the line it always did
                    self.file.write(line)
            else:
                self.file.write(text)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
