"""Removing cmm's configuration folder (``cmm uninstall``): only the files cmm makes, as the
folder's owner."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import attrs

from cmm.config import paths
from cmm.config.userfiles import UserDir


#: Every file cmm writes in its folder: certificates and keys, settings, mappings, pid and state
#: files, the request log with its rotations, the DNS cache, and the temporary files of atomic
#: writes.  A new file kept there must be added here, or `cmm uninstall` leaves the folder.
OWN_FILES = (
    "ca.crt", "ca.key", "server.crt", "server.key", paths.ENV_FILE_NAME, paths.MAPPINGS_FILE_NAME,
    paths.PID_FILE_NAME, paths.STATE_FILE_NAME, paths.DNS_CACHE_FILE_NAME, paths.LOG_FILE_NAME,
)
_NAMES = "|".join(re.escape(name.lstrip(".")) for name in OWN_FILES)
_USAGE = re.escape(paths.USAGE_FILE_NAME)  # the usage database, its side files, and damaged ones set aside
_OWN_FILE = re.compile(rf"(?:{'|'.join(map(re.escape, OWN_FILES))}|cmm\.log\.\d+|\.(?:{_NAMES})\..+\.tmp"
                       rf"|{_USAGE}(?:\.corrupt-\d{{8}}T\d{{6}}Z)?(?:-wal|-shm|-journal)?)")


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
