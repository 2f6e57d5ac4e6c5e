"""Benchmark only: a cmm whose workers read no token usage, for bench/run.py's usage row.

bench/run.py starts a second cmm with this directory first on ``PYTHONPATH`` and
``CMM_BENCH_USAGE_OFF=1``; every Python process of that cmm (master, workers, recorder) imports
this module at start-up, and once ``cmm.serve.proxy`` is loaded its ``usage_reader`` gives no
reader. cmm itself has no switch for this: reading usage is not optional for its users.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any, Sequence

PATCHED = "cmm.serve.proxy"


class _NoUsage(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loading of ``cmm.serve.proxy`` to patch it once run."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name != PATCHED:
            return None
        sys.meta_path.remove(self)  # the real finders find it; this one is done
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.usage_reader = lambda response: None  # type: ignore[attr-defined]

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("CMM_BENCH_USAGE_OFF") == "1":
    sys.meta_path.insert(0, _NoUsage())
