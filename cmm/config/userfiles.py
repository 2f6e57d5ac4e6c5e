"""Doing I/O in a directory a user owns, from a process that may be root.

``sudo twistd cmm`` runs as root but keeps its files in the user's ``~/.cmm``.  Anything the
user can write there (a symbolic link, a FIFO, a hard link) would otherwise steer root's
``open``/``chown``/``chmod`` at files the user may not touch.  So root does its work in that
directory *as the directory's owner*: :meth:`UserDir.acting` opens the directory without
following a link, makes it the working directory and switches the effective uid, gid and groups
to the owner until the block ends.  Whatever a link there points at, the kernel then only lets
cmm reach what the user could reach anyway.  The file operations on top also refuse links
(``O_NOFOLLOW``) and anything but regular files, and write atomically with mode 0600.

A directory that is itself a link, that belongs to someone other than the user (or root), or that
its group or everyone may write is refused with an :class:`UnsafeDirectory` that says the fix.

Switching the effective ids is process-wide; the master's reactor is single-threaded and every
switch is undone in a ``finally`` before control returns to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs

FILE_MODE = 0o600
DIR_MODE = 0o700
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW
_HERE_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafeDirectory(Exception):
    """A directory root must not work in; the message says what to fix."""


@attrs.frozen
class Identity:
    """Whom file operations run as: effective uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of_uid(cls, uid: int, gid: int | None = None, *, unknown_gid: int | None = None) -> Identity:
        """The password database's view of ``uid`` (its groups too); ``gid`` overrides its group,
        ``unknown_gid`` is the group of a uid the database does not know (else the uid's number)."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # a uid without an entry (e.g. SUDO_UID of a deleted user): just one group
            own_gid = gid if gid is not None else unknown_gid if unknown_gid is not None else uid
            return cls(uid, own_gid, (own_gid,))
        own_gid = entry.pw_gid if gid is None else gid
        return cls(uid, own_gid, tuple(os.getgrouplist(entry.pw_name, own_gid)))

    @classmethod
    def current(cls) -> Identity:
        return cls(os.geteuid(), os.getegid(), tuple(os.getgroups()))

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def _user_name(uid: int) -> str:
    return Identity(uid, uid).name


def directory_problem(info: os.stat_result, path: Path, allowed_uids: frozenset[int] | None,
                      user: str) -> str | None:
    """Why root must not work in the directory ``lstat`` described, as a fix to apply; None if fine.

    ``allowed_uids`` None: any owner will do (root acting for whoever owns the directory).
    """
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return (f"{path} is a symbolic link (to {target}); cmm does not follow one with root's rights. "
                f"Use the directory itself: rm {path} && mv {target} {path} (or pass --config-dir {target})")
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory; move it away (mv {path} {path}.old) and run again"
    if allowed_uids is not None and info.st_uid not in allowed_uids:
        return (f"{path} belongs to {_user_name(info.st_uid)}, not {user}, so cmm will not use it. "
                f"If it is yours: sudo chown -R {user} {path}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} can be written by {'everyone' if info.st_mode & stat.S_IWOTH else 'its group'} "
                f"(mode {stat.S_IMODE(info.st_mode):o}), who could plant links for root to follow. "
                f"Fix: chmod 700 {path}")
    return None


@contextlib.contextmanager
def running_as(identity: Identity) -> Iterator[None]:
    """Effective ids of ``identity`` for the block, when root; a no-op for anyone else or for root."""
    if os.geteuid() != 0 or identity.uid == 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups(list(identity.groups) or [identity.gid])
    try:
        os.setegid(identity.gid)
        try:
            os.seteuid(identity.uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(egid)
    finally:
        os.setgroups(groups)


def _regular(fd: int, name: str) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file; cmm reads and writes only plain files there", name)
    return info


def _open(name: str | Path, flags: int, mode: int = FILE_MODE, dir_fd: int | None = None) -> int:
    """``os.open`` that never follows a final symbolic link and says so plainly."""
    if dir_fd is not None:
        _plain(str(name))
    try:
        return os.open(name, flags | _NOFOLLOW, mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.ENOTDIR and _is_link(name, dir_fd)):
            raise OSError(errno.ELOOP, "is a symbolic link; cmm does not follow links there", str(name)) from None
        raise


def _plain(name: str) -> str:
    """``name`` itself, when it names an entry of the directory and nothing beyond it."""
    if os.sep in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a file name inside the directory")
    return name


def _is_link(name: str | Path, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def read_file(path: Path) -> bytes:
    """A regular file's bytes, never through a final symbolic link and never blocking on a FIFO.

    For readers that write nothing (``cmm status``, ``cmm doctor``); FileNotFoundError as usual.
    """
    fd = _open(path, os.O_RDONLY | os.O_NONBLOCK)
    _regular(fd, str(path))
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


_acting: dict[Path, int] = {}  # directories whose acting() block is open: their descriptor


@attrs.frozen
class UserDir:
    """A directory and the identity that does its I/O (its owner); get one with :meth:`open`."""

    path: Path
    owner: Identity

    @classmethod
    def open(cls, path: Path, expected: Identity | None = None, *, create: bool = True) -> UserDir:
        """Check ``path`` (creating it 0700 as ``expected`` when missing and ``create``) and decide
        whom its I/O runs as; UnsafeDirectory when it must not be used.

        ``expected`` is the user the directory should belong to (SUDO_UID under sudo); root itself
        is always accepted.  None: the current user, or for root without sudo, whoever owns it.
        """
        path = Path(os.path.abspath(path))
        euid = os.geteuid()
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise
            _create(path, expected, euid)
            info = os.lstat(path)
        if expected is not None:
            allowed: frozenset[int] | None = frozenset({0, euid, expected.uid})
            user = expected.name
        elif euid == 0:
            allowed, user = None, "root"
        else:
            allowed, user = frozenset({0, euid}), Identity.current().name
        problem = directory_problem(info, path, allowed, user)
        if problem:
            raise UnsafeDirectory(problem)
        if expected is not None and info.st_uid == expected.uid:
            owner = expected
        elif info.st_uid == euid:
            owner = Identity.current()
        else:
            owner = Identity.of_uid(info.st_uid, unknown_gid=info.st_gid)
        return cls(path, owner)

    @contextlib.contextmanager
    def acting(self) -> Iterator[int]:
        """The directory as working directory and its owner's ids, for the block; yields its fd.

        The directory is opened without following a link and checked again, so swapping it for a
        link or another folder after :meth:`open` gains nothing.  Nested blocks reuse the outer one.
        """
        if self.path in _acting:
            yield _acting[self.path]
            return
        fd = _open(self.path, _DIR_FLAGS)
        try:
            info = os.fstat(fd)
            problem = directory_problem(info, self.path, frozenset({self.owner.uid}), self.owner.name)
            if problem:
                raise UnsafeDirectory(problem)
            here = os.open(".", _HERE_FLAGS)
            try:
                os.fchdir(fd)
                _acting[self.path] = fd
                try:
                    with running_as(self.owner):
                        yield fd
                finally:
                    del _acting[self.path]
                    os.fchdir(here)
            finally:
                os.close(here)
        finally:
            os.close(fd)

    def file(self, name: str) -> Path:
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        """The regular file ``name`` (FileNotFoundError when missing), read as the owner."""
        _plain(name)
        with self.acting() as fd:
            handle = _open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=fd)
            _regular(handle, str(self.file(name)))
            with os.fdopen(handle, "rb") as opened:
                return opened.read()

    def write_bytes(self, name: str, data: bytes, mode: int = FILE_MODE) -> None:
        """Replace ``name`` atomically (a fresh O_EXCL temporary renamed over it), as the owner.

        The temporary has its final mode before it holds any data; a link at ``name`` is replaced,
        never followed.
        """
        _plain(name)
        with self.acting() as fd:
            temporary = f".{name.lstrip('.')}.{secrets.token_hex(6)}.tmp"
            handle = _open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=fd)
            try:
                with os.fdopen(handle, "wb") as opened:
                    os.fchmod(opened.fileno(), mode)  # the umask may have taken bits away
                    opened.write(data)
                    opened.flush()
                    os.fsync(opened.fileno())
                os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=fd)
                raise

    def open_file(self, name: str, flags: int, mode: int = FILE_MODE) -> int:
        """An fd of the regular file ``name`` opened as the owner (created ``mode`` with O_CREAT);
        a file of the owner's with a looser mode is tightened to ``mode``.  A file with other hard
        links is refused: it may be another file's second name."""
        _plain(name)
        with self.acting() as fd:
            handle = _open(name, flags | os.O_NONBLOCK, mode, dir_fd=fd)
            info = _regular(handle, str(self.file(name)))
            if info.st_nlink > 1:
                os.close(handle)
                raise OSError(errno.EMLINK, "has other hard links; cmm writes only a file of its own there",
                              str(self.file(name)))
            if stat.S_IMODE(info.st_mode) & ~mode and info.st_uid == os.geteuid():
                os.fchmod(handle, mode)
            os.set_blocking(handle, True)
            return handle

    def unlink(self, name: str) -> bool:
        """Remove ``name`` (a link itself, never its target); False when there was none."""
        _plain(name)
        with self.acting() as fd:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                return False
            return True

    def lstat(self, name: str) -> os.stat_result:
        _plain(name)
        with self.acting() as fd:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def bind_unix(self, name: str, mode: int = FILE_MODE) -> socket.socket:
        """A Unix socket bound at ``name`` as the owner, with ``mode`` from the start; one left
        behind by a killed run, or a link, is replaced (any other file there is an error)."""
        _plain(name)
        with self.acting() as fd:
            try:
                kind = stat.S_IFMT(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                if kind in (stat.S_IFSOCK, stat.S_IFLNK):
                    os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(name)  # relative: the working directory is this one
            except BaseException:
                sock.close()
                raise
            finally:
                os.umask(old_umask)
            return sock


def _create(path: Path, expected: Identity | None, euid: int) -> None:
    """Make a missing directory 0700 and the expected user's.

    Inside a folder that user owns (their home) it is made as that user; elsewhere root makes it
    and hands it over through a descriptor opened without following links.
    """
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if euid == 0 and expected is not None and expected.uid != 0 and ancestor.stat().st_uid == expected.uid:
        try:
            with running_as(expected):
                os.makedirs(path, mode=DIR_MODE)
            return
        except PermissionError:
            pass  # a folder of theirs they cannot reach from / (e.g. under root's 0700 tmp): root makes it
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    if euid == 0 and expected is not None and expected.uid != 0:
        fd = _open(path, _DIR_FLAGS)
        try:
            os.fchown(fd, expected.uid, expected.gid)
        finally:
            os.close(fd)
