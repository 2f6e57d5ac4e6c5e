"""Run ``twistd cmm`` from a source checkout (tests, benchmark).

What is measured or tested must be the code in this tree, not an older installed copy: the
command puts the checkout first on ``sys.path`` (and so its ``twisted/plugins/cmm_plugin.py``
first among Twisted's plugins, see :mod:`cmm.daemon.launch`) and prints which ``cmm`` package it
imported, so a caller can prove it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from cmm.daemon.launch import TWISTD_CODE

REPO = Path(__file__).resolve().parents[2]
ANNOUNCE = "cmm package:"
_RUN_TWISTD = f"import cmm; print({ANNOUNCE!r}, cmm.__file__, flush=True); {TWISTD_CODE}"


def twistd_command(cmm_args: list[str], python: str = sys.executable) -> list[str]:
    """``twistd -n cmm ARGS`` in the foreground, without a pid file."""
    return [python, "-c", _RUN_TWISTD, "-n", "--pidfile=", "cmm", *cmm_args]


def checkout_env(base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """An environment whose Python imports cmm from this checkout first."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH", "")]))
    return env
