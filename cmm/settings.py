"""Sans-IO assembly of the serving configuration from command-line values and ``.env``.

Command-line flags win over ``~/.cmm/.env`` (the seed's file and keys), which wins over built-in
defaults. Everything is checked here, before anything binds or edits the hosts file, so a typo
ends in one clear sentence instead of a half-started interceptor.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Mapping as MappingType

import attrs

from cmm.proxy import MiB, ProxySettings
from cmm.router import DEFAULT_PROXY_URL, Mapping, Router, Upstream
from cmm.upstream import ANTHROPIC_HOST, Destination

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


def _number(value: object, name: str, kind: type = float, minimum: float = 0) -> float:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number, not {value!r}") from None
    if number <= minimum:
        raise ConfigError(f"--{name} must be greater than {minimum:g}, not {value!r}")
    return number


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


def build_config(options: MappingType[str, object], env: MappingType[str, str], config_dir: Path) -> ServeConfig:
    """Merge flags (``options``, as parsed by twistd) with ``.env`` values (``env``)."""
    source = options.get("source") or env.get("DEFAULT_SOURCE_MODEL") or None
    target = options.get("target") or env.get("DEFAULT_TARGET_MODEL") or None
    if not source or not target:
        missing = " and ".join(n for n, v in (("--source", source), ("--target", target)) if not v)
        raise ConfigError(
            f"no mapping: give {missing} (e.g. --source claude-haiku-4-5 --target gemini-2.5-flash), "
            f"or set DEFAULT_SOURCE_MODEL and DEFAULT_TARGET_MODEL with `cmm config set`"
        )
    url = str(options.get("proxy-url") or env.get("PROXY_URL") or DEFAULT_PROXY_URL)
    key = options.get("proxy-api-key")
    key = str(key if key is not None else env.get("PROXY_API_KEY", ""))
    try:
        upstream = Upstream.from_url(url, key)
        mapping = Mapping(str(source), str(target), upstream)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    port = int(_number(options.get("port", 443), "port", int))
    if port > 65535:
        raise ConfigError(f"--port must be at most 65535, not {port}")
    anthropic_port = int(_number(options.get("anthropic-port", 443), "anthropic-port", int))
    proxy = ProxySettings(
        router=Router((mapping,)),
        anthropic=Destination("https", ANTHROPIC_HOST, anthropic_port, anthropic=True),
        body_limit=int(_number(options.get("body-limit", 32), "body-limit") * MiB),
        head_timeout=_number(options.get("head-timeout", 30), "head-timeout"),
        idle_timeout=_number(options.get("idle-timeout", 120), "idle-timeout"),
        upstream_timeout=_number(options.get("upstream-timeout", 600), "upstream-timeout"),
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
    )
