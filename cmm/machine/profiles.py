"""The user's shell profiles: putting cmm's ``NODE_EXTRA_CA_CERTS`` line in them and taking it out.

The line itself is :mod:`cmm.machine.profile_lines`.  Files are rewritten in place (dotfiles are
often symlinks into a dotfiles repository; a rename would replace the link with a copy), always
as the profiles' owner.  A profile that already sets the variable to another file is left alone
and reported: Node reads a single file, so the user has to combine the PEMs or choose.
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable
from pathlib import Path

import attrs

from cmm.config.textfile import rewrite_in_place
from cmm.machine.certs import pem_bundle_contains
from cmm.machine.commands import Machine, as_owner
from cmm.machine.profile_lines import Syntax, add_line, assignments, has_line, remove_line
from cmm.machine.trust_stores import read_ca


@attrs.frozen
class Profile:
    path: Path
    syntax: Syntax


POSIX_PROFILES = (".bashrc", ".bash_profile", ".zshrc", ".profile")
FISH_CONFIG = ".config/fish/config.fish"


def profiles(home: Path) -> tuple[Profile, ...]:
    """Every profile cmm may edit, whether it exists or not."""
    return tuple(Profile(home / name, Syntax.POSIX) for name in POSIX_PROFILES) + (
        Profile(home / FISH_CONFIG, Syntax.FISH),
    )


def existing_profiles(home: Path) -> tuple[Profile, ...]:
    """The profiles that are (or link to) regular files the caller can see."""
    return tuple(profile for profile in profiles(home) if _is_file(profile.path))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a folder on the way its owner cannot search
        return False


def default_profile(home: Path, shell: str) -> Profile:
    """The profile to create when the user has none: the one their shell reads in a new terminal
    (zsh: ~/.zshrc, bash: ~/.bashrc, fish: config.fish), else ~/.profile."""
    name = Path(shell).name
    if name.startswith("fish"):
        return Profile(home / FISH_CONFIG, Syntax.FISH)
    chosen = {"zsh": ".zshrc", "bash": ".bashrc"}.get(name, ".profile")
    return Profile(home / chosen, Syntax.POSIX)


def read_profile(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape")


def points_at_ca(value: str, ca_cert: Path, ca_pem: bytes | None) -> bool:
    """The value names cmm's CA file, or a bundle that contains cmm's CA."""
    if not value:
        return False
    if os.path.normpath(value) == os.path.normpath(str(ca_cert)):
        return True
    if not ca_pem or not os.path.isabs(value):
        return False
    try:
        return pem_bundle_contains(Path(value).read_bytes(), ca_pem)
    except OSError:
        return False


class ProfileAction(enum.Enum):
    ADDED = "added the NODE_EXTRA_CA_CERTS line"
    UPDATED = "updated the NODE_EXTRA_CA_CERTS line"
    UNCHANGED = "NODE_EXTRA_CA_CERTS line already there"
    CREATED = "created it with the NODE_EXTRA_CA_CERTS line"
    SET_BY_USER = "already sets it to cmm's CA (your own line, left as it is)"
    CONFLICT = "left alone: it sets NODE_EXTRA_CA_CERTS to another file"
    REMOVED = "removed the line"
    FAILED = "cannot be edited"


@attrs.frozen
class ProfileChange:
    """What happened to one profile; ``others`` are the values set by lines cmm did not write."""

    path: Path
    action: ProfileAction
    others: tuple[str, ...] = ()


def plan_profile(
    text: str, syntax: Syntax, ca_cert: Path, home: Path, is_ca: Callable[[str], bool]
) -> tuple[ProfileAction, str, tuple[str, ...]]:
    """What to do with one profile's text: (action, new text, conflicting values).

    A line of the user's that sets the variable to another file wins over adding ours: appending
    would silently replace their CA file with ours (Node reads only one).
    """
    found = assignments(text, home)
    others = tuple(a.value for a in found if not a.managed)
    conflicts = tuple(value for value in others if not is_ca(value))
    if conflicts:
        return ProfileAction.CONFLICT, text, conflicts
    if others and not any(a.managed for a in found):
        return ProfileAction.SET_BY_USER, text, ()
    new = add_line(text, syntax, ca_cert)
    if new == text:
        return ProfileAction.UNCHANGED, text, ()
    return (ProfileAction.UPDATED if any(a.managed for a in found) else ProfileAction.ADDED), new, ()


def _create(path: Path, text: str, home: Path) -> None:
    """A new profile (and its folders below ``home``); run as the profile's owner."""
    if not home.is_dir():
        raise FileNotFoundError(2, "No such directory", str(home))
    missing = []
    parent = path.parent
    while parent != home and not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(text.encode("utf-8", "surrogateescape"))
        handle.flush()
        os.fsync(handle.fileno())


def _failure(path: Path, error: OSError) -> ProfileChange:
    return ProfileChange(path, ProfileAction.FAILED, (error.strerror or str(error),))


def install_profiles(ca_cert: Path, machine: Machine, ca_pem: bytes | None = None) -> tuple[ProfileChange, ...]:
    """Put cmm's line in every existing profile (or create the shell's profile if there is none).

    Files are rewritten in place, so they keep their mode, owner and symlinks; all of it is done
    as the profiles' owner (:func:`as_owner`).  A profile that cannot be read or written that way
    is reported (FAILED) and left alone; the others are still edited.
    """
    if ca_pem is None:
        ca_pem = read_ca(ca_cert, machine)

    def is_ca(value: str) -> bool:
        return points_at_ca(value, ca_cert, ca_pem)

    with as_owner(machine):
        found = existing_profiles(machine.home)
        if not found:
            profile = default_profile(machine.home, machine.shell)
            try:
                _create(profile.path, add_line("", profile.syntax, ca_cert), machine.home)
            except OSError as error:
                return (_failure(profile.path, error),)
            return (ProfileChange(profile.path, ProfileAction.CREATED),)
        changes = []
        for profile in found:
            try:
                action, _, conflicts = plan_profile(read_profile(profile.path), profile.syntax, ca_cert, machine.home, is_ca)
                if action in (ProfileAction.ADDED, ProfileAction.UPDATED):
                    # Recomputed on the text as read for writing, so a concurrent edit is not lost.
                    rewrite_in_place(profile.path, functools.partial(add_line, syntax=profile.syntax, ca_cert=ca_cert))
            except OSError as error:
                changes.append(_failure(profile.path, error))
                continue
            changes.append(ProfileChange(profile.path, action, conflicts))
    return tuple(changes)


def remove_profiles(machine: Machine, ca_cert: Path | None = None) -> tuple[ProfileChange, ...]:
    """Take cmm's line out of every profile, as their owner; lines of the user's that name
    ``ca_cert`` are reported (as SET_BY_USER) but left for the user to delete, and a profile that
    cannot be edited is reported (FAILED)."""
    changes = []
    with as_owner(machine):
        for profile in existing_profiles(machine.home):
            try:
                text = read_profile(profile.path)
                if has_line(text):
                    rewrite_in_place(profile.path, remove_line)
                    changes.append(ProfileChange(profile.path, ProfileAction.REMOVED))
            except OSError as error:
                changes.append(_failure(profile.path, error))
                continue
            if ca_cert is not None:
                own = tuple(
                    a.value for a in assignments(text, machine.home)
                    if not a.managed and points_at_ca(a.value, ca_cert, None)
                )
                if own:
                    changes.append(ProfileChange(profile.path, ProfileAction.SET_BY_USER, own))
    return tuple(changes)
