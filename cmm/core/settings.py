"""Sans-IO assembly of the serving configuration from command-line values and ``.env``.

Command-line flags win over ``~/.cmm/.env`` (the keys the tool cmm replaces used), which wins
over built-in defaults. Everything is checked here, before anything binds or edits the hosts file, so a typo
ends in one clear sentence instead of a half-started interceptor.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Iterable, Mapping as MappingType, Protocol

import attrs

from cmm.core.router import DEFAULT_FALLBACK_ON, DEFAULT_PROXY_URL, Mapping, Router, Upstream
from cmm.core.values import ANTHROPIC_HOST, MiB, Destination, ProxySettings, parse_servers

DEFAULT_LISTEN = ("127.0.0.1", "::1")


class ConfigError(ValueError):
    """A setting a user must fix; the message says which and how."""


@attrs.frozen
class ServeConfig:
    proxy: ProxySettings
    config_dir: Path
    port: int
    listen: tuple[str, ...]
    anthropic_ips: tuple[str, ...]  # empty: ask DNS
    hosts_file: Path | None  # None: leave the hosts file alone
    log_file: Path
    log_max_bytes: int
    log_backups: int
    connect_timeout: float
    workers: int = 0  # 0: serve inside the master
    grace: float = 30.0
    user: str | None = None
    log_format: str = "text"
    accept: str = "shared"
    dns_servers: tuple[tuple[str, int], ...] = ()  # empty: those in resolv.conf
    usage_retention_days: float = 90.0  # usage rows older than this are deleted


class MappingLike(Protocol):
    """A mapping as a file gives it; read-only, so a frozen value fits."""

    @property
    def source(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def url(self) -> str | None: ...

    @property
    def api_key(self) -> str | None: ...


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[attr-defined]


def _number(value: object, name: str, kind: type = float, minimum: float = 0) -> float:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number, not {value!r}") from None
    if number <= minimum:
        raise ConfigError(f"--{name} must be greater than {minimum:g}, not {value!r}")
    return float(number)


def _addresses(text: str | None, name: str, loopback_only: bool) -> tuple[str, ...]:
    if not text:
        return ()
    result = []
    for part in text.split(","):
        part = part.strip()
        try:
            address = ipaddress.ip_address(part)
        except ValueError:
            raise ConfigError(f"--{name}: {part!r} is not an IP address") from None
        if loopback_only and not address.is_loopback:
            raise ConfigError(f"--{name}: cmm listens on loopback addresses only, not {part}")
        result.append(str(address))
    return tuple(result)


def _rule_keys(mapping: MappingLike) -> dict[str, Any]:
    """A file mapping's conditions and failover keys (none on a plain pair: the router's defaults)."""
    keys = {name: getattr(mapping, name) for name in ("request_class", "headers", "min_body_bytes", "mode",
                                                      "on_target_error") if hasattr(mapping, name)}
    fallback_on = getattr(mapping, "fallback_on", None)
    if fallback_on is None and keys.get("mode") == "fallback":
        fallback_on = DEFAULT_FALLBACK_ON
    if fallback_on is not None:
        keys["fallback_on"] = tuple(fallback_on)
    return keys


def _conditioned(mapping: MappingLike) -> bool:
    return bool(getattr(mapping, "request_class", ()) or getattr(mapping, "headers", ())
                or getattr(mapping, "min_body_bytes", None) is not None)


def _mappings(options: MappingType[str, object], env: MappingType[str, str],
              file_mappings: Iterable[MappingLike]) -> tuple[Mapping, ...]:
    """Flags first, then the mappings file (a flag wins for the same source), then the .env
    default pair unless a flag or the file names its source.  The pair is what --source/--target
    default to, so any such flag replaces it; adding a mapping to the file does not (the user
    added a pair, not took one away).  Each mapping's URL and key default to --proxy-url/PROXY_URL
    and its key."""
    file_mappings = tuple(file_mappings)
    sources, targets = _as_list(options.get("source")), _as_list(options.get("target"))
    flagged = bool(sources or targets)
    # A lone --source or --target takes its partner from the .env defaults (as the tool cmm replaces did).
    if len(sources) == 1 and not targets and env.get("DEFAULT_TARGET_MODEL"):
        targets = [env["DEFAULT_TARGET_MODEL"]]
    if len(targets) == 1 and not sources and env.get("DEFAULT_SOURCE_MODEL"):
        sources = [env["DEFAULT_SOURCE_MODEL"]]
    if len(sources) != len(targets):
        if not sources or not targets:
            missing = "--target" if not targets else "--source"
            raise ConfigError(f"no mapping: give {missing} too (or set DEFAULT_{missing[2:].upper()}_MODEL "
                              f"with `cmm config set`)")
        raise ConfigError(f"give --source and --target in pairs (got {len(sources)} --source and "
                          f"{len(targets)} --target)")
    # A flag replaces the file's plain mapping for its source; the file's rules with conditions stay.
    specs: list[tuple[str, str, str | None, str | None, dict[str, Any]]] = [
        (s, t, None, None, {}) for s, t in zip(sources, targets)]
    specs += [(m.source, m.target, m.url, m.api_key, _rule_keys(m)) for m in file_mappings
              if _conditioned(m) or m.source not in sources]
    source, target = env.get("DEFAULT_SOURCE_MODEL"), env.get("DEFAULT_TARGET_MODEL")
    plain_sources = set(sources) | {m.source for m in file_mappings if not _conditioned(m)}
    if not flagged and source and target and source not in plain_sources:
        specs.append((source, target, None, None, {}))
    if not specs:
        missing = " and ".join(n for n, v in (("--source", source), ("--target", target)) if not v)
        raise ConfigError(
            f"no mapping: give {missing} (e.g. --source claude-haiku --target gemini-2.5-flash), "
            f"add one with `cmm map add`, or set DEFAULT_SOURCE_MODEL and DEFAULT_TARGET_MODEL with "
            f"`cmm config set`"
        )
    url = str(options.get("proxy-url") or env.get("PROXY_URL") or DEFAULT_PROXY_URL)
    flag_key = options.get("proxy-api-key")
    key = str(flag_key if flag_key is not None else env.get("PROXY_API_KEY", ""))
    mappings = []
    for source, target, own_url, own_key, rule_keys in specs:
        try:
            upstream = Upstream.from_url(own_url or url, own_key if own_key is not None else key)
            mappings.append(Mapping(source, target, upstream, **rule_keys))
        except ValueError as error:
            raise ConfigError(f"mapping {source}: {error}") from None
    return tuple(mappings)


def build_config(options: MappingType[str, object], env: MappingType[str, str], config_dir: Path,
                 file_mappings: Iterable[MappingLike] = ()) -> ServeConfig:
    """Merge flags (``options``, as parsed by twistd) with the mappings file and ``.env``."""
    mappings = _mappings(options, env, file_mappings)
    port = int(_number(options.get("port", 443), "port", int))
    if port > 65535:
        raise ConfigError(f"--port must be at most 65535, not {port}")
    anthropic_port = int(_number(options.get("anthropic-port", 443), "anthropic-port", int))
    proxy = ProxySettings(
        router=Router(mappings),
        anthropic=Destination("https", ANTHROPIC_HOST, anthropic_port, anthropic=True),
        body_limit=int(_number(options.get("body-limit", 32), "body-limit") * MiB),
        head_timeout=_number(options.get("head-timeout", 30), "head-timeout"),
        idle_timeout=_number(options.get("idle-timeout", 120), "idle-timeout"),
        upstream_timeout=_number(options.get("upstream-timeout", 600), "upstream-timeout"),
        log_content=bool(options.get("log-content")),
        retries=int(_number(options.get("retries", 3), "retries", int)),
        retry_max_delay=_number(options.get("retry-max-delay", 30), "retry-max-delay", minimum=-1),
        max_connections=int(_number(options.get("max-connections", 1024), "max-connections", int)),
        keep_billing_line=bool(options.get("keep-billing-line")) or _yes(env.get("KEEP_BILLING_LINE", "")),
        tunnel_idle_timeout=_number(options.get("tunnel-idle-timeout", 900), "tunnel-idle-timeout"),
        fallback_body_max=int(_number(options.get("fallback-body-max", 8), "fallback-body-max", minimum=-1) * MiB),
    )
    listen = _addresses(str(options.get("listen") or ",".join(DEFAULT_LISTEN)), "listen", loopback_only=True)
    hosts = options.get("hosts-file")
    log_file = options.get("log-file")
    return ServeConfig(
        proxy=proxy,
        config_dir=config_dir,
        port=port,
        listen=listen,
        anthropic_ips=_addresses(options.get("anthropic-ip"), "anthropic-ip", loopback_only=False),  # type: ignore[arg-type]
        hosts_file=None if options.get("no-hosts") else Path(str(hosts or "/etc/hosts")),
        log_file=Path(str(log_file)) if log_file else config_dir / "cmm.log",
        log_max_bytes=int(_number(options.get("log-max-bytes", 1_000_000), "log-max-bytes", int)),
        log_backups=int(_number(options.get("log-backups", 3), "log-backups", int, minimum=-1)),
        connect_timeout=_number(options.get("connect-timeout", 10), "connect-timeout"),
        workers=int(_number(options.get("workers", 0), "workers", int, minimum=-1)),
        grace=_number(options.get("grace", 30), "grace", minimum=-1),
        user=str(options["user"]) if options.get("user") else None,
        log_format=_choice(options.get("log-format", "text"), "log-format", ("text", "json")),
        accept=_choice(options.get("accept", "shared"), "accept", ("shared", "reuseport")),
        dns_servers=_dns_servers(options.get("dns-server")),
        usage_retention_days=_number(options.get("usage-retention", 90), "usage-retention"),
    )


# How a .env switch may be spelled; config.envfile refuses any other value when it is set.
SWITCH_ON = frozenset({"1", "true", "yes", "on"})
SWITCH_OFF = frozenset({"0", "false", "no", "off"})


def _yes(value: str) -> bool:
    return value.strip().lower() in SWITCH_ON


def _dns_servers(value: object) -> tuple[tuple[str, int], ...]:
    if not value:
        return ()
    try:
        return parse_servers(str(value))
    except ValueError as error:
        raise ConfigError(f"--dns-server: {error}") from None


def _choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)
