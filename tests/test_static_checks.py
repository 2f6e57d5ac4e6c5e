"""ruff and mypy, run as part of the one test command (settings in ruff.toml and setup.cfg)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    done = run("ruff", "check", "--no-cache", "cmm", "tests", "bench")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing() -> None:
    done = run("mypy", "--no-incremental", "--cache-dir=/dev/null")  # files and strictness: setup.cfg [mypy]
    assert done.returncode == 0, done.stdout + done.stderr
