"""``twistd cmm``: options, and the service that binds, edits the hosts file and serves.

The serving unit (``build_serving``) is self-contained — settings, pool, TLS options and
request log in, a protocol factory out — so a worker process can run it as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Mapping as MappingType

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from cmm import certs, envfile, hosts, paths
from cmm.proxy import ProxyContext, ProxyFactory
from cmm.request_log import RequestLog
from cmm.resolve import AddressBook
from cmm.settings import ConfigError, ServeConfig, build_config
from cmm.tls import server_options
from cmm.upstream import Connector, Pool, anthropic_tls_options

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve api.anthropic.com on 127.0.0.1/::1 with cmm's own certificate and send requests whose "
        "model starts with --source to the proxy URL as --target; everything else goes to the real API."
    )
    optParameters = [
        ["source", None, None, "Source model prefix, e.g. claude-haiku-4-5 (default: DEFAULT_SOURCE_MODEL in .env)."],
        ["target", None, None, "Model name sent to the proxy instead (default: DEFAULT_TARGET_MODEL in .env)."],
        ["proxy-url", None, None, "Anthropic-compatible messages URL, http or https (default: PROXY_URL in .env, "
                                  "else http://localhost:8317/v1/messages)."],
        ["proxy-api-key", None, None, "Bearer key for the proxy (default: PROXY_API_KEY in .env)."],
        ["port", None, "443", "Port to serve on."],
        ["listen", None, None, "Comma-separated loopback addresses to serve on (default: 127.0.0.1,::1)."],
        ["config-dir", None, None, "Certificates, .env and logs (default: ~/.cmm of SUDO_USER, else of you)."],
        ["anthropic-ip", None, None, "Comma-separated real addresses of api.anthropic.com; skips DNS."],
        ["anthropic-port", None, "443", "Port of the real API (for tests)."],
        ["hosts-file", None, "/etc/hosts", "Hosts file that gets the cmm block while running."],
        ["body-limit", None, "32", "Largest request body in MiB (Anthropic's own limit is 32)."],
        ["head-timeout", None, "30", "Seconds a client may take to send a request head."],
        ["idle-timeout", None, "120", "Seconds an idle keep-alive client connection is kept."],
        ["connect-timeout", None, "10", "Seconds to connect to an upstream."],
        ["upstream-timeout", None, "600", "Seconds of upstream silence before giving up (not total time)."],
        ["log-file", None, None, "Request log file (default: cmm.log in the config dir)."],
        ["log-max-bytes", None, "1000000", "Rotate the request log at this size."],
        ["log-backups", None, "3", "Rotated request logs to keep."],
    ]
    optFlags = [["no-hosts", None, "Do not edit the hosts file (point api.anthropic.com here yourself)."]]

    def __init__(self, environ: MappingType[str, str] = os.environ,
                 home_of: Callable[[str], Path] = paths.home_of_user) -> None:
        super().__init__()
        self.environ = environ
        self.home_of = home_of

    def postOptions(self) -> None:
        config_dir = Path(self["config-dir"]) if self["config-dir"] else paths.config_dir(self.environ, self.home_of)
        env_path = config_dir / ".env"
        try:
            env = envfile.parse_env(env_path.read_text()) if env_path.exists() else {}
            self.config = build_config(self, env, config_dir)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        except OSError as error:
            raise usage.UsageError(f"cannot read {env_path}: {error.strerror}") from None


@attrs.define
class Serving:
    """The parts of one serving unit."""

    factory: ProxyFactory
    pool: Pool
    addresses: AddressBook


def build_serving(config: ServeConfig, reactor: object, record: Callable, addresses: AddressBook | None = None,
                  anthropic_trust: object | None = None) -> Serving:
    if addresses is None:
        addresses = (AddressBook.fixed(list(config.anthropic_ips)) if config.anthropic_ips
                     else AddressBook.from_dns(reactor, cache=config.config_dir / "anthropic-ip.cache"))
    connector = Connector(
        reactor=reactor,
        anthropic_addresses=addresses.current,
        anthropic_tls=anthropic_tls_options(anthropic_trust),
        connect_timeout=config.connect_timeout,
    )
    pool = Pool(connector.connect, reactor)
    context = ProxyContext(settings=config.proxy, pool=pool, clock=reactor, record=record)
    return Serving(ProxyFactory(context), pool, addresses)


@attrs.define(eq=False, slots=False)
class InterceptorService(Service):
    """Binds (privileged), then points api.anthropic.com here once its real addresses are known,
    and puts the hosts file back on stop."""

    config: ServeConfig
    reactor: object = None
    environ: MappingType[str, str] = attrs.field(factory=lambda: os.environ)
    console: object = None
    ports: list[IListeningPort] = attrs.field(factory=list)
    serving: Serving | None = None
    request_log: RequestLog | None = None
    hosts_edited: bool = False
    resolved: defer.Deferred | None = None

    def __attrs_post_init__(self) -> None:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor

    def privilegedStartService(self) -> None:
        config = self.config
        result = certs.ensure_certificates(config.config_dir, owner=paths.invoking_user(self.environ))
        if result.created_ca or result.issued_server:
            log.info("Created certificates in {dir}; Claude Code trusts them with: export NODE_EXTRA_CA_CERTS={ca}",
                     dir=str(config.config_dir), ca=str(result.paths.ca_cert))
        options = server_options(result.paths.server_cert.read_bytes(), result.paths.server_key.read_bytes())
        self.request_log = RequestLog.to_file(config.log_file, config.log_max_bytes, config.log_backups,
                                              console=self.console or sys.__stdout__)
        self._give_to_user(config.log_file)
        self.serving = build_serving(config, self.reactor, self.request_log)
        errors = []
        for address in config.listen:
            try:
                self.ports.append(self.reactor.listenSSL(config.port, self.serving.factory, options, interface=address))
            except Exception as error:  # CannotListenError: in use, no permission, no IPv6
                errors.append(f"{address}:{config.port}: {getattr(error, 'socketError', error)}")
        if not self.ports:
            raise SystemExit(f"cmm: cannot listen on port {config.port} ({'; '.join(errors)}). "
                             f"Another cmm running? Try `sudo cmm stop`. Ports below 1024 need sudo.")
        for error in errors:
            log.warn("Not listening on {error}", error=error)
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        assert self.serving is not None
        pid_file = self.config.config_dir / "cmm.pid"
        try:
            pid_file.write_text(f"{os.getpid()}\n")
            self._give_to_user(pid_file)
        except OSError as error:
            log.warn("Cannot write {path}: {error}", path=str(pid_file), error=error.strerror)
        mapping = self.config.proxy.router.mappings[0]
        log.info("cmm serving on port {port}: {source}* → {target} at {url}; everything else → api.anthropic.com",
                 port=self.config.port, source=mapping.source, target=mapping.target, url=mapping.upstream.url)
        # Learn the real addresses before the hosts file points the name at us.
        self.resolved = self.serving.addresses.current()
        self.resolved.addCallbacks(
            lambda found: log.info("api.anthropic.com is at {addresses}", addresses=", ".join(found)),
            lambda failure: log.error("Cannot resolve api.anthropic.com yet ({why}); passthrough requests will "
                                      "retry", why=failure.getErrorMessage()),
        )
        self.resolved.addBoth(lambda _: self._edit_hosts())

    def _give_to_user(self, path: Path) -> None:
        """Files made under sudo in the user's ~/.cmm stay the user's, so `cmm` works without sudo."""
        owner = paths.invoking_user(self.environ)
        if owner is not None and path.exists():
            os.chown(path, *owner)

    def _edit_hosts(self) -> None:
        if self.config.hosts_file is None or not self.running:
            return
        try:
            hosts.install(self.config.hosts_file)
            self.hosts_edited = True
            log.info("{path}: api.anthropic.com → 127.0.0.1, ::1", path=str(self.config.hosts_file))
        except OSError as error:
            log.error("Cannot edit {path} ({why}); run with sudo, or point api.anthropic.com at 127.0.0.1 yourself",
                      path=str(self.config.hosts_file), why=error.strerror)

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        if self.hosts_edited and self.config.hosts_file is not None:
            try:
                hosts.restore(self.config.hosts_file)
                self.hosts_edited = False
            except OSError as error:
                log.error("Cannot restore {path}: {why}; run `sudo cmm stop`", path=str(self.config.hosts_file),
                          why=error.strerror)
        pid_file = self.config.config_dir / "cmm.pid"
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
        stopping = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        self.ports.clear()
        if self.serving is not None:
            self.serving.pool.close_idle()
        if self.request_log is not None:
            self.request_log.close()
        return defer.DeferredList(stopping)


def makeService(options: Options) -> InterceptorService:
    return InterceptorService(options.config)
