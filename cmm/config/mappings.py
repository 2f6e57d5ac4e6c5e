"""The mappings file ``<config dir>/mappings.toml``: any number of source → target mappings.

Each mapping may name its own upstream URL and API key, so haiku can go to CLIProxyAPI and
sonnet to another Anthropic-compatible server; without them it uses ``PROXY_URL`` and
``PROXY_API_KEY`` from ``.env``.  A mapping with conditions (request class, headers, body size) is
a rule, so one source may appear in several entries; failover keys say what happens when
Anthropic or the target refuses.  The file is re-read on SIGHUP, so every problem in it is found
here, all at once and with the entry it is in, before the running config is replaced.  Reading
and writing are pure (text in, values out); only :func:`load` and :func:`save` touch the disk.
"""

from __future__ import annotations

import difflib
import re
import shlex
import tomllib
from collections.abc import Iterable
from typing import Any
from pathlib import Path

import attrs

from cmm.config import envfile, paths, userfiles
from cmm.core.router import (ANY_MODEL, DEFAULT_FALLBACK_ON, MODES, REQUEST_CLASSES, TARGET_ERROR_ACTIONS,
                             UNREACHABLE, Mapping, Upstream)
from cmm.config.userfiles import UserDir

FILE_NAME = paths.MAPPINGS_FILE_NAME

_KEYS = ("source", "target", "url", "api_key", "request_class", "header", "min_body_bytes", "mode", "fallback_on",
         "on_target_error")
_STRING_KEYS = ("source", "target", "url", "api_key", "mode", "on_target_error")
_REQUIRED = ("source", "target")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name

HEADER = """\
# cmm mappings: requests whose model starts with `source` ("*": any model) go to `url` as `target`.
# Rules with conditions (request_class, header, min_body_bytes) are tried first, in file order;
# the first whose conditions all hold wins. Then the longest matching plain source wins.
# `url` and `api_key` are optional: without them a mapping uses PROXY_URL and PROXY_API_KEY
# from .env (api_key = "" sends no key at all).
# `cmm map add` and `cmm map remove` rewrite this file; other comments are not kept.
# A running cmm re-reads it on `sudo kill -HUP $(cat <config dir>/cmm.pid)`.
#
# [[mapping]]
# source = "claude-haiku"   (a family prefix matches every generation: claude-haiku-5-5, ...)
# target = "gemini-2.5-flash"
# url = "http://localhost:8317/v1/messages"
# api_key = "..."
# request_class = ["subagent", "compaction"]  # main, subagent, workflow, compaction, auxiliary, side_reply
# header = { "x-claude-code-agent-type" = "Explore*" }  # header name = glob
# min_body_bytes = 600000                     # the decoded request body's size
# mode = "always"                             # or "fallback": Anthropic first, the target when it refuses
# fallback_on = [429, 529, 500, 502, 503, 504, "unreachable"]  # with mode = "fallback"
# on_target_error = "error"                   # or "anthropic": a failing target hands the request back
"""


class MappingsError(ValueError):
    """The mappings file (or a change to it) is unusable; one line per problem, each self-contained."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class MappingSpec:
    """One mapping as written in the file; ``None`` url/api_key mean "the .env default", ``None``
    fallback_on the default for ``mode = "fallback"``."""

    source: str
    target: str
    url: str | None = None
    api_key: str | None = None
    request_class: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    min_body_bytes: int | None = None
    mode: str = "always"
    fallback_on: tuple[int | str, ...] | None = None
    on_target_error: str = "error"

    @property
    def conditioned(self) -> bool:
        return bool(self.request_class or self.headers or self.min_body_bytes is not None)

    @property
    def conditions(self) -> tuple[frozenset[str], frozenset[tuple[str, str]], int | None]:
        """What decides whether the rule applies, as compared between entries (order and case
        of header names do not matter)."""
        return (frozenset(self.request_class), frozenset((name.lower(), glob) for name, glob in self.headers),
                self.min_body_bytes)

    @property
    def identity(self) -> tuple[str, tuple[frozenset[str], frozenset[tuple[str, str]], int | None]]:
        """Two entries with the same key would be the same rule: a file holds it once."""
        return self.source, self.conditions


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


def _suggest(value: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _repeated(values: Iterable[object]) -> list[object]:
    seen: list[object] = []
    repeated: list[object] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.append(value)
    return repeated


def _spec_problems(spec: MappingSpec) -> list[str]:
    problems = [
        f"{name} must be a non-empty name without whitespace or control characters, not {value!r}"
        for name, value in (("source", spec.source), ("target", spec.target))
        if not _is_name(value)
    ]
    if spec.target == ANY_MODEL:
        problems.append('target must be a model name; "*" is for source only')
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
    return problems + _rule_problems(spec)


def _rule_problems(spec: MappingSpec) -> list[str]:
    """The conditions and the failover keys: known values, each once, and only where they apply."""
    problems = [f"request_class: {value!r} is not a request class{_suggest(value, REQUEST_CLASSES)}; "
                f"use {', '.join(REQUEST_CLASSES)}" for value in spec.request_class if value not in REQUEST_CLASSES]
    problems += [f"request_class names {value!r} twice" for value in _repeated(spec.request_class)]
    for name, glob in spec.headers:
        if not _TOKEN.fullmatch(name):
            problems.append(f"header: {name!r} is not a header name (letters, digits and -, no spaces)")
        if not glob or not glob.isprintable():
            problems.append(f"header {name}: the glob must be non-empty printable text, not {glob!r}")
    problems += [f"header names {name!r} twice" for name in _repeated(n.lower() for n, _ in spec.headers)]
    if spec.min_body_bytes is not None and (type(spec.min_body_bytes) is not int or spec.min_body_bytes < 1):
        problems.append(f"min_body_bytes must be a positive number of bytes, not {spec.min_body_bytes!r}")
    if spec.mode not in MODES:
        problems.append(f"mode must be one of {', '.join(map(repr, MODES))}, not {spec.mode!r}"
                        f"{_suggest(spec.mode, MODES)}")
    if spec.on_target_error not in TARGET_ERROR_ACTIONS:
        problems.append(f"on_target_error must be one of {', '.join(map(repr, TARGET_ERROR_ACTIONS))}, "
                        f"not {spec.on_target_error!r}{_suggest(spec.on_target_error, TARGET_ERROR_ACTIONS)}")
    if spec.mode == "fallback" and spec.on_target_error == "anthropic":
        problems.append('on_target_error = "anthropic" does not go with mode = "fallback": there the target '
                        'answers only when Anthropic has refused already')
    if spec.fallback_on is not None:
        if spec.mode != "fallback":
            problems.append('fallback_on applies only with mode = "fallback"')
        if not spec.fallback_on:
            problems.append('fallback_on is empty; leave it out for the default '
                            f'{_fallback_text(DEFAULT_FALLBACK_ON)}')
        problems += [f"fallback_on: {value!r} is neither a status from 400 to 599 nor {UNREACHABLE!r}"
                     for value in spec.fallback_on if not _is_fallback_cause(value)]
        problems += [f"fallback_on names {value!r} twice" for value in _repeated(spec.fallback_on)]
    return problems


def _is_fallback_cause(value: object) -> bool:
    return value == UNREACHABLE or type(value) is int and 400 <= value <= 599


def _fallback_text(values: Iterable[int | str]) -> str:
    return "[" + ", ".join(toml_string(v) if isinstance(v, str) else str(v) for v in values) + "]"


def _label(index: int, source: object) -> str:
    return f"mapping #{index}" + (f" (source {source!r})" if isinstance(source, str) else "")


def _all_problems(specs: Iterable[tuple[int, MappingSpec]], origin: str) -> list[str]:
    """Problems of each (number, spec) and of the set: a source repeats only with other conditions."""
    problems = []
    first_with: dict[object, int] = {}
    for index, spec in specs:
        label = f"{origin}: {_label(index, spec.source)}"
        problems += [f"{label}: {problem}" for problem in _spec_problems(spec)]
        if spec.identity in first_with:
            same = "source and conditions" if spec.conditioned else "source"
            problems.append(f"{label}: the same {same} as mapping #{first_with[spec.identity]}; keep one of them")
        first_with.setdefault(spec.identity, index)
    return problems


def check(specs: Iterable[MappingSpec], origin: str = FILE_NAME) -> tuple[MappingSpec, ...]:
    """The specs, if every one is usable and no rule repeats; else MappingsError naming all problems."""
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


def _key_type_problems(key: str, value: object) -> list[str]:
    """What keeps a key's TOML value from being of the kind the key takes (values are checked later)."""
    if key in _STRING_KEYS:
        return [] if isinstance(value, str) else [f"{key} must be a string, not {_type_name(value)}"]
    if key == "request_class":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return [f'request_class must be an array of strings such as ["subagent"], not {_type_name(value)}'
                    + ("" if not isinstance(value, list) else " with other values")]
        return [] if value else [f"request_class is empty; leave it out to match every class, or name some of "
                                 f"{', '.join(REQUEST_CLASSES)}"]
    if key == "header":
        if not isinstance(value, dict):
            return [f'header must be a table of header name = "glob", such as {{ "x-claude-code-agent-type" = '
                    f'"Explore*" }}, not {_type_name(value)}']
        problems = [f"header {name}: the glob must be a string, not {_type_name(glob)}"
                    for name, glob in value.items() if not isinstance(glob, str)]
        return problems if value else ["header is empty; leave it out, or name header = glob pairs"]
    if key == "min_body_bytes":
        if type(value) is not int:
            return [f"min_body_bytes must be an integer (bytes), not {_type_name(value)}"]
        return []
    if key == "fallback_on":
        if not isinstance(value, list):
            return [f'fallback_on must be an array of statuses and "unreachable", not {_type_name(value)}']
        return [f"fallback_on: {_type_name(v)} {v!r} is neither a status nor {UNREACHABLE!r}"
                for v in value if not isinstance(v, str) and type(v) is not int]
    return []


def _entry(index: int, entry: object, origin: str) -> tuple[MappingSpec | None, list[str]]:
    """The spec in one ``[[mapping]]`` table, or the shape problems that keep it from being one."""
    if not isinstance(entry, dict):
        return None, [f"{origin}: mapping #{index} must be a table ([[mapping]]), not {_type_name(entry)}"]
    label = f"{origin}: {_label(index, entry.get('source'))}"
    problems = [f"{label}: {_unknown_key(key)}" for key in entry if key not in _KEYS]
    problems += [f"{label}: {key} is missing" for key in _REQUIRED if key not in entry]
    badly_typed = {key for key, value in entry.items() if key in _KEYS and _key_type_problems(key, value)}
    problems += [f"{label}: {problem}" for key, value in entry.items() if key in badly_typed
                 for problem in _key_type_problems(key, value)]
    if not problems:
        return _spec(entry), []
    # Still check the values of the well-typed keys, so that every problem shows at once.
    usable = {key: value for key, value in entry.items() if key in _KEYS and key not in badly_typed}
    if "source" in usable and "target" in usable:
        problems += [f"{label}: {problem}" for problem in _spec_problems(_spec(usable))]
    return None, problems


def _spec(entry: dict[str, Any]) -> MappingSpec:
    """The spec of an entry whose keys are all known and of the right TOML type."""
    fallback_on = entry.get("fallback_on")
    return MappingSpec(
        entry["source"], entry["target"], entry.get("url"), entry.get("api_key"),
        request_class=tuple(entry.get("request_class", ())),
        headers=tuple(entry.get("header", {}).items()),
        min_body_bytes=entry.get("min_body_bytes"),
        mode=entry.get("mode", "always"),
        fallback_on=None if fallback_on is None else tuple(fallback_on),
        on_target_error=entry.get("on_target_error", "error"),
    )


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


def _spec_lines(spec: MappingSpec) -> list[str]:
    lines = ["[[mapping]]"]
    for key in ("source", "target", "url", "api_key"):
        value = getattr(spec, key)
        if value is not None:
            lines.append(f"{key} = {toml_string(value)}")
    if spec.request_class:
        lines.append(f"request_class = [{', '.join(map(toml_string, spec.request_class))}]")
    if spec.headers:
        pairs = ", ".join(f"{toml_string(name)} = {toml_string(glob)}" for name, glob in spec.headers)
        lines.append(f"header = {{ {pairs} }}")
    if spec.min_body_bytes is not None:
        lines.append(f"min_body_bytes = {spec.min_body_bytes}")
    if spec.mode != "always":
        lines.append(f"mode = {toml_string(spec.mode)}")
    if spec.fallback_on is not None:
        lines.append(f"fallback_on = {_fallback_text(spec.fallback_on)}")
    if spec.on_target_error != "error":
        lines.append(f"on_target_error = {toml_string(spec.on_target_error)}")
    return lines


def format_mappings(specs: Iterable[MappingSpec]) -> str:
    """The file's text: the documenting header, then one ``[[mapping]]`` table per spec.

    Refuses (MappingsError) what :func:`parse_mappings` would refuse, so a saved file always loads.
    """
    return "\n".join([HEADER, *("\n".join(_spec_lines(spec)) + "\n" for spec in check(specs))])


# --- editing ----------------------------------------------------------------------------------


def add_mapping(specs: Iterable[MappingSpec], spec: MappingSpec) -> tuple[MappingSpec, ...]:
    """``spec`` in place of the entry with its source and conditions, else appended; MappingsError
    if it is unusable."""
    problems = _spec_problems(spec)
    if problems:
        raise MappingsError(*problems)
    specs = tuple(specs)
    if any(s.identity == spec.identity for s in specs):
        return tuple(spec if s.identity == spec.identity else s for s in specs)
    return (*specs, spec)


def remove_mapping(specs: Iterable[MappingSpec], source: str | None, number: int | None = None
                   ) -> tuple[MappingSpec, ...]:
    """Everything but the entry with ``source`` or the ``number``-th (from 1, as ``cmm map list``
    shows); MappingsError saying what there is when that does not name exactly one entry."""
    specs = tuple(specs)
    if number is not None:
        if not 1 <= number <= len(specs):
            raise MappingsError(f"no mapping #{number}: there are {len(specs)} (see `cmm map list`)")
        if source is not None and specs[number - 1].source != source:
            raise MappingsError(f"mapping #{number} has source {specs[number - 1].source!r}, not {source!r}")
        return specs[:number - 1] + specs[number:]
    numbers = [index for index, spec in enumerate(specs, 1) if spec.source == source]
    if not numbers:
        known = ", ".join(repr(s.source) for s in specs) or "none"
        raise MappingsError(f"no mapping with source {source!r} (sources: {known})")
    if len(numbers) > 1:
        listed = ", ".join(f"#{n}" for n in numbers)
        raise MappingsError(f"{len(numbers)} mappings have source {source!r} ({listed}); say which with "
                            f"`cmm map remove {shlex.quote(str(source))} --number N` (numbers as `cmm map list` "
                            f"shows them)")
    return specs[:numbers[0] - 1] + specs[numbers[0]:]


def to_router_mappings(
    specs: Iterable[MappingSpec], default_url: str, default_api_key: str = ""
) -> tuple[Mapping, ...]:
    """Router mappings, with the .env defaults (PROXY_URL, PROXY_API_KEY) where a spec has none.

    ValueError (from :meth:`Upstream.from_url`) when a spec relies on an unusable ``default_url``.
    """
    return tuple(
        router_mapping(spec, Upstream.from_url(spec.url if spec.url is not None else default_url,
                                               spec.api_key if spec.api_key is not None else default_api_key))
        for spec in specs
    )


def router_mapping(spec: MappingSpec, upstream: Upstream) -> Mapping:
    """The router's value for a spec, its fallback statuses defaulted for ``mode = "fallback"``."""
    fallback_on = spec.fallback_on if spec.fallback_on is not None else (
        DEFAULT_FALLBACK_ON if spec.mode == "fallback" else ())
    return Mapping(spec.source, spec.target, upstream, mode=spec.mode, fallback_on=fallback_on,
                   on_target_error=spec.on_target_error, request_class=spec.request_class, headers=spec.headers,
                   min_body_bytes=spec.min_body_bytes)


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
