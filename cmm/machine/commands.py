"""The machine cmm changes: the commands it runs there, its paths, and whose files are whose.

Every system path is taken relative to :attr:`Machine.root` and every command runs through
:attr:`Machine.run`, so tests inject a scratch root and fake commands and never touch the real
machine.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import attrs

from cmm.config import paths
from cmm.config.userfiles import Identity, running_as
from cmm.machine.profile_lines import VARIABLE


@attrs.frozen
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


Runner = Callable[[Sequence[str]], CommandResult]

#: Where root's tools live; an ordinary user's PATH often lacks them (Debian), yet `cmm status`
#: run as that user must still find update-ca-certificates to tell whether cmm's CA is installed.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run a command and capture its output; a missing program is exit status 127."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as error:
        return CommandResult(127, "", str(error))
    return CommandResult(done.returncode, done.stdout, done.stderr)


def find_command(name: str) -> str | None:
    """``shutil.which`` over PATH plus the sbin folders."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which(name, path=search)


def login_shell(user: str) -> str:
    """The user's shell from the password database ("" if unknown)."""
    try:
        return pwd.getpwnam(user).pw_shell
    except KeyError:
        return ""


@attrs.frozen
class Machine:
    """Everything of the computer this module reads or changes, injected so tests use fakes.

    ``home``/``shell``/``owner`` are those of the user who ran sudo when there is one: the trust
    line belongs in *their* profiles.  System paths are looked up under ``root``.
    """

    home: Path
    shell: str = ""
    owner: tuple[int, int] | None = None
    is_root: bool = False
    environment_value: str | None = None  # NODE_EXTRA_CA_CERTS in the calling environment
    root: Path = Path("/")
    platform: str = sys.platform
    which: Callable[[str], str | None] = find_command
    run: Runner = run_command

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        home_of: Callable[[str], Path] = paths.home_of_user,
        shell_of: Callable[[str], str] = login_shell,
        geteuid: Callable[[], int] = os.geteuid,
    ) -> Machine:
        """The real machine as seen by the user who invoked cmm (``SUDO_USER`` under sudo)."""
        home = paths.config_dir(environ, home_of).parent
        sudo_user = environ.get("SUDO_USER", "")
        # sudo sets SHELL to root's shell; the user's own is in the password database.
        shell = shell_of(sudo_user) if sudo_user and sudo_user != "root" else environ.get("SHELL", "")
        return cls(
            home=home,
            shell=shell,
            owner=paths.invoking_user(environ),
            is_root=geteuid() == 0,
            environment_value=environ.get(VARIABLE),
        )

    def system_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def as_owner(machine: Machine) -> AbstractContextManager[None]:
    """The user's effective ids for the block (under sudo; else nothing changes).

    Profiles and the CA file are the user's files and may be links (into a dotfiles repository):
    root reads, edits and creates them as the user, so a link planted there reaches only what the
    user could edit anyway, never /etc/sudoers.d or another root file; what cmm creates is the user's.
    """
    if machine.owner is None:
        return contextlib.nullcontext()
    return running_as(Identity.of_uid(*machine.owner))


def display(path: Path, home: Path) -> str:
    """``~/.bashrc`` rather than ``/home/me/.bashrc`` in messages."""
    try:
        return "~/" + str(path.relative_to(home))
    except ValueError:
        return str(path)
