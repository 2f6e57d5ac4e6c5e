"""The master service: binds, edits the hosts file, supervises the workers and writes the logs.

Process model: the master stays root only for what needs it — binding port 443 and editing
/etc/hosts (and putting it back) — and serves nothing itself; workers adopt the listening sockets
and serve as the invoking user (SUDO_USER), else ``nobody`` or ``--user``. ``--workers 0`` serves
inside the master (tests, debugging).

Everything the master reaches outside itself (the port, the workers, the certificates, the hosts
file, the request log, DNS, signals, the status socket, the clock) is an attribute with the real
thing as its default, so that the whole start, reload and stop runs in tests on a memory reactor.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, TextIO, cast

import attrs
from twisted.application.service import Service
from twisted.internet import defer, tcp, unix
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol as TwistedProtocol
from twisted.logger import Logger

from cmm.config import paths
from cmm.config.userfiles import UnsafeDirectory, UserDir
from cmm.core.records import RequestRecord
from cmm.core.settings import ConfigError, ServeConfig
from cmm.core.router import is_plain, rule_label
from cmm.daemon.master import Supervisor, bind
from cmm.daemon.recording import UsageRecorder
from cmm.daemon.stats import LiveStats
from cmm.daemon.wire import WorkerConfig
from cmm.machine import certs, dnsflush, hosts, usercerts
from cmm.serve import resolve
from cmm.serve.proxy import ProxyContext, ProxyFactory
from cmm.serve.request_log import RequestLog
from cmm.serve.resolve import AddressBook
from cmm.serve.serving import build_context
from cmm.serve.tls import ReloadableServerTLS, server_factory, server_options

log = Logger()


class Binder(Protocol):
    """A listening, non-blocking socket on ``address``:``port``; OSError says why not."""

    def __call__(self, address: str, port: int, reuse_port: bool = False) -> socket.socket: ...


class HostsEditor(Protocol):
    """Points api.anthropic.com here in the hosts file, and takes it back (:mod:`cmm.machine.hosts`)."""

    def install(self, path: Path) -> object: ...

    def restore(self, path: Path) -> object: ...


class RequestLogFactory(Protocol):
    def __call__(self, path: Path, max_bytes: int, backups: int, *, console: TextIO | None, json: bool,
                 directory: UserDir | None) -> RequestLog: ...


class AddressBookFactory(Protocol):
    """The book of api.anthropic.com's real addresses; the cache callables run as the dir's owner."""

    def __call__(self, config: ServeConfig, reactor: Any, *, load_cache: Callable[[], str | None],
                 save_cache: Callable[[str], None], on_change: Callable[[list[str]], None]) -> AddressBook: ...


def address_book(config: ServeConfig, reactor: Any, *, load_cache: Callable[[], str | None],
                 save_cache: Callable[[str], None], on_change: Callable[[list[str]], None]) -> AddressBook:
    """--anthropic-ip skips DNS; otherwise DNS, with the cache in the config dir to start from."""
    if config.anthropic_ips:
        return AddressBook.fixed(list(config.anthropic_ips))
    return AddressBook.from_dns(reactor, servers=config.dns_servers, load_cache=load_cache,
                                save_cache=save_cache, on_change=on_change)


def open_user_dir(path: Path, environ: Mapping[str, str]) -> UserDir:
    """The config (or log) dir, checked and created as its user; ConfigError says what to fix."""
    try:
        return paths.user_dir(path, environ)
    except UnsafeDirectory as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"cannot create {error.filename or path}: {error.strerror}") from None


def worker_identity(config: ServeConfig, environ: Mapping[str, str], euid: int) -> tuple[int, int] | None:
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


class StatusProtocol(TwistedProtocol):
    """Answers one JSON status document on the control socket, then closes."""

    factory: StatusFactory

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.factory.status()).encode() + b"\n")
        self.transport.loseConnection()


class StatusFactory(Factory[StatusProtocol]):
    protocol = StatusProtocol
    noisy = False

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status


def listen_control(directory: UserDir, factory: Factory[Any], reactor: Any) -> IListeningPort:
    """The ``cmm status`` socket in the config dir, made and chmodded as its owner."""
    sock = directory.bind_unix(paths.CONTROL_SOCKET_NAME)
    try:
        sock.setblocking(False)
        port: ControlPort = ControlPort._fromListeningDescriptor(reactor, sock.fileno(), factory)
        with directory.acting():  # startListening chmods the socket by its (relative) name
            port.mode = 0o600
            port.startListening()
    finally:
        sock.close()  # the port holds its own duplicate
    return port


def _no_reload(directory: UserDir) -> ServeConfig:
    raise ConfigError("started without a command line to read the configuration again with")


@attrs.define(eq=False, slots=False)
class InterceptorService(Service):
    """The master: binds (privileged), supervises the serving, and owns the hosts file and logs."""

    config: ServeConfig
    reactor: Any = None
    environ: Mapping[str, str] = attrs.field(factory=lambda: os.environ)
    console: TextIO | None = None
    euid: int = attrs.field(factory=os.geteuid)
    getpid: Callable[[], int] = os.getpid  # asked late: twistd may fork after making the service
    user_dir: UserDir | None = None  # the config dir, where all I/O runs as its owner

    # collaborators: the real ones by default
    clock: Any = None  # grace periods and the start time; the reactor unless given
    load_config: Callable[[UserDir], ServeConfig] = _no_reload  # SIGHUP: .env and mappings.toml again
    binder: Binder = bind
    supervisor_factory: Callable[..., Supervisor] = Supervisor
    certificates: Callable[[UserDir], certs.EnsureResult] = usercerts.ensure_certificates
    hosts_editor: HostsEditor = hosts
    flush_dns: Callable[[], object] = dnsflush.flush
    request_log_factory: RequestLogFactory = RequestLog.to_file
    address_book_factory: AddressBookFactory = address_book
    install_signal: Callable[[int, Callable[[int, Any], None]], object] = signal.signal
    control_listener: Callable[[UserDir, Factory[Any], Any], IListeningPort] = listen_control
    usage_recorder_factory: Callable[..., UsageRecorder] = UsageRecorder

    # state
    sockets: list[socket.socket] = attrs.field(factory=list)  # one per listen address
    extra_sockets: list[socket.socket] = attrs.field(factory=list)  # --accept reuseport: the other workers'
    ports: list[IListeningPort] = attrs.field(factory=list)
    context: ProxyContext | None = None
    supervisor: Supervisor | None = None
    usage: UsageRecorder | None = None  # the usage database's writer, a process of the user's
    tls: ReloadableServerTLS | None = None
    addresses: AddressBook | None = None
    request_log: RequestLog | None = None
    stats: LiveStats = attrs.field(factory=LiveStats)
    hosts_edited: bool = False
    started_at: float = 0.0
    worker_config: WorkerConfig | None = None

    def __attrs_post_init__(self) -> None:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        if self.clock is None:
            self.clock = self.reactor

    # start

    def privilegedStartService(self) -> None:
        config = self.config
        try:
            if self.user_dir is None:
                self.user_dir = open_user_dir(config.config_dir, self.environ)
            log_parent = Path(os.path.abspath(config.log_file.parent))
            log_dir = self.user_dir if log_parent == self.user_dir.path else open_user_dir(log_parent, self.environ)
            self.worker_config = self._worker_config(config)
            self.request_log = self.request_log_factory(
                config.log_file, config.log_max_bytes, config.log_backups, console=self.console or sys.__stdout__,
                json=config.log_format == "json", directory=log_dir)
        except (ConfigError, UnsafeDirectory, certs.CertificateError) as error:  # a CertificateError: never served
            raise SystemExit(f"cmm: {error}") from None
        except OSError as error:
            raise SystemExit(f"cmm: cannot write {error.filename or config.config_dir}: {error.strerror}") from None
        errors = []
        reuse_port = config.accept == "reuseport" and config.workers > 1
        for address in config.listen:
            try:
                self.sockets.append(self.binder(address, config.port, reuse_port=reuse_port))
                if reuse_port:  # one more socket per further worker, all on the same port
                    self.extra_sockets += [self.binder(address, config.port, reuse_port=True)
                                           for _ in range(config.workers - 1)]
            except OSError as error:
                errors.append(f"{address}:{config.port}: {error.strerror}")
        if not self.sockets:
            raise SystemExit(f"cmm: cannot listen on port {config.port} ({'; '.join(errors)}). "
                             f"Another cmm running? Try `sudo cmm stop`. Ports below 1024 need sudo.")
        for problem in errors:
            log.warn("Not listening on {error}", error=problem)
        Service.privilegedStartService(self)

    def _worker_config(self, config: ServeConfig) -> WorkerConfig:
        assert self.user_dir is not None
        result = self.certificates(self.user_dir)
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
        self.started_at = self.clock.seconds()
        self.addresses = addresses = self.address_book_factory(
            config, self.reactor, load_cache=self._load_address_cache, save_cache=self._save_address_cache,
            on_change=self._addresses_changed)
        self._write_files()
        self._listen_control()
        self._start_usage_recorder()
        self.install_signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        self.install_signal(signal.SIGUSR1, lambda *_: self.reactor.callFromThread(self.rotate))
        for mapping in config.proxy.router.mappings:
            log.info("cmm: {rule} at {url}", rule=rule_label(mapping), url=mapping.upstream.url)
        # Learn the real addresses before the hosts file points the name at us: from the cache at
        # once, else from DNS if it answers soon. DNS down must not keep intercepted models from
        # being served; the book keeps asking in the background and tells _addresses_changed.
        addresses.start()
        addresses.ready(resolve.START_WAIT).addBoth(lambda _: self._serve())

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
            self.context.report_cooldown = self.stats.cooldown
            self.tls = ReloadableServerTLS(server_options(self.worker_config.cert_pem, self.worker_config.key_pem))
            factory = server_factory(self.tls, ProxyFactory(self.context))
            for sock in self.sockets:
                self.ports.append(self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
        else:
            identity = worker_identity(config, self.environ, self.euid)
            slots: list[list[socket.socket]]
            if self.extra_sockets:  # slot i gets the i-th socket of every address
                per_address = config.workers
                everything = [[first, *self.extra_sockets[n * (per_address - 1):(n + 1) * (per_address - 1)]]
                              for n, first in enumerate(self.sockets)]
                slots = [[group[i] for group in everything] for i in range(config.workers)]
            else:
                slots = [self.sockets] * config.workers
            self.supervisor = self.supervisor_factory(
                reactor=self.reactor, sockets=slots, count=config.workers, record=self.record,
                record_batch=self.record_batch,
                gauges=self.stats.gauges, on_cooldown=self.stats.cooldown, uid=identity[0] if identity else None,
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
            self.hosts_editor.install(self.config.hosts_file)
            self.hosts_edited = True
            self.flush_dns()
            log.info("{path}: api.anthropic.com → 127.0.0.1, ::1", path=str(self.config.hosts_file))
        except OSError as error:
            log.error("Cannot edit {path} ({why}); run with sudo, or point api.anthropic.com at 127.0.0.1 yourself",
                      path=str(self.config.hosts_file), why=error.strerror)

    # running

    def _start_usage_recorder(self) -> None:
        """As the config dir's owner: root never opens that user's database (see cmm.daemon.recorder)."""
        assert self.user_dir is not None
        owner = self.user_dir.owner if self.euid == 0 else None
        self.usage = self.usage_recorder_factory(
            reactor=self.reactor, database=self.user_dir.file(paths.USAGE_FILE_NAME),
            retention_days=self.config.usage_retention_days, uid=owner.uid if owner else None,
            gid=owner.gid if owner else None, environ=dict(self.environ))
        self.usage.start()

    def record(self, record: RequestRecord, worker: str) -> None:
        self.record_batch((record,), worker)

    def record_batch(self, records: Sequence[RequestRecord], worker: str) -> None:
        """Counted, stored and logged; a worker's batch with its log lines in one write."""
        for record in records:
            self.stats.add(record, worker)
            if self.usage is not None:
                self.usage.add(record)
        if self.request_log is not None:
            self.request_log.write_all(records)

    def reload(self) -> None:
        """SIGHUP: re-read .env, mappings.toml and the certificates; keep the running config if
        anything is wrong, and say exactly what."""
        try:
            assert self.user_dir is not None
            config = self.load_config(self.user_dir)
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
        if self.usage is not None:
            self.usage.reload(config.usage_retention_days)
        self._write_files()
        log.info("Reloaded: {mappings}", mappings=", ".join(map(rule_label, config.proxy.router.mappings)))

    def rotate(self) -> None:
        if self.request_log is not None and self.request_log.file is not None:
            self.request_log.file.rotate()
            log.info("Request log rotated")

    def status(self) -> dict[str, Any]:
        if self.context is not None:  # --workers 0: the master's own gauges
            self.stats.gauges("master", self.context.gauges())
        usage = {"usage": self.usage.status()} if self.usage is not None else {}
        return {**self._state(), **self.stats.snapshot(), **usage}

    def _state(self) -> dict[str, Any]:
        config = self.config
        return {
            "pid": self.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "port": config.port,
            "listen": list(config.listen),
            "worker_count": config.workers,
            "accept": config.accept,
            "mappings": [{"source": m.source, "target": m.target, "url": m.upstream.url,
                          "unconditioned": not m.conditioned, "intercepts": not m.conditioned and m.mode == "always",
                          **({} if is_plain(m) else {"rule": rule_label(m)})}
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
        for name, text in ((paths.PID_FILE_NAME, f"{self.getpid()}\n"), (paths.STATE_FILE_NAME, state)):
            try:
                self.user_dir.write_bytes(name, text.encode())
            except (OSError, UnsafeDirectory) as error:
                log.warn("Cannot write {path}: {error}", path=str(self.user_dir.file(name)),
                         error=getattr(error, "strerror", None) or str(error))

    def _listen_control(self) -> None:
        assert self.user_dir is not None
        try:
            self.ports.append(self.control_listener(self.user_dir, StatusFactory(self.status), self.reactor))
        except Exception as error:
            log.warn("No live status: cannot listen on {path}: {error}",
                     path=str(self.user_dir.file(paths.CONTROL_SOCKET_NAME)), error=str(error))

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
            timeout = self.clock.callLater(self.config.grace, drained.cancel)
            try:
                yield drained
                timeout.cancel()
            except defer.CancelledError:
                for connection in list(self.context.connections):
                    cast(Any, connection.transport).abortConnection()  # TLS over TCP: it can abort
            self.context.pool.close_idle()
        for sock in self.sockets + self.extra_sockets:
            sock.close()
        if self.hosts_edited and self.config.hosts_file is not None:
            try:
                self.hosts_editor.restore(self.config.hosts_file)
                self.hosts_edited = False
                self.flush_dns()
            except OSError as error:
                log.error("Cannot restore {path}: {why}; run `sudo cmm stop`", path=str(self.config.hosts_file),
                          why=error.strerror)
        if self.user_dir is not None:
            for name in (paths.PID_FILE_NAME, paths.STATE_FILE_NAME, paths.CONTROL_SOCKET_NAME):
                try:
                    if name != paths.PID_FILE_NAME or self.user_dir.read_bytes(name).strip() == str(self.getpid()).encode():
                        self.user_dir.unlink(name)
                except (OSError, UnsafeDirectory):
                    pass  # gone already, or not a file of ours
        if self.usage is not None:  # last (every request's record has reached it), the hosts file already back
            yield self.usage.stop()
        if self.request_log is not None:
            self.request_log.close()
