"""``cmm map``: list, add and remove the mappings in ``<config dir>/mappings.toml``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cmm.cli.config import mask
from cmm.cli.context import EXIT_OK, EXIT_USAGE, Context, config_dir, existing_user_dir, user_dir
from cmm.config import envfile
from cmm.config.userfiles import UserDir


def add_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser, parser_class: Callable[..., argparse.ArgumentParser]
) -> None:
    map_ = commands.add_parser("map", parents=[common], help="show or change mappings in <config dir>/mappings.toml")
    actions = map_.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    actions.add_parser("list", parents=[common], help="every mapping with its upstream and (masked) key")
    add = actions.add_parser("add", parents=[common], help="add a mapping, or replace the one with the same source")
    add.add_argument("source", metavar="SOURCE", help="model prefix to intercept, e.g. claude-haiku (every generation of haiku)")
    add.add_argument("target", metavar="TARGET", help="model the upstream is asked for, e.g. gemini-2.5-flash")
    add.add_argument("--url", default=None, metavar="URL", help="upstream for this mapping (default: PROXY_URL)")
    add.add_argument("--api-key", default=None, metavar="KEY", help="key for that upstream (default: PROXY_API_KEY)")
    remove = actions.add_parser("remove", parents=[common], help="remove the mapping with this source")
    remove.add_argument("source", metavar="SOURCE")


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
        rows = [(spec.source, spec.target, url(spec), key(spec)) for spec in specs]
        widths = [max(map(len, column)) for column in zip(*rows)]
        for source, target, upstream, api_key in rows:
            ctx.say(f"{source:<{widths[0]}} → {target:<{widths[1]}}  {upstream:<{widths[2]}}  key {api_key}")
        if pair is not None and all(spec.source != pair[0] for spec in specs):
            ctx.say(f"and from .env (DEFAULT_SOURCE_MODEL/DEFAULT_TARGET_MODEL): {pair[0]} → {pair[1]}")
        return EXIT_OK

    try:
        if args.action == "add":
            spec = mappings.MappingSpec(args.source, args.target, args.url, args.api_key)
            verb = "Replaced" if any(s.source == spec.source for s in specs) else "Added"
            new_specs = mappings.add_mapping(specs, spec)
            message = f"{verb} {spec.source} → {spec.target} via {url(spec)} (key {key(spec)}) in {path}"
            if pair is not None and pair[0] == spec.source:
                message += f"; it replaces the .env pair {pair[0]} → {pair[1]}"
        else:  # remove
            new_specs = mappings.remove_mapping(specs, args.source)
            message = f"Removed the mapping for {args.source} from {path}"
    except mappings.MappingsError as error:
        return ctx.fail(_lines(str(error)), EXIT_USAGE)
    try:
        mappings.save(folder or user_dir(args, ctx), new_specs)
    except OSError as error:
        return ctx.fail(f"cannot write {path}: {error.strerror or error}")
    ctx.say(message)
    ctx.say(mappings.reload_hint(directory))
    return EXIT_OK

