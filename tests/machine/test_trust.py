"""Trust for cmm's CA: the profile-line transform (Hypothesis), profile files, the system trust
stores with fake tools, the status query, and the config-folder removal — on temporary paths only.

Nothing here reads or writes the real home, shell profiles or trust store: every test builds a
:class:`Machine` whose home and root are temporary folders and whose commands are fakes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote_from_bytes

import attrs
import pytest
from cryptography import x509
from hypothesis import assume, example, given
from hypothesis import strategies as st

from cmm.machine import certs, trust
from cmm.machine.trust import (
    ADDED_NEWLINE_NOTE,
    MARKER,
    CommandResult,
    Machine,
    ProfileAction,
    StoreKind,
    SystemStore,
    Syntax,
    TrustError,
    add_line,
    assignments,
    has_line,
    remove_line,
)

from support import AWKWARD_TEXT_PIECES

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
CA = Path("/home/me/.cmm/ca.crt")
POSIX_LINE = f'export NODE_EXTRA_CA_CERTS="{CA}" {MARKER}'
FISH_LINE = f'set -gx NODE_EXTRA_CA_CERTS "{CA}" {MARKER}'

# --- the pure transform ------------------------------------------------------------------------

_pieces = st.sampled_from(
    [
        POSIX_LINE,
        FISH_LINE,
        POSIX_LINE + ADDED_NEWLINE_NOTE,
        f'export NODE_EXTRA_CA_CERTS="/elsewhere.pem" {MARKER}',
        "export NODE_EXTRA_CA_CERTS=/etc/corp.pem",
        f"# {MARKER}",
        MARKER,
        "alias ll='ls -l'",
        *AWKWARD_TEXT_PIECES,
    ]
)
texts = st.one_of(st.text(), st.lists(st.one_of(_pieces, st.text(max_size=5)), max_size=12).map("".join))
syntaxes = st.sampled_from(list(Syntax))
ca_paths = st.one_of(
    st.just(str(CA)),
    st.sampled_from(["/x/$HOME/ca.crt", "/x/${HOME}", "/$HOMEDIR/a b", '/q"\\`$x', "/~/'it'"]),
    st.text(st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), min_size=1, max_size=30).map(
        lambda name: "/tmp/" + name
    ),
)


@given(texts, syntaxes, ca_paths)
@example("", Syntax.POSIX, str(CA))
@example("alias x=y", Syntax.POSIX, str(CA))
@example("a\r\nb", Syntax.FISH, str(CA))
@example("a\r", Syntax.POSIX, str(CA))
@example(POSIX_LINE + "\r", Syntax.POSIX, str(CA))
def test_remove_undoes_add(text: str, syntax: Syntax, ca: str) -> None:
    assume(not has_line(text))
    added = add_line(text, syntax, ca)
    assert has_line(added)
    assert remove_line(added) == text


@given(texts, syntaxes, ca_paths)
def test_add_is_idempotent(text: str, syntax: Syntax, ca: str) -> None:
    once = add_line(text, syntax, ca)
    assert add_line(once, syntax, ca) == once


@given(texts, syntaxes, ca_paths)
def test_add_then_remove_equals_remove(text: str, syntax: Syntax, ca: str) -> None:
    assert remove_line(add_line(text, syntax, ca)) == remove_line(text)


@given(texts)
def test_remove_leaves_no_line(text: str) -> None:
    assert not has_line(remove_line(text))


@given(texts, syntaxes, ca_paths)
def test_added_line_reads_back_as_the_path(text: str, syntax: Syntax, ca: str) -> None:
    for home in (None, Path("/home/me")):  # the written path is quoted: nothing in it expands
        found = [a for a in assignments(add_line(text, syntax, ca), home) if a.managed]
        assert [a.value for a in found] == [ca]


def test_appended_at_the_end() -> None:
    assert add_line("alias ll='ls -l'\n", Syntax.POSIX, CA) == f"alias ll='ls -l'\n{POSIX_LINE}\n"
    assert add_line("", Syntax.FISH, CA) == f"{FISH_LINE}\n"


def test_missing_final_newline_is_added_and_noted() -> None:
    added = add_line("alias ll='ls -l'", Syntax.POSIX, CA)
    assert added == f"alias ll='ls -l'\n{POSIX_LINE}{ADDED_NEWLINE_NOTE}\n"
    assert remove_line(added) == "alias ll='ls -l'"
    # the user wrote below it since: the line goes, their line break stays
    assert remove_line(added + "echo hi\n") == "alias ll='ls -l'\necho hi\n"


def test_crlf_profile_gets_crlf_line() -> None:
    added = add_line("a\r\n", Syntax.POSIX, CA)
    assert added == f"a\r\n{POSIX_LINE}\r\n"
    assert remove_line(added) == "a\r\n"


def test_changed_path_is_updated_where_it_is() -> None:
    text = f"a\n{POSIX_LINE}\nb\n"
    updated = add_line(text, Syntax.POSIX, "/new/ca.crt")
    assert updated == f'a\nexport NODE_EXTRA_CA_CERTS="/new/ca.crt" {MARKER}\nb\n'
    assert remove_line(updated) == "a\nb\n"


def test_prior_art_line_is_recognised() -> None:
    """The Node tool appended "\\n<line>\\n" to ~/.zshrc with exactly this line."""
    zshrc = 'export PATH=x\n\nexport NODE_EXTRA_CA_CERTS="/Users/me/.cmm/ca.crt" # cmm-managed\n'
    assert has_line(zshrc)
    assert remove_line(zshrc) == "export PATH=x\n\n"


def test_duplicates_become_one_line_at_the_end() -> None:
    text = f"{POSIX_LINE}\na\n{POSIX_LINE}\n"
    assert add_line(text, Syntax.POSIX, CA) == f"a\n{POSIX_LINE}\n"


def test_mentions_of_the_marker_are_not_lines() -> None:
    text = f"# {POSIX_LINE}\necho '{MARKER}'\nexport NODE_EXTRA_CA_CERTS=/x # cmm-managed-not\n"
    assert not has_line(text)
    assert remove_line(text) == text


def test_path_with_line_break_is_refused() -> None:
    with pytest.raises(ValueError):
        add_line("", Syntax.POSIX, "/a\nb")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_written_line_sets_the_variable_in_bash(tmp_path: Path) -> None:
    odd = str(tmp_path / 'we"ird $dir `x` \\ é')
    profile = tmp_path / "profile"
    profile.write_text(add_line("", Syntax.POSIX, odd))
    printed = subprocess.run(
        ["bash", "-c", f'. "{profile}"; printf %s "$NODE_EXTRA_CA_CERTS"'], capture_output=True, text=True
    )
    assert printed.stdout == odd
    assert [a.value for a in assignments(profile.read_text())] == [odd]


def test_written_line_quotes_for_fish(tmp_path: Path) -> None:
    """fish reads a double-quoted string with only \\", \\$ and \\\\ as escapes (fish-shell docs,
    "Quotes"); the line must escape exactly those. (fish itself is not on the test machines.)"""
    odd = '/tmp/we"ird $dir \\ x'
    line = add_line("", Syntax.FISH, odd)
    assert line == 'set -gx NODE_EXTRA_CA_CERTS "/tmp/we\\"ird \\$dir \\\\ x" # cmm-managed\n'
    assert [a.value for a in assignments(line)] == [odd]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("export NODE_EXTRA_CA_CERTS=/etc/corp.pem", "/etc/corp.pem"),
        ("  export NODE_EXTRA_CA_CERTS='/etc/a b.pem'  # corp", "/etc/a b.pem"),
        ('NODE_EXTRA_CA_CERTS="$HOME/.cmm/ca.crt"', "/home/me/.cmm/ca.crt"),
        ("export NODE_EXTRA_CA_CERTS=${HOME}/x.pem", "/home/me/x.pem"),
        ("export NODE_EXTRA_CA_CERTS=$HOMEDIR/x.pem", "$HOMEDIR/x.pem"),  # another variable
        ('export NODE_EXTRA_CA_CERTS="\\$HOME/x.pem"', "$HOME/x.pem"),  # escaped: literal
        ("export NODE_EXTRA_CA_CERTS=~/x.pem", "/home/me/x.pem"),
        ("declare -x NODE_EXTRA_CA_CERTS=/d.pem", "/d.pem"),
        ("set -gx NODE_EXTRA_CA_CERTS /f.pem", "/f.pem"),
        ("set -Ux NODE_EXTRA_CA_CERTS '/g.pem'", "/g.pem"),
        ("set --global --export NODE_EXTRA_CA_CERTS ~/h.pem", "/home/me/h.pem"),
    ],
)
def test_assignments_of_other_tools_and_users(line: str, value: str) -> None:
    found = assignments(f"# x\n{line}\n", Path("/home/me"))
    assert found == (trust.Assignment(value, False, 2),)


@pytest.mark.parametrize(
    "line",
    [
        "# export NODE_EXTRA_CA_CERTS=/x",
        "NODE_EXTRA_CA_CERTS=/x node app.js",  # one command's environment, not the shell's
        "unset NODE_EXTRA_CA_CERTS",
        "set -g NODE_EXTRA_CA_CERTS /x",  # fish without -x: not exported
        "echo $NODE_EXTRA_CA_CERTS",
    ],
)
def test_lines_that_set_nothing(line: str) -> None:
    assert assignments(line + "\n") == ()


def test_plan_profile() -> None:
    home = Path("/home/me")

    def is_ca(value: str) -> bool:
        return value == str(CA)

    action, new, conflicts = trust.plan_profile("export NODE_EXTRA_CA_CERTS=/corp.pem\n", Syntax.POSIX, CA, home, is_ca)
    assert (action, conflicts) == (ProfileAction.CONFLICT, ("/corp.pem",))
    assert new == "export NODE_EXTRA_CA_CERTS=/corp.pem\n"
    mine = 'export NODE_EXTRA_CA_CERTS="$HOME/.cmm/ca.crt"\n'
    assert trust.plan_profile(mine, Syntax.POSIX, CA, home, is_ca)[:2] == (ProfileAction.SET_BY_USER, mine)
    assert trust.plan_profile("", Syntax.POSIX, CA, home, is_ca)[0] is ProfileAction.ADDED
    assert trust.plan_profile(POSIX_LINE + "\n", Syntax.POSIX, CA, home, is_ca)[0] is ProfileAction.UNCHANGED
    moved = trust.plan_profile(POSIX_LINE + "\n", Syntax.POSIX, Path("/new/ca.crt"), home, is_ca)
    assert moved[0] is ProfileAction.UPDATED


def test_shell_syntax_and_default_profile() -> None:
    home = Path("/h")
    assert trust.syntax_of("/usr/bin/fish") is Syntax.FISH and trust.syntax_of("/bin/zsh") is Syntax.POSIX
    assert trust.default_profile(home, "/bin/zsh").path == home / ".zshrc"
    assert trust.default_profile(home, "/bin/bash").path == home / ".bashrc"
    fish = trust.Profile(home / ".config/fish/config.fish", Syntax.FISH)
    assert trust.default_profile(home, "/usr/local/bin/fish") == fish
    assert trust.default_profile(home, "/bin/dash").path == home / ".profile"
    assert trust.default_profile(home, "").path == home / ".profile"
    assert trust.export_line(Syntax.POSIX, "/a") == 'export NODE_EXTRA_CA_CERTS="/a"'
    assert trust.unset_line(Syntax.FISH) == "set -e NODE_EXTRA_CA_CERTS"


# --- fakes -------------------------------------------------------------------------------------


@attrs.define
class FakeTools:
    """Commands the tests allow, recording every call; p11-kit's trust and macOS's security keep
    a little state so that status, store and remove agree."""

    calls: list[list[str]] = attrs.field(factory=list)
    fail: set[str] = attrs.field(factory=set)
    anchors: dict[str, str] = attrs.field(factory=dict)  # p11-kit: uri -> label
    keychain: dict[str, str] = attrs.field(factory=dict)  # macOS: SHA-1 -> common name
    stored: list[tuple[str, bytes]] = attrs.field(factory=list)  # (path, bytes) each tool read
    before_read: Callable[[], None] = lambda: None  # what someone else does just before the tool reads

    def read(self, path: str) -> bytes:
        self.before_read()
        data = Path(path).read_bytes()
        self.stored.append((path, data))
        return data

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        tool = Path(argv[0]).name
        if tool in self.fail:
            return CommandResult(1, "", f"{tool}: it broke")
        if tool == "trust":
            return self._trust(argv[1:])
        if tool == "security":
            return self._security(argv[1:])
        return CommandResult(0, "Updating certificates... done.\n")

    def _trust(self, args: list[str]) -> CommandResult:
        if args[:1] == ["list"]:
            listing = "".join(
                f"{uri}\n    type: certificate\n    label: {label}\n    trust: anchor\n    category: authority\n\n"
                for uri, label in self.anchors.items()
            )
            return CommandResult(0, listing)
        if args[:2] == ["anchor", "--store"]:
            cert = x509.load_pem_x509_certificate(self.read(args[2]))
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            label = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            self.anchors[f"pkcs11:id={quote_from_bytes(ski, safe='')};type=cert"] = str(label)
            return CommandResult(0)
        if args[:2] == ["anchor", "--remove"]:
            return CommandResult(0) if self.anchors.pop(args[2], None) else CommandResult(1, "", "not found")
        return CommandResult(2, "", "usage")

    def _security(self, args: list[str]) -> CommandResult:
        if args[0] == "find-certificate":
            name = args[args.index("-c") + 1]
            found = [digest for digest, cn in self.keychain.items() if name in cn]
            if not found:
                return CommandResult(44, "", "The specified item could not be found in the keychain.")
            listing = "".join(f'SHA-256 hash: {"0" * 64}\nSHA-1 hash: {d}\nkeychain: "x"\n' for d in found)
            return CommandResult(0, listing)
        if args[0] == "add-trusted-cert":
            der = trust.pem_certificates(self.read(args[-1]))[0]
            cert = x509.load_der_x509_certificate(der)
            self.keychain[hashlib.sha1(der).hexdigest().upper()] = str(
                cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            )
            return CommandResult(0)
        if args[0] == "remove-trusted-cert":
            self.read(args[-1])
            return CommandResult(0)
        if args[0] == "delete-certificate":
            self.keychain.pop(args[args.index("-Z") + 1])
            return CommandResult(0)
        return CommandResult(0)

    def commands(self) -> list[str]:
        return [" ".join([Path(argv[0]).name, *argv[1:]]) for argv in self.calls]


def make_machine(
    tmp_path: Path,
    tools: FakeTools | None = None,
    *,
    have: Sequence[str] = (),
    is_root: bool = True,
    platform: str = "linux",
    shell: str = "/bin/bash",
    environment_value: str | None = None,
) -> Machine:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (tmp_path / "root").mkdir(exist_ok=True)
    available = set(have)
    return Machine(
        home=home,
        shell=shell,
        is_root=is_root,
        root=tmp_path / "root",
        platform=platform,
        environment_value=environment_value,
        which=lambda name: f"/usr/sbin/{name}" if name in available else None,
        run=tools if tools is not None else FakeTools(),
    )


def write_ca(directory: Path, common_name: str = "cmm local CA") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.crt"
    path.write_bytes(certs.make_ca(NOW, common_name=common_name).cert_pem)
    return path


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

    changes = trust.install_profiles(ca, machine)
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

    again = trust.install_profiles(ca, machine)
    assert {c.action for c in again} == {ProfileAction.UNCHANGED}

    removed = trust.remove_profiles(machine, ca)
    assert {c.action for c in removed} == {ProfileAction.REMOVED}
    assert bashrc.read_bytes() == b"alias ll='ls -l'\n\xff odd byte"
    assert real_zshrc.read_text() == ""
    assert fish.read_text() == "set -g fish_greeting\n"
    assert trust.remove_profiles(machine, ca) == ()


@pytest.mark.parametrize(
    ("shell", "created"),
    [("/bin/zsh", ".zshrc"), ("/bin/bash", ".bashrc"), ("/usr/bin/fish", ".config/fish/config.fish"), ("", ".profile")],
)
def test_profile_of_the_shell_is_created_when_there_is_none(tmp_path: Path, shell: str, created: str) -> None:
    machine = make_machine(tmp_path, shell=shell)
    ca = write_ca(machine.home / ".cmm")
    changes = trust.install_profiles(ca, machine)
    path = machine.home / created
    assert changes == (trust.ProfileChange(path, ProfileAction.CREATED),)
    syntax = Syntax.FISH if "fish" in shell else Syntax.POSIX
    assert path.read_text() == trust.add_line("", syntax, ca)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


USER = 65534  # nobody: the user who ran sudo, in the tests that act as another user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A home of uid 65534 that uid can reach (pytest's tmp_path is under root's 0700 folder)."""
    base = Path(tempfile.mkdtemp(prefix="cmm-home-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, USER, USER)
        yield home
    finally:
        shutil.rmtree(base)


def _users_file(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, USER, USER)
    return path


def _victim(path: Path) -> Path:
    """A root file the user can read but not write, as /etc/sudoers.d/x or /etc/profile would be."""
    path.write_text("root's own\n")
    path.chmod(0o644)
    return path


@needs_root
def test_created_profile_belongs_to_the_sudo_user(tmp_path: Path, user_home: Path) -> None:
    machine = attrs.evolve(make_machine(tmp_path, shell="/usr/bin/fish"), home=user_home, owner=(USER, USER))
    ca = write_ca(tmp_path / "cfg")
    assert [c.action for c in trust.install_profiles(ca, machine)] == [ProfileAction.CREATED]
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
    ca = _users_file(config / "ca.crt", certs.make_ca(NOW).cert_pem.decode())
    victim = _victim(user_home.parent / "sudoers")
    (user_home / ".bashrc").symlink_to(victim)
    os.lchown(user_home / ".bashrc", USER, USER)
    zshrc = _users_file(user_home / ".zshrc", "alias ll='ls -l'\n")
    dotfile = _users_file(user_home / "dotfiles" / "profile", "PATH=$PATH:~/bin\n")
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


@needs_root
def test_ca_is_read_as_the_user_never_through_a_link(tmp_path: Path, user_home: Path) -> None:
    """ca.crt linked to a file only root can read gives root's tools nothing of it."""
    tools = FakeTools()
    machine = attrs.evolve(make_machine(tmp_path, tools, have=["trust"]), home=user_home, owner=(USER, USER))
    secret = tmp_path / "root-only.pem"
    secret.write_bytes(certs.make_ca(NOW).cert_pem)
    secret.chmod(0o600)
    config = user_home / ".cmm"
    config.mkdir()
    os.chown(config, USER, USER)
    (config / "ca.crt").symlink_to(secret)
    assert trust.read_ca(config / "ca.crt", machine) is None
    store = trust.detect_system_store(machine)
    assert store is not None
    with pytest.raises(TrustError):
        trust.install_system_trust(store, config / "ca.crt", machine)
    assert tools.stored == []
    assert trust.system_preflight(config / "ca.crt", machine, requested=False, force=True) == (None, None)


def test_profile_pointing_elsewhere_is_left_alone(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    ca = write_ca(machine.home / ".cmm")
    zshrc = machine.home / ".zshrc"
    zshrc.write_text("export NODE_EXTRA_CA_CERTS=/etc/corp.pem\n")
    bundle = machine.home / "bundle.pem"
    bundle.write_bytes(certs.make_ca(NOW).cert_pem + ca.read_bytes())
    profile = machine.home / ".profile"
    profile.write_text(f"export NODE_EXTRA_CA_CERTS={bundle}\n")  # the user combined them already

    changes = trust.install_profiles(ca, machine)
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
    assert trust.pem_bundle_contains(other + b"\n" + ours, ours)
    assert not trust.pem_bundle_contains(other, ours)
    assert not trust.pem_bundle_contains(b"garbage", b"garbage")


# --- system trust stores -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "have", "dirs", "kind"),
    [
        ("darwin", ["security", "trust"], ["Library/Keychains/System.keychain"], StoreKind.MACOS),
        ("darwin", ["security"], [], None),  # no System keychain: not a Mac after all
        ("linux", ["security", "update-ca-certificates", "trust"], [], StoreKind.DEBIAN),
        ("linux", ["update-ca-trust", "trust"], ["etc/pki/ca-trust/source/anchors"], StoreKind.FEDORA),
        ("linux", ["update-ca-trust", "trust"], [], StoreKind.P11KIT),  # Arch: no /etc/pki
        ("linux", ["trust"], [], StoreKind.P11KIT),
        ("linux", [], ["etc/pki/ca-trust/source/anchors"], None),
    ],
)
def test_detection(tmp_path: Path, platform: str, have: list[str], dirs: list[str], kind: StoreKind | None) -> None:
    machine = make_machine(tmp_path, have=have, platform=platform)
    for name in dirs:
        (machine.root / name).mkdir(parents=True)
    store = trust.detect_system_store(machine)
    assert (store.kind if store else None) is kind
    if kind is StoreKind.DEBIAN:
        assert store is not None and store.location == machine.root / "usr/local/share/ca-certificates/cmm-local-ca.crt"


@pytest.mark.parametrize(
    ("have", "dirs", "update"),
    [
        (["update-ca-certificates"], ["usr/local/share/ca-certificates"], ["update-ca-certificates"]),
        (["update-ca-trust"], ["etc/pki/ca-trust/source/anchors"], ["update-ca-trust extract"]),
    ],
)
def test_file_based_store(tmp_path: Path, have: list[str], dirs: list[str], update: list[str]) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=have)
    for name in dirs:
        (machine.root / name).mkdir(parents=True)
    store = trust.detect_system_store(machine)
    assert store is not None and store.location is not None
    ca = write_ca(tmp_path / "cfg")
    assert trust.system_status(store, ca.read_bytes(), machine) == trust.SystemTrustStatus(store, False, False)

    assert "added cmm's CA to" in trust.install_system_trust(store, ca, machine)
    assert store.location.read_bytes() == ca.read_bytes()
    assert stat.S_IMODE(store.location.stat().st_mode) == 0o644
    assert tools.commands() == update
    assert trust.system_status(store, ca.read_bytes(), machine) == trust.SystemTrustStatus(store, True, True)

    assert "already trusts" in trust.install_system_trust(store, ca, machine)
    assert tools.commands() == update  # nothing run again

    new_ca = write_ca(tmp_path / "cfg")  # setup --force
    assert trust.system_status(store, new_ca.read_bytes(), machine).current is False
    assert "replaced the old cmm CA" in trust.install_system_trust(store, new_ca, machine)
    assert store.location.read_bytes() == new_ca.read_bytes()

    assert trust.remove_system_trust(store, machine, new_ca) is not None
    assert not store.location.exists()
    assert tools.commands() == update * 3
    assert trust.remove_system_trust(store, machine, new_ca) is None
    assert tools.commands() == update * 3


def test_p11kit_store(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["trust"])
    store = trust.detect_system_store(machine)
    assert store is not None and store.kind is StoreKind.P11KIT
    tools.anchors["pkcs11:id=%01%02;type=cert"] = "Some Other Root"
    ca = write_ca(tmp_path / "cfg")

    trust.install_system_trust(store, ca, machine)
    assert tools.commands()[-1].startswith("trust anchor --store ")
    assert_private_copy(tools, ca)
    assert trust.system_status(store, ca.read_bytes(), machine) == trust.SystemTrustStatus(store, True, True)

    new_ca = write_ca(tmp_path / "cfg")
    assert trust.system_status(store, new_ca.read_bytes(), machine) == trust.SystemTrustStatus(store, True, False)
    assert "replaced" in trust.install_system_trust(store, new_ca, machine)
    assert len(tools.anchors) == 2  # the old cmm CA went, the other root stayed

    tools.calls.clear()
    assert trust.remove_system_trust(store, machine, new_ca) is not None
    assert [c[:3] for c in tools.calls] == [
        ["/usr/sbin/trust", "list", "--filter=ca-anchors"],
        ["/usr/sbin/trust", "list", "--filter=ca-anchors"],
        ["/usr/sbin/trust", "anchor", "--remove"],
    ]
    assert list(tools.anchors.values()) == ["Some Other Root"]


def assert_private_copy(tools: FakeTools, ca: Path) -> None:
    """The tool read the checked bytes from root's own copy, which is gone afterwards."""
    path, data = tools.stored[-1]
    assert data == ca.read_bytes()
    assert Path(path) != ca and Path(path).parent.parent == Path(trust.PRIVATE_COPY_PARENT)
    assert not Path(path).parent.exists()


def test_macos_keychain(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["security"], platform="darwin")
    keychain = machine.root / "Library/Keychains/System.keychain"
    keychain.parent.mkdir(parents=True)
    keychain.write_bytes(b"")
    store = trust.detect_system_store(machine)
    assert store is not None and store.kind is StoreKind.MACOS
    ca = write_ca(tmp_path / "cfg")

    trust.install_system_trust(store, ca, machine)
    assert tools.commands()[-1].startswith(f"security add-trusted-cert -d -r trustRoot -k {keychain} ")
    assert_private_copy(tools, ca)
    assert trust.system_status(store, ca.read_bytes(), machine).current is True

    new_ca = write_ca(tmp_path / "cfg")
    trust.install_system_trust(store, new_ca, machine)
    assert len(tools.keychain) == 1 and trust.system_status(store, new_ca.read_bytes(), machine).current

    assert trust.remove_system_trust(store, machine, new_ca) is not None
    assert tools.keychain == {}
    removal = next(c for c in tools.calls if c[1] == "remove-trusted-cert")
    assert removal[-1] != str(new_ca)  # root's own copy of the checked certificate, not the user's path
    assert_private_copy(tools, new_ca)
    assert any(c.startswith("security delete-certificate -Z ") for c in tools.commands())


def test_store_needs_root_and_reports_tool_failures(tmp_path: Path) -> None:
    tools = FakeTools(fail={"update-ca-certificates"})
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"], is_root=False)
    store = trust.detect_system_store(machine)
    assert store is not None
    ca = write_ca(tmp_path / "cfg")
    with pytest.raises(TrustError, match="needs root"):
        trust.install_system_trust(store, ca, machine)
    assert tools.calls == [] and not store.location.exists()  # type: ignore[union-attr]
    with pytest.raises(TrustError, match="it broke"):
        trust.install_system_trust(store, ca, attrs.evolve(machine, is_root=True))


STORES = [
    pytest.param(["update-ca-certificates"], "linux", id="debian"),
    pytest.param(["trust"], "linux", id="p11kit"),
    pytest.param(["security"], "darwin", id="macos"),
]


def store_for(tmp_path: Path, tools: FakeTools, have: list[str], platform: str) -> SystemStore:
    machine = make_machine(tmp_path, tools, have=have, platform=platform)
    keychain = machine.system_path(trust.MACOS_KEYCHAIN)
    keychain.parent.mkdir(parents=True, exist_ok=True)
    keychain.write_bytes(b"")
    store = trust.detect_system_store(machine)
    assert store is not None
    return store


def refused_cas(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """ca.crt files root must not make system roots, and the reason it gives for each."""
    config = tmp_path / "refused"
    config.mkdir()
    made = {
        "old": (certs.make_ca(NOW, excluded_networks=()).cert_pem, "cmm setup --force"),
        "open": (certs.make_ca(NOW, permitted_names=None).cert_pem, "without cmm's name constraint"),
        "bundle": (certs.make_ca(NOW).cert_pem + certs.make_ca(NOW, permitted_names=None).cert_pem,
                   "exactly one certificate"),
        "junk": (b"-----BEGIN CERTIFICATE-----\nbm90\n-----END CERTIFICATE-----\n", "not a PEM certificate"),
    }
    found = {}
    for name, (pem, reason) in made.items():
        (config / name).mkdir()
        (config / name / "ca.crt").write_bytes(pem)
        found[name] = (config / name / "ca.crt", reason)
    elsewhere = write_ca(tmp_path / "elsewhere")  # a good CA, but reached through a link
    (config / "link").mkdir()
    (config / "link" / "ca.crt").symlink_to(elsewhere)
    found["link"] = (config / "link" / "ca.crt", "symbolic link")
    found["missing"] = (config / "missing" / "ca.crt", "run `cmm setup` first")
    return found


@pytest.mark.parametrize(("have", "platform"), STORES)
def test_system_trust_installs_only_cmms_constrained_ca(tmp_path: Path, have: list[str], platform: str) -> None:
    tools = FakeTools()
    store = store_for(tmp_path, tools, have, platform)
    machine = make_machine(tmp_path, tools, have=have, platform=platform)
    for name, (ca, reason) in refused_cas(tmp_path).items():
        with pytest.raises(TrustError, match="not making .* a system root") as refused:
            trust.install_system_trust(store, ca, machine)
        assert reason in str(refused.value), name
    assert tools.calls == [] and tools.stored == []
    assert store.location is None or store.kind is StoreKind.MACOS or not store.location.exists()
    assert tools.keychain == {} and tools.anchors == {}


@pytest.mark.parametrize(("have", "platform"), STORES[1:])
def test_system_trust_tool_gets_the_checked_bytes(tmp_path: Path, have: list[str], platform: str) -> None:
    """Swapping ca.crt between root's check and the tool's read changes nothing."""
    tools = FakeTools()
    store = store_for(tmp_path, tools, have, platform)
    machine = make_machine(tmp_path, tools, have=have, platform=platform)
    ca = write_ca(tmp_path / "cfg")
    checked = ca.read_bytes()
    tools.before_read = lambda: ca.write_bytes(certs.make_ca(NOW, permitted_names=None).cert_pem)
    trust.install_system_trust(store, ca, machine)
    assert tools.stored[-1][1] == checked != ca.read_bytes()


def test_setup_trust_reports_a_refused_ca(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"])
    store = trust.detect_system_store(machine)
    old = tmp_path / "cfg" / "ca.crt"
    old.parent.mkdir()
    old.write_bytes(certs.make_ca(NOW, excluded_networks=()).cert_pem)
    report = trust.setup_trust(old, machine, profile=False, store=store, system_requested=True)
    assert report.failed and "cmm setup --force" in report.warnings[0]
    assert tools.calls == []


def test_preflight(tmp_path: Path) -> None:
    tools = FakeTools()
    user = make_machine(tmp_path, tools, have=["update-ca-certificates"], is_root=False)
    root = attrs.evolve(user, is_root=True)
    ca = write_ca(tmp_path / "cfg")
    none = make_machine(tmp_path, tools)

    assert trust.system_preflight(ca, none, requested=True, force=False) == (None, trust.NO_STORE_MESSAGE)
    assert "needs root" in str(trust.system_preflight(ca, user, requested=True, force=False)[1])
    store, problem = trust.system_preflight(ca, root, requested=True, force=False)
    assert store is not None and problem is None
    # nothing in the store: --force concerns only the files
    assert trust.system_preflight(ca, user, requested=False, force=True) == (None, None)
    trust.install_system_trust(store, ca, root)
    problem = trust.system_preflight(ca, user, requested=False, force=True)[1]
    assert problem and "sudo cmm setup --force" in problem
    assert trust.system_preflight(ca, root, requested=False, force=True) == (store, None)
    # the store holds another folder's CA: not ours to replace
    other = write_ca(tmp_path / "other")
    assert trust.system_preflight(other, root, requested=False, force=True) == (None, None)


# --- status ------------------------------------------------------------------------------------


def test_trust_status(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"], environment_value="/elsewhere.pem")
    config = machine.home / ".cmm"

    status = trust.trust_status(config, machine=machine)
    assert not status.ca_exists and not status.ok and status.fix == "cmm setup"
    assert "no CA yet" in status.detail

    ca = write_ca(config)
    (machine.home / ".bashrc").write_text("")
    (machine.home / ".zshrc").write_text("export NODE_EXTRA_CA_CERTS=/corp.pem\n")
    status = trust.trust_status(config, machine=machine)
    assert status.ca_exists and not status.profile_ok and not status.ok
    assert "~/.zshrc sets it to /corp.pem" in status.detail
    assert "single file" in status.fix

    trust.install_profiles(ca, machine)
    store = trust.detect_system_store(machine)
    assert store is not None
    trust.install_system_trust(store, ca, machine)
    status = trust.trust_status(config, machine=machine)
    assert status.ok and status.fix == ""
    assert [p.path.name for p in status.profiles if p.points_at_ca] == [".bashrc"]
    assert status.system == trust.SystemTrustStatus(store, True, True)
    assert "~/.bashrc" in status.detail and "system trust store holds cmm's CA" in status.detail
    assert status.environment_value == "/elsewhere.pem" and not status.environment_ok
    assert trust.trust_status(config, machine=attrs.evolve(machine, environment_value=str(ca))).environment_ok

    write_ca(config)  # a new CA; the store still has the old one
    status = trust.trust_status(config, machine=machine)
    assert status.system.current is False and "older cmm CA" in status.detail
    assert trust.trust_status(config, machine=machine, system=False).system.store is None


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


# --- the config folder -------------------------------------------------------------------------


def test_remove_config_dir_removes_only_cmms_files(tmp_path: Path) -> None:
    folder = tmp_path / ".cmm"
    folder.mkdir()
    own = ["ca.crt", "ca.key", "server.crt", "server.key", ".env", "mappings.toml", "cmm.pid", "cmm.log",
           "cmm.log.1", "cmm.log.3", "anthropic-ip.cache", "cmm.state.json", ".ca.key.x1y2.tmp", ".env.abc.tmp"]
    for name in own:
        (folder / name).write_text("x")
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()

    result = trust.remove_config_dir(folder)
    assert sorted(p.name for p in result.removed) == sorted(own)
    assert sorted(p.name for p in result.left) == ["notes.txt", "sub"]
    assert not result.folder_removed and (folder / "notes.txt").read_text() == "mine"

    (folder / "notes.txt").unlink()
    (folder / "sub").rmdir()
    (folder / "ca.crt").write_text("x")
    assert trust.remove_config_dir(folder) == trust.RemovedFolder((folder / "ca.crt",), (), True)
    assert not folder.exists()
    assert trust.remove_config_dir(folder) == trust.RemovedFolder((), (), False)


def test_remove_config_dir_never_follows_a_symlinked_file(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    precious = tmp_path / "precious"
    precious.write_text("keep")
    (folder / "ca.crt").symlink_to(precious)
    assert trust.remove_config_dir(folder).folder_removed
    assert precious.read_text() == "keep"


# --- setup and uninstall reports ---------------------------------------------------------------


def test_setup_and_uninstall_trust_reports(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"])
    ca = write_ca(machine.home / ".cmm")
    (machine.home / ".bashrc").write_text("")
    (machine.home / ".zshrc").write_text("export NODE_EXTRA_CA_CERTS=/corp.pem\n")
    store = trust.detect_system_store(machine)

    report = trust.setup_trust(ca, machine, profile=True, store=store, system_requested=True)
    assert not report.failed
    assert report.lines == (
        "shell profile ~/.bashrc: added the NODE_EXTRA_CA_CERTS line",
        f"system trust store: added cmm's CA to {store.describe()}",  # type: ignore[union-attr]
    )
    assert len(report.warnings) == 1 and "~/.zshrc" in report.warnings[0]

    (machine.home / ".profile").write_text(f'export NODE_EXTRA_CA_CERTS="{ca}"\n')  # by hand
    report = trust.uninstall_trust(ca, machine)
    assert not report.failed
    assert report.lines == (
        f"System trust store: removed cmm's CA from {store.describe()}.",  # type: ignore[union-attr]
        "Shell profile ~/.bashrc: removed the NODE_EXTRA_CA_CERTS line.",
    )
    assert report.warnings == (
        f"~/.profile still sets NODE_EXTRA_CA_CERTS to {ca} on a line cmm did not write; delete it yourself",
    )


def test_uninstall_trust_stops_when_the_store_needs_root(tmp_path: Path) -> None:
    tools = FakeTools()
    machine = make_machine(tmp_path, tools, have=["update-ca-certificates"])
    ca = write_ca(machine.home / ".cmm")
    store = trust.detect_system_store(machine)
    assert store is not None
    trust.install_system_trust(store, ca, machine)
    trust.install_profiles(ca, machine)
    created = machine.home / ".bashrc"
    before = created.read_text()

    report = trust.uninstall_trust(ca, attrs.evolve(machine, is_root=False))
    assert report.failed and "sudo cmm uninstall" in report.warnings[0]
    assert created.read_text() == before  # nothing half removed
    assert store.location is not None and store.location.exists()
