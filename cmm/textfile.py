"""Line handling shared by the edits cmm makes to users' text files (/etc/hosts, ~/.cmm/.env):
both must leave every line they do not own exactly as it was."""

from __future__ import annotations


def split_lines(text: str) -> list[str]:
    """Split on ``\\n`` only, keeping line ends (``str.splitlines`` also splits on \\f, \\x1c, ...)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines
