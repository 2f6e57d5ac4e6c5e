"""Small helpers shared by several test modules."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from cmm.testing.checkout import checkout_env


def process_env(**changes: str | None) -> dict[str, str]:
    """The environment for a subprocess running this checkout's cmm; None removes a variable."""
    env = {**checkout_env(), "PYTHONUNBUFFERED": "1"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def done(coroutine: Any) -> Any:
    """The result of a coroutine whose awaits are all already fired (no reactor needed)."""
    results: list[Any] = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "the coroutine waited on something"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class HeaderLookup:
    """``header``/``header_all`` over a ``headers`` list of (lower-case name, value) pairs."""

    headers: Any

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


# Pieces that make a text file awkward for the in-place line edits (cmm.textfile): every line
# break str.splitlines knows besides "\n", blanks, a comment sign, non-ASCII and a byte that was
# not UTF-8 (surrogate-escaped, as read from such a file). Mixed with each edit's own lines.
AWKWARD_TEXT_PIECES = [" ", "#", "\n", "\r\n", "\r", "\t", "\x0c", "\u2028", "\x1c", "é", "\udcff"]
