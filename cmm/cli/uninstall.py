"""``cmm uninstall``: stop cmm, remove its trust entries, profile lines and config dir."""

from __future__ import annotations

import argparse
import sys

from cmm.cli import stop
from cmm.cli.context import EXIT_OK, Context, config_dir, machine_of, say_report
from cmm.config import paths


def run(args: argparse.Namespace, ctx: Context) -> int:
    """Everything cmm set up, in the order that leaves nothing half done: the running instance
    and /etc/hosts first, then trust, and only then the folder holding the CA."""
    from cmm.config import removal
    from cmm.machine import certs, profile_lines, trust

    from cmm.cli import service as unit

    directory = config_dir(args, ctx)
    manager = unit.manager_for(sys.platform, args.unit_dir)
    if manager is not None and manager.path.exists():  # else the service manager would start cmm again
        return ctx.fail(f"cmm runs as a boot service ({manager.path}): remove it first with "
                        f"`sudo cmm service uninstall`; nothing was removed")
    if stop.run(args, ctx) != EXIT_OK:
        return ctx.fail("nothing else was removed")
    machine = machine_of(ctx)
    report = trust.uninstall_trust(certs.certificate_paths(directory).ca_cert, machine)
    say_report(ctx, report)
    if report.failed:
        return ctx.fail(f"{directory} was kept; fix the above and run `cmm uninstall` again")
    try:
        folder = removal.remove_config_dir(paths.user_dir(directory, ctx.environ, create=False))
    except FileNotFoundError:
        folder = removal.RemovedFolder((), (), False)
    except OSError as error:
        return ctx.fail(f"cannot remove {error.filename or directory}: {error.strerror or error}")
    if folder.folder_removed:
        ctx.say(f"Removed {directory} ({len(folder.removed)} files).")
    elif folder.left:
        names = ", ".join(entry.name for entry in folder.left)
        ctx.say(f"Removed cmm's {len(folder.removed)} files from {directory}.")
        ctx.err.write(f"cmm: kept {directory}: it also holds {names}, which cmm did not make\n")
    else:
        ctx.say(f"{directory} does not exist.")
    syntax = profile_lines.syntax_of(machine.shell)
    ctx.say()
    ctx.say(f"cmm is uninstalled. Open a new terminal, or run `{profile_lines.unset_line(syntax)}` in this one.")
    return EXIT_OK

