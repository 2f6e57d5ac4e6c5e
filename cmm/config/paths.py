"""Where cmm keeps its files, and whose they are.

cmm needs root (port 443, /etc/hosts) but its files belong to the person using it: ``cmm setup``
runs as the user and ``sudo twistd cmm`` as root, and both must find the same ``~/.cmm``.  So
under sudo the directory is that of ``SUDO_USER``, and it belongs to ``SUDO_UID``/``SUDO_GID``:
root does its I/O there as that user (:mod:`cmm.config.userfiles`), so the files are the user's and no
link the user plants there can lead root anywhere.  Root without sudo (a boot service given
``--config-dir``) acts as whoever owns the directory.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Mapping
from pathlib import Path

from cmm.config.userfiles import Identity, UserDir

CONFIG_DIR_NAME = ".cmm"
ENV_FILE_NAME = ".env"
PID_FILE_NAME = "cmm.pid"
STATE_FILE_NAME = "cmm.state.json"
CONTROL_SOCKET_NAME = "cmm.sock"
LOG_FILE_NAME = "cmm.log"
DNS_CACHE_FILE_NAME = "anthropic-ip.cache"
MAPPINGS_FILE_NAME = "mappings.toml"
USAGE_FILE_NAME = "usage.sqlite3"  # written by the usage recorder, as the user
HOSTS_FILE = Path("/etc/hosts")


def home_of_user(name: str) -> Path:
    """The home directory the password database gives for ``name`` (KeyError if unknown)."""
    return Path(pwd.getpwnam(name).pw_dir)


def current_user_name() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def config_dir(
    environ: Mapping[str, str] = os.environ,
    home_of: Callable[[str], Path] = home_of_user,
    current_user: Callable[[], str] = current_user_name,
) -> Path:
    """``~/.cmm`` of the user who ran sudo, else of the current user."""
    sudo_user = environ.get("SUDO_USER", "")
    if sudo_user and sudo_user != "root":
        try:
            return home_of(sudo_user) / CONFIG_DIR_NAME
        except KeyError:
            pass  # a SUDO_USER the password database does not know: fall back to our own home
    home = environ.get("HOME", "")
    if home:
        return Path(home) / CONFIG_DIR_NAME
    return home_of(current_user()) / CONFIG_DIR_NAME


def invoking_user(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(uid, gid) of the user who ran sudo, for chowning files made as root; None without sudo."""
    try:
        return int(environ["SUDO_UID"]), int(environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None


def config_owner(environ: Mapping[str, str] = os.environ) -> Identity | None:
    """The user the config dir must belong to: whoever ran sudo (with their groups); None without
    sudo (or for sudo by root itself)."""
    ids = invoking_user(environ)
    if ids is None or ids[0] == 0:
        return None
    return Identity.of_uid(*ids)


def user_dir(directory: Path, environ: Mapping[str, str] = os.environ, *, create: bool = True) -> UserDir:
    """``directory`` checked, with the identity its I/O runs as; UnsafeDirectory says what to fix."""
    return UserDir.open(directory, config_owner(environ), create=create)


def env_file(directory: Path) -> Path:
    return directory / ENV_FILE_NAME


def pid_file(directory: Path) -> Path:
    return directory / PID_FILE_NAME
