"""bench/hostile.py runs against this checkout: the command its figures are quoted from must work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_hostile_bench_runs_and_every_bomb_gets_413() -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "hostile.py"), "--rounds", "1"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for bomb in ("zstd bomb", "br bomb", "gzip, gzip bomb"):
        line = next(line for line in out.splitlines() if line.strip().startswith(bomb))
        assert re.search(r"\b413\b", line), line
    for start in ("direct: --anthropic-ip", "DNS down, cache present", "DNS down, no cache"):
        assert re.search(rf"{re.escape(start)}\s+\d+\.\d+ s\s+\d+\.\d+x the direct run", out), out
