"""The mappings file ``<config dir>/mappings.toml``: any number of source → target mappings.

Each mapping may name its own upstream URL and API key, so haiku can go to CLIProxyAPI and
sonnet to another Anthropic-compatible server; without them it uses ``PROXY_URL`` and
``PROXY_API_KEY`` from ``.env``.  The file is re-read on SIGHUP, so every problem in it is found
here, all at once and with the entry it is in, before the running config is replaced.  Reading
and writing are pure (text in, values out); only :func:`load` and :func:`save` touch the disk.
"""

from __future__ import annotations

import difflib
import shlex
import tomllib
from collections.abc import Iterable
from pathlib import Path

import attrs

from cmm.config import envfile, paths, userfiles
from cmm.core.router import Mapping, Upstream
from cmm.config.userfiles import UserDir

FILE_NAME = paths.MAPPINGS_FILE_NAME

_KEYS = ("source", "target", "url", "api_key")
_REQUIRED = ("source", "target")

HEADER = """\
# cmm mappings: requests whose model starts with `source` go to `url` as `target`.
# The longest matching source wins. `url` and `api_key` are optional: without them a mapping
# uses PROXY_URL and PROXY_API_KEY from .env (api_key = "" sends no key at all).
# `cmm map add` and `cmm map remove` rewrite this file; other comments are not kept.
# A running cmm re-reads it on `sudo kill -HUP $(cat <config dir>/cmm.pid)`.
#
# [[mapping]]
# source = "claude-haiku"   (a family prefix matches every generation: claude-haiku-5-5, ...)
# target = "gemini-2.5-flash"
# url = "http://localhost:8317/v1/messages"
# api_key = "..."
"""


class MappingsError(ValueError):
    """The mappings file (or a change to it) is unusable; one line per problem, each self-contained."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class MappingSpec:
    """One mapping as written in the file; ``None`` url/api_key mean "the .env default"."""

    source: str
    target: str
    url: str | None = None
    api_key: str | None = None


def mappings_file(config_dir: Path) -> Path:
    return Path(config_dir) / FILE_NAME


def reload_hint(config_dir: Path) -> str:
    """What to run so that a running cmm uses the edited file (it re-reads it on SIGHUP)."""
    pid_file = shlex.quote(str(paths.pid_file(Path(config_dir))))
    return f"A running cmm picks this up on `sudo kill -HUP $(cat {pid_file})`."


# --- checking ---------------------------------------------------------------------------------


def _is_name(value: str) -> bool:
    """Printable, no whitespace: names and URLs end up in request heads and log lines."""
    return bool(value) and value.isprintable() and not any(ch.isspace() for ch in value)


def _spec_problems(spec: MappingSpec) -> list[str]:
    problems = [
        f"{name} must be a non-empty name without whitespace or control characters, not {value!r}"
        for name, value in (("source", spec.source), ("target", spec.target))
        if not _is_name(value)
    ]
    if spec.url is not None:
        if not _is_name(spec.url):
            problems.append(f"url must not contain whitespace or control characters, not {spec.url!r}")
        else:
            try:
                Upstream.from_url(spec.url)
            except ValueError as error:
                problems.append(f"url is not usable: {error}")
    if spec.api_key and not _is_name(spec.api_key):
        # The key goes into an Authorization header: a line break would inject headers.
        problems.append("api_key must not contain whitespace or control characters")
    return problems


def _label(index: int, source: object) -> str:
    return f"mapping #{index}" + (f" (source {source!r})" if isinstance(source, str) else "")


def _all_problems(specs: Iterable[tuple[int, MappingSpec]], origin: str) -> list[str]:
    """Problems of each (number, spec) and of the set: a source may appear only once."""
    problems = []
    first_with: dict[str, int] = {}
    for index, spec in specs:
        label = f"{origin}: {_label(index, spec.source)}"
        problems += [f"{label}: {problem}" for problem in _spec_problems(spec)]
        if spec.source in first_with:
            problems.append(f"{label}: the same source as mapping #{first_with[spec.source]}; keep one of them")
        first_with.setdefault(spec.source, index)
    return problems


def check(specs: Iterable[MappingSpec], origin: str = FILE_NAME) -> tuple[MappingSpec, ...]:
    """The specs, if every one is usable and no source repeats; else MappingsError naming all problems."""
    specs = tuple(specs)
    problems = _all_problems(enumerate(specs, 1), origin)
    if problems:
        raise MappingsError(*problems)
    return specs


# --- reading ----------------------------------------------------------------------------------


_TOML_TYPES = {
    str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array", dict: "a table"
}


def _type_name(value: object) -> str:
    return next((name for kind, name in _TOML_TYPES.items() if isinstance(value, kind)), "a date/time")


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, _KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; valid keys: {', '.join(_KEYS)}"


def _entry(index: int, entry: object, origin: str) -> tuple[MappingSpec | None, list[str]]:
    """The spec in one ``[[mapping]]`` table, or the shape problems that keep it from being one."""
    if not isinstance(entry, dict):
        return None, [f"{origin}: mapping #{index} must be a table ([[mapping]]), not {_type_name(entry)}"]
    label = f"{origin}: {_label(index, entry.get('source'))}"
    problems = [f"{label}: {_unknown_key(key)}" for key in entry if key not in _KEYS]
    problems += [f"{label}: {key} is missing" for key in _REQUIRED if key not in entry]
    problems += [
        f"{label}: {key} must be a string, not {_type_name(value)}"
        for key, value in entry.items()
        if key in _KEYS and not isinstance(value, str)
    ]
    if problems:
        return None, problems
    return MappingSpec(entry["source"], entry["target"], entry.get("url"), entry.get("api_key")), []


def parse_mappings(text: str, origin: str = FILE_NAME) -> tuple[MappingSpec, ...]:
    """Every mapping in the file's text; MappingsError listing every problem, prefixed by ``origin``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise MappingsError(f"{origin}: not valid TOML: {error}") from None
    problems = [
        f"{origin}: unknown top-level key {key!r}; the file holds only [[mapping]] entries"
        for key in document
        if key != "mapping"
    ]
    entries = document.get("mapping", [])
    if isinstance(entries, dict):
        problems.append(f"{origin}: write [[mapping]] (two brackets) for each mapping, not [mapping]")
        entries = []
    elif not isinstance(entries, list):
        problems.append(f"{origin}: mapping must be [[mapping]] tables, not {_type_name(entries)}")
        entries = []
    numbered = []
    for index, entry in enumerate(entries, 1):
        spec, entry_problems = _entry(index, entry, origin)
        problems += entry_problems
        if spec is not None:
            numbered.append((index, spec))
    problems += _all_problems(numbered, origin)
    if problems:
        raise MappingsError(*problems)
    return tuple(spec for _, spec in numbered)


# --- writing ----------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string holding exactly ``value`` (tomllib has no writer)."""
    return '"' + "".join(
        _ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ch < " " or ch == "\x7f" else ch) for ch in value
    ) + '"'


def format_mappings(specs: Iterable[MappingSpec]) -> str:
    """The file's text: the documenting header, then one ``[[mapping]]`` table per spec.

    Refuses (MappingsError) what :func:`parse_mappings` would refuse, so a saved file always loads.
    """
    parts = [HEADER]
    for spec in check(specs):
        lines = ["[[mapping]]"]
        for key in _KEYS:
            value = getattr(spec, key)
            if value is not None:
                lines.append(f"{key} = {toml_string(value)}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


# --- editing ----------------------------------------------------------------------------------


def add_mapping(specs: Iterable[MappingSpec], spec: MappingSpec) -> tuple[MappingSpec, ...]:
    """``spec`` in place of the entry with its source, else appended; MappingsError if it is unusable."""
    problems = _spec_problems(spec)
    if problems:
        raise MappingsError(*problems)
    specs = tuple(specs)
    if any(s.source == spec.source for s in specs):
        return tuple(spec if s.source == spec.source else s for s in specs)
    return (*specs, spec)


def remove_mapping(specs: Iterable[MappingSpec], source: str) -> tuple[MappingSpec, ...]:
    """Everything but the entry with ``source``; MappingsError (naming the sources there are) if absent."""
    specs = tuple(specs)
    kept = tuple(s for s in specs if s.source != source)
    if len(kept) == len(specs):
        known = ", ".join(repr(s.source) for s in specs) or "none"
        raise MappingsError(f"no mapping with source {source!r} (sources: {known})")
    return kept


def to_router_mappings(
    specs: Iterable[MappingSpec], default_url: str, default_api_key: str = ""
) -> tuple[Mapping, ...]:
    """Router mappings, with the .env defaults (PROXY_URL, PROXY_API_KEY) where a spec has none.

    ValueError (from :meth:`Upstream.from_url`) when a spec relies on an unusable ``default_url``.
    """
    return tuple(
        Mapping(
            spec.source,
            spec.target,
            Upstream.from_url(
                spec.url if spec.url is not None else default_url,
                spec.api_key if spec.api_key is not None else default_api_key,
            ),
        )
        for spec in specs
    )


# --- the file ---------------------------------------------------------------------------------


def load(path: Path) -> tuple[MappingSpec, ...]:
    """The mappings in ``path``; () when there is no file; MappingsError when it is unusable.

    OSErrors other than a missing file (e.g. PermissionError) reach the caller unchanged. A
    symbolic link is not followed.
    """
    try:
        data = userfiles.read_file(Path(path))
    except FileNotFoundError:
        return ()
    return _decode(data, Path(path))


def load_from(directory: UserDir) -> tuple[MappingSpec, ...]:
    """As :func:`load` for the mappings file in ``directory``, read as the directory's owner."""
    try:
        data = directory.read_bytes(FILE_NAME)
    except FileNotFoundError:
        return ()
    return _decode(data, directory.file(FILE_NAME))


def _decode(data: bytes, path: Path) -> tuple[MappingSpec, ...]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MappingsError(f"{path}: not UTF-8 text (byte {error.start})") from None
    return parse_mappings(text, str(path))


def save(directory: UserDir, specs: Iterable[MappingSpec]) -> None:
    """Replace the mappings file in ``directory`` atomically with mode 0600 (entries may hold API
    keys), as the directory's owner; nothing is written when the specs are unusable."""
    envfile.save_text(directory, format_mappings(specs), FILE_NAME)
