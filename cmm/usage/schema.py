"""The usage database's one table: a row a request, written by the recorder (as the user) and
read by ``cmm usage`` and ``cmm dashboard``. Columns match :class:`cmm.core.records.RequestRecord`
so a record becomes a row without translation."""

from __future__ import annotations

SCHEMA_VERSION = 1

COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "REAL NOT NULL"),  # the request's start, seconds since the epoch (UTC)
    ("route", "TEXT NOT NULL"),  # intercepted | passthrough | fallback | tunnel
    ("rule", "TEXT"),  # the routing rule's label, NULL for passthrough
    ("model", "TEXT"),  # the model asked for
    ("served_model", "TEXT"),  # the model that answered
    ("upstream", "TEXT"),  # "anthropic" or the target's host:port
    ("request_class", "TEXT"),
    ("method", "TEXT NOT NULL"),
    ("path", "TEXT NOT NULL"),
    ("status", "INTEGER"),  # NULL: no response reached the client
    ("error", "TEXT"),
    ("fallback", "TEXT"),  # why another upstream answered, e.g. "anthropic 429"
    ("duration", "REAL NOT NULL"),  # seconds
    ("ttfb", "REAL"),  # seconds to the response head's first byte
    ("bytes_in", "INTEGER NOT NULL"),
    ("bytes_out", "INTEGER NOT NULL"),
    ("input_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"),
    ("cache_creation_input_tokens", "INTEGER"),
    ("cache_read_input_tokens", "INTEGER"),
)

CREATE = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
    + ")",
    "CREATE INDEX IF NOT EXISTS requests_time ON requests (time)",
)
