"""Shell profile files: which are edited, created, left alone, and that root edits them only as
their owner — in a temporary home only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import pytest

from cmm.machine import certs, profile_lines, profiles, trust
from cmm.machine.profile_lines import ADDED_NEWLINE_NOTE, MARKER, Syntax, add_line, has_line
from cmm.machine.profiles import ProfileAction

from machine_fakes import CA, NOW, POSIX_LINE, USER, make_machine, needs_root, roots_file, users_file, write_ca


def test_plan_profile() -> None:
    home = Path("/home/me")

    def is_ca(value: str) -> bool:
        return value == str(CA)

    action, new, conflicts = profiles.plan_profile("export NODE_EXTRA_CA_CERTS=/corp.pem\n", Syntax.POSIX, CA, home, is_ca)
    assert (action, conflicts) == (ProfileAction.CONFLICT, ("/corp.pem",))
    assert new == "export NODE_EXTRA_CA_CERTS=/corp.pem\n"
    mine = 'export NODE_EXTRA_CA_CERTS="$HOME/.cmm/ca.crt"\n'
    assert profiles.plan_profile(mine, Syntax.POSIX, CA, home, is_ca)[:2] == (ProfileAction.SET_BY_USER, mine)
    assert profiles.plan_profile("", Syntax.POSIX, CA, home, is_ca)[0] is ProfileAction.ADDED
    assert profiles.plan_profile(POSIX_LINE + "\n", Syntax.POSIX, CA, home, is_ca)[0] is ProfileAction.UNCHANGED
    moved = profiles.plan_profile(POSIX_LINE + "\n", Syntax.POSIX, Path("/new/ca.crt"), home, is_ca)
    assert moved[0] is ProfileAction.UPDATED


def test_default_profile() -> None:
    home = Path("/h")
    assert profiles.default_profile(home, "/bin/zsh").path == home / ".zshrc"
    assert profiles.default_profile(home, "/bin/bash").path == home / ".bashrc"
    fish = profiles.Profile(home / ".config/fish/config.fish", Syntax.FISH)
    assert profiles.default_profile(home, "/usr/local/bin/fish") == fish
    assert profiles.default_profile(home, "/bin/dash").path == home / ".profile"
    assert profiles.default_profile(home, "").path == home / ".profile"


# --- profile files -----------------------------------------------------------------------------


def test_install_profiles_edits_only_existing_ones_in_place(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    ca = write_ca(machine.home / ".cmm")
    bashrc = machine.home / ".bashrc"
    bashrc.write_bytes(b"alias ll='ls -l'\n\xff odd byte")
    bashrc.chmod(0o600)
    real_zshrc = tmp_path / "dotfiles" / "zshrc"
    real_zshrc.parent.mkdir()
    real_zshrc.write_text("")
    (machine.home / ".zshrc").symlink_to(real_zshrc)
    fish = machine.home / ".config/fish/config.fish"
    fish.parent.mkdir(parents=True)
    fish.write_text("set -g fish_greeting\n")
    inode = bashrc.stat().st_ino

    changes = profiles.install_profiles(ca, machine)
    assert [(c.path.name, c.action) for c in changes] == [
        (".bashrc", ProfileAction.ADDED),
        (".zshrc", ProfileAction.ADDED),
        ("config.fish", ProfileAction.ADDED),
    ]
    assert not (machine.home / ".profile").exists() and not (machine.home / ".bash_profile").exists()
    line = f'export NODE_EXTRA_CA_CERTS="{ca}" {MARKER}{ADDED_NEWLINE_NOTE}\n'
    assert bashrc.read_bytes() == b"alias ll='ls -l'\n\xff odd byte\n" + line.encode()
    assert stat.S_IMODE(bashrc.stat().st_mode) == 0o600 and bashrc.stat().st_ino == inode
    assert (machine.home / ".zshrc").is_symlink()
    assert real_zshrc.read_text() == f'export NODE_EXTRA_CA_CERTS="{ca}" {MARKER}\n'
    assert fish.read_text() == f'set -g fish_greeting\nset -gx NODE_EXTRA_CA_CERTS "{ca}" {MARKER}\n'

    again = profiles.install_profiles(ca, machine)
    assert {c.action for c in again} == {ProfileAction.UNCHANGED}

    removed = profiles.remove_profiles(machine, ca)
    assert {c.action for c in removed} == {ProfileAction.REMOVED}
    assert bashrc.read_bytes() == b"alias ll='ls -l'\n\xff odd byte"
    assert real_zshrc.read_text() == ""
    assert fish.read_text() == "set -g fish_greeting\n"
    assert profiles.remove_profiles(machine, ca) == ()


@pytest.mark.parametrize(
    ("shell", "created"),
    [("/bin/zsh", ".zshrc"), ("/bin/bash", ".bashrc"), ("/usr/bin/fish", ".config/fish/config.fish"), ("", ".profile")],
)
def test_profile_of_the_shell_is_created_when_there_is_none(tmp_path: Path, shell: str, created: str) -> None:
    machine = make_machine(tmp_path, shell=shell)
    ca = write_ca(machine.home / ".cmm")
    changes = profiles.install_profiles(ca, machine)
    path = machine.home / created
    assert changes == (profiles.ProfileChange(path, ProfileAction.CREATED),)
    syntax = Syntax.FISH if "fish" in shell else Syntax.POSIX
    assert path.read_text() == profile_lines.add_line("", syntax, ca)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@needs_root
def test_created_profile_belongs_to_the_sudo_user(tmp_path: Path, user_home: Path) -> None:
    machine = attrs.evolve(make_machine(tmp_path, shell="/usr/bin/fish"), home=user_home, owner=(USER, USER))
    ca = write_ca(tmp_path / "cfg")
    assert [c.action for c in profiles.install_profiles(ca, machine)] == [ProfileAction.CREATED]
    for path in (user_home / ".config", user_home / ".config/fish", user_home / ".config/fish/config.fish"):
        assert (path.stat().st_uid, path.stat().st_gid) == (USER, USER)
    assert (user_home / ".config/fish/config.fish").read_text() == add_line("", Syntax.FISH, ca)


@needs_root
def test_sudo_setup_edits_profiles_only_as_their_owner(tmp_path: Path, user_home: Path) -> None:
    """A profile linked to a root file is reported and left alone; the user's own files, linked
    or not, are edited in place and stay the user's."""
    machine = attrs.evolve(make_machine(tmp_path), home=user_home, owner=(USER, USER))
    config = user_home / ".cmm"
    config.mkdir(mode=0o700)
    os.chown(config, USER, USER)
    ca = users_file(config / "ca.crt", certs.make_ca(NOW).cert_pem.decode())
    victim = roots_file(user_home.parent / "sudoers")
    (user_home / ".bashrc").symlink_to(victim)
    os.lchown(user_home / ".bashrc", USER, USER)
    zshrc = users_file(user_home / ".zshrc", "alias ll='ls -l'\n")
    dotfile = users_file(user_home / "dotfiles" / "profile", "PATH=$PATH:~/bin\n")
    (user_home / ".profile").symlink_to(dotfile)

    report = trust.setup_trust(ca, machine, profile=True)
    assert victim.read_text() == "root's own\n" and victim.stat().st_uid == 0
    assert report.failed
    assert len(report.warnings) == 1 and "~/.bashrc" in report.warnings[0] and str(victim) in report.warnings[0]
    assert report.lines == (
        "shell profile ~/.zshrc: added the NODE_EXTRA_CA_CERTS line",
        "shell profile ~/.profile: added the NODE_EXTRA_CA_CERTS line",
    )
    for path in (zshrc, dotfile):
        assert has_line(path.read_text()) and path.stat().st_uid == USER
    assert (user_home / ".profile").is_symlink()

    victim.write_text(f'export NODE_EXTRA_CA_CERTS="{ca}" {MARKER}\n')  # cmm's line in root's file
    before = victim.read_text()
    report = trust.uninstall_trust(ca, machine)
    assert victim.read_text() == before
    assert report.failed and "~/.bashrc" in report.warnings[0]
    assert not has_line(zshrc.read_text()) and not has_line(dotfile.read_text())


@needs_root
def test_fish_folder_is_made_as_the_user(tmp_path: Path, user_home: Path) -> None:
    """A ~/.config linked to a root folder: root does not create config.fish in it."""
    machine = attrs.evolve(make_machine(tmp_path, shell="/usr/bin/fish"), home=user_home, owner=(USER, USER))
    ca = write_ca(tmp_path / "cfg")
    target = user_home.parent / "rootdir"
    target.mkdir(mode=0o755)
    (user_home / ".config").symlink_to(target)
    report = trust.setup_trust(ca, machine, profile=True)
    assert report.failed and "config.fish" in report.warnings[0]
    assert list(target.iterdir()) == []


def test_profile_pointing_elsewhere_is_left_alone(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    ca = write_ca(machine.home / ".cmm")
    zshrc = machine.home / ".zshrc"
    zshrc.write_text("export NODE_EXTRA_CA_CERTS=/etc/corp.pem\n")
    bundle = machine.home / "bundle.pem"
    bundle.write_bytes(certs.make_ca(NOW).cert_pem + ca.read_bytes())
    profile = machine.home / ".profile"
    profile.write_text(f"export NODE_EXTRA_CA_CERTS={bundle}\n")  # the user combined them already

    changes = profiles.install_profiles(ca, machine)
    assert [(c.path.name, c.action, c.others) for c in changes] == [
        (".zshrc", ProfileAction.CONFLICT, ("/etc/corp.pem",)),
        (".profile", ProfileAction.SET_BY_USER, ()),
    ]
    assert zshrc.read_text() == "export NODE_EXTRA_CA_CERTS=/etc/corp.pem\n"
    assert profile.read_text() == f"export NODE_EXTRA_CA_CERTS={bundle}\n"
    advice = trust.conflict_advice(zshrc, ["/etc/corp.pem"], ca, machine.home)
    assert "~/.zshrc" in advice and "single file" in advice and f"cat /etc/corp.pem {ca}" in advice


def test_pem_bundle_contains() -> None:
    ours, other = certs.make_ca(NOW).cert_pem, certs.make_ca(NOW).cert_pem
    assert certs.pem_bundle_contains(other + b"\n" + ours, ours)
    assert not certs.pem_bundle_contains(other, ours)
    assert not certs.pem_bundle_contains(b"garbage", b"garbage")
