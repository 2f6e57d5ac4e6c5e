"""``cmm setup``: the local CA and server certificate, and trust for them (profiles, system store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmm.cli.context import EXIT_FAILURE, EXIT_OK, Context, config_dir, machine_of, say_report, user_dir
from cmm.machine import hosts

EXAMPLE_SOURCE = "claude-haiku"  # Claude Code renames its models each generation; the family stays


def _shell_line(shell: str, ca_cert: Path) -> tuple[str, str]:
    """The NODE_EXTRA_CA_CERTS line for the user's shell and the profile it belongs in."""
    from cmm.machine import profile_lines, profiles

    line = profile_lines.export_line(profile_lines.syntax_of(shell), ca_cert)
    return line, str(profiles.default_profile(Path("~"), shell).path)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from cmm.machine import certs, trust  # imported here: only setup and uninstall need cryptography

    from cmm.machine.usercerts import ensure_certificates

    directory = config_dir(args, ctx)
    machine = machine_of(ctx)
    store, problem = trust.system_preflight(
        certs.certificate_paths(directory).ca_cert, machine, requested=args.system_trust, force=args.force
    )
    if problem:
        return ctx.fail(problem)
    try:
        folder = user_dir(args, ctx)
        directory = folder.path
        result = ensure_certificates(folder, force=args.force)
    except certs.CertificateError as error:  # a CA cmm will not use, a linked folder or file
        return ctx.fail(str(error))
    except PermissionError as error:
        return ctx.fail(f"permission denied writing {error.filename or directory}: {error.strerror}")
    except OSError as error:
        return ctx.fail(f"cannot write the certificates in {directory}: {error}")
    until = f"{result.server_not_after:%Y-%m-%d}"
    if result.created_ca:
        ctx.say(f"Created a local certificate authority: {result.paths.ca_cert}")
    if result.issued_server:
        ctx.say(f"Issued a server certificate for {hosts.HOSTNAME}, valid until {until}: {result.paths.server_cert}")
    if not (result.created_ca or result.issued_server):
        ctx.say(f"Certificates are in place in {directory} (server certificate valid until {until}).")
        ctx.say("Use --force to make new ones.")
    else:
        _say_reload(ctx, directory, result.created_ca)
    report = trust.setup_trust(
        result.paths.ca_cert,
        machine,
        profile=not args.no_profile,
        store=store,
        system_requested=args.system_trust,
        created_ca=result.created_ca,
    )
    line, profile = _shell_line(machine.shell, result.paths.ca_cert)
    if report.lines:
        ctx.say()
        ctx.say("Trust for the CA:")
        say_report(ctx, report, "  ")
    else:
        say_report(ctx, report)
    ctx.say()
    if args.no_profile:
        ctx.say(f"Claude Code trusts the CA through NODE_EXTRA_CA_CERTS: add this line to {profile}")
        ctx.say("(--no-profile: cmm did not) and run it in this terminal:")
    else:
        ctx.say("New terminals get NODE_EXTRA_CA_CERTS from your shell profile; in this one, run:")
    ctx.say()
    ctx.say(f"    {line}")
    ctx.say()
    ctx.say("Claude Code must be started from a terminal that has it.")
    ctx.say()
    ctx.say(f"Then start cmm, e.g.: sudo twistd -n cmm --source {EXAMPLE_SOURCE} --target gemini-2.5-flash")
    ctx.say(f"(a family prefix such as {EXAMPLE_SOURCE} matches every generation: claude-haiku-4-5-20251001, "
            "claude-haiku-5-5, ...).")
    return EXIT_FAILURE if report.failed else EXIT_OK


def _say_reload(ctx: Context, directory: Path, created_ca: bool) -> None:
    """A running cmm keeps serving the certificate it loaded until SIGHUP: say how to reload."""
    from cmm.cli import status

    instance = status.find_instance(directory)
    if not instance.running:
        return
    ctx.say(f"cmm is running (pid {instance.pid}) and still serves the previous certificate; "
            f"load the new one with: sudo kill -HUP {instance.pid}")
    if created_ca:
        ctx.say("Claude Code sessions started before now trust the previous CA only: restart them.")

