"""``cmm map``: list, add and remove the mappings in ``<config dir>/mappings.toml``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from cmm.cli.config import mask
from cmm.cli.context import EXIT_OK, EXIT_USAGE, Context, config_dir, existing_user_dir, user_dir
from cmm.config import envfile
from cmm.config.userfiles import UserDir
from cmm.core.router import DEFAULT_FALLBACK_ON, MODES, REQUEST_CLASSES, TARGET_ERROR_ACTIONS

if TYPE_CHECKING:
    from cmm.config.mappings import MappingSpec


def add_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser, parser_class: Callable[..., argparse.ArgumentParser]
) -> None:
    map_ = commands.add_parser("map", parents=[common], help="show or change mappings in <config dir>/mappings.toml")
    actions = map_.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    actions.add_parser("list", parents=[common], help="every mapping with its upstream and (masked) key")
    add = actions.add_parser("add", parents=[common],
                             help="add a mapping, or replace the one with the same source and conditions")
    add.add_argument("source", metavar="SOURCE",
                     help='model prefix to intercept, e.g. claude-haiku (every generation of haiku), or "*" for any')
    add.add_argument("target", metavar="TARGET", help="model the upstream is asked for, e.g. gemini-2.5-flash")
    add.add_argument("--url", default=None, metavar="URL", help="upstream for this mapping (default: PROXY_URL)")
    add.add_argument("--api-key", default=None, metavar="KEY", help="key for that upstream (default: PROXY_API_KEY)")
    add.add_argument("--request-class", action="append", default=[], metavar="CLASS",
                     help=f"only requests of this class ({', '.join(REQUEST_CLASSES)}); may be repeated")
    add.add_argument("--header", action="append", default=[], metavar="NAME=GLOB",
                     help="only requests whose header NAME matches GLOB; may be repeated")
    add.add_argument("--min-body-bytes", type=int, default=None, metavar="N",
                     help="only requests whose decoded body has at least N bytes")
    add.add_argument("--mode", choices=MODES, default="always",
                     help="always (default), or fallback: Anthropic first, the target when it refuses")
    add.add_argument("--fallback-on", default=None, metavar="LIST",
                     help='with --mode fallback: statuses and "unreachable", e.g. 429,529,unreachable '
                          f'(default {",".join(map(str, DEFAULT_FALLBACK_ON))})')
    add.add_argument("--on-target-error", choices=TARGET_ERROR_ACTIONS, default="error",
                     help="error (default), or anthropic: a failing target hands the request to Anthropic")
    remove = actions.add_parser("remove", parents=[common],
                                help="remove the mapping with this source (or number, as list shows it)")
    remove.add_argument("source", metavar="SOURCE", nargs="?", default=None)
    remove.add_argument("--number", type=int, default=None, metavar="N",
                        help="the mapping's number in `cmm map list`, when several share a source")


def _env_pair(folder: UserDir | None) -> tuple[str, str] | None:
    """The .env DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL pair, which applies next to the mappings
    file unless the file maps the same source; None when unset or unreadable."""
    if folder is None:
        return None
    try:
        values = envfile.parse_env(envfile.load_from(folder))
    except OSError:
        return None
    source, target = values.get("DEFAULT_SOURCE_MODEL", ""), values.get("DEFAULT_TARGET_MODEL", "")
    return (source, target) if source and target else None


def _lines(message: str) -> str:
    """Each line of a multi-problem message gets the ``cmm:`` prefix, as a single one would."""
    return message.replace("\n", "\ncmm: ")


def _rule_text(spec: MappingSpec) -> str:
    """The conditions and failover keys of a mapping, in words (empty for a plain one)."""
    parts = []
    if spec.request_class:
        parts.append("when request class is " + " or ".join(spec.request_class))
    parts += [f"when header {name} matches {glob}" for name, glob in spec.headers]
    if spec.min_body_bytes is not None:
        parts.append(f"when the body has ≥ {spec.min_body_bytes} bytes")
    if spec.mode == "fallback":
        causes = spec.fallback_on if spec.fallback_on is not None else DEFAULT_FALLBACK_ON
        parts.append(f"only when Anthropic answers {', '.join(map(str, causes))}")
    if spec.on_target_error == "anthropic":
        parts.append("Anthropic answers when the target fails")
    return "; ".join(parts)


def _spec_from(args: argparse.Namespace) -> MappingSpec:
    """The spec the ``add`` flags describe; MappingsError for a flag that cannot be read."""
    from cmm.config.mappings import MappingsError, MappingSpec

    problems, headers = [], []
    for item in args.header:
        name, equals, glob = item.partition("=")
        if not equals:
            problems.append(f"--header must be NAME=GLOB, e.g. x-claude-code-agent-type=Explore*, not {item!r}")
        headers.append((name.strip(), glob))
    fallback_on: tuple[int | str, ...] | None = None
    if args.fallback_on is not None:
        fallback_on = tuple(int(part) if part.strip().isdigit() else part.strip()
                            for part in args.fallback_on.split(","))
    if problems:
        raise MappingsError(*problems)
    return MappingSpec(args.source, args.target, args.url, args.api_key, request_class=tuple(args.request_class),
                       headers=tuple(headers), min_body_bytes=args.min_body_bytes, mode=args.mode,
                       fallback_on=fallback_on, on_target_error=args.on_target_error)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from cmm.config import mappings  # imported here: the other commands do not need it

    folder = existing_user_dir(args, ctx)
    directory = folder.path if folder is not None else config_dir(args, ctx)
    path = mappings.mappings_file(directory)
    try:
        specs = mappings.load_from(folder) if folder is not None else ()
    except mappings.MappingsError as error:
        return ctx.fail(_lines(f"{error}\nfix {path} by hand; it was left unchanged"), EXIT_USAGE)
    except OSError as error:
        return ctx.fail(f"cannot read {path}: {error.strerror or error}")

    def url(spec: mappings.MappingSpec) -> str:
        return spec.url or "(PROXY_URL)"

    def key(spec: mappings.MappingSpec) -> str:
        return "(PROXY_API_KEY)" if spec.api_key is None else mask(spec.api_key) if spec.api_key else "(no key)"

    pair = _env_pair(folder)
    if args.action == "list":
        if not specs:
            ctx.say(f"No mappings in {path}; add one with `cmm map add SOURCE TARGET`.")
        rows = [(f"#{n}", spec.source, spec.target, url(spec), key(spec), _rule_text(spec))
                for n, spec in enumerate(specs, 1)]
        widths = [max(map(len, column)) for column in zip(*rows)]
        for number, source, target, upstream, api_key, rule in rows:
            line = (f"{number:<{widths[0]}} {source:<{widths[1]}} → {target:<{widths[2]}}  "
                    f"{upstream:<{widths[3]}}  key {api_key}")
            ctx.say(f"{line:<{sum(widths[:5]) + 14}}  {rule}" if rule else line)
        if pair is not None and all(spec.source != pair[0] or spec.conditioned for spec in specs):
            ctx.say(f"and from .env (DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL): {pair[0]} → {pair[1]}")
        return EXIT_OK

    try:
        if args.action == "add":
            spec = _spec_from(args)
            verb = "Replaced" if any(s.identity == spec.identity for s in specs) else "Added"
            new_specs = mappings.add_mapping(specs, spec)
            rule = _rule_text(spec)
            message = (f"{verb} {spec.source} → {spec.target} via {url(spec)} (key {key(spec)})"
                       f"{f' ({rule})' if rule else ''} in {path}")
            if pair is not None and pair[0] == spec.source and not spec.conditioned:
                message += f"; it replaces the .env pair {pair[0]} → {pair[1]}"
        else:  # remove
            if args.source is None and args.number is None:
                raise mappings.MappingsError("say which mapping to remove: its SOURCE, or --number N "
                                             "(as `cmm map list` numbers them)")
            new_specs = mappings.remove_mapping(specs, args.source, args.number)
            gone = next(s for s in specs if s not in new_specs)
            message = f"Removed the mapping for {gone.source} from {path}"
    except mappings.MappingsError as error:
        return ctx.fail(_lines(str(error)), EXIT_USAGE)
    try:
        mappings.save(folder or user_dir(args, ctx), new_specs)
    except OSError as error:
        return ctx.fail(f"cannot write {path}: {error.strerror or error}")
    ctx.say(message)
    ctx.say(mappings.reload_hint(directory))
    return EXIT_OK

