"""``cmm config``: list, get, set and delete the settings in ``<config dir>/.env``."""

from __future__ import annotations

import argparse

from cmm.cli.context import EXIT_OK, EXIT_USAGE, Context, config_dir, existing_user_dir, user_dir
from cmm.config import envfile, paths


def mask(value: str) -> str:
    return "****" + value[-4:] if len(value) > 4 else "****"


def _shown(key: str, value: str) -> str:
    return mask(value) if envfile.SETTINGS[key].secret and value else value


def _default_text(key: str) -> str:
    return f"(default: {envfile.SETTINGS[key].default or 'empty'})"


def run(args: argparse.Namespace, ctx: Context) -> int:
    key: str | None = getattr(args, "key", None)
    if key is not None and key not in envfile.SETTINGS:
        return ctx.fail(envfile.unknown_key_message(key), EXIT_USAGE)
    folder = existing_user_dir(args, ctx)
    path = paths.env_file(folder.path if folder is not None else config_dir(args, ctx))
    try:
        text = envfile.load_from(folder) if folder is not None else ""
    except PermissionError:
        return ctx.fail(f"permission denied reading {path}")
    except OSError as error:
        return ctx.fail(f"cannot read {path}: {error.strerror or error}")
    values = envfile.parse_env(text)

    if args.action == "list":
        width = max(map(len, envfile.KEYS)) + 2
        for name in envfile.KEYS:
            if name in values:
                shown = _shown(name, values[name]) or "(empty)"
                problem = envfile.validate(name, values[name])
                if problem:
                    shown += f"  (invalid: {problem})"
            else:
                shown = _default_text(name)
            ctx.say(f"{name:<{width}}{shown}")
        return EXIT_OK

    assert key is not None
    if args.action == "get":
        ctx.say(values.get(key, envfile.SETTINGS[key].default))
        return EXIT_OK

    if args.action == "set":
        problem = envfile.validate(key, args.value)
        if problem:
            return ctx.fail(problem, EXIT_USAGE)
        new_text = envfile.set_value(text, key, args.value)
        message = f"Set {key}={_shown(key, args.value)} in {path}"
    else:  # delete
        if key not in values:
            ctx.say(f"{key} is not set in {path} {_default_text(key)}")
            return EXIT_OK
        new_text = envfile.delete_value(text, key)
        message = f"Deleted {key} from {path}; now {_default_text(key)}"
    try:
        envfile.save_text(folder or user_dir(args, ctx), new_text)
    except PermissionError:
        return ctx.fail(f"permission denied writing {path}")
    except OSError as error:
        return ctx.fail(f"cannot write {path}: {error.strerror or error}")
    ctx.say(message)
    return EXIT_OK

