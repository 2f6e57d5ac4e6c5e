"""The machine as cmm sees it from its environment."""

from __future__ import annotations

from pathlib import Path

from cmm.machine.commands import Machine


def test_machine_from_environ() -> None:
    machine = Machine.from_environ(
        {"HOME": "/root", "SUDO_USER": "me", "SUDO_UID": "1000", "SUDO_GID": "1000", "SHELL": "/bin/bash"},
        home_of=lambda name: Path(f"/home/{name}"),
        shell_of=lambda name: "/usr/bin/fish",
        geteuid=lambda: 0,
    )
    assert (machine.home, machine.shell, machine.owner, machine.is_root) == (
        Path("/home/me"), "/usr/bin/fish", (1000, 1000), True,
    )
    environ = {"HOME": "/home/u", "SHELL": "/bin/zsh", "NODE_EXTRA_CA_CERTS": "/x"}
    plain = Machine.from_environ(environ, geteuid=lambda: 1000)
    assert (plain.home, plain.shell, plain.owner, plain.is_root, plain.environment_value) == (
        Path("/home/u"), "/bin/zsh", None, False, "/x",
    )
