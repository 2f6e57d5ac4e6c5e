"""bench/failover.py runs against this checkout: the figures quoted from it must come from a run
in which every request went the way it was meant to (the bench checks each answer)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_failover_bench_runs_and_gives_every_figure() -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "failover.py"), "--rounds", "2", "--body-mib", "1"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("Anthropic's 429 alone", "failover: Anthropic's 429, then the target", "added beyond the 429",
                  "a rule in cool-down", "a kept body costs, to Anthropic, MiB", "a kept body costs, to the target, MiB"):
        line = next(line for line in result.stdout.splitlines() if label in line)
        assert re.search(r"[-+]?\d+\.\d+$", line), line
