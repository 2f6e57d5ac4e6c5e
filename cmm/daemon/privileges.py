"""Giving up root for good: what the workers, the usage recorder and ``sudo cmm usage`` do before
they touch anything a user could have crafted. Plain Python, so a small process stays small."""

from __future__ import annotations

import os


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved ids): a compromised process
    cannot regain root. Modules it needs are imported before, since the interpreter's own files
    may not be readable by that user."""
    import encodings.idna  # noqa: F401  (host names in TLS options, imported lazily otherwise)

    os.setgroups([])
    if hasattr(os, "setresuid"):  # Linux
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:  # macOS: as root, setuid/setgid set the real, effective and saved ids alike
        os.setgid(gid)
        os.setuid(uid)
    if os.geteuid() != uid or os.getuid() != uid or (uid != 0 and _can_regain_root()):
        raise SystemExit(f"cmm: could not drop privileges to uid {uid}")


def _can_regain_root() -> bool:
    try:
        os.seteuid(0)
    except PermissionError:
        return False
    return True


def parse_user(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    return int(uid), int(gid or uid)
