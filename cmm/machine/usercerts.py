"""The certificates in a user's config dir, made and renewed without root touching it by path."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import attrs

from cmm.config.userfiles import UserDir
from cmm.machine import certs


def ensure_certificates(directory: UserDir, force: bool = False, now: datetime | None = None) -> certs.EnsureResult:
    """:func:`certs.ensure_certificates` for a user's directory without root touching it by path.

    The files are read and written as the directory's owner (never through a link), and the
    decisions are :func:`certs.plan_certificates`', made in between with the current process's
    rights: key generation then imports from a Python the user may not be able to read, and no
    copy of the CA key ever lies anywhere else. The paths in the result are those in ``directory``.
    """
    paths = certs.certificate_paths(directory.path)
    files: dict[str, bytes] = {}
    for path in attrs.astuple(paths, recurse=False):
        try:
            files[path.name] = directory.read_bytes(path.name)
        except FileNotFoundError:
            pass
    plan = certs.plan_certificates(files, now if now is not None else datetime.now(timezone.utc), force=force,
                                   shown=Path(directory.path))
    for write in plan.writes:
        directory.write_bytes(write.name, write.data, write.mode)
    return certs.EnsureResult(paths=paths, created_ca=plan.created_ca, issued_server=plan.issued_server,
                              server_not_after=plan.server_not_after, server=plan.server)
