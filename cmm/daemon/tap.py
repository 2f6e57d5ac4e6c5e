"""``twistd cmm``: options, and the master service that binds, edits the hosts file, supervises
the workers and writes the logs.

Process model: the master stays root only for what needs it — binding port 443
and editing /etc/hosts (and putting it back) — and serves nothing itself; workers adopt the
listening sockets and serve as the invoking user (SUDO_USER), else ``nobody`` or ``--user``.
``--workers 0`` serves inside the master (tests, debugging).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping as MappingType

import attrs
from twisted.application.service import Service
from twisted.internet import defer, tcp, unix
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python import usage

from cmm.config import envfile, mappings, paths

from cmm.machine import certs, dnsflush, hosts

from cmm.serve import resolve
from cmm.daemon.master import Supervisor, bind
from cmm.serve.proxy import ProxyContext, ProxyFactory
from cmm.core.records import RequestRecord
from cmm.serve.request_log import RequestLog
from cmm.serve.resolve import AddressBook
from cmm.serve.serving import build_context
from cmm.core.settings import ConfigError, ServeConfig, build_config
from cmm.daemon.stats import LiveStats
from cmm.serve.tls import ReloadableServerTLS, server_factory, server_options
from cmm.config.userfiles import UnsafeDirectory, UserDir
from cmm.daemon.wire import WorkerConfig

log = Logger()



class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve api.anthropic.com on 127.0.0.1/::1 with cmm's own certificate and send requests whose "
        "model starts with --source to the proxy URL as --target; everything else goes to the real API. "
        "--source/--target may be repeated; mappings.toml in the config dir adds more. "
        "SIGHUP reloads mappings, settings and certificates; SIGUSR1 rotates the request log."
    )
    optParameters = [
        ["proxy-url", None, None, "Anthropic-compatible messages URL, http or https (default: PROXY_URL in .env, "
                                  "else http://localhost:8317/v1/messages)."],
        ["proxy-api-key", None, None, "Bearer key for the proxy (default: PROXY_API_KEY in .env)."],
        ["port", None, "443", "Port to serve on."],
        ["listen", None, None, "Comma-separated loopback addresses to serve on (default: 127.0.0.1,::1)."],
        ["config-dir", None, None, "Certificates, .env, mappings.toml and logs (default: ~/.cmm of SUDO_USER)."],
        ["anthropic-ip", None, None, "Comma-separated real addresses of api.anthropic.com; skips DNS."],
        ["dns-server", None, None, "Comma-separated name servers (IP, IP:PORT or [IPv6]:PORT) to ask for the real "
                                   "addresses of api.anthropic.com (default: those in resolv.conf)."],
        ["anthropic-port", None, "443", "Port of the real API (for tests)."],
        ["hosts-file", None, "/etc/hosts", "Hosts file that gets the cmm block while running."],
        ["workers", None, str(os.cpu_count() or 1), "Worker processes; 0 serves inside the master."],
        ["user", None, None, "User the workers run as (default: SUDO_USER, else nobody)."],
        ["grace", None, "30", "Seconds in-flight requests get to finish on stop."],
        ["body-limit", None, "32", "Largest request body in MiB (Anthropic's own limit is 32)."],
        ["head-timeout", None, "30", "Seconds a client may take to send a request head, and then the body up to "
                                     "its model."],
        ["idle-timeout", None, "120", "Seconds an idle keep-alive client connection is kept."],
        ["connect-timeout", None, "10", "Seconds to connect to an upstream."],
        ["upstream-timeout", None, "600", "Seconds of upstream silence before giving up (not total time)."],
        ["max-connections", None, "1024", "Client connections each serving process holds at once; beyond it the "
                                          "longest-idle keep-alive one is closed, or, if none is idle, the new one "
                                          "refused."],
        ["retries", None, "3", "Tries in all for an intercepted request the target answers 429 (1: no retry)."],
        ["retry-max-delay", None, "30", "Longest wait cmm sits out before a retry; a longer one goes to the client "
                                        "as retry-after."],
        ["log-file", None, None, "Request log file (default: cmm.log in the config dir)."],
        ["log-max-bytes", None, "1000000", "Rotate the request log at this size."],
        ["log-backups", None, "3", "Rotated request logs to keep."],
        ["log-format", None, "text", "Request log format: text (the seed's lines) or json."],
        ["accept", None, "shared", "How workers share connections: shared (one listening socket) or reuseport "
                                   "(one SO_REUSEPORT socket per worker)."],
    ]
    optFlags = [
        ["no-hosts", None, "Do not edit the hosts file (point api.anthropic.com here yourself)."],
        ["log-content", None, "Also log each request's head (credentials redacted) and the first 4 KiB of a "
                              "messages body read for routing. Off by default: prompts are private."],
    ]

    def __init__(self, environ: MappingType[str, str] = os.environ,
                 home_of: Callable[[str], Path] = paths.home_of_user) -> None:
        super().__init__()
        self.environ = environ
        self.home_of = home_of
        self["source"], self["target"] = [], []

    def opt_source(self, model: str) -> None:
        """Source model prefix, e.g. claude-haiku-4-5 (repeatable; default: DEFAULT_SOURCE_MODEL)."""
        self["source"].append(model)

    def opt_target(self, model: str) -> None:
        """Model name sent to the proxy for the --source before it (repeatable)."""
        self["target"].append(model)

    def postOptions(self) -> None:
        path = Path(self["config-dir"]) if self["config-dir"] else paths.config_dir(self.environ, self.home_of)
        try:
            self.user_dir = open_user_dir(path, self.environ)
            self.config_dir = self.user_dir.path
            self.config = load_config(dict(self), self.user_dir)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def open_user_dir(path: Path, environ: MappingType[str, str]) -> UserDir:
    """The config (or log) dir, checked and created as its user; ConfigError says what to fix."""
    try:
        return paths.user_dir(path, environ)
    except UnsafeDirectory as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"cannot create {error.filename or path}: {error.strerror}") from None


def load_config(options: MappingType[str, Any], config_dir: UserDir) -> ServeConfig:
    """Read .env and mappings.toml (as the dir's owner) and merge them under the flags; ConfigError
    says what is wrong."""
    try:
        env = envfile.parse_env(envfile.load_from(config_dir))
        file_mappings = mappings.load_from(config_dir)
    except OSError as error:
        raise ConfigError(f"cannot read {error.filename}: {error.strerror}") from None
    except (mappings.MappingsError, UnsafeDirectory) as error:
        raise ConfigError(str(error)) from None
    return build_config(options, env, config_dir.path, file_mappings)


def worker_identity(config: ServeConfig, environ: MappingType[str, str], euid: int) -> tuple[int, int] | None:
    """Whom the workers run as: only a root master drops privileges (else it has none to drop)."""
    if euid != 0:
        return None
    if config.user:
        try:
            entry = pwd.getpwnam(config.user)
        except KeyError:
            raise ConfigError(f"--user {config.user}: no such user") from None
        return entry.pw_uid, entry.pw_gid
    owner = paths.invoking_user(environ)
    if owner is not None and owner[0] != 0:
        return owner
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


class ControlPort(unix.Port):
    """The status socket, bound beforehand as the config dir's owner: Twisted's own Port would
    chmod and unlink it by path as root; the service removes it (as the owner) instead."""

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


class StatusProtocol(Protocol):
    """Answers one JSON status document on the control socket, then closes."""

    def connectionMade(self) -> None:
        self.transport.write(json.dumps(self.factory.status()).encode() + b"\n")
        self.transport.loseConnection()


@attrs.define(eq=False, slots=False)
class InterceptorService(Service):
    """The master: binds (privileged), supervises the serving, and owns the hosts file and logs."""

    config: ServeConfig
    options: dict[str, Any] = attrs.field(factory=dict)  # the command line, kept across reloads
    reactor: Any = None
    environ: MappingType[str, str] = attrs.field(factory=lambda: os.environ)
    console: Any = None
    euid: int = attrs.field(factory=os.geteuid)
    install_signals: bool = True
    flush_dns: Callable[[], object] = dnsflush.flush
    sockets: list = attrs.field(factory=list)  # one per listen address
    extra_sockets: list = attrs.field(factory=list)  # --accept reuseport: the other workers' sockets
    ports: list[IListeningPort] = attrs.field(factory=list)
    context: ProxyContext | None = None
    supervisor: Supervisor | None = None
    tls: ReloadableServerTLS | None = None
    addresses: AddressBook | None = None
    request_log: RequestLog | None = None
    stats: LiveStats = attrs.field(factory=LiveStats)
    hosts_edited: bool = False
    started_at: float = 0.0
    worker_config: WorkerConfig | None = None
    user_dir: UserDir | None = None  # the config dir, where all I/O runs as its owner

    def __attrs_post_init__(self) -> None:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor

    # start

    def privilegedStartService(self) -> None:
        config = self.config
        try:
            if self.user_dir is None:
                self.user_dir = open_user_dir(config.config_dir, self.environ)
            log_parent = Path(os.path.abspath(config.log_file.parent))
            log_dir = self.user_dir if log_parent == self.user_dir.path else open_user_dir(log_parent, self.environ)
            self.worker_config = self._worker_config(config)
            self.request_log = RequestLog.to_file(config.log_file, config.log_max_bytes, config.log_backups,
                                                  console=self.console or sys.__stdout__,
                                                  json=config.log_format == "json", directory=log_dir)
        except (ConfigError, UnsafeDirectory, certs.CertificateError) as error:  # a CertificateError: never served
            raise SystemExit(f"cmm: {error}") from None
        except OSError as error:
            raise SystemExit(f"cmm: cannot write {error.filename or config.config_dir}: {error.strerror}") from None
        errors = []
        reuse_port = config.accept == "reuseport" and config.workers > 1
        for address in config.listen:
            try:
                self.sockets.append(bind(address, config.port, reuse_port=reuse_port))
                if reuse_port:  # one more socket per further worker, all on the same port
                    self.extra_sockets += [bind(address, config.port, reuse_port=True)
                                           for _ in range(config.workers - 1)]
            except OSError as error:
                errors.append(f"{address}:{config.port}: {error.strerror}")
        if not self.sockets:
            raise SystemExit(f"cmm: cannot listen on port {config.port} ({'; '.join(errors)}). "
                             f"Another cmm running? Try `sudo cmm stop`. Ports below 1024 need sudo.")
        for error in errors:
            log.warn("Not listening on {error}", error=error)
        Service.privilegedStartService(self)

    def _worker_config(self, config: ServeConfig) -> WorkerConfig:
        assert self.user_dir is not None
        result = ensure_certificates(self.user_dir)
        if result.created_ca or result.issued_server:
            log.info("Created certificates in {dir}; Claude Code trusts them with: export NODE_EXTRA_CA_CERTS={ca}",
                     dir=str(config.config_dir), ca=str(result.paths.ca_cert))
        known = self.addresses.addresses if self.addresses is not None else []
        return WorkerConfig(
            proxy=config.proxy,
            cert_pem=result.server.cert_pem,
            key_pem=result.server.key_pem,
            anthropic_addresses=tuple(config.anthropic_ips or known),
            connect_timeout=config.connect_timeout,
        )

    def startService(self) -> None:
        Service.startService(self)
        config = self.config
        self.started_at = time.time()
        if config.anthropic_ips:
            self.addresses = AddressBook.fixed(list(config.anthropic_ips))
        else:
            self.addresses = AddressBook.from_dns(self.reactor, servers=config.dns_servers,
                                                  load_cache=self._load_address_cache,
                                                  save_cache=self._save_address_cache,
                                                  on_change=self._addresses_changed)
        self._write_files()
        self._listen_control()
        if self.install_signals:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
            signal.signal(signal.SIGUSR1, lambda *_: self.reactor.callFromThread(self.rotate))
        for mapping in config.proxy.router.mappings:
            log.info("cmm: {source}* → {target} at {url}", source=mapping.source, target=mapping.target,
                     url=mapping.upstream.url)
        # Learn the real addresses before the hosts file points the name at us: from the cache at
        # once, else from DNS if it answers soon. DNS down must not keep intercepted models from
        # being served; the book keeps asking in the background and tells _addresses_changed.
        self.addresses.start()
        self.addresses.ready(resolve.START_WAIT).addBoth(lambda _: self._serve())

    def _addresses_changed(self, addresses: list[str]) -> None:
        """DNS gave new addresses: the workers get them (in the master, the context asks the book)."""
        if self.worker_config is None:
            return
        self.worker_config = attrs.evolve(self.worker_config, anthropic_addresses=tuple(addresses))
        if self.supervisor is not None:
            self.supervisor.reload(self.worker_config)

    def _serve(self) -> None:
        if not self.running:
            return
        config = self.config
        assert self.worker_config is not None and self.addresses is not None
        if not self.addresses.addresses and not self.addresses.failures:  # a failure has said so already
            log.error("No address for api.anthropic.com yet: DNS has not answered within {wait} s and none is "
                      "cached. Serving anyway: requests passed through to Anthropic get a 502 until DNS answers; "
                      "or restart cmm with --anthropic-ip and the API's addresses", wait=resolve.START_WAIT)
        self.worker_config = attrs.evolve(self.worker_config, anthropic_addresses=tuple(self.addresses.addresses))
        if config.workers == 0:
            self.context = build_context(config.proxy, self.addresses, config.connect_timeout, self.reactor,
                                         lambda record: self.record(record, "master"))
            self.tls = ReloadableServerTLS(server_options(self.worker_config.cert_pem, self.worker_config.key_pem))
            factory = server_factory(self.tls, ProxyFactory(self.context))
            for sock in self.sockets:
                self.ports.append(self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
        else:
            identity = worker_identity(config, self.environ, self.euid)
            if self.extra_sockets:  # slot i gets the i-th socket of every address
                per_address = config.workers
                everything = [[first, *self.extra_sockets[n * (per_address - 1):(n + 1) * (per_address - 1)]]
                              for n, first in enumerate(self.sockets)]
                slots = [[group[i] for group in everything] for i in range(config.workers)]
            else:
                slots = [self.sockets] * config.workers
            self.supervisor = Supervisor(
                reactor=self.reactor, sockets=slots, count=config.workers, record=self.record,
                gauges=self.stats.gauges, uid=identity[0] if identity else None,
                gid=identity[1] if identity else None, grace=config.grace, environ=dict(self.environ),
            )
            self.supervisor.start(self.worker_config)
        self._edit_hosts()
        log.info("cmm serving on port {port} ({workers})", port=config.port,
                 workers=f"{config.workers} workers" if config.workers else "in the master")

    def _edit_hosts(self) -> None:
        if self.config.hosts_file is None:
            return
        try:
            hosts.install(self.config.hosts_file)
            self.hosts_edited = True
            self.flush_dns()
            log.info("{path}: api.anthropic.com → 127.0.0.1, ::1", path=str(self.config.hosts_file))
        except OSError as error:
            log.error("Cannot edit {path} ({why}); run with sudo, or point api.anthropic.com at 127.0.0.1 yourself",
                      path=str(self.config.hosts_file), why=error.strerror)

    # running

    def record(self, record: RequestRecord, worker: str) -> None:
        self.stats.add(record, worker)
        if self.request_log is not None:
            self.request_log(record)

    def reload(self) -> None:
        """SIGHUP: re-read .env, mappings.toml and the certificates; keep the running config if
        anything is wrong, and say exactly what."""
        try:
            assert self.user_dir is not None
            config = load_config(self.options, self.user_dir)
            worker_config = self._worker_config(config)
            server_options(worker_config.cert_pem, worker_config.key_pem)  # refuse a broken key pair here
        except (ConfigError, ValueError, OSError, UnsafeDirectory) as error:
            log.error("Reload refused, still serving the previous configuration: {error}", error=str(error))
            return
        config = attrs.evolve(config, port=self.config.port, listen=self.config.listen, workers=self.config.workers,
                              hosts_file=self.config.hosts_file)  # what is bound stays bound
        assert self.addresses is not None
        self.config = config
        self.worker_config = attrs.evolve(worker_config, anthropic_addresses=tuple(self.addresses.addresses))
        if self.context is not None and self.tls is not None:
            self.context.settings = config.proxy
            self.tls.options = server_options(worker_config.cert_pem, worker_config.key_pem)
        if self.supervisor is not None:
            self.supervisor.reload(self.worker_config)
        self._write_files()
        log.info("Reloaded: {mappings}", mappings=", ".join(f"{m.source}* → {m.target}"
                                                            for m in config.proxy.router.mappings))

    def rotate(self) -> None:
        if self.request_log is not None and self.request_log.file is not None:
            self.request_log.file.rotate()
            log.info("Request log rotated")

    def status(self) -> dict[str, Any]:
        if self.context is not None:  # --workers 0: the master's own gauges
            self.stats.gauges("master", self.context.gauges())
        return {**self._state(), **self.stats.snapshot()}

    def _state(self) -> dict[str, Any]:
        config = self.config
        return {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "port": config.port,
            "listen": list(config.listen),
            "worker_count": config.workers,
            "accept": config.accept,
            "mappings": [{"source": m.source, "target": m.target, "url": m.upstream.url}
                         for m in config.proxy.router.mappings],
            "hosts_file": str(config.hosts_file) if config.hosts_file else None,
            "config_dir": str(config.config_dir),
        }

    def _load_address_cache(self) -> str | None:
        assert self.user_dir is not None
        try:
            return self.user_dir.read_bytes(paths.DNS_CACHE_FILE_NAME).decode(errors="replace")
        except FileNotFoundError:
            return None
        except UnsafeDirectory as error:
            raise OSError(errno.EPERM, str(error), str(self.user_dir.file(paths.DNS_CACHE_FILE_NAME))) from None

    def _save_address_cache(self, text: str) -> None:
        assert self.user_dir is not None
        try:
            self.user_dir.write_bytes(paths.DNS_CACHE_FILE_NAME, text.encode())
        except UnsafeDirectory as error:
            raise OSError(errno.EPERM, str(error), str(self.user_dir.file(paths.DNS_CACHE_FILE_NAME))) from None

    def _write_files(self) -> None:
        assert self.user_dir is not None
        state = json.dumps(self._state(), indent=2) + "\n"
        for name, text in ((paths.PID_FILE_NAME, f"{os.getpid()}\n"), (paths.STATE_FILE_NAME, state)):
            try:
                self.user_dir.write_bytes(name, text.encode())
            except (OSError, UnsafeDirectory) as error:
                log.warn("Cannot write {path}: {error}", path=str(self.user_dir.file(name)),
                         error=getattr(error, "strerror", None) or str(error))

    def _listen_control(self) -> None:
        assert self.user_dir is not None
        factory = Factory.forProtocol(StatusProtocol)
        factory.status = self.status
        factory.noisy = False
        try:
            sock = self.user_dir.bind_unix(paths.CONTROL_SOCKET_NAME)
            try:
                sock.setblocking(False)
                port = ControlPort._fromListeningDescriptor(self.reactor, sock.fileno(), factory)
                with self.user_dir.acting():  # startListening chmods the socket by its (relative) name
                    port.mode = 0o600
                    port.startListening()
            finally:
                sock.close()  # the port holds its own duplicate
            self.ports.append(port)
        except Exception as error:
            log.warn("No live status: cannot listen on {path}: {error}", path=str(self.user_dir.file(paths.CONTROL_SOCKET_NAME)),
                     error=str(error))

    # stop

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        if self.addresses is not None:
            self.addresses.stop()
        for port in self.ports:
            yield port.stopListening()
        self.ports.clear()
        if self.supervisor is not None:
            yield self.supervisor.stop()
        if self.context is not None:
            drained = self.context.drain()
            timeout = self.reactor.callLater(self.config.grace, drained.cancel)
            try:
                yield drained
                timeout.cancel()
            except defer.CancelledError:
                for connection in list(self.context.connections):
                    connection.transport.abortConnection()
            self.context.pool.close_idle()
        for sock in self.sockets + self.extra_sockets:
            sock.close()
        if self.hosts_edited and self.config.hosts_file is not None:
            try:
                hosts.restore(self.config.hosts_file)
                self.hosts_edited = False
                self.flush_dns()
            except OSError as error:
                log.error("Cannot restore {path}: {why}; run `sudo cmm stop`", path=str(self.config.hosts_file),
                          why=error.strerror)
        if self.user_dir is not None:
            for name in (paths.PID_FILE_NAME, paths.STATE_FILE_NAME, paths.CONTROL_SOCKET_NAME):
                try:
                    if name != paths.PID_FILE_NAME or self.user_dir.read_bytes(name).strip() == str(os.getpid()).encode():
                        self.user_dir.unlink(name)
                except (OSError, UnsafeDirectory):
                    pass  # gone already, or not a file of ours
        if self.request_log is not None:
            self.request_log.close()


def ensure_certificates(directory: UserDir, force: bool = False) -> certs.EnsureResult:
    """:func:`certs.ensure_certificates` for a user's directory without root touching it by path.

    The certificates are copied (read as the owner) into a private folder of the current user,
    checked and renewed there, and what changed is written back as the owner. So the files are
    the user's from the start, no link in the directory leads root anywhere, and the key
    generation itself keeps the current user's rights (a Python installed where the user cannot
    read still imports). The paths in the result are those in ``directory``.
    """
    names = [path.name for path in attrs.astuple(certs.certificate_paths(Path(".")), recurse=False)]
    # Root stages in /tmp, whose sticky bit keeps others from renaming the folder away (a TMPDIR
    # kept from the user's environment might not).
    with tempfile.TemporaryDirectory(prefix="cmm-certs.", dir="/tmp" if os.geteuid() == 0 else None) as staging:
        for name in names:
            try:
                data = directory.read_bytes(name)
            except FileNotFoundError:
                continue
            certs.write_atomically(Path(staging) / name, data, 0o600)
        before = {name: (Path(staging) / name).read_bytes() for name in names if (Path(staging) / name).exists()}
        result = certs.ensure_certificates(Path(staging), force=force)
        for name in names:
            path = Path(staging) / name
            data = path.read_bytes()
            if before.get(name) != data:
                directory.write_bytes(name, data, stat.S_IMODE(path.stat().st_mode))
    return attrs.evolve(result, paths=certs.certificate_paths(directory.path))


def makeService(options: Options) -> InterceptorService:
    return InterceptorService(options.config, options=dict(options), user_dir=options.user_dir)
