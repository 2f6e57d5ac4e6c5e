"""``twistd cmm``: the command line, read into a configuration, and the master service it makes.

twistd's contract: :class:`Options` and :func:`makeService`. The service itself, and everything
it reaches outside itself, is in :mod:`cmm.daemon.service`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.python import usage

from cmm.config import envfile, mappings, paths
from cmm.config.userfiles import UnsafeDirectory, UserDir
from cmm.core.settings import ConfigError, ServeConfig, build_config
from cmm.daemon.service import InterceptorService, open_user_dir


# Not the CPU count: each worker is a whole Python process, and a handful of requests a minute from
# Claude Code needs no more than two (one to carry on if the other dies). More by --workers.
DEFAULT_WORKERS = 2


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
        ["workers", None, str(DEFAULT_WORKERS), "Worker processes; 0 serves inside the master."],
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
        ["tunnel-idle-timeout", None, "900", "Seconds an upgraded connection (WebSocket) may stay silent both ways."],
        ["fallback-body-max", None, "8", "Largest request body in MiB kept so that a fallback rule can resend it."],
        ["usage-retention", None, "90", "Days of usage records kept in the usage database."],
        ["log-file", None, None, "Request log file (default: cmm.log in the config dir)."],
        ["log-max-bytes", None, "1000000", "Rotate the request log at this size."],
        ["log-backups", None, "3", "Rotated request logs to keep."],
        ["log-format", None, "text", "Request log format: text (one readable line a request) or json."],
        ["accept", None, "shared", "How workers share connections: shared (one listening socket) or reuseport "
                                   "(one SO_REUSEPORT socket per worker)."],
    ]
    optFlags = [
        ["keep-billing-line", None, "Send Claude Code's billing line to targets as it is (default: drop its "
         "per-request fields, so the target's prompt cache can hit; KEEP_BILLING_LINE in .env)."],
        ["no-hosts", None, "Do not edit the hosts file (point api.anthropic.com here yourself)."],
        ["log-content", None, "Also log each request's head (credentials redacted) and the first 4 KiB of a "
                              "messages body read for routing. Off by default: prompts are private."],
    ]

    def __init__(self, environ: Mapping[str, str] = os.environ,
                 home_of: Callable[[str], Path] = paths.home_of_user) -> None:
        super().__init__()
        self.environ = environ
        self.home_of = home_of
        self["source"], self["target"] = [], []

    def opt_source(self, model: str) -> None:
        """Source model prefix, e.g. claude-haiku (repeatable; default: DEFAULT_SOURCE_MODEL)."""
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


def load_config(options: Mapping[str, Any], config_dir: UserDir) -> ServeConfig:
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


def makeService(options: Options) -> InterceptorService:
    """The master, which reads the command line's configuration again on SIGHUP."""
    return InterceptorService(options.config, user_dir=options.user_dir,
                              load_config=functools.partial(load_config, dict(options)))
