"""The settings file ``~/.cmm/.env``: ``KEY=value`` lines, as the tool cmm replaces wrote them.

Users of the Node tool already have this file, and some edit it by hand, so reading is lenient
(comments, blank lines, ``export`` prefixes, quoted values) and editing changes only the line of
the key being set: every other line, comment and line end survives.  The file can hold an API
key, hence mode 0600.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import attrs

from cmm.config import paths, userfiles
from cmm.config.textfile import split_lines
from cmm.config.userfiles import UserDir
from cmm.core.settings import SWITCH_OFF, SWITCH_ON

FILE_NAME = paths.ENV_FILE_NAME
ENV_MODE = 0o600


@attrs.frozen
class Setting:
    """One known key: its default and what it is for (shown by ``cmm config list``)."""

    key: str
    default: str
    description: str
    secret: bool = False


def _validate_url(value: str) -> str | None:
    if any(ch.isspace() for ch in value):
        return "must not contain whitespace"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (reading it raises ValueError on a malformed port)
    except ValueError as error:
        return f"is not a valid URL ({error})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host, e.g. http://localhost:8317/v1/messages"
    return None


def _validate_single_line(value: str) -> str | None:
    if any(ch in value for ch in "\r\n\0"):
        return "must be a single line"
    return None


def _validate_model(value: str) -> str | None:
    if any(ch.isspace() for ch in value):
        return "must not contain whitespace"
    return None


def _validate_switch(value: str) -> str | None:
    if value.strip().lower() not in SWITCH_ON | SWITCH_OFF:
        return "must be true or false"
    return None


SETTINGS: Mapping[str, Setting] = {
    setting.key: setting
    for setting in (
        Setting("PROXY_URL", "http://localhost:8317/v1/messages", "CLIProxyAPI endpoint URL (http or https)"),
        Setting("PROXY_API_KEY", "", "API key for CLIProxyAPI", secret=True),
        Setting("DEFAULT_SOURCE_MODEL", "", "default source model (lets `twistd cmm` run without --source)"),
        Setting("DEFAULT_TARGET_MODEL", "", "default target model"),
        Setting("KEEP_BILLING_LINE", "false",
                "true: targets get the billing line's per-request fields (defeats their prompt cache)"),
    )
}

_VALIDATORS: Mapping[str, Callable[[str], str | None]] = {
    "PROXY_URL": _validate_url,
    "PROXY_API_KEY": _validate_single_line,
    "DEFAULT_SOURCE_MODEL": _validate_model,
    "DEFAULT_TARGET_MODEL": _validate_model,
    "KEEP_BILLING_LINE": _validate_switch,
}

KEYS: tuple[str, ...] = tuple(SETTINGS)


def unknown_key_message(key: str) -> str:
    return f"unknown key {key!r}; valid keys: {', '.join(KEYS)}"


def validate(key: str, value: str) -> str | None:
    """An error message for ``key=value``, or None when it may be stored."""
    if key not in SETTINGS:
        return unknown_key_message(key)
    problem = _VALIDATORS[key](value)
    if problem is None and _format_value(value) is None:
        problem = "cannot contain both ' and \" together with spaces, '#' or quotes at its ends"
    return None if problem is None else f"{key} {problem} (got {value!r})"


# --- parsing ----------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=(.*)")
_QUOTED = re.compile(r"""\s*(['"])(.*?)\1\s*(?:#.*)?""")
_INLINE_COMMENT = re.compile(r"\s#")


def _split_eol(line: str) -> tuple[str, str]:
    for eol in ("\r\n", "\n"):
        if line.endswith(eol):
            return line[: -len(eol)], eol
    return line, ""


def _parse_value(raw: str) -> str:
    quoted = _QUOTED.fullmatch(raw)
    if quoted:
        return quoted.group(2)
    comment = _INLINE_COMMENT.search(raw)
    if comment:
        raw = raw[: comment.start()]
    return raw.strip()


def _assignment(line: str) -> tuple[str, str] | None:
    content, _ = _split_eol(line)
    if content.lstrip().startswith("#"):
        return None
    match = _ASSIGNMENT.fullmatch(content)
    if match is None:
        return None
    return match.group(1), _parse_value(match.group(2))


def parse_env(text: str) -> dict[str, str]:
    """Every ``KEY=value`` in the text (the last one wins); anything else is ignored."""
    values: dict[str, str] = {}
    for line in split_lines(text):
        found = _assignment(line)
        if found is not None:
            values[found[0]] = found[1]
    return values


# --- editing ----------------------------------------------------------------------------------

_BARE = re.compile(r"[^\s'\"#]*")


def _format_value(value: str) -> str | None:
    """The value as written so that :func:`parse_env` reads it back exactly; None if impossible."""
    if _BARE.fullmatch(value):
        return value
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    if value[0] in "'\"" or value[-1] in "'\"" or value[0].isspace() or value[-1].isspace():
        return None
    return None if _INLINE_COMMENT.search(value) else value


def set_value(text: str, key: str, value: str) -> str:
    """Set ``key`` on its existing line (keeping an ``export`` prefix), or append a line."""
    formatted = _format_value(value)
    if formatted is None or any(ch in value for ch in "\r\n"):
        raise ValueError(f"cannot store {value!r} in a .env file")
    lines = split_lines(text)
    out: list[str] = []
    replaced = False
    for line in lines:
        found = _assignment(line)
        if found is None or found[0] != key:
            out.append(line)
            continue
        if replaced:
            continue  # drop duplicates so the file says one thing
        content, eol = _split_eol(line)
        prefix = content[: content.index("=")].rstrip() + "="
        out.append(f"{prefix}{formatted}{eol}")
        replaced = True
    if not replaced:
        eol = "\r\n" if lines and lines[-1].endswith("\r\n") else "\n"
        if out and not out[-1].endswith("\n"):
            out[-1] += eol
        out.append(f"{key}={formatted}{eol}")
    return "".join(out)


def delete_value(text: str, key: str) -> str:
    """Remove every line assigning ``key``; all other lines stay as they are."""
    return "".join(
        line for line in split_lines(text) if (found := _assignment(line)) is None or found[0] != key
    )


# --- the file ---------------------------------------------------------------------------------


def load_text(path: Path) -> str:
    """The file's text, or "" when there is none yet; never read through a symbolic link."""
    try:
        return userfiles.read_file(path).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return ""


def load_from(directory: UserDir, name: str = FILE_NAME) -> str:
    """The text of ``name`` in ``directory``, read as its owner; "" when there is none yet."""
    try:
        return directory.read_bytes(name).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return ""


def save_text(directory: UserDir, text: str, name: str = FILE_NAME) -> None:
    """Replace ``name`` in ``directory`` atomically with mode 0600, as the directory's owner.

    Under sudo the file is thus the user's from the start, and a link planted in its place is
    replaced, never written through.
    """
    directory.write_bytes(name, text.encode("utf-8", "surrogateescape"), ENV_MODE)
