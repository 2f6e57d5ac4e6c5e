"""bench/usage_off: the benchmark's cmm without the usage reader, and only when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "import cmm.serve.proxy as proxy; print(proxy.usage_reader.__module__, proxy.usage_reader(None))"


def reader_in_a_cmm_process(switch: str | None) -> str:
    """Which usage reader a process started as bench/run.py starts its cmms sees, and what it gives."""
    environ = {key: value for key, value in os.environ.items() if key != "CMM_BENCH_USAGE_OFF"}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "usage_off"), str(REPO)])
    if switch is not None:
        environ["CMM_BENCH_USAGE_OFF"] = switch
    code = PROBE if switch == "1" else PROBE.replace(", proxy.usage_reader(None)", "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, cwd="/",
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_switch_takes_the_reader_out() -> None:
    assert reader_in_a_cmm_process("1") == "sitecustomize None"


@pytest.mark.parametrize("switch", [None, "0", ""])
def test_without_the_switch_cmm_reads_usage(switch: str | None) -> None:
    assert reader_in_a_cmm_process(switch) == "cmm.core.usage"
