"""The packages' walls, read from the source: every import (function-level ones too) of every
module under cmm/ is checked against what its package may import.

- ``cmm.core`` is pure: no Twisted, pyOpenSSL, treq or zope, and no other cmm package;
- ``cmm.serve`` (what a worker imports) reaches neither ``machine``, ``cli``, ``daemon`` nor
  ``testing``;
- ``cmm.usage`` (the store and its queries) is plain Python and sqlite3, used by the recorder,
  ``cmm usage`` and the dashboard alike;
- ``cmm.dashboard`` serves from the store and the control socket, never the serving stack;
- no product package imports ``cmm.testing``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CMM = Path(__file__).resolve().parents[1] / "cmm"

#: package -> top-level names (or cmm subpackages, as "cmm.x") it must not import
FORBIDDEN = {
    "core": ("twisted", "OpenSSL", "treq", "zope", "cmm.serve", "cmm.daemon", "cmm.config", "cmm.machine", "cmm.cli",
             "cmm.testing"),
    "serve": ("cmm.machine", "cmm.cli", "cmm.daemon", "cmm.testing"),
    "daemon": ("cmm.cli", "cmm.testing"),
    "config": ("cmm.testing",),
    "machine": ("cmm.testing",),
    "cli": ("cmm.testing",),
    "usage": ("twisted", "OpenSSL", "treq", "cmm.serve", "cmm.daemon", "cmm.machine", "cmm.cli", "cmm.testing"),
    "dashboard": ("cmm.serve", "cmm.daemon", "cmm.machine", "cmm.cli", "cmm.testing"),
}


def imported_names(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``; relative ones made absolute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            # ``from cmm import serve`` imports cmm.serve: name each imported thing under its base
            found += [(node.lineno, f"{base}.{alias.name}" if base == "cmm" else base) for alias in node.names]
    return found


def violations(package: str, module: str, source: str) -> list[str]:
    """What in ``source`` (module ``module`` of package ``package``) crosses a wall."""
    banned = FORBIDDEN.get(package, ())
    return [f"{module}:{line} imports {name}" for line, name in imported_names(source, module)
            if any(name == wall or name.startswith(wall + ".") for wall in banned)]


def product_modules() -> list[tuple[str, str, Path]]:
    modules = []
    for path in sorted(CMM.rglob("*.py")):
        parts = path.relative_to(CMM.parent).with_suffix("").parts
        if len(parts) > 2:  # cmm/<package>/<module>.py
            modules.append((parts[1], ".".join(p for p in parts if p != "__init__"), path))
    return modules


def test_every_package_is_checked() -> None:
    packages = {package for package, _, _ in product_modules()}
    assert packages <= {*FORBIDDEN, "testing"}, packages


def test_the_walls_hold() -> None:
    found = [v for package, module, path in product_modules() for v in violations(package, module, path.read_text())]
    assert found == []


@pytest.mark.parametrize("package, source, culprit", [
    ("core", "import twisted.internet\n", "twisted.internet"),
    ("core", "def f():\n    from OpenSSL import SSL\n", "OpenSSL"),
    ("core", "from cmm.serve.proxy import ProxyFactory\n", "cmm.serve.proxy"),
    ("core", "from cmm import config\n", "cmm.config"),
    ("core", "from ..machine import certs\n", "cmm.machine"),
    ("serve", "from cmm.machine import trust\n", "cmm.machine"),
    ("serve", "if True:\n    import cmm.cli.main\n", "cmm.cli.main"),
    ("serve", "from cmm.daemon.wire import encode\n", "cmm.daemon.wire"),
    ("cli", "from cmm.testing.fakes import main\n", "cmm.testing.fakes"),
    ("daemon", "from cmm import testing\n", "cmm.testing"),
])
def test_a_module_crossing_a_wall_is_caught(package: str, source: str, culprit: str) -> None:
    found = violations(package, f"cmm.{package}.fake", source)
    assert len(found) == 1 and found[0].endswith(f"imports {culprit}"), found


@pytest.mark.parametrize("package, source", [
    ("core", "import json\nimport attrs\nfrom cmm.core.errors import HttpError\nfrom . import framing\n"),
    ("serve", "from twisted.internet import defer\nfrom cmm.core import values\nfrom cmm.config import paths\n"),
    ("testing", "from cmm.machine import certs\nfrom cmm.testing import checkout\n"),
])
def test_what_a_package_may_import_passes(package: str, source: str) -> None:
    assert violations(package, f"cmm.{package}.fake", source) == []
