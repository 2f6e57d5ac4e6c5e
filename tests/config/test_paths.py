"""Which ~/.cmm is used, with and without sudo (user lookups injected)."""

from __future__ import annotations

from pathlib import Path

from cmm.config.paths import config_dir, config_owner, env_file, invoking_user, pid_file

HOMES = {"alice": Path("/home/alice"), "me": Path("/home/me")}


def home_of(name: str) -> Path:
    return HOMES[name]


def test_plain_user_uses_home() -> None:
    assert config_dir({"HOME": "/tmp/h"}, home_of) == Path("/tmp/h/.cmm")


def test_sudo_uses_invoking_users_home() -> None:
    environ = {"HOME": "/root", "SUDO_USER": "alice", "SUDO_UID": "1000", "SUDO_GID": "1001"}
    assert config_dir(environ, home_of) == Path("/home/alice/.cmm")


def test_sudo_from_root_uses_own_home() -> None:
    assert config_dir({"HOME": "/root", "SUDO_USER": "root"}, home_of) == Path("/root/.cmm")


def test_unknown_sudo_user_falls_back_to_home() -> None:
    assert config_dir({"HOME": "/root", "SUDO_USER": "ghost"}, home_of) == Path("/root/.cmm")


def test_no_home_falls_back_to_password_database() -> None:
    assert config_dir({}, home_of, current_user=lambda: "me") == Path("/home/me/.cmm")


def test_default_lookups_work() -> None:
    assert config_dir({}).name == ".cmm"


def test_invoking_user() -> None:
    assert invoking_user({"SUDO_UID": "1000", "SUDO_GID": "1001"}) == (1000, 1001)
    assert invoking_user({}) is None
    assert invoking_user({"SUDO_UID": "1000"}) is None
    assert invoking_user({"SUDO_UID": "x", "SUDO_GID": "1"}) is None


def test_file_names() -> None:
    assert env_file(Path("/d")) == Path("/d/.env")
    assert pid_file(Path("/d")) == Path("/d/cmm.pid")


def test_config_owner_is_the_sudo_user_only() -> None:
    owner = config_owner({"SUDO_UID": "65534", "SUDO_GID": "65533"})
    assert owner is not None and (owner.uid, owner.gid) == (65534, 65533) and 65533 in owner.groups
    assert config_owner({"SUDO_UID": "0", "SUDO_GID": "0"}) is None  # sudo by root: root itself
    assert config_owner({}) is None
