"""``cmm doctor``: every prerequisite checked, with the fix for each one that fails.

Each check is a pure function from what was observed (file bytes, a probe's answer, the
environment) to a :class:`Check` value; :func:`diagnose` gathers the observations through
injected collaborators, and :func:`format_checks` prints. Tests feed the checks directly.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509

from cmm.cli import status

from cmm.config import envfile, paths
from cmm.core.values import Servers

from cmm.machine import certs, hosts

from cmm.serve import resolve
from cmm.serve.resolve import usable_addresses
from cmm.cli.status import HostsInfo, Instance, MappingInfo, Probe, RecentModels, TrustInfo
from cmm.core.model_names import family

ANTHROPIC_HOST = hosts.HOSTNAME
CONNECT_TIMEOUT = 1.0


@attrs.frozen
class Check:
    """One prerequisite: ``ok`` None means not checkable here (``detail`` says why)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


# --- pure checks ----------------------------------------------------------------------------------


@attrs.frozen
class CertFiles:
    """What the four certificate files hold (None: missing) and the private keys' modes."""

    directory: Path
    ca_cert: bytes | None
    ca_key: bytes | None
    server_cert: bytes | None
    server_key: bytes | None
    key_modes: Mapping[str, int] = attrs.field(factory=dict)  # file name -> st_mode
    problem: str | None = None  # e.g. a file that cannot be read


def read_cert_files(directory: Path) -> CertFiles:
    locations = certs.certificate_paths(directory)
    found: dict[str, bytes | None] = {}
    modes: dict[str, int] = {}
    problem = None
    for field, path in attrs.asdict(locations, recurse=False).items():
        try:
            found[field] = path.read_bytes()
            if field.endswith("_key"):
                modes[path.name] = path.stat().st_mode
        except FileNotFoundError:
            found[field] = None
        except OSError as error:
            found[field] = None
            problem = f"cannot read {path} ({error.strerror})"
    return CertFiles(directory, key_modes=modes, problem=problem, **found)


def check_certificates(files: CertFiles, now: datetime, warn_days: int = status.CERT_WARN_DAYS) -> Check:
    name = "certificates"
    if files.problem:
        return Check(name, False, files.problem, f'sudo chown -R "$USER" {files.directory}')
    missing = [n for n, v in (("ca.crt", files.ca_cert), ("ca.key", files.ca_key), ("server.crt", files.server_cert),
                              ("server.key", files.server_key)) if v is None]
    if missing:
        return Check(name, False, f"missing in {files.directory}: {', '.join(missing)}", "cmm setup")
    ca = certs.KeyPair(files.ca_cert, files.ca_key)  # type: ignore[arg-type]
    if not certs.ca_is_usable(ca, now):
        return Check(name, False, "the CA in ca.crt is expired or does not match ca.key",
                     "cmm setup --force (a new CA: open a new terminal afterwards)")
    server = certs.KeyPair(files.server_cert, files.server_key)  # type: ignore[arg-type]
    if certs.server_needs_issue(server, ca.cert_pem, now, timedelta(0)):
        return Check(name, False, "server.crt is expired, not signed by ca.crt, or does not match server.key",
                     "cmm setup, then restart cmm")
    loose = sorted(n for n, mode in files.key_modes.items() if stat.S_IMODE(mode) & 0o077)
    if loose:
        return Check(name, False, f"private keys readable by others: {', '.join(loose)}",
                     "chmod 600 " + " ".join(str(files.directory / n) for n in loose))
    not_after = certs.server_not_after(server.cert_pem)
    days = int((not_after - now).total_seconds() // 86400)
    if days < warn_days:
        return Check(name, False, f"the server certificate expires on {not_after:%Y-%m-%d} ({days} days left)",
                     "cmm setup (renews it, same CA), then restart cmm")
    return Check(name, True, f"CA and server certificate in {files.directory}; valid until {not_after:%Y-%m-%d} "
                             f"({days} days left)")


def check_name_constraint(ca_pem: bytes | None) -> Check:
    """The CA may vouch only for api.anthropic.com and for no IP address, so a stolen key cannot
    impersonate other sites; the verdict is :func:`certs.has_cmm_constraint`'s, which cmm itself
    applies before using or installing a CA, and the detail says what differs."""
    name = "CA scope"
    fix = "cmm setup --force (a new, constrained CA; open a new terminal afterwards)"
    if ca_pem is None:
        return Check(name, None, "no CA yet")
    try:
        cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return Check(name, False, "ca.crt is not a PEM certificate", fix)
    if certs.has_cmm_constraint(cert):
        return Check(name, True, f"the CA can only vouch for {ANTHROPIC_HOST}, and for no IP address")
    try:
        extension = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return Check(name, False, "the CA may sign certificates for any site (no name constraint)", fix)
    except ValueError:
        return Check(name, False, "the CA's extensions cannot be read", fix)
    dns = [entry.value for entry in extension.value.permitted_subtrees or [] if isinstance(entry, x509.DNSName)]
    if not extension.critical:
        detail = "the CA's name constraint is not marked critical, so some clients may ignore it"
    elif dns != [ANTHROPIC_HOST]:
        detail = f"the CA's name constraint is not limited to {ANTHROPIC_HOST} ({', '.join(dns) or 'none'})"
    elif not extension.value.excluded_subtrees:
        detail = "the CA may sign certificates for IP addresses (made by an older cmm); cmm refuses to use it"
    else:
        detail = "the CA's name constraint differs from the one cmm makes; cmm refuses to use it"
    return Check(name, False, detail, fix)


def check_ca_variable(environ: Mapping[str, str], ca_cert: Path, ca_pem: bytes | None,
                      read_bytes: Callable[[Path], bytes] = Path.read_bytes) -> Check:
    """Claude Code trusts cmm only if NODE_EXTRA_CA_CERTS names a file holding cmm's CA."""
    from cmm.machine import profile_lines

    name = profile_lines.VARIABLE
    line = profile_lines.export_line(profile_lines.syntax_of(environ.get("SHELL", "")), ca_cert)
    fix = f"{line}   (new terminals get it from your shell profile: `cmm setup` adds it there)"
    value = environ.get(profile_lines.VARIABLE, "")
    if not value:
        if environ.get("SUDO_USER"):
            return Check(name, None, "not visible under sudo (it clears the environment): run `cmm doctor` as yourself")
        return Check(name, False, "not set in this shell: Claude Code started here rejects cmm's certificate", fix)
    if ca_pem is None:
        return Check(name, None, f"set to {value}, but there is no CA to compare with yet")
    try:
        held = read_bytes(Path(value))
    except OSError as error:
        return Check(name, False, f"set to {value}, which cannot be read ({error.strerror})", fix)
    if certs.pem_bundle_contains(held, ca_pem):
        return Check(name, True, f"{value} holds cmm's CA")
    return Check(name, False, f"set to {value}, which does not hold cmm's CA ({ca_cert})", fix)


def check_trust(info: TrustInfo) -> Check:
    return Check("shell profiles", info.ok, info.detail, info.fix or "cmm setup")


def _listener_hint(port: int, platform: str) -> str:
    if platform == "darwin":
        return f"sudo lsof -nP -iTCP:{port} -sTCP:LISTEN"
    return f"sudo ss -ltnp 'sport = :{port}'"


def check_port(port: int, accepted: Mapping[str, bool | None], instance: Instance,
               platform: str = sys.platform) -> Check:
    """Free, or held by the cmm that runs; anything else there keeps cmm from starting."""
    name = f"port {port}"
    taken = [address for address, answer in accepted.items() if answer]
    shown = ", ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in taken)
    if not taken:
        return Check(name, True, f"free on {' and '.join(accepted)}")
    if instance.running and (instance.state is None or instance.state.port == port):
        return Check(name, True, f"held by cmm (pid {instance.pid})")
    return Check(name, False, f"another program listens on {shown}",
                 f"find it with `{_listener_hint(port, platform)}` and stop it")


def check_hosts(info: HostsInfo, instance: Instance) -> Check:
    """The hosts block must exist exactly while cmm runs."""
    name = "hosts file"
    if info.path is None:
        return Check(name, True, "cmm runs with --no-hosts: the hosts file is yours to manage")
    if info.has_block is None:
        return Check(name, False, f"{info.path} is {info.problem}", f"check the permissions of {info.path}")
    if instance.running:
        if info.has_block:
            return Check(name, True, f"{info.path} points {ANTHROPIC_HOST} at cmm")
        return Check(name, False, f"cmm runs but {info.path} has no cmm block, so Claude Code bypasses it",
                     "see cmm's log for 'Cannot edit'; restart it with sudo")
    if info.has_block:
        return Check(name, False, f"{info.path} points {ANTHROPIC_HOST} at 127.0.0.1 but cmm is not running "
                                  "(left by a killed run): Claude Code cannot reach Anthropic", "sudo cmm stop")
    return Check(name, True, f"{info.path} has no cmm block (cmm is not running)")


def check_dns(answer: Sequence[str] | BaseException, hostname: str = ANTHROPIC_HOST) -> Check:
    """cmm needs the real addresses (asked of DNS directly, not the hosts file) for passthrough."""
    name = "DNS"
    if isinstance(answer, BaseException):
        reason = str(answer) if hostname in str(answer) else f"no usable address for {hostname}: {answer!r}"
        return Check(name, False, reason,
                     "check the network and /etc/resolv.conf (or name a server with --dns-server), or give cmm the "
                     "addresses with --anthropic-ip")
    usable = usable_addresses(answer)
    if not usable:
        return Check(name, False, f"DNS answers {hostname} with loopback addresses only",
                     "fix the DNS server's answer, or give cmm the real addresses with --anthropic-ip")
    return Check(name, True, f"{hostname} is at {', '.join(usable)}")


def check_settings(values: Mapping[str, str], path: Path) -> Check:
    problems = [problem for key, value in values.items() if key in envfile.SETTINGS
                if (problem := envfile.validate(key, value))]
    if problems:
        return Check("settings", False, f"{path}: " + "; ".join(problems), "cmm config set KEY VALUE (cmm config list)")
    return Check("settings", True, f"{path} is valid" if path.exists() else "defaults (no .env yet)")


def check_mappings(path: Path, count: int, problem: str | None) -> Check:
    if problem:
        return Check("mappings", False, problem, f"fix {path} by hand, or rewrite it with `cmm map add` / `remove`")
    return Check("mappings", True, f"{path}: {count} mapping{'s' if count != 1 else ''}")


def check_recent_models(mappings: Sequence[MappingInfo], recent: RecentModels, now: datetime,
                        started: datetime | None) -> list[Check]:
    """A mapping that matched nothing lately while models of its family went to Anthropic names
    another generation: Claude Code's names moved on (``claude-haiku-4-5``, now ``claude-haiku-5-5``)."""
    span = status.recent_span(recent, now, started)
    checks = []
    for mapping in mappings:
        others = () if mapping.rule else recent.stale_hint(mapping.source)  # a rule's conditions may just not hold
        if others:
            prefix = family(mapping.source)
            checks.append(Check(
                f"mapping {mapping.source}*", False,
                f"matched no request {span}, but {', '.join(others)} (its family) went to Anthropic",
                f"map the family prefix, which matches every generation: `cmm map add {prefix} {mapping.target}` "
                f"(or --source {prefix}), and remove {mapping.source}"))
    if mappings and not checks:
        checks.append(Check("recent models", True, f"no model of a mapped family went to Anthropic {span}"))
    return checks


def check_target(probe: Probe) -> Check:
    name = "target server"
    if probe.answers:
        return Check(name, True, f"{probe.url} answers ({probe.detail})")
    return Check(name, False, f"{probe.url} does not answer ({probe.detail})",
                 "start the target server (CLIProxyAPI listens on localhost:8317 by default), or point cmm at it: "
                 "cmm config set PROXY_URL http://HOST:PORT/v1/messages")


# --- gathering ------------------------------------------------------------------------------------


async def port_accepts(reactor: Any, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> bool | None:
    """True: something accepted a connection; False: refused; None: no answer or no such address."""
    from twisted.internet import error
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    try:
        protocol = await connectProtocol(kind(reactor, host, port, timeout=timeout), Protocol())
    except error.ConnectionRefusedError:
        return False
    except (error.ConnectError, OSError):
        return None
    protocol.transport.loseConnection()
    return True


async def dns_lookup(reactor: Any, servers: Servers = ()) -> list[str]:
    """The addresses cmm would use, asked as cmm asks: ``servers``, else those in resolv.conf."""
    answer = await resolve.lookup(resolve.QuietResolver(reactor=reactor, servers=servers))
    return list(answer.addresses)


async def diagnose(
    config_dir: Path,
    *,
    connect: Callable[[str, int], Awaitable[bool | None]],
    lookup: Callable[[], Awaitable[list[str]]],
    probe: Callable[[str], Awaitable[Probe]],
    environ: Mapping[str, str] = os.environ,
    hosts_file: Path = paths.HOSTS_FILE,
    port: int = 443,
    now: datetime | None = None,
    find: Callable[[Path], Instance] = status.find_instance,
    trust: Callable[[Path, Mapping[str, str]], TrustInfo | None] = status.trust_info,
    platform: str = sys.platform,
    live: Callable[[Path], Awaitable[object | None]] | None = None,
) -> list[Check]:
    """Every check, in the order a person fixes them. ``live`` reads a running cmm's counters."""
    from twisted.internet import defer

    now = now or datetime.now(timezone.utc)
    instance = find(config_dir)
    files = read_cert_files(config_dir)
    ca_cert = certs.certificate_paths(config_dir).ca_cert
    env_path = paths.env_file(config_dir)
    settings = status.read_settings(config_dir)
    running_hosts = instance.state.hosts_file if instance.running and instance.state is not None else hosts_file

    async def dns() -> Sequence[str] | BaseException:
        try:
            return await lookup()
        except Exception as error:
            return error

    addresses = ("127.0.0.1", "::1")
    urls = status.target_urls(instance, status.configured_mappings(config_dir, settings), settings.get("PROXY_URL", ""))
    async def accepts(address: str) -> bool | None:
        return await connect(address, port)

    async def answers(url: str) -> Probe:
        return await probe(url)

    # All at once (a slow name server need not wait for the port checks), each kind kept typed.
    connecting = defer.gatherResults([defer.ensureDeferred(accepts(a)) for a in addresses])
    looking = defer.ensureDeferred(dns())
    probing = defer.gatherResults([defer.ensureDeferred(answers(url)) for url in urls])
    accepted = dict(zip(addresses, await connecting, strict=True))
    answer = await looking
    probes = await probing
    checks = [
        check_certificates(files, now),
        check_name_constraint(files.ca_cert),
    ]
    trust_state = trust(config_dir, environ)
    if trust_state is not None:
        checks.append(check_trust(trust_state))
    checks += [
        check_ca_variable(environ, ca_cert, files.ca_cert),
        check_port(port, accepted, instance, platform),
        check_hosts(status.read_hosts(running_hosts), instance),
        check_dns(answer),
        check_settings(envfile.parse_env(_quiet_text(env_path)), env_path),
        *_mappings_check(config_dir),
        *(check_target(p) for p in probes),
    ]
    if live is not None and instance.running and instance.state is not None:
        recent = status.parse_recent(await live((instance.state.config_dir or config_dir) / paths.CONTROL_SOCKET_NAME))
        if recent is not None:
            checks += check_recent_models(instance.state.mappings, recent, now, instance.state.started)
    return checks


def _mappings_check(config_dir: Path) -> list[Check]:
    """Only when there is a mappings file: without one, flags or .env give the mapping."""
    from cmm.config import mappings

    path = mappings.mappings_file(config_dir)
    if not path.exists():
        return []
    try:
        return [check_mappings(path, len(mappings.load(path)), None)]
    except mappings.MappingsError as error:
        return [check_mappings(path, 0, str(error))]
    except OSError as error:
        return [check_mappings(path, 0, f"cannot read {path} ({error.strerror})")]


def _quiet_text(path: Path) -> str:
    try:
        return envfile.load_text(path)
    except OSError:
        return ""


# --- output ---------------------------------------------------------------------------------------


def format_checks(checks: Sequence[Check]) -> str:
    """One line per check (✓ passed, ✗ failed, – not checked), each failure followed by its fix."""
    width = max((len(c.name) for c in checks), default=0) + 2
    lines = []
    for check in checks:
        mark = {True: "✓", False: "✗", None: "–"}[check.ok]
        lines.append(f"{mark} {check.name:<{width}}{check.detail}")
        if check.ok is False and check.fix:
            lines.append(f"  {'':<{width}}fix: {check.fix}")
    failed = sum(1 for c in checks if c.ok is False)
    lines.append("")
    lines.append(f"{failed} of {len(checks)} checks failed." if failed else "All checks passed.")
    return "\n".join(lines) + "\n"


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.ok is False for c in checks) else 0


def run(config_dir: Path, *, environ: Mapping[str, str], hosts_file: Path, port: int, timeout: float,
        write: Callable[[str], object], dns_servers: Servers = ()) -> int:
    """``cmm doctor`` on the real reactor."""

    async def work(reactor: Any) -> list[Check]:
        return await diagnose(
            config_dir,
            connect=lambda host, p: port_accepts(reactor, host, p),
            lookup=lambda: dns_lookup(reactor, dns_servers),
            probe=lambda url: status.probe_target(url, reactor=reactor, timeout=timeout),
            environ=environ,
            hosts_file=hosts_file,
            port=port,
            live=lambda path: status.read_live(path, reactor=reactor),
        )

    try:
        checks = status.run_async(work)
    except KeyboardInterrupt:
        return 130
    write(format_checks(checks))
    return exit_code(checks)
