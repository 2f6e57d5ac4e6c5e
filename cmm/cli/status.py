"""``cmm status``: is an interceptor running, with what, and are its surroundings in order.

Collecting (pid and state files, the hosts file, the certificate, a probe of each target) is
kept apart from formatting: :func:`format_report` turns a :class:`StatusReport` value into
text, so the wording is tested without processes, files or sockets.  The probes and
:func:`run_async` are shared with ``cmm doctor`` and ``cmm test``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from cmm.config import envfile, paths, userfiles
from cmm.core.model_names import family, same_family

from cmm.machine import certs, hosts
from cmm.cli.processes import is_cmm_process, process_alive, process_start_time

CERT_WARN_DAYS = 30
PROBE_TIMEOUT = 3.0

T = TypeVar("T")


# --- values ------------------------------------------------------------------------------------


@attrs.frozen
class MappingInfo:
    """One mapping as the state file (or .env) names it."""

    source: str
    target: str
    url: str
    rule: str = ""  # a rule's label, conditions included (empty: a plain mapping)
    unconditioned: bool = True  # no condition: any request for its models may take it
    intercepts: bool = True  # unconditioned and not a fallback rule: its models' requests go to the target


@attrs.frozen
class RunningState:
    """``<config dir>/cmm.state.json``, written by a running interceptor."""

    pid: int
    started: datetime | None
    port: int | None
    listen: tuple[str, ...]
    mappings: tuple[MappingInfo, ...]
    hosts_file: Path | None  # None: started with --no-hosts
    config_dir: Path | None


@attrs.frozen
class Instance:
    """What the pid and state files say, checked against the process table."""

    running: bool
    pid: int | None = None
    state: RunningState | None = None  # None: no (readable) state file
    note: str = ""  # why it counts as not running, or what is odd about it


@attrs.frozen
class CertInfo:
    """The server certificate cmm serves: when it expires, or why that is unknown."""

    path: Path
    not_after: datetime | None
    problem: str | None = None


@attrs.frozen
class HostsInfo:
    """Whether the hosts file carries cmm's block (None: could not be read, see ``problem``)."""

    path: Path | None  # None: the running interceptor leaves the hosts file alone
    has_block: bool | None
    problem: str | None = None


@attrs.frozen
class TrustInfo:
    """How Claude Code is told to trust cmm's CA (from :mod:`cmm.machine.trust`)."""

    ok: bool
    detail: str
    fix: str = ""


@attrs.frozen
class Probe:
    """Whether a server answered HTTP at ``url``: any response counts, the status is kept."""

    url: str
    answers: bool
    detail: str


@attrs.frozen
class RouteCounts:
    """Live counters of one route since start, from the running interceptor's control socket."""

    route: str  # "source* → target" or "passthrough"
    requests: int
    errors: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    by_status: tuple[tuple[str, int], ...] = ()  # failures by status ("-": none reached the client)
    bytes_in: int = 0
    bytes_out: int = 0


@attrs.frozen
class WorkerCounts:
    """One serving process's live figures (a worker, or the master with --workers 0)."""

    name: str
    requests: int
    connections: int | None = None
    in_flight: int | None = None  # open requests, streams included
    upstream_idle: int | None = None
    upstream_opened: int | None = None
    refused: int | None = None  # connections refused at --max-connections, every one busy
    evicted_idle: int | None = None  # idle connections closed to make room at --max-connections
    tunnels: int | None = None  # open upgraded connections (WebSocket), each also a connection


@attrs.frozen
class ModelSeen:
    name: str  # a mapping's source, or a model no mapping matched
    last: float  # wall-clock seconds
    count: int  # since start


@attrs.frozen
class RecentModels:
    """Which mappings matched lately and which models none matched, from the control socket."""

    window: float  # seconds: what "lately" means
    matched: tuple[ModelSeen, ...] = ()  # by mapping source
    unmatched: tuple[ModelSeen, ...] = ()  # by model, most recent first

    def last_match(self, source: str) -> float | None:
        return next((seen.last for seen in self.matched if seen.name == source), None)

    def stale_hint(self, source: str) -> tuple[str, ...]:
        """Unmatched recent models of ``source``'s family, when ``source`` matched nothing lately:
        the mapping names another generation (``claude-haiku-4-5`` while ``claude-haiku-5-5`` is asked).
        A source that is its family's prefix already matches every generation: nothing to suggest."""
        if self.last_match(source) is not None or family(source) == source:
            return ()
        return tuple(seen.name for seen in self.unmatched if same_family(source, seen.name))


@attrs.frozen
class StatusReport:
    config_dir: Path
    now: datetime
    instance: Instance
    configured: tuple[MappingInfo, ...]  # from .env, shown when nothing runs
    hosts: HostsInfo
    certificate: CertInfo
    trust: TrustInfo | None  # None: trust checking not available
    targets: tuple[Probe, ...]
    routes: tuple[RouteCounts, ...] | None = None  # None: no live counters to be had
    workers: tuple[WorkerCounts, ...] = ()
    recent: RecentModels | None = None  # None: no live counters to be had
    failover: tuple[str, ...] = ()  # fallbacks by cause per rule, running cool-downs, bodies not kept


# --- reading files -----------------------------------------------------------------------------


def state_file(config_dir: Path) -> Path:
    return Path(config_dir) / paths.STATE_FILE_NAME


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.astimezone()  # naive: local time


def parse_state(text: str) -> RunningState:
    """The state file's JSON; ValueError when it is not one (a half-written or foreign file)."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or isinstance(data["pid"], bool):
        raise ValueError("no pid")
    port = data.get("port")
    mappings = []
    for item in data.get("mappings") or ():
        if isinstance(item, dict):
            plain = not item.get("rule")
            mappings.append(MappingInfo(str(item.get("source", "")), str(item.get("target", "")),
                                        str(item.get("url", "")), str(item.get("rule", "")),
                                        item.get("unconditioned", plain) is True, item.get("intercepts", plain) is True))
    hosts_file = data.get("hosts_file")
    config_dir = data.get("config_dir")
    return RunningState(
        pid=data["pid"],
        started=_parse_time(data.get("started")),
        port=port if isinstance(port, int) and not isinstance(port, bool) else None,
        listen=tuple(str(a) for a in data.get("listen") or ()),
        mappings=tuple(mappings),
        hosts_file=Path(hosts_file) if isinstance(hosts_file, str) and hosts_file else None,
        config_dir=Path(config_dir) if isinstance(config_dir, str) and config_dir else None,
    )


def _read(path: Path) -> tuple[str, float] | None:
    """Text and mtime of a regular file, never through a link (``sudo cmm status`` reads as root)."""
    try:
        return userfiles.read_file(path).decode(), path.lstat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None


def find_instance(
    config_dir: Path,
    *,
    is_alive: Callable[[int], bool] = process_alive,
    started_at: Callable[[int], float | None] = process_start_time,
    is_cmm: Callable[[int], bool] = is_cmm_process,
) -> Instance:
    """The interceptor named by the state file (else the pid file), if its process still runs.

    A process that started after the file was written, or that is not cmm, is not the one that
    wrote it (the pid was reused after a crash or a reboot, or the file is not cmm's), as
    ``cmm stop`` also assumes.
    """
    state_read = _read(state_file(config_dir))
    state: RunningState | None = None
    note = ""
    if state_read is not None:
        try:
            state = parse_state(state_read[0])
        except ValueError:
            note = f"{state_file(config_dir)} is unreadable"
    pid_read = _read(paths.pid_file(config_dir))
    if state is not None:
        pid, written = state.pid, state_read[1]  # type: ignore[index]
    elif pid_read is not None and pid_read[0].strip().isdigit():
        pid, written = int(pid_read[0].strip()), pid_read[1]
    else:
        return Instance(False, note=note or f"no pid file in {config_dir}")
    if pid <= 1 or not is_alive(pid):
        return Instance(False, pid, state, f"pid {pid} from a previous run is gone")
    started = started_at(pid)
    if (started is not None and started > written + 1.0) or not is_cmm(pid):
        return Instance(False, pid, state, f"pid {pid} now belongs to another process")
    return Instance(True, pid, state, note)


def read_certificate(config_dir: Path) -> CertInfo:
    path = certs.certificate_paths(config_dir).server_cert
    try:
        return CertInfo(path, certs.server_not_after(userfiles.read_file(path)))
    except FileNotFoundError:
        return CertInfo(path, None, "missing")
    except OSError as error:
        return CertInfo(path, None, f"unreadable ({error.strerror})")
    except ValueError:
        return CertInfo(path, None, "not a PEM certificate")


def read_hosts(path: Path | None) -> HostsInfo:
    if path is None:
        return HostsInfo(None, None)
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return HostsInfo(path, False, "missing")
    except OSError as error:
        return HostsInfo(path, None, f"unreadable ({error.strerror})")
    return HostsInfo(path, hosts.has_block(text))


def read_settings(config_dir: Path) -> dict[str, str]:
    """``.env`` values over their defaults; an unreadable file counts as empty."""
    values = {key: setting.default for key, setting in envfile.SETTINGS.items()}
    try:
        values.update(envfile.parse_env(envfile.load_text(paths.env_file(config_dir))))
    except OSError:
        pass
    return values


def configured_mappings(config_dir: Path, settings: Mapping[str, str]) -> tuple[MappingInfo, ...]:
    """What ``twistd cmm`` without flags would map: mappings.toml, and the .env default pair
    unless the file maps its source too (as :mod:`cmm.core.settings` does)."""
    from cmm.config import mappings
    from cmm.core.router import is_plain, rule_label

    proxy_url = settings.get("PROXY_URL", "")
    try:
        specs = mappings.load(mappings.mappings_file(config_dir))
    except (mappings.MappingsError, OSError):
        specs = ()  # `cmm doctor` and `cmm map list` say what is wrong with it
    found = [MappingInfo(spec.source, spec.target, spec.url or proxy_url, "" if is_plain(spec) else rule_label(spec),
                         not spec.conditioned, not spec.conditioned and spec.mode == "always")
             for spec in specs]
    source, target = settings.get("DEFAULT_SOURCE_MODEL", ""), settings.get("DEFAULT_TARGET_MODEL", "")
    if source and target and all(spec.source != source or spec.conditioned for spec in specs):
        found.append(MappingInfo(source, target, proxy_url))
    return tuple(found)


def trust_info(config_dir: Path, environ: Mapping[str, str]) -> TrustInfo:
    """Whether new shells point Claude Code at cmm's CA (profiles, and the system store)."""
    from cmm.machine import trust

    found = trust.trust_status(config_dir, environ)
    return TrustInfo(found.ok, found.detail, found.fix)


# --- probing -----------------------------------------------------------------------------------


def explain(failure: Failure | BaseException, timeout: float | None = None) -> str:
    """A short reason for a failed connection or request, for a person to act on."""
    from OpenSSL import SSL
    from twisted.internet import error as net
    from twisted.web import _newclient

    value = failure.value if isinstance(failure, Failure) else failure
    reasons = getattr(value, "reasons", None)
    if isinstance(value, (_newclient.ResponseNeverReceived, _newclient.RequestTransmissionFailed,
                          _newclient.ResponseFailed)) and reasons:
        return explain(reasons[0], timeout)
    if isinstance(value, (net.ConnectionRefusedError, ConnectionRefusedError)):
        return "connection refused"
    if isinstance(value, (net.TimeoutError, defer.CancelledError, TimeoutError)):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if isinstance(value, net.DNSLookupError):
        return "host name not found"
    if isinstance(value, SSL.Error):
        details = [part[2] for part in (value.args[0] if value.args and isinstance(value.args[0], list) else ())
                   if isinstance(part, tuple) and len(part) == 3]
        return "TLS failed: " + (", ".join(details) or str(value))
    if isinstance(value, (net.ConnectionLost, net.ConnectionDone, _newclient.ResponseFailed)):
        return "connection closed without an answer"
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def http_client(reactor: Any, timeout: float, endpoints: Any = None) -> Any:
    """A treq client without connection reuse: each check gets a fresh connection."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    if endpoints is not None:
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    else:
        agent = Agent(reactor, connectTimeout=timeout, pool=pool)
    return HTTPClient(agent)


def discard_body(response: Any) -> None:
    """Drop the body unread: a probe needs only the status, and the body may be endless."""
    from twisted.internet.interfaces import IPushProducer
    from twisted.internet.protocol import Protocol

    class _Drop(Protocol):
        def connectionMade(self) -> None:
            transport = self.transport
            assert IPushProducer.providedBy(transport)  # deliverBody's transport: the body as a producer
            transport.stopProducing()

    response.original.deliverBody(_Drop())


async def probe_target(url: str, *, reactor: Any, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Any HTTP answer within ``timeout`` means the target server is up (even a 404 or 405)."""
    client = http_client(reactor, timeout)
    try:
        response = await client.get(url, timeout=timeout, allow_redirects=False, reactor=reactor)
    except Exception as error:  # refused, timed out, TLS, DNS: all "does not answer"
        return Probe(url, False, explain(error, timeout))
    discard_body(response)
    return Probe(url, True, f"HTTP {response.code}")


def parse_live(data: object) -> tuple[RouteCounts, ...]:
    """The ``routes`` of the control socket's JSON status; junk gives nothing."""
    routes = data.get("routes") if isinstance(data, dict) else None
    if not isinstance(routes, dict):
        return ()
    found = []
    for name, values in routes.items():
        if not isinstance(values, dict):
            continue
        errors = values.get("errors")
        by_status = tuple((str(k), v) for k, v in errors.items() if isinstance(v, int)) if isinstance(errors, dict) else ()
        found.append(RouteCounts(str(name), int(values.get("requests") or 0), sum(v for _, v in by_status),
                                 values.get("p50_ms"), values.get("p99_ms"), by_status,
                                 int(values.get("bytes_in") or 0), int(values.get("bytes_out") or 0)))
    return tuple(found)


def parse_workers(data: object) -> tuple[WorkerCounts, ...]:
    """The ``workers`` of the control socket's JSON status; junk gives nothing."""
    workers = data.get("workers") if isinstance(data, dict) else None
    if not isinstance(workers, dict):
        return ()

    def number(values: dict[str, Any], key: str) -> int | None:
        value = values.get(key)
        return value if isinstance(value, int) else None

    return tuple(WorkerCounts(str(name), number(values, "requests") or 0, number(values, "connections"),
                              number(values, "in_flight"), number(values, "upstream_idle"),
                              number(values, "upstream_opened"), number(values, "refused"),
                              number(values, "evicted_idle"), number(values, "tunnels"))
                 for name, values in sorted(workers.items()) if isinstance(values, dict))


def parse_recent(data: object) -> RecentModels | None:
    """The ``recent`` of the control socket's JSON status (None: absent); junk entries are skipped."""
    recent = data.get("recent") if isinstance(data, dict) else None
    if not isinstance(recent, dict) or not isinstance(recent.get("window_s"), (int, float)):
        return None

    def seen(key: str) -> tuple[ModelSeen, ...]:
        table = recent.get(key)
        found = [ModelSeen(str(name), float(values["last"]), int(values.get("count") or 0))
                 for name, values in (table.items() if isinstance(table, dict) else ())
                 if isinstance(values, dict) and isinstance(values.get("last"), (int, float))]
        return tuple(sorted(found, key=lambda item: -item.last))

    return RecentModels(float(recent["window_s"]), seen("matched"), seen("unmatched"))


def parse_failover(data: object) -> tuple[str, ...]:
    """The failover lines of the control socket's JSON status; junk gives nothing."""
    data = data if isinstance(data, dict) else {}
    fallbacks, cooldowns, workers = data.get("fallbacks"), data.get("cooldowns"), data.get("workers")
    lines = [f"{rule}: " + ", ".join(f"{why}×{n}" for why, n in causes.items())
             for rule, causes in (fallbacks.items() if isinstance(fallbacks, dict) else ()) if isinstance(causes, dict)]
    lines += [f"⚠ {c.get('rule')}: straight to its target until {c.get('until')} ({c.get('cause')})"
              for c in (cooldowns if isinstance(cooldowns, list) else ()) if isinstance(c, dict)]
    unkept = sum(w.get("fallback_unkept") or 0 for w in (workers.values() if isinstance(workers, dict) else ())
                 if isinstance(w, dict) and isinstance(w.get("fallback_unkept"), int))
    if unkept:
        lines.append(f"{unkept} requests too large to keep for a failover (--fallback-body-max)")
    return tuple(lines)


async def read_live(socket_path: Path, *, reactor: Any, timeout: float = 1.0) -> object | None:
    """The running interceptor's JSON status from its control socket; None when there is none."""
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Collect(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.done: defer.Deferred[bytes] = defer.Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: object = None) -> None:
            self.done.callback(self.data)

    collect = Collect()
    try:
        await connectProtocol(UNIXClientEndpoint(reactor, str(socket_path), timeout=timeout), collect)
        counters: object = json.loads(await collect.done.addTimeout(timeout, reactor))
        return counters
    except Exception:  # no socket (an older cmm), no permission, a stuck master: no counters
        return None


def run_async(work: Callable[[Any], Awaitable[T]], reactor: Any = None) -> T:
    """Run ``work(reactor)`` on the reactor and return its result (once per process: the CLI).

    KeyboardInterrupt when a signal stopped the reactor before the work was done.
    """
    if reactor is None:
        from twisted.internet import reactor
    outcome: list[object] = []

    async def run() -> T:
        return await work(reactor)

    def start() -> None:
        done = defer.ensureDeferred(run())
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[return-value]


# --- collecting ----------------------------------------------------------------------------------


def target_urls(instance: Instance, configured: tuple[MappingInfo, ...], proxy_url: str) -> tuple[str, ...]:
    """Each target once: the running mappings', else the configured ones', else PROXY_URL."""
    if instance.running and instance.state is not None and instance.state.mappings:
        mapped = instance.state.mappings
    else:
        mapped = configured
    urls = tuple(dict.fromkeys(m.url for m in mapped if m.url))
    return urls or ((proxy_url,) if proxy_url else ())


async def collect(
    config_dir: Path,
    *,
    probe: Callable[[str], Awaitable[Probe]],
    hosts_file: Path = paths.HOSTS_FILE,
    environ: Mapping[str, str] = os.environ,
    now: datetime | None = None,
    find: Callable[[Path], Instance] = find_instance,
    trust: Callable[[Path, Mapping[str, str]], TrustInfo | None] = trust_info,
    live: Callable[[Path], Awaitable[object | None]] | None = None,
) -> StatusReport:
    """Everything ``cmm status`` shows; the targets are probed concurrently."""
    instance = find(config_dir)
    settings = read_settings(config_dir)
    routes: tuple[RouteCounts, ...] | None = None
    workers: tuple[WorkerCounts, ...] = ()
    recent: RecentModels | None = None
    failover: tuple[str, ...] = ()
    if instance.running and instance.state is not None:
        hosts_path = instance.state.hosts_file
        cert_dir = instance.state.config_dir or config_dir
        if live is not None:
            data = await live(cert_dir / paths.CONTROL_SOCKET_NAME)
            routes = parse_live(data) if data is not None else None
            workers = parse_workers(data) if data is not None else ()
            recent = parse_recent(data)
            failover = parse_failover(data)
    else:
        hosts_path, cert_dir = hosts_file, config_dir
    configured = configured_mappings(config_dir, settings)
    urls = target_urls(instance, configured, settings.get("PROXY_URL", ""))
    async def answer(url: str) -> Probe:
        return await probe(url)

    probes = await defer.gatherResults([defer.ensureDeferred(answer(url)) for url in urls])
    return StatusReport(
        config_dir=config_dir,
        now=now or datetime.now(timezone.utc),
        instance=instance,
        configured=configured,
        hosts=read_hosts(hosts_path),
        certificate=read_certificate(cert_dir),
        trust=trust(config_dir, environ),
        targets=tuple(probes),
        routes=routes,
        workers=workers,
        recent=recent,
        failover=failover,
    )


# --- formatting ---------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    total = max(int(seconds), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _address(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


def _mapping_line(mapping: MappingInfo) -> str:
    return f"{mapping.rule or f'{mapping.source}* → {mapping.target}'} via {mapping.url}"


def _minutes(window: float) -> str:
    return f"{window / 60:g} min"


def recent_span(recent: RecentModels, now: datetime, started: datetime | None) -> str:
    """What "lately" covered: the whole run, if it is shorter than the window."""
    up = (now - started).total_seconds() if started is not None else None
    return "since start" if up is not None and up < recent.window else f"in the last {_minutes(recent.window)}"


def match_note(mapping: MappingInfo, recent: RecentModels, now: datetime, started: datetime | None) -> str:
    """When the mapping last matched; a stale one (its family asked under another name) gets a ⚠
    and the family prefix that would match."""
    last = recent.last_match(mapping.source)
    if last is not None:
        return f"; last match {format_duration(now.timestamp() - last)} ago"
    since = recent_span(recent, now, started)
    others = () if mapping.rule else recent.stale_hint(mapping.source)  # a rule's conditions may just not hold
    if not others:
        return f"; no match {since}"
    return (f"; ⚠ no match {since}, while {', '.join(others)} went to Anthropic: "
            f"map the family, `cmm map add {family(mapping.source)} {mapping.target}`")


def _unmatched_line(recent: RecentModels, now: datetime) -> str:
    """The models no mapping matched lately (they went to Anthropic), the latest first."""
    if not recent.unmatched:
        return f"none in the last {_minutes(recent.window)}"
    models = ", ".join(f"{seen.name} ×{seen.count} ({format_duration(now.timestamp() - seen.last)} ago)"
                       for seen in recent.unmatched)
    return f"{models}: passed to Anthropic"


def _certificate_line(info: CertInfo, now: datetime) -> str:
    if info.not_after is None:
        return f"⚠ {info.path} {info.problem}: run `cmm setup`"
    days = (info.not_after - now).total_seconds() / 86400
    until = f"{info.not_after:%Y-%m-%d}"
    if days <= 0:
        return f"⚠ expired on {until}: run `cmm setup` to renew it, then restart cmm"
    if days < CERT_WARN_DAYS:
        return f"⚠ expires on {until} ({int(days)} days left): run `cmm setup` to renew it, then restart cmm"
    return f"valid until {until} ({int(days)} days left)"


def _hosts_line(info: HostsInfo, running: bool) -> str:
    if info.path is None:
        return "left alone (--no-hosts): point api.anthropic.com at 127.0.0.1 yourself"
    if info.has_block is None:
        return f"⚠ {info.path} is {info.problem}"
    if running:
        if info.has_block:
            return f"{info.path} points api.anthropic.com at cmm"
        return f"⚠ {info.path} has no cmm block: Claude Code does not reach cmm (see cmm's log)"
    if info.has_block:
        return f"⚠ {info.path} still points api.anthropic.com at 127.0.0.1 (left by a killed run): `sudo cmm stop`"
    return f"{info.path} has no cmm block"


def _probe_line(probe: Probe) -> str:
    if probe.answers:
        return f"{probe.url} answers ({probe.detail})"
    return f"⚠ {probe.url} does not answer ({probe.detail}): start the target server or fix PROXY_URL"


def _route_line(counts: RouteCounts) -> str:
    text = f"{counts.route}: {counts.requests}"
    if counts.errors:
        statuses = ", ".join(f"{status}×{n}" for status, n in counts.by_status)
        text += f" ({counts.errors} failed{': ' + statuses if statuses else ''})"
    if counts.bytes_in or counts.bytes_out:
        text += f", ↑{_size(counts.bytes_in)} ↓{_size(counts.bytes_out)}"
    if counts.p50_ms is not None:
        text += f", p50 {counts.p50_ms:g} ms"
    if counts.p99_ms is not None:
        text += f", p99 {counts.p99_ms:g} ms"
    return text


def _size(count: int) -> str:
    size: float = count
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def _worker_line(worker: WorkerCounts) -> str:
    parts = [f"{worker.name}: {worker.requests} requests"]
    if worker.connections is not None:
        parts.append(f"{worker.connections} connections")
    if worker.in_flight is not None:
        parts.append(f"{worker.in_flight} in flight")
    if worker.tunnels:
        parts.append(f"{worker.tunnels} open tunnels")
    if worker.upstream_idle is not None:
        parts.append(f"{worker.upstream_idle} idle upstream connections ({worker.upstream_opened or 0} opened)")
    if worker.evicted_idle:
        parts.append(f"{worker.evicted_idle} idle connections closed to make room (--max-connections)")
    if worker.refused:
        parts.append(f"⚠ {worker.refused} connections refused, all busy (--max-connections)")
    return ", ".join(parts)


def format_report(report: StatusReport) -> str:
    """The text of ``cmm status``; lines with ⚠ need attention."""
    instance, state = report.instance, report.instance.state
    rows: list[tuple[str, str]] = []
    if instance.running:
        about = [f"pid {instance.pid}"]
        if state is not None and state.started is not None:
            about.append(f"up {format_duration((report.now - state.started).total_seconds())}")
        head = f"cmm is running ({', '.join(about)})"
        if state is None:
            rows.append(("state", f"⚠ {instance.note or 'no state file'}: port and mappings unknown"))
        else:
            rows.append(("listening", ", ".join(_address(a, state.port) for a in state.listen) or str(state.port)))
            notes = [match_note(m, report.recent, report.now, state.started) if report.recent else ""
                     for m in state.mappings]
            rows.extend(("mapping", _mapping_line(m) + note) for m, note in zip(state.mappings, notes))
    else:
        head = f"cmm is not running ({instance.note})" if instance.note else "cmm is not running"
        if report.configured:
            rows.extend(("mapping", _mapping_line(m) + " (configured, for the next start)")
                        for m in report.configured)
        else:
            rows.append(("mapping", "none configured: `cmm map add SOURCE TARGET` (a family prefix such as "
                                    "claude-haiku matches every generation), or give --source/--target to twistd cmm"))
    if report.routes is not None:
        rows.extend(("requests", _route_line(r)) for r in report.routes)
        if not report.routes:
            rows.append(("requests", "none since start"))
    if report.recent is not None and instance.running:
        rows.append(("unmatched", _unmatched_line(report.recent, report.now)))
    rows.extend(("fallback", line) for line in report.failover)
    rows.extend(("process", _worker_line(w)) for w in report.workers)
    rows.extend(("target", _probe_line(p)) for p in report.targets)
    rows.append(("hosts", _hosts_line(report.hosts, instance.running)))
    rows.append(("certificate", _certificate_line(report.certificate, report.now)))
    if report.trust is not None:
        trust = report.trust.detail if report.trust.ok else f"⚠ {report.trust.detail}"
        if not report.trust.ok and report.trust.fix:
            trust += f": {report.trust.fix}"
        rows.append(("trust", trust))
    rows.append(("config", str(report.config_dir)))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join([head, *(f"  {name:<{width}}{text}" for name, text in rows)]) + "\n"


def exit_code(report: StatusReport) -> int:
    """0 when running, 1 when not (scripts test ``cmm status`` like ``systemctl is-active``)."""
    return 0 if report.instance.running else 1


def run(config_dir: Path, *, environ: Mapping[str, str], hosts_file: Path, timeout: float,
        write: Callable[[str], object]) -> int:
    """``cmm status`` on the real reactor."""

    async def work(reactor: Any) -> StatusReport:
        return await collect(config_dir, hosts_file=hosts_file, environ=environ,
                             probe=lambda url: probe_target(url, reactor=reactor, timeout=timeout),
                             live=lambda path: read_live(path, reactor=reactor))

    try:
        report = run_async(work)
    except KeyboardInterrupt:
        return 130
    write(format_report(report))
    return exit_code(report)

