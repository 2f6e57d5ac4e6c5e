"""A usage store made the way the recorder makes it (:mod:`cmm.usage.schema`), for the dashboard's tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from cmm.usage.schema import COLUMNS, CREATE

NAMES = [name for name, _ in COLUMNS]


def request_row(**values: Any) -> dict[str, Any]:
    """A plausible intercepted request; ``values`` override its columns."""
    row: dict[str, Any] = {
        "time": 1_800_000_000.0, "route": "intercepted", "rule": "haiku", "model": "claude-haiku-4-5",
        "served_model": "gemini-2.5-flash", "upstream": "localhost:8317", "request_class": "main",
        "method": "POST", "path": "/v1/messages", "status": 200, "error": None, "fallback": None,
        "duration": 0.5, "ttfb": 0.1, "bytes_in": 1000, "bytes_out": 2000, "input_tokens": 10,
        "output_tokens": 20, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 40,
    }
    unknown = set(values) - set(row)
    assert not unknown, unknown
    row.update(values)
    return row


def create_store(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in CREATE:
                db.execute(statement)
    finally:
        db.close()
    path.chmod(0o600)


def insert(path: Path, *rows: dict[str, Any]) -> list[int]:
    """Append ``rows`` (one transaction, as the recorder batches them); their ids."""
    ids = []
    db = sqlite3.connect(path)
    try:
        with db:
            for row in rows:
                cursor = db.execute(f"INSERT INTO requests ({', '.join(NAMES)}) VALUES ({', '.join('?' * len(NAMES))})",
                                    [row[name] for name in NAMES])
                ids.append(int(cursor.lastrowid or 0))
    finally:
        db.close()
    return ids
