"""``cmm test``: prove end to end that a mapped model is intercepted and another one is not.

The requests go where Claude Code's go: TLS to cmm's address with the name api.anthropic.com,
verified against cmm's own CA. With an interceptor running (its state file says where) they go
through it; otherwise a temporary one is started on a free high port with ``--no-hosts`` and
stopped afterwards, so the test needs no root and changes nothing on the machine.

Sending no Anthropic credentials is deliberate: the passthrough request then comes back 401 from
Anthropic, which proves the route without spending anything; a 502 made by cmm itself
(``x-cmm-error: 1``) means the route is broken.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
from zope.interface import implementer

from cmm.cli import status

from cmm.config import paths

from cmm.machine import certs, hosts
from cmm.cli.doctor import Check, exit_code, format_checks
from cmm.cli.status import Instance, RunningState
from cmm.config.userfiles import UserDir
from cmm.daemon.launch import TWISTD_CODE

PROVIDER = "cliproxyapi"
TIMEOUT = 60.0  # an intercepted request may really reach Gemini or GPT through the target
STARTUP_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0  # a live cmm answers at once; only a stuck or starting one is slower
STOP_TIMEOUT = 10.0
FALLBACK_MAPPING = ("claude-haiku", "gemini-2.5-flash")  # the README's example
PASSTHROUGH_CANDIDATES = ("claude-opus-5-5", "claude-sonnet-5-5", "claude-3-5-haiku-latest", "cmm-selftest")

TARGET_FIX = ("start the target server (CLIProxyAPI listens on localhost:8317 by default), or point cmm at it: "
              "cmm config set PROXY_URL http://HOST:PORT/v1/messages")


@attrs.frozen
class Target:
    """Where the test requests go, and the CA cmm must prove itself with."""

    address: str
    port: int
    ca_cert: Path
    sources: tuple[str, ...]  # mappings that send their models' requests to the target: the intercepted check's
    taken: tuple[str, ...] = ()  # every source that may take a plain request (a fallback rule's too): none for passthrough

    @property
    def url(self) -> str:
        suffix = "" if self.port == 443 else f":{self.port}"
        return f"https://{hosts.HOSTNAME}{suffix}/v1/messages"


@attrs.frozen
class Reply:
    """The parts of a response the checks judge."""

    status: int
    provider: str | None  # x-cmm-provider
    cmm_error: bool  # x-cmm-error: cmm answered itself instead of an upstream
    message: str = ""  # error.message of an Anthropic-format error body


@attrs.frozen
class Options:
    """``cmm test``'s flags; all but ``temporary`` and ``timeout`` shape a temporary interceptor."""

    temporary: bool = False
    timeout: float = TIMEOUT
    port: int | None = None
    source: str | None = None
    target: str | None = None
    proxy_url: str | None = None
    anthropic_ip: str | None = None
    anthropic_port: int | None = None


# --- pure judging ------------------------------------------------------------------------------


def choose_models(sources: Sequence[str], taken: Sequence[str] = ()) -> tuple[str | None, str]:
    """A model a mapping takes (its source itself: prefixes match themselves) and one that no
    mapping or unconditioned rule (``taken``; a fallback rule may send it to its target) takes."""
    mapped = sources[0] if sources else None
    for candidate in PASSTHROUGH_CANDIDATES:
        if not any(candidate.startswith(source) for source in (*sources, *taken)):
            return mapped, candidate
    return mapped, "cmm-selftest-" + "x" * 8


def error_message(body: bytes) -> str:
    """``error.message`` from an Anthropic-format error body, else ""."""
    try:
        data = json.loads(body)
        message = data["error"]["message"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deeply
        return ""
    return str(message)[:300]


def _passthrough_fix(message: str) -> str:
    if "certificate" in message or "TLS" in message:
        return ("cmm cannot verify the real api.anthropic.com: its system trust store lacks Anthropic's CA "
                "(check SSL_CERT_FILE / SSL_CERT_DIR where cmm runs)")
    if "DNS" in message or "address" in message:
        return "cmm has no address for api.anthropic.com: check DNS (`cmm doctor`) or give --anthropic-ip"
    return "check this machine's connection to api.anthropic.com (`cmm doctor`) and cmm's log"


def judge_tls(error: str | None, target: Target) -> Check:
    where = f"{target.address}:{target.port}" if ":" not in target.address else f"[{target.address}]:{target.port}"
    if error is None:
        return Check("TLS", True, f"{where} proves it is {hosts.HOSTNAME} with a certificate from {target.ca_cert}")
    if error.startswith("cannot read"):
        return Check("TLS", False, error, "cmm setup")
    if error == "connection refused":
        return Check("TLS", False, f"nothing listens on {where}", "is cmm running? `cmm status`")
    if error.startswith("TLS failed"):
        return Check("TLS", False, f"{where}: {error}; its certificate is not from {target.ca_cert}",
                     "cmm setup, then restart cmm (it must serve a certificate from that CA)")
    return Check("TLS", False, f"{where}: {error}", "see cmm's log")


def judge_intercepted(model: str | None, outcome: Reply | str) -> Check:
    name = "intercepted"
    if model is None:
        return Check(name, None, "no mapping to test")
    if isinstance(outcome, str):
        return Check(name, False, f"{model}: no response ({outcome})", "see cmm's log")
    if outcome.cmm_error:
        fix = TARGET_FIX if outcome.status in (502, 504) else "see cmm's log"
        return Check(name, False, f"{model}: cmm answered {outcome.status}: {outcome.message}", fix)
    if outcome.provider == PROVIDER:
        note = f" ({outcome.message})" if outcome.status >= 400 and outcome.message else ""
        return Check(name, True,
                     f"{model} → HTTP {outcome.status} from the target, with x-cmm-provider: {PROVIDER}{note}")
    return Check(name, False, f"{model} → HTTP {outcome.status} without x-cmm-provider: it was not intercepted",
                 "check the mapping's source model (`cmm status`)")


def judge_passthrough(model: str, outcome: Reply | str) -> Check:
    name = "passthrough"
    if isinstance(outcome, str):
        return Check(name, False, f"{model}: no response ({outcome})", "see cmm's log")
    if outcome.cmm_error:
        return Check(name, False, f"{model}: cmm answered {outcome.status}: {outcome.message}",
                     _passthrough_fix(outcome.message))
    if outcome.provider is not None:
        return Check(name, False, f"{model} was sent to the target although no mapping takes it",
                     "see cmm's log; report this as a bug")
    note = " (expected: the test sends no credentials)" if outcome.status in (401, 403) else ""
    return Check(name, True, f"{model} → HTTP {outcome.status} from {hosts.HOSTNAME}, untouched{note}")


def judge_name_lookup(found: Sequence[str] | str, listen: Sequence[str]) -> Check:
    """With a hosts block, the system resolver must send api.anthropic.com to cmm."""
    name = "name lookup"
    fix = "sudo cmm stop, then start cmm again (it adds the hosts block); flush the OS DNS cache"
    if isinstance(found, str):
        return Check(name, False, f"{hosts.HOSTNAME} does not resolve ({found})", fix)
    stray = [a for a in found if a not in listen]
    if not found or stray:
        return Check(name, False, f"{hosts.HOSTNAME} resolves to {', '.join(stray or found) or 'nothing'}, "
                                  "not to cmm", fix)
    return Check(name, True, f"{hosts.HOSTNAME} resolves to {', '.join(dict.fromkeys(found))} (cmm)")


def system_lookup(name: str) -> list[str] | str:
    """What the system resolver (hosts file included) answers, as Claude Code would see it."""
    try:
        infos = socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)
    except OSError as error:
        return str(error)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --- sending -----------------------------------------------------------------------------------


def _tls_creator(target: Target) -> Any:
    from twisted.internet import ssl

    authority = ssl.Certificate.loadPEM(target.ca_cert.read_bytes())
    return ssl.optionsForClientTLS(hosts.HOSTNAME, trustRoot=authority, acceptableProtocols=[b"http/1.1"])


def _endpoint(reactor: Any, target: Target, timeout: float) -> Any:
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS

    kind = TCP6ClientEndpoint if ":" in target.address else TCP4ClientEndpoint
    return wrapClientTLS(_tls_creator(target), kind(reactor, target.address, target.port, timeout=timeout))


def _pinned(reactor: Any, target: Target, timeout: float) -> Any:
    """An endpoint factory that sends every URL to cmm's address, as the hosts block would."""
    from twisted.web.iweb import IAgentEndpointFactory

    @implementer(IAgentEndpointFactory)
    class Pinned:
        def endpointForURI(self, uri: Any) -> Any:
            return _endpoint(reactor, target, timeout)

    return Pinned()


async def handshake(reactor: Any, target: Target, timeout: float) -> str | None:
    """None when cmm completes a verified TLS handshake as api.anthropic.com, else why not."""
    from twisted.internet import defer
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.internet.protocol import Protocol

    @implementer(IHandshakeListener)
    class Handshake(Protocol):
        def __init__(self) -> None:
            self.done: defer.Deferred[None] = defer.Deferred()

        def handshakeCompleted(self) -> None:
            if not self.done.called:
                self.done.callback(None)
            assert self.transport is not None  # the handshake happened on it
            self.transport.loseConnection()

        def connectionLost(self, reason: Any = None) -> None:
            if not self.done.called:
                self.done.errback(reason)

    try:
        endpoint = _endpoint(reactor, target, timeout)
    except OSError as error:  # reading the CA
        return f"cannot read {target.ca_cert} ({error.strerror})"
    try:
        protocol = Handshake()
        await connectProtocol(endpoint, protocol)
        await protocol.done.addTimeout(timeout, reactor)
    except Exception as error:
        return status.explain(error, timeout)
    return None


async def send(reactor: Any, target: Target, model: str, timeout: float) -> Reply | str:
    """One small non-streaming message request without credentials; a str says why it failed."""
    import treq
    from twisted.internet import defer

    client = status.http_client(reactor, timeout, _pinned(reactor, target, timeout))
    payload = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "cmm self-test: say ok"}]}

    async def exchange() -> Reply:
        response = await client.post(target.url, json=payload, reactor=reactor, allow_redirects=False,
                                     headers={"anthropic-version": "2023-06-01", "user-agent": "cmm-selftest"})
        body = await treq.content(response)
        headers = response.headers
        provider = (headers.getRawHeaders("x-cmm-provider") or [None])[0]
        return Reply(response.code, provider, bool(headers.getRawHeaders("x-cmm-error")), error_message(body))

    try:
        return await defer.ensureDeferred(exchange()).addTimeout(timeout, reactor)
    except Exception as error:
        return status.explain(error, timeout)


async def run_checks(reactor: Any, target: Target, timeout: float) -> list[Check]:
    """TLS first: without it the requests cannot tell anything more."""
    tls = judge_tls(await handshake(reactor, target, min(timeout, HANDSHAKE_TIMEOUT)), target)
    mapped, other = choose_models(target.sources, target.taken)
    if not tls.ok:
        skipped = "skipped: no TLS connection"
        return [tls, Check("intercepted", None, skipped), Check("passthrough", None, skipped)]
    intercepted = await send(reactor, target, mapped, timeout) if mapped else ""
    passthrough = await send(reactor, target, other, timeout)
    return [tls, judge_intercepted(mapped, intercepted), judge_passthrough(other, passthrough)]


# --- the interceptor under test ---------------------------------------------------------------


def running_target(state: RunningState, config_dir: Path) -> Target:
    listen = state.listen or ("127.0.0.1",)
    address = "127.0.0.1" if "127.0.0.1" in listen else listen[0]
    ca = certs.certificate_paths(state.config_dir or config_dir).ca_cert
    return Target(address, state.port or 443, ca, tuple(m.source for m in state.mappings if m.intercepts),
                  tuple(m.source for m in state.mappings if m.unconditioned))


def twistd_argv(cmm_args: Sequence[str], python: str = sys.executable) -> list[str]:
    """``twistd -n cmm ARGS`` with the Python cmm runs in (no reliance on PATH)."""
    return [python, "-c", TWISTD_CODE, "-n", "--pidfile=", "cmm", *cmm_args]


@attrs.frozen
class Plan:
    """How a temporary interceptor is started, and which sources its mappings have."""

    args: tuple[str, ...]
    sources: tuple[str, ...]
    fallback: bool  # nothing configured a mapping: the README's example is used


def temporary_args(options: Options, workdir: Path, port: int, fallback: bool) -> list[str]:
    """Flags for ``twistd cmm``: its own port and config dir, the hosts file left alone."""
    # Its requests are answered by the time it is stopped: no grace period worth waiting for.
    args = ["--port", str(port), "--listen", "127.0.0.1", "--no-hosts", "--workers", "1", "--grace", "1",
            "--config-dir", str(workdir), "--log-file", str(workdir / paths.LOG_FILE_NAME)]
    source, target = (FALLBACK_MAPPING if fallback else (options.source, options.target))
    for flag, value in (("--source", source), ("--target", target), ("--proxy-url", options.proxy_url),
                        ("--anthropic-ip", options.anthropic_ip), ("--anthropic-port", options.anthropic_port)):
        if value:
            args += [flag, str(value)]
    return args


def needs_fallback(options: Options, settings: Mapping[str, str], file_sources: Sequence[str]) -> bool:
    """No flag, no .env default pair and no mappings file entry: nothing to intercept."""
    configured = settings.get("DEFAULT_SOURCE_MODEL") and settings.get("DEFAULT_TARGET_MODEL")
    return not (options.source or options.target or configured or file_sources)


def plan_temporary(options: Options, config_dir: Path, workdir: Path, port: int,
                   environ: Mapping[str, str]) -> Plan:
    """Parse the flags exactly as ``twistd cmm`` will (ConfigProblem if it would refuse them)."""
    from twisted.python import usage

    from cmm.config import mappings
    from cmm.daemon.tap import Options as TwistdOptions

    try:
        file_sources = [spec.source for spec in mappings.load(mappings.mappings_file(config_dir))]
    except (mappings.MappingsError, OSError) as error:
        raise ConfigProblem(str(error)) from None
    fallback = needs_fallback(options, status.read_settings(config_dir), file_sources)
    args = temporary_args(options, workdir, port, fallback)
    parsed = TwistdOptions(environ=environ)
    try:
        parsed.parseOptions(args)
    except usage.UsageError as error:
        raise ConfigProblem(str(error)) from None
    return Plan(tuple(args), tuple(m.source for m in parsed.config.proxy.router.mappings if not m.conditioned), fallback)


class ConfigProblem(Exception):
    """The settings would keep cmm from starting; the message says which."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class StartError(Exception):
    """The temporary interceptor exited or never listened."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@attrs.define
class TemporaryInterceptor:
    """A ``twistd -n cmm`` child on a high port with its own config dir, stopped on exit.

    Its config dir is a fresh temporary one so that the user's pid and state files are never
    touched; the user's certificates are copied in (read as their owner, never through a link,
    which twistd would refuse) so that the test proves the CA Claude Code trusts.
    """

    config_dir: Path
    options: Options
    environ: Mapping[str, str]
    python: str = sys.executable
    popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen
    startup_timeout: float = STARTUP_TIMEOUT
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    plan: Plan | None = None
    port: int = 0
    _log: IO[bytes] | None = None

    def __enter__(self) -> Target:
        self.workdir = Path(tempfile.mkdtemp(prefix="cmm-test-"))
        try:
            self._link_user_files()
            for attempt in range(3):
                self.port = self.options.port or free_port()
                self._launch()
                try:
                    self._wait_ready()
                    break
                except StartError as error:
                    self._stop()
                    output = self.output()
                    if self.options.port or "cannot listen" not in output or attempt == 2:
                        raise StartError(str(error), output) from None
                    # else a port taken between choosing and binding it: try another
        except BaseException:
            self.__exit__(None, None, None)
            raise
        assert self.plan is not None
        ca_dir = self.config_dir if self.has_user_certificates else self.workdir  # the user's, when copied
        return Target("127.0.0.1", self.port, certs.certificate_paths(ca_dir).ca_cert, self.plan.sources)

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    @property
    def has_user_certificates(self) -> bool:
        found = certs.certificate_paths(self.config_dir)
        return all(p.exists() for p in attrs.asdict(found, recurse=False).values())

    def _link_user_files(self) -> None:
        """Certificates, .env and mappings.toml as the user has them (missing ones stay missing:
        the temporary cmm then makes throwaway certificates, and the caller says so)."""
        assert self.workdir is not None
        names = [p.name for p in attrs.astuple(certs.certificate_paths(self.config_dir))]
        if not self.has_user_certificates:
            names = []
        try:
            user = paths.user_dir(self.config_dir, self.environ, create=False)
        except FileNotFoundError:
            return
        work = UserDir.open(self.workdir)
        for name in (*names, paths.ENV_FILE_NAME, paths.MAPPINGS_FILE_NAME):
            try:
                work.write_bytes(name, user.read_bytes(name))
            except FileNotFoundError:
                pass

    def _launch(self) -> None:
        assert self.workdir is not None
        self.plan = plan_temporary(self.options, self.config_dir, self.workdir, self.port, self.environ)
        self._log = open(self.workdir / "twistd.out", "w+b")  # noqa: SIM115 - closed in _stop
        self.process = self.popen(twistd_argv(self.plan.args, self.python), stdout=self._log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(self.environ),
                                  start_new_session=True)  # Ctrl-C reaches us; we stop it

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise StartError(f"exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                raise StartError(f"not listening on 127.0.0.1:{self.port} after {self.startup_timeout:g} s")
            time.sleep(0.05)

    def output(self) -> str:
        if self.workdir is None or not (self.workdir / "twistd.out").exists():
            return ""
        return (self.workdir / "twistd.out").read_bytes().decode("utf-8", "replace")

    def _stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# --- the command -------------------------------------------------------------------------------


def run(
    config_dir: Path,
    options: Options,
    *,
    environ: Mapping[str, str],
    write: Callable[[str], object],
    find: Callable[[Path], Instance] = status.find_instance,
    lookup_name: Callable[[str], list[str] | str] = system_lookup,
    python: str = sys.executable,
    run_async: Callable[[Callable[[Any], Any]], list[Check]] = status.run_async,
    hosts_file: Path = paths.HOSTS_FILE,
) -> int:
    """``cmm test``: checks printed with ✓/✗ and a fix each; 0 only when all pass."""
    instance = find(config_dir)
    state = instance.state
    if not options.temporary and instance.running and state is not None and state.port:
        target = running_target(state, config_dir)
        write(f"Testing the running cmm (pid {instance.pid}) at {target.address}:{target.port}\n")
        checks: list[Check] = []
        if state.hosts_file is not None and target.port == 443:
            checks.append(judge_name_lookup(lookup_name(hosts.HOSTNAME), state.listen))
        checks += run_async(lambda reactor: run_checks(reactor, target, options.timeout))
        write(format_checks(checks))
        return exit_code(checks)

    if instance.running and not options.temporary:
        write(f"cmm is running (pid {instance.pid}) but left no state file saying where; "
              "testing a temporary one instead.\n")
    temporary = TemporaryInterceptor(config_dir, options, environ, python=python)
    try:
        with temporary as target:
            plan = temporary.plan
            assert plan is not None
            write(f"Testing a temporary cmm at 127.0.0.1:{target.port} (--no-hosts; stopped afterwards)\n")
            checks = []
            if not temporary.has_user_certificates:
                checks.append(Check("certificates", False, f"none in {config_dir}: the test used throwaway ones",
                                    "cmm setup"))
            if not instance.running:  # a block left by a killed cmm sends Claude Code to nothing at all
                from cmm.cli.doctor import check_hosts

                left = check_hosts(status.read_hosts(hosts_file), instance)
                if left.ok is False:
                    checks.append(left)
            if plan.fallback:
                source, target_model = FALLBACK_MAPPING
                checks.append(Check("mapping", None, f"none configured; testing {source} → {target_model}"))
            checks += run_async(lambda reactor: run_checks(reactor, target, options.timeout))
            failed = exit_code(checks)
            write(format_checks(checks))
            if failed:
                write("Log of the temporary cmm:\n" + tail(temporary.output()) + "\n")
            return failed
    except ConfigProblem as error:
        write(format_checks([Check("settings", False, str(error), "cmm config list; cmm map list")]))
        return 1
    except StartError as error:
        write(format_checks([Check("temporary cmm", False, f"did not start: {error}",
                                   "see its output below; `cmm doctor` checks the usual causes")]))
        write("Output of the temporary cmm:\n" + tail(error.output) + "\n")
        return 1
    except KeyboardInterrupt:  # the temporary cmm is stopped by the with block
        write("\ninterrupted\n")
        return 130
