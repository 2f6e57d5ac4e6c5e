"""The certificates in a user's config dir, made and renewed without root touching it by path."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import attrs

from cmm.config.userfiles import UserDir
from cmm.machine import certs


def ensure_certificates(directory: UserDir, force: bool = False) -> certs.EnsureResult:
    """:func:`certs.ensure_certificates` for a user's directory without root touching it by path.

    The certificates are copied (read as the owner) into a private folder of the current user,
    checked and renewed there, and what changed is written back as the owner. So the files are
    the user's from the start, no link in the directory leads root anywhere, and the key
    generation itself keeps the current user's rights (a Python installed where the user cannot
    read still imports). The paths in the result are those in ``directory``.
    """
    names = [path.name for path in attrs.astuple(certs.certificate_paths(Path(".")), recurse=False)]
    # Root stages in /tmp, whose sticky bit keeps others from renaming the folder away (a TMPDIR
    # kept from the user's environment might not).
    with tempfile.TemporaryDirectory(prefix="cmm-certs.", dir="/tmp" if os.geteuid() == 0 else None) as staging:
        for name in names:
            try:
                data = directory.read_bytes(name)
            except FileNotFoundError:
                continue
            certs.write_atomically(Path(staging) / name, data, 0o600)
        before = {name: (Path(staging) / name).read_bytes() for name in names if (Path(staging) / name).exists()}
        result = certs.ensure_certificates(Path(staging), force=force)
        for name in names:
            path = Path(staging) / name
            data = path.read_bytes()
            if before.get(name) != data:
                directory.write_bytes(name, data, stat.S_IMODE(path.stat().st_mode))
    return attrs.evolve(result, paths=certs.certificate_paths(directory.path))
