"""Plain values every layer shares: where Anthropic is, where a connection goes, the proxy's limits.

They live in the core so that settings can be built and checked without Twisted.
"""

from __future__ import annotations

import ipaddress

import attrs

from cmm.core.router import Router

ANTHROPIC_HOST = "api.anthropic.com"
MiB = 1024 * 1024
DNS_PORT = 53
Servers = tuple[tuple[str, int], ...]


@attrs.frozen
class Destination:
    """Where a connection goes. Anthropic is reached by address with its name kept for TLS."""

    scheme: str
    host: str
    port: int
    anthropic: bool = False

    @property
    def label(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@attrs.frozen
class ProxySettings:
    """What a serving unit needs to route; replaced whole on reload."""

    router: Router
    anthropic: Destination = Destination("https", ANTHROPIC_HOST, 443, anthropic=True)
    body_limit: int = 32 * MiB
    head_timeout: float = 30.0  # from a head's first byte to its end, and from a body's start to its model
    idle_timeout: float = 120.0  # keep-alive idle, and silence from the client mid-body
    upstream_timeout: float = 600.0  # silence from the upstream (not total time: streams are long)
    log_content: bool = False  # log the head (credentials redacted) and the body's first bytes
    retries: int = 3  # tries in all for an intercepted request the target answers 429
    retry_max_delay: float = 30.0  # a longer requested wait goes to the client as retry-after instead
    retry_body_cap: int = 4 * MiB  # larger request bodies are not kept, so not retried
    max_connections: int = 1024  # client connections at once; see ProxyContext.admit
    keep_billing_line: bool = False  # True: intercepted bodies keep the billing line's per-request fields
    tunnel_idle_timeout: float = 900.0  # silence both ways after which an upgraded tunnel is closed
    fallback_body_max: int = 8 * MiB  # larger request bodies are not kept, so not failed over


def parse_servers(text: str) -> Servers:
    """``--dns-server``: comma-separated ``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` (port 53 by default).

    ValueError says which part is wrong."""
    servers = []
    for part in (p.strip() for p in text.split(",")):
        host, port = part, str(DNS_PORT)
        if part.startswith("["):
            host, bracket, rest = part[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{part!r} is not [IPv6]:PORT")
            port = rest[1:] or port
        elif part.count(":") == 1:
            host, port = part.split(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address (IP, IP:PORT or [IPv6]:PORT)") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r}: the port must be a number from 1 to 65535")
        servers.append((str(address), int(port)))
    return tuple(servers)
