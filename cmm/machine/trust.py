"""Making the machine trust cmm's CA, and taking that trust away again.

Claude Code is a Node program, and Node (unless started with ``--use-system-ca``) ignores the
system trust store: it trusts cmm's CA through ``NODE_EXTRA_CA_CERTS``.  So ``cmm setup`` puts one
marked line in each of the user's shell profiles that exist::

    export NODE_EXTRA_CA_CERTS="/home/me/.cmm/ca.crt" # cmm-managed          (sh, bash, zsh)
    set -gx NODE_EXTRA_CA_CERTS "/home/me/.cmm/ca.crt" # cmm-managed         (fish)

That is the prior art's line, so lines it wrote are recognised (updated, removed) too.  As with
the hosts block, the edit is a pure text transform: :func:`add_line` then :func:`remove_line`
gives back the original text, byte for byte, and files are rewritten in place (dotfiles are often
symlinks into a dotfiles repository; a rename would replace the link with a copy).  A profile
that already sets the variable to another file is left alone and reported: Node reads a single
file, so the user has to combine the PEMs or choose.

The system store (``--system-trust``, for curl, Python and other tools that use it) is optional;
which mechanism the machine has is detected from the tools and folders present, never guessed from
the distribution's name.  Every path is taken relative to :attr:`Machine.root` and every command
runs through :attr:`Machine.run`, so tests never touch the real machine.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from urllib.parse import unquote_to_bytes

import attrs
from cryptography.hazmat.primitives import serialization

from cmm.config import paths
from cmm.config.textfile import rewrite_in_place, split_lines
from cmm.config.userfiles import Identity, UserDir, read_file, running_as
from cmm.machine import certs

VARIABLE = "NODE_EXTRA_CA_CERTS"
MARKER = "# cmm-managed"
# Ends the marker when add_line had to end the file's last line first; remove_line then takes
# that line break away again (the same trick as the hosts block's note).
ADDED_NEWLINE_NOTE = "; cmm also ended the line above"

# --- shell syntax ------------------------------------------------------------------------------


class Syntax(enum.Enum):
    """How a profile sets an environment variable."""

    POSIX = "sh"  # sh, bash, zsh: export NAME="value"
    FISH = "fish"  # set -gx NAME "value"


_SPECIAL = {Syntax.POSIX: '\\"$`', Syntax.FISH: '\\"$'}  # escaped inside "..."


def _double_quoted(value: str, syntax: Syntax) -> str:
    special = _SPECIAL[syntax]
    return '"' + "".join("\\" + ch if ch in special else ch for ch in value) + '"'


def syntax_of(shell: str) -> Syntax:
    """fish for a fish shell (by its path or name), else POSIX."""
    return Syntax.FISH if Path(shell).name.startswith("fish") else Syntax.POSIX


def export_line(syntax: Syntax, ca_cert: Path | str) -> str:
    """The command that sets NODE_EXTRA_CA_CERTS in this syntax (without cmm's marker)."""
    value = str(ca_cert)
    if "\n" in value or "\r" in value:
        raise ValueError(f"a path with a line break cannot go in a shell profile: {value!r}")
    quoted = _double_quoted(value, syntax)
    if syntax is Syntax.FISH:
        return f"set -gx {VARIABLE} {quoted}"
    return f"export {VARIABLE}={quoted}"


def unset_line(syntax: Syntax) -> str:
    return f"set -e {VARIABLE}" if syntax is Syntax.FISH else f"unset {VARIABLE}"


# --- reading assignments back ------------------------------------------------------------------

_MANAGED = re.compile(
    rf"\s*(?:export\s+{VARIABLE}=|set\s+-gx\s+{VARIABLE}\s+)(?P<value>.*?)\s+"
    rf"{re.escape(MARKER)}(?P<note>{re.escape(ADDED_NEWLINE_NOTE)})?"
)
_POSIX_ASSIGNMENT = re.compile(rf"\s*(?P<export>(?:export|declare\s+-x|typeset\s+-x)\s+)?{VARIABLE}=(?P<value>.*)")
_FISH_ASSIGNMENT = re.compile(rf"\s*set\s+(?P<flags>(?:-\S+\s+)*){VARIABLE}(?:\s+(?P<value>.*))?")


@attrs.frozen
class Assignment:
    """One line of a profile that sets NODE_EXTRA_CA_CERTS; ``managed`` when cmm wrote it."""

    value: str
    managed: bool
    line: int  # 1-based


def _content(line: str) -> str:
    """A line without its line end; a last line's lone ``\\r`` goes too, so that ending that line
    cannot turn it into one of cmm's (as in cmm.machine.hosts)."""
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def _managed_match(line: str) -> re.Match[str] | None:
    return _MANAGED.fullmatch(_content(line))


_HOME_REFERENCE = re.compile(r"\$(?:HOME(?![A-Za-z0-9_])|\{HOME\})")


def _home_reference(raw: str, at: int) -> int:
    """Length of an unescaped ``$HOME``/``${HOME}`` at ``raw[at]`` (``$HOMEDIR`` is not one), else 0."""
    match = _HOME_REFERENCE.match(raw, at)
    return match.end() - at if match else 0


def _word(raw: str, syntax: Syntax, home: Path | None) -> tuple[str, str]:
    """The first shell word of ``raw`` with quotes removed, and the rest of the line.

    Good enough to compare a profile's value with a path: double and single quotes, backslash
    escapes, ``$HOME`` and a leading ``~``; other variables are left as written.
    """
    raw = raw.lstrip()
    out: list[str] = []
    i = 0
    if raw.startswith("~") and (len(raw) == 1 or raw[1] in "/\"' \t;"):
        out.append(str(home) if home is not None else "~")
        i = 1
    special = _SPECIAL[syntax]
    while i < len(raw):
        ch = raw[i]
        if ch in " \t;&|":
            break
        if ch == '"':
            j = i + 1
            piece: list[str] = []
            while j < len(raw) and raw[j] != '"':
                if raw[j] == "\\" and j + 1 < len(raw) and raw[j + 1] in special:
                    piece.append(raw[j + 1])
                    j += 2
                elif home is not None and (length := _home_reference(raw, j)):
                    piece.append(str(home))
                    j += length
                else:
                    piece.append(raw[j])
                    j += 1
            out.append("".join(piece))
            i = j + 1
        elif ch == "'":
            j = raw.find("'", i + 1)
            j = len(raw) if j < 0 else j
            piece_text = raw[i + 1 : j]
            if syntax is Syntax.FISH:
                piece_text = piece_text.replace("\\'", "'").replace("\\\\", "\\")
            out.append(piece_text)
            i = j + 1
        elif ch == "\\" and i + 1 < len(raw):
            out.append(raw[i + 1])
            i += 2
        elif home is not None and (length := _home_reference(raw, i)):
            out.append(str(home))
            i += length
        else:
            out.append(ch)
            i += 1
    return "".join(out), raw[i:]


def assignments(text: str, home: Path | None = None) -> tuple[Assignment, ...]:
    """Every line of ``text`` that sets NODE_EXTRA_CA_CERTS, in file order (the last one wins).

    ``home`` expands ``$HOME`` and ``~``.  A one-command prefix (``NODE_EXTRA_CA_CERTS=x node``)
    does not count: it sets nothing for the shell.
    """
    found: list[Assignment] = []
    for number, line in enumerate(split_lines(text), start=1):
        content = _content(line)
        managed = _MANAGED.fullmatch(content)
        if managed is not None:
            syntax = Syntax.POSIX if content.lstrip().startswith("export") else Syntax.FISH
            value, _ = _word(managed.group("value"), syntax, home)
            found.append(Assignment(value, True, number))
            continue
        posix = _POSIX_ASSIGNMENT.fullmatch(content)
        if posix is not None:
            value, rest = _word(posix.group("value"), Syntax.POSIX, home)
            rest = rest.strip()
            if posix.group("export") or not rest or rest.startswith(("#", ";", "&&", "||")):
                found.append(Assignment(value, False, number))
            continue
        fish = _FISH_ASSIGNMENT.fullmatch(content)
        if fish is not None and fish.group("value") is not None:
            flags = fish.group("flags")
            if "--export" in flags or re.search(r"(?:^|\s)-[a-zA-Z]*x", flags):
                found.append(Assignment(_word(fish.group("value"), Syntax.FISH, home)[0], False, number))
    return tuple(found)


def has_line(text: str) -> bool:
    """Whether cmm's marked line is in ``text``."""
    return any(_managed_match(line) for line in split_lines(text))


# --- the pure edit -----------------------------------------------------------------------------


def _render(syntax: Syntax, ca_cert: Path | str, note: bool) -> str:
    return f"{export_line(syntax, ca_cert)} {MARKER}" + (ADDED_NEWLINE_NOTE if note else "")


def remove_line(text: str) -> str:
    """Take out every line cmm added; text without one comes back unchanged."""
    lines = split_lines(text)
    kept: list[str] = []
    for index, line in enumerate(lines):
        match = _managed_match(line)
        if match is None:
            kept.append(line)
            continue
        if index == len(lines) - 1 and match.group("note") and kept:
            eol = "\r\n" if line.endswith("\r\n") else "\n"
            if not kept[-1].endswith(eol):
                eol = "\n"
            if kept[-1].endswith(eol):
                ended = kept[-1][: -len(eol)]
                if _managed_match(ended) is None:  # never turn a line of the user's into one of cmm's
                    kept[-1] = ended
    return "".join(kept)


def add_line(text: str, syntax: Syntax, ca_cert: Path | str) -> str:
    """Point cmm's line at ``ca_cert``: updated where it is, or appended at the end.

    Several cmm lines (hand copies) become one, at the end.  Idempotent, and
    ``remove_line(add_line(t)) == remove_line(t)``.
    """
    lines = split_lines(text)
    marked = [index for index, line in enumerate(lines) if _managed_match(line)]
    if len(marked) == 1:
        index = marked[0]
        line = lines[index]
        content = _content(line)
        match = _MANAGED.fullmatch(content)
        assert match is not None
        lines[index] = _render(syntax, ca_cert, bool(match.group("note"))) + line[len(content) :]
        return "".join(lines)
    text = remove_line(text)
    last_newline = text.rfind("\n")
    eol = "\r\n" if last_newline > 0 and text[last_newline - 1] == "\r" else "\n"
    if text and not text.endswith("\n"):
        return text + eol + _render(syntax, ca_cert, True) + eol
    return text + _render(syntax, ca_cert, False) + eol


# --- CA files ----------------------------------------------------------------------------------

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)


def pem_certificates(data: bytes) -> tuple[bytes, ...]:
    """The DER of every PEM certificate in ``data`` (a single CA file or a bundle)."""
    found = []
    for body in _PEM_CERT.findall(data):
        try:
            found.append(base64.b64decode(b"".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            continue
    return tuple(found)


def pem_bundle_contains(bundle: bytes, ca_pem: bytes) -> bool:
    """Whether a PEM bundle holds the CA (a user who combined cmm's CA with another one)."""
    wanted = set(pem_certificates(ca_pem))
    return bool(wanted) and not wanted.isdisjoint(pem_certificates(bundle))


def _ca_facts(ca_pem: bytes | None) -> tuple[str, str | None, bytes | None]:
    """(common name, SHA-1 hex of the DER, subject key identifier) of the CA, as far as known."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    default = "cmm local CA"
    if not ca_pem:
        return default, None, None
    try:
        cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        return default, None, None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else default
    sha1 = hashlib.sha1(pem_certificates(ca_pem)[0]).hexdigest().upper()
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = None
    return name, sha1, ski


# --- the machine -------------------------------------------------------------------------------


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


def display(path: Path, home: Path) -> str:
    """``~/.bashrc`` rather than ``/home/me/.bashrc`` in messages."""
    try:
        return "~/" + str(path.relative_to(home))
    except ValueError:
        return str(path)


# --- shell profiles ----------------------------------------------------------------------------


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


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _points_at(value: str, ca_cert: Path, ca_pem: bytes | None) -> bool:
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


def as_owner(machine: Machine) -> AbstractContextManager[None]:
    """The profiles' owner's effective ids for the block (under sudo; else nothing changes).

    Profiles are the user's files and may be links (into a dotfiles repository): root reads,
    edits and creates them as the user, so a link planted there reaches only what the user could
    edit anyway, never /etc/sudoers.d or another root file; what cmm creates is the user's.
    """
    if machine.owner is None:
        return contextlib.nullcontext()
    return running_as(Identity.of_uid(*machine.owner))


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
        return _points_at(value, ca_cert, ca_pem)

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
                action, _, conflicts = plan_profile(_read(profile.path), profile.syntax, ca_cert, machine.home, is_ca)
                if action in (ProfileAction.ADDED, ProfileAction.UPDATED):
                    # Recomputed on the text as read for writing, so a concurrent edit is not lost.
                    rewrite_in_place(profile.path, lambda text, s=profile.syntax: add_line(text, s, ca_cert))
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
                text = _read(profile.path)
                if has_line(text):
                    rewrite_in_place(profile.path, remove_line)
                    changes.append(ProfileChange(profile.path, ProfileAction.REMOVED))
            except OSError as error:
                changes.append(_failure(profile.path, error))
                continue
            if ca_cert is not None:
                own = tuple(
                    a.value for a in assignments(text, machine.home)
                    if not a.managed and _points_at(a.value, ca_cert, None)
                )
                if own:
                    changes.append(ProfileChange(profile.path, ProfileAction.SET_BY_USER, own))
    return tuple(changes)


def read_ca(ca_cert: Path, machine: Machine) -> bytes | None:
    """The CA file's bytes as its owner reads them, never through a link (None: none usable).

    Root must not read a path in the user's folder with its own rights: a link there could name
    any file on the machine."""
    with as_owner(machine):
        try:
            return read_file(ca_cert)
        except OSError:
            return None


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --- the system trust store --------------------------------------------------------------------


class StoreKind(enum.Enum):
    DEBIAN = "update-ca-certificates"
    FEDORA = "update-ca-trust"
    P11KIT = "p11-kit trust"
    MACOS = "macOS System keychain"


ANCHOR_NAME = "cmm-local-ca.crt"
DEBIAN_ANCHORS = "/usr/local/share/ca-certificates"
FEDORA_ANCHORS = "/etc/pki/ca-trust/source/anchors"
MACOS_KEYCHAIN = "/Library/Keychains/System.keychain"


@attrs.frozen
class SystemStore:
    """The machine's trust store mechanism: its tool and, for file-based ones, cmm's anchor file
    (for macOS, the keychain)."""

    kind: StoreKind
    command: str
    location: Path | None = None

    def describe(self) -> str:
        if self.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
            return f"{self.kind.value} ({self.location})"
        return self.kind.value


class TrustError(Exception):
    """A trust-store step that cannot be done; the message says what to do instead."""


def detect_system_store(machine: Machine) -> SystemStore | None:
    """The first mechanism whose tool (and folder) is present, in this order: macOS security with
    the System keychain; update-ca-certificates (Debian, Ubuntu); update-ca-trust with
    /etc/pki/ca-trust (Fedora, RHEL); p11-kit's ``trust`` (Arch and others).  None if none is."""
    if machine.platform == "darwin":
        security = machine.which("security")
        keychain = machine.system_path(MACOS_KEYCHAIN)
        if security and keychain.exists():
            return SystemStore(StoreKind.MACOS, security, keychain)
    command = machine.which("update-ca-certificates")
    if command:
        return SystemStore(StoreKind.DEBIAN, command, machine.system_path(DEBIAN_ANCHORS) / ANCHOR_NAME)
    command = machine.which("update-ca-trust")
    if command and machine.system_path(FEDORA_ANCHORS).is_dir():
        return SystemStore(StoreKind.FEDORA, command, machine.system_path(FEDORA_ANCHORS) / ANCHOR_NAME)
    command = machine.which("trust")
    if command:
        return SystemStore(StoreKind.P11KIT, command)
    return None


NO_STORE_MESSAGE = (
    "no system trust store tool found (looked for update-ca-certificates, update-ca-trust with "
    f"{FEDORA_ANCHORS}, p11-kit's trust, and macOS security); Claude Code does not need one: "
    "it trusts cmm's CA through NODE_EXTRA_CA_CERTS"
)


@attrs.frozen
class SystemTrustStatus:
    """cmm's entries in the system store: ``present`` (any), ``current`` (the CA given; None when
    that cannot be told)."""

    store: SystemStore | None
    present: bool = False
    current: bool | None = False


def parse_trust_list(output: str) -> tuple[tuple[str, str], ...]:
    """(pkcs11 URI, label) of each entry printed by ``trust list``."""
    entries: list[tuple[str, str]] = []
    uri: str | None = None
    for line in output.splitlines():
        if line.startswith("pkcs11:"):
            uri = line.strip()
            entries.append((uri, ""))
        elif uri is not None and line.strip().startswith("label:"):
            entries[-1] = (uri, line.split(":", 1)[1].strip())
    return tuple(entries)


def _uri_id(uri: str) -> bytes | None:
    match = re.search(r"[:;]id=([^;]*)", uri)
    return unquote_to_bytes(match.group(1)) if match else None


def parse_keychain_hashes(output: str) -> tuple[str, ...]:
    """The SHA-1 hashes printed by ``security find-certificate -Z``."""
    return tuple(h.upper() for h in re.findall(r"SHA-1 hash:\s*([0-9A-Fa-f]{40})", output))


def _p11kit_entries(store: SystemStore, machine: Machine, name: str) -> tuple[tuple[str, str], ...]:
    result = machine.run([store.command, "list", "--filter=ca-anchors"])
    if result.returncode != 0:
        raise TrustError(f"`trust list` failed: {result.output}")
    return tuple(entry for entry in parse_trust_list(result.stdout) if entry[1] == name)


def _keychain_hashes(store: SystemStore, machine: Machine, name: str) -> tuple[str, ...]:
    result = machine.run([store.command, "find-certificate", "-a", "-c", name, "-Z", str(store.location)])
    if result.returncode != 0:
        return ()  # "The specified item could not be found in the keychain."
    return parse_keychain_hashes(result.stdout)


def system_status(store: SystemStore | None, ca_pem: bytes | None, machine: Machine) -> SystemTrustStatus:
    """Whether the store holds a cmm CA, and whether it is ``ca_pem``; needs no root."""
    if store is None:
        return SystemTrustStatus(None)
    name, sha1, ski = _ca_facts(ca_pem)
    if store.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
        assert store.location is not None
        installed = _read_optional(store.location)
        if installed is None:
            return SystemTrustStatus(store)
        current = bool(ca_pem) and set(pem_certificates(installed)) == set(pem_certificates(ca_pem or b""))
        return SystemTrustStatus(store, True, current)
    if store.kind is StoreKind.P11KIT:
        try:
            entries = _p11kit_entries(store, machine, name)
        except TrustError:
            return SystemTrustStatus(store, False, None)
        if not entries:
            return SystemTrustStatus(store)
        ids = [_uri_id(uri) for uri, _ in entries]
        current = None if ski is None or None in ids else ski in ids
        return SystemTrustStatus(store, True, current)
    hashes = _keychain_hashes(store, machine, name)
    if not hashes:
        return SystemTrustStatus(store)
    return SystemTrustStatus(store, True, None if sha1 is None else sha1 in hashes)


def _check(result: CommandResult, what: str) -> None:
    if result.returncode != 0:
        raise TrustError(f"{what} failed (exit status {result.returncode}): {result.output or 'no output'}")


def _need_root(machine: Machine, what: str) -> None:
    if not machine.is_root:
        raise TrustError(f"{what} needs root")


#: Where root puts the copy of the CA a store's tool reads: /tmp's sticky bit keeps other users
#: from renaming root's folder there, unlike a TMPDIR the user may have passed through sudo.
PRIVATE_COPY_PARENT = "/tmp"


def trusted_ca_pem(ca_cert: Path) -> bytes:
    """The only bytes root hands to a system store: cmm's constrained CA, read from the user's
    folder without following a link, re-encoded from the parsed certificate (nothing else rides
    along). Raises TrustError with what to do otherwise."""
    try:
        cert = certs.read_ca_certificate(ca_cert)
    except certs.CertificateError as error:
        raise TrustError(f"not making {ca_cert} a system root: {error}") from None
    except OSError as error:
        raise TrustError(f"cannot read {ca_cert}: {error.strerror}") from None
    return cert.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _private_copy(ca_pem: bytes) -> Iterator[Path]:
    """A file holding ``ca_pem`` in a folder only root can reach, for a store's tool to read:
    never the user's path, whose file could be swapped after cmm checked it."""
    with tempfile.TemporaryDirectory(prefix="cmm-ca-", dir=PRIVATE_COPY_PARENT) as private:
        copy = Path(private) / certs.certificate_paths(Path(private)).ca_cert.name
        certs.write_atomically(copy, ca_pem, certs.CERT_MODE)
        yield copy


def install_system_trust(store: SystemStore, ca_cert: Path, machine: Machine) -> str:
    """Make the store trust ``ca_cert``, replacing an older cmm CA there; says what it did.

    Only a CA carrying exactly cmm's name constraint is installed, read as the folder's owner.
    Tools that read a file get a private copy of the checked bytes, never the user's path.
    Raises TrustError when not root, when the CA is refused, or when the store's tool fails.
    """
    with as_owner(machine):
        ca_pem = trusted_ca_pem(ca_cert)
    status = system_status(store, ca_pem, machine)
    if status.present and status.current:
        return f"already trusts cmm's CA: {store.describe()}"
    _need_root(machine, "adding cmm's CA to the system trust store")
    if store.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
        assert store.location is not None
        store.location.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        certs.write_atomically(store.location, ca_pem, certs.CERT_MODE)
        argv = [store.command] if store.kind is StoreKind.DEBIAN else [store.command, "extract"]
        _check(machine.run(argv), " ".join(argv))
    else:
        if status.present:
            _remove_system_entries(store, machine, ca_pem)
        with _private_copy(ca_pem) as copy:
            if store.kind is StoreKind.P11KIT:
                _check(machine.run([store.command, "anchor", "--store", str(copy)]), "trust anchor --store")
            else:
                argv = [store.command, "add-trusted-cert", "-d", "-r", "trustRoot", "-k", str(store.location),
                        str(copy)]
                _check(machine.run(argv), "security add-trusted-cert")
    verb = "replaced the old cmm CA in" if status.present else "added cmm's CA to"
    return f"{verb} {store.describe()}"


def _remove_system_entries(store: SystemStore, machine: Machine, ca_pem: bytes | None) -> bool:
    name, sha1, _ = _ca_facts(ca_pem)
    if store.kind in (StoreKind.DEBIAN, StoreKind.FEDORA):
        assert store.location is not None
        try:
            store.location.unlink()
        except FileNotFoundError:
            return False
        argv = [store.command] if store.kind is StoreKind.DEBIAN else [store.command, "extract"]
        _check(machine.run(argv), " ".join(argv))
        return True
    if store.kind is StoreKind.P11KIT:
        entries = _p11kit_entries(store, machine, name)
        for uri, _ in entries:
            _check(machine.run([store.command, "anchor", "--remove", uri]), "trust anchor --remove")
        return bool(entries)
    hashes = _keychain_hashes(store, machine, name)
    if ca_pem and sha1 in hashes:  # its trust setting, named by a private copy of that certificate
        from cryptography import x509

        single = x509.load_der_x509_certificate(pem_certificates(ca_pem)[0])
        with _private_copy(single.public_bytes(serialization.Encoding.PEM)) as copy:
            machine.run([store.command, "remove-trusted-cert", "-d", str(copy)])
    for digest in hashes:
        argv = [store.command, "delete-certificate", "-Z", digest, str(store.location)]
        _check(machine.run(argv), "security delete-certificate")
    return bool(hashes)


def remove_system_trust(store: SystemStore, machine: Machine, ca_cert: Path | None = None) -> str | None:
    """Take every cmm CA out of the store; what was done, or None when there was nothing."""
    ca_pem = read_ca(ca_cert, machine) if ca_cert is not None else None
    if not system_status(store, ca_pem, machine).present:
        return None
    _need_root(machine, "removing cmm's CA from the system trust store")
    if not _remove_system_entries(store, machine, ca_pem):
        return None
    return f"removed cmm's CA from {store.describe()}"


# --- status ------------------------------------------------------------------------------------


@attrs.frozen
class ProfileStatus:
    """One existing profile: the values set there, and whether the one that wins names the CA."""

    path: Path
    assignments: tuple[Assignment, ...]
    points_at_ca: bool

    @property
    def managed(self) -> bool:
        return any(a.managed for a in self.assignments)


@attrs.frozen
class TrustStatus:
    """Whether Claude Code (and optionally the system) will trust cmm's current CA.

    ``ok``/``detail``/``fix`` summarise the profiles for ``cmm status`` and ``cmm doctor``.
    """

    ca_cert: Path
    ca_exists: bool
    home: Path
    profiles: tuple[ProfileStatus, ...]
    system: SystemTrustStatus
    environment_value: str | None
    environment_ok: bool

    @property
    def profile_ok(self) -> bool:
        """Some profile makes new shells point NODE_EXTRA_CA_CERTS at the current CA."""
        return any(p.points_at_ca for p in self.profiles)

    @property
    def ok(self) -> bool:
        return self.ca_exists and self.profile_ok

    @property
    def detail(self) -> str:
        if not self.ca_exists:
            return f"no CA yet ({self.ca_cert})"
        good = [display(p.path, self.home) for p in self.profiles if p.points_at_ca]
        wrong = [
            f"{display(p.path, self.home)} sets it to {p.assignments[-1].value}"
            for p in self.profiles
            if p.assignments and not p.points_at_ca
        ]
        if good:
            text = f"{VARIABLE} → cmm's CA in {', '.join(good)}"
        else:
            text = f"no shell profile sets {VARIABLE} to cmm's CA"
        if wrong:
            text += f" ({'; '.join(wrong)})"
        store = self.system
        if store.store is not None and store.present:
            state = {True: "holds cmm's CA", False: "holds an older cmm CA", None: "holds a cmm CA"}[store.current]
            text += f"; system trust store {state}"
        return text

    @property
    def fix(self) -> str:
        if self.ok:
            return ""
        if not self.ca_exists:
            return "cmm setup"
        conflicting = [p for p in self.profiles if p.assignments and not p.points_at_ca and not p.managed]
        if conflicting:
            p = conflicting[0]
            return conflict_advice(p.path, [p.assignments[-1].value], self.ca_cert, self.home)
        return "cmm setup"


def trust_status(
    config_dir: Path,
    environ: Mapping[str, str] | None = None,
    *,
    machine: Machine | None = None,
    system: bool = True,
) -> TrustStatus:
    """Profile lines, the calling environment's NODE_EXTRA_CA_CERTS and the system store, for
    ``cmm status`` and ``cmm doctor``.  Changes nothing and needs no root.

    ``machine`` defaults to ``Machine.from_environ(environ)`` (tests pass a fake one);
    ``system=False`` skips the store, which may run ``trust list`` or ``security``.  A value
    "points at the CA" when it names ``<config_dir>/ca.crt`` or a PEM bundle that contains it.
    """
    if machine is None:
        machine = Machine.from_environ(os.environ if environ is None else environ)
    ca_cert = certs.certificate_paths(config_dir).ca_cert
    ca_pem = read_ca(ca_cert, machine)
    found = []
    with as_owner(machine):  # profiles may be links: read only what their owner could
        for profile in existing_profiles(machine.home):
            try:
                text = _read(profile.path)
            except OSError:
                continue
            settings = assignments(text, machine.home)
            ok = bool(settings) and _points_at(settings[-1].value, ca_cert, ca_pem)
            found.append(ProfileStatus(profile.path, settings, ok))
        env = machine.environment_value
        env_ok = env is not None and _points_at(env, ca_cert, ca_pem)
    store_status = system_status(detect_system_store(machine), ca_pem, machine) if system else SystemTrustStatus(None)
    return TrustStatus(
        ca_cert=ca_cert,
        ca_exists=ca_pem is not None,
        home=machine.home,
        profiles=tuple(found),
        system=store_status,
        environment_value=env,
        environment_ok=env_ok,
    )


# --- the configuration folder ------------------------------------------------------------------

#: Every file cmm writes in its folder: certificates and keys, settings, mappings, pid and state
#: files, the request log with its rotations, the DNS cache, and the temporary files of atomic
#: writes.  A new file kept there must be added here, or `cmm uninstall` leaves the folder.
OWN_FILES = (
    "ca.crt", "ca.key", "server.crt", "server.key", paths.ENV_FILE_NAME, paths.MAPPINGS_FILE_NAME,
    paths.PID_FILE_NAME, paths.STATE_FILE_NAME, paths.DNS_CACHE_FILE_NAME, paths.LOG_FILE_NAME,
)
_NAMES = "|".join(re.escape(name.lstrip(".")) for name in OWN_FILES)
_OWN_FILE = re.compile(rf"(?:{'|'.join(map(re.escape, OWN_FILES))}|cmm\.log\.\d+|\.(?:{_NAMES})\..+\.tmp)")


def is_own_file(name: str) -> bool:
    return _OWN_FILE.fullmatch(name) is not None


@attrs.frozen
class RemovedFolder:
    removed: tuple[Path, ...]
    left: tuple[Path, ...]  # entries cmm did not make, kept with the folder
    folder_removed: bool


def remove_config_dir(directory: Path | UserDir) -> RemovedFolder:
    """Delete the files cmm makes in ``directory``, then the folder if nothing else is in it.

    Only cmm's own file names are deleted (never a subfolder, never an unknown file), so a
    ``--config-dir`` pointed at the wrong folder cannot cost the user anything else.  The files
    are removed as the folder's owner, by name inside the folder opened without following links
    (a link is removed itself, never its target); an unsafe folder raises UnsafeDirectory.
    """
    try:
        folder = directory if isinstance(directory, UserDir) else UserDir.open(directory, create=False)
    except FileNotFoundError:
        return RemovedFolder((), (), False)
    removed: list[Path] = []
    left: list[Path] = []
    with folder.acting() as fd:
        for name in sorted(os.listdir(fd)):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if is_own_file(name) and (stat.S_ISLNK(info.st_mode) or stat.S_ISREG(info.st_mode)):
                os.unlink(name, dir_fd=fd)
                removed.append(folder.file(name))
            else:
                left.append(folder.file(name))
    if left:
        return RemovedFolder(tuple(removed), tuple(left), False)
    try:
        folder.path.rmdir()  # rmdir never follows a link, and only an empty folder goes
    except OSError:
        return RemovedFolder(tuple(removed), (), False)
    return RemovedFolder(tuple(removed), (), True)


# --- what `cmm setup` and `cmm uninstall` do and say -------------------------------------------


@attrs.frozen
class Report:
    """Lines for stdout, warnings for stderr, and whether the command failed."""

    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    failed: bool = False


def conflict_advice(path: Path, others: Iterable[str], ca_cert: Path, home: Path) -> str:
    files = ", ".join(others)
    return (
        f"{display(path, home)} already sets {VARIABLE} to {files}, not cmm's CA; left it alone. "
        f"Node reads a single file, so combine them (cat {files} {ca_cert} > ~/.node-extra-ca.pem, "
        f"and point {VARIABLE} at that file) or choose one."
    )


def system_preflight(
    ca_cert: Path, machine: Machine, *, requested: bool, force: bool
) -> tuple[SystemStore | None, str | None]:
    """Before the certificates change: the store setup must update (or None), or an error that
    stops setup before anything is done.

    ``--system-trust`` needs a store and root.  Without it the store is only updated when it
    already trusts *this* folder's CA and setup replaces that CA (``--force``, expiry): a store
    entry made from another config folder is never touched.  ``--force`` then needs root too.
    """
    store = detect_system_store(machine)
    if requested:
        if store is None:
            return None, NO_STORE_MESSAGE
        if not machine.is_root:
            return None, "--system-trust needs root: run `sudo cmm setup --system-trust`"
        return store, None
    old = read_ca(ca_cert, machine)
    if store is None or old is None or not system_status(store, old, machine).current:
        return None, None
    if force and not machine.is_root:
        return None, (
            f"cmm's CA is in the system trust store ({store.describe()}) and --force replaces it: "
            "run `sudo cmm setup --force` so that the store gets the new CA too"
        )
    return store, None


def setup_trust(
    ca_cert: Path,
    machine: Machine,
    *,
    profile: bool,
    store: SystemStore | None = None,
    system_requested: bool = False,
    created_ca: bool = False,
) -> Report:
    """After the certificates are in place: the profiles, then the system store when asked for,
    or when it trusted the CA that was just replaced (``store`` from :func:`system_preflight`)."""
    lines: list[str] = []
    warnings: list[str] = []
    failed = False
    if profile:
        try:
            changes = install_profiles(ca_cert, machine)
        except OSError as error:
            warnings.append(f"cannot edit {error.filename or 'a shell profile'}: {error.strerror}")
            failed = True
            changes = ()
        for change in changes:
            if change.action is ProfileAction.CONFLICT:
                warnings.append(conflict_advice(change.path, change.others, ca_cert, machine.home))
            elif change.action is ProfileAction.FAILED:
                warnings.append(_failure_advice(change, machine))
                failed = True
            else:
                lines.append(f"shell profile {display(change.path, machine.home)}: {change.action.value}")
    if store is not None and (system_requested or created_ca):
        if not machine.is_root:
            warnings.append(
                f"the system trust store ({store.describe()}) still holds the previous cmm CA: "
                "run `sudo cmm setup --system-trust` to replace it"
            )
        else:
            try:
                lines.append(f"system trust store: {install_system_trust(store, ca_cert, machine)}")
            except (TrustError, OSError) as error:
                warnings.append(f"system trust store: {error}")
                failed = True
    return Report(tuple(lines), tuple(warnings), failed)


def uninstall_trust(ca_cert: Path, machine: Machine) -> Report:
    """Remove cmm's CA from the system store (first: it needs root, and may fail) and its lines
    from the profiles.  Stops at a system-store failure, so that nothing is half removed."""
    lines: list[str] = []
    warnings: list[str] = []
    store = detect_system_store(machine)
    if store is not None:
        try:
            done = remove_system_trust(store, machine, ca_cert)
        except TrustError as error:
            hint = "; run `sudo cmm uninstall`" if not machine.is_root else ""
            return Report((), (f"system trust store: {error}{hint}",), True)
        if done:
            lines.append(f"System trust store: {done}.")
    try:
        changes = remove_profiles(machine, ca_cert)
    except OSError as error:
        return Report(tuple(lines), (f"cannot edit {error.filename or 'a shell profile'}: {error.strerror}",), True)
    failed = False
    for change in changes:
        if change.action is ProfileAction.REMOVED:
            lines.append(f"Shell profile {display(change.path, machine.home)}: removed the {VARIABLE} line.")
        elif change.action is ProfileAction.FAILED:
            warnings.append(_failure_advice(change, machine))
            failed = True
        else:
            warnings.append(
                f"{display(change.path, machine.home)} still sets {VARIABLE} to {', '.join(change.others)} "
                "on a line cmm did not write; delete it yourself"
            )
    return Report(tuple(lines), tuple(warnings), failed)


def _failure_advice(change: ProfileChange, machine: Machine) -> str:
    shown = display(change.path, machine.home)
    reason = change.others[0] if change.others else "cannot be edited"
    link = f" (a link to {os.path.realpath(change.path)})" if change.path.is_symlink() else ""
    return (f"cannot edit {shown}{link} as its owner: {reason}; left it alone. "
            f"Add the {VARIABLE} line to it yourself, or make it a file of your own")
