"""Fixtures of the machine tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine_fakes import USER


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A home of uid 65534 that uid can reach (pytest's tmp_path is under root's 0700 folder)."""
    base = Path(tempfile.mkdtemp(prefix="cmm-home-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, USER, USER)
        yield home
    finally:
        shutil.rmtree(base)
