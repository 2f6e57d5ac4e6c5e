"""In-place rewrites: links followed (dotfiles repositories), anything but a regular file refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cmm.config.textfile import rewrite_in_place


def test_rewrites_through_a_link_keeping_the_inode(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles-bashrc"
    real.write_text("a\nb\n")
    inode = real.stat().st_ino
    (tmp_path / ".bashrc").symlink_to(real)
    assert rewrite_in_place(tmp_path / ".bashrc", lambda text: text.replace("b", "c"))
    assert real.read_text() == "a\nc\n" and real.stat().st_ino == inode
    assert not rewrite_in_place(tmp_path / ".bashrc", lambda text: text)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / ".bashrc"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as raised:
        rewrite_in_place(fifo, lambda text: text + "x\n")
    assert raised.value.errno == errno.EINVAL and str(fifo) in str(raised.value)


def test_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        rewrite_in_place(tmp_path, lambda text: text + "x\n")
