"""Model families: what a mapping's source should name so that every generation of a model matches.

Claude Code asks for whatever its release calls ``haiku`` today (``claude-haiku-4-5-20251001``,
then ``claude-haiku-5-5``); a mapping whose source names one generation quietly stops matching
at the next. The family, the name before its first number, matches them all.
"""

from __future__ import annotations


def family(model: str) -> str:
    """``claude-haiku-5-5`` and ``claude-haiku-4-5-20251001`` give ``claude-haiku``: the words before
    the first one that starts with a digit (the whole name if it has none, or starts with one)."""
    words = []
    for word in model.split("-"):
        if not word or word[0].isdigit():
            break
        words.append(word)
    return "-".join(words) or model


def same_family(source: str, model: str) -> bool:
    """Whether a mapping's ``source`` and ``model`` name one family (``*`` names none)."""
    return source != "*" and family(source) == family(model)
