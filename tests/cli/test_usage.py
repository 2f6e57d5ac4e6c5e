"""``cmm usage`` over a store filled with known rows: the table, JSON and CSV, every grouping, the
time window, no database yet, a store being written meanwhile, and sudo reading as the user."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from cmm.cli.main import main
from cmm.core.records import RequestRecord
from cmm.usage import query
from cmm.usage.store import UsageStore, row_of

NOW = time.time()
HAIKU, OPUS = "claude-haiku-4-5", "claude-opus-4-6"


def haiku(offset: float, duration: float, status: int | None = 200) -> RequestRecord:
    return RequestRecord(NOW - offset, "POST", "/v1/messages", HAIKU, True, "gemini", status, duration, 1, 2,
                         rule="haiku", upstream="127.0.0.1:8317", request_class="sub", input_tokens=100,
                         output_tokens=10, cache_read_input_tokens=300, cache_creation_input_tokens=0)


def opus(offset: float, duration: float, status: int | None = 200, error: str | None = None) -> RequestRecord:
    return RequestRecord(NOW - offset, "POST", "/v1/messages", OPUS, False, None, status, duration, 1, 2, error=error,
                         upstream="anthropic", request_class="main", input_tokens=50, output_tokens=5,
                         cache_creation_input_tokens=50)


KNOWN = [haiku(600, 0.1), haiku(500, 0.2), haiku(400, 0.3, status=500), haiku(300, 0.4),
         opus(200, 1.0), opus(100, 3.0, status=None, error="connection reset"),
         opus(2 * 86400, 9.0)]  # two days ago: outside the default 24 hours


def fill(directory: Path, records: list[RequestRecord] = KNOWN) -> Path:
    store = UsageStore(directory / "usage.sqlite3")
    store.write([row_of(record) for record in records])
    store.close()
    return directory / "usage.sqlite3"


def cmm_usage(*args: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["usage", *args], environ=environ or {"HOME": "/nonexistent"}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    fill(tmp_path)
    return tmp_path


def test_the_table_by_model_with_totals_errors_cache_hits_and_percentiles(filled: Path) -> None:
    code, out, err = cmm_usage("--config-dir", str(filled))
    assert (code, err) == (0, "")
    title, *lines = out.splitlines()
    assert title.startswith("Requests since ") and title.endswith("(24h), by model")
    assert lines == [
        "MODEL             REQUESTS  ERRORS  INPUT  OUTPUT  CACHE WRITE  CACHE READ  CACHE HIT    P50    P99",
        "claude-haiku-4-5         4       1    400      40            0       1,200      75.0%  200ms  400ms",
        "claude-opus-4-6          2       1    100      10          100           0       0.0%  1.00s  3.00s",
        "-" * len(lines[0]),
        "TOTAL                    6       2    500      50          100       1,200      66.7%  300ms  3.00s",
    ]


def test_json_has_every_group_and_the_total_in_plain_numbers(filled: Path) -> None:
    code, out, _ = cmm_usage("--config-dir", str(filled), "--json", "--by", "upstream")
    document = json.loads(out)
    assert code == 0 and document["by"] == "upstream" and document["database"] == str(filled / "usage.sqlite3")
    groups = {group["key"]: group for group in document["groups"]}
    assert groups["127.0.0.1:8317"] == {
        "key": "127.0.0.1:8317", "requests": 4, "errors": 1, "input_tokens": 400, "output_tokens": 40,
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1200, "cache_hit_rate": 0.75,
        "p50_seconds": 0.2, "p99_seconds": 0.4}
    assert groups["anthropic"]["requests"] == 2 and groups["anthropic"]["p99_seconds"] == 3.0
    assert document["total"]["requests"] == 6 and document["total"]["errors"] == 2


def test_csv_has_a_header_and_one_line_a_group(filled: Path) -> None:
    code, out, _ = cmm_usage("--config-dir", str(filled), "--csv", "--by", "mapping")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(rows[0]) == ["mapping", "requests", "errors", "input_tokens", "output_tokens",
                                           "cache_creation_input_tokens", "cache_read_input_tokens",
                                           "cache_hit_rate", "p50_seconds", "p99_seconds"]
    assert [(row["mapping"], row["requests"], row["cache_hit_rate"]) for row in rows] == [
        ("haiku", "4", "0.75"), ("", "2", "0.0")]  # the rule's label; passthrough has none


@pytest.mark.parametrize("by, keys", [
    ("class", {"sub": 4, "main": 2}),
    ("route", {"intercepted": 4, "passthrough": 2}),
    ("day", None),  # checked below: local days
])
def test_every_grouping(filled: Path, by: str, keys: dict[str, int] | None) -> None:
    _, out, _ = cmm_usage("--config-dir", str(filled), "--json", "--by", by, "--since", "7d")
    found = {group["key"]: group["requests"] for group in json.loads(out)["groups"]}
    if keys is None:
        days: dict[str, int] = {}
        for record in KNOWN:
            day = time.strftime("%Y-%m-%d", time.localtime(record.started))
            days[day] = days.get(day, 0) + 1
        assert found == days and sum(found.values()) == 7
    else:
        assert found == {**keys, **({"main": 3} if by == "class" else {"passthrough": 3} if by == "route" else {})}


def test_since_a_span_or_a_date(filled: Path) -> None:
    assert json.loads(cmm_usage("--config-dir", str(filled), "--json", "--since", "7d")[1])["total"]["requests"] == 7
    assert json.loads(cmm_usage("--config-dir", str(filled), "--json", "--since", "6m")[1])["total"]["requests"] == 3
    yesterday = time.strftime("%Y-%m-%d", time.localtime(NOW - 86400))
    document = json.loads(cmm_usage("--config-dir", str(filled), "--json", "--since", yesterday)[1])
    assert document["total"]["requests"] == 6


def test_an_empty_window_says_so(filled: Path) -> None:
    code, out, _ = cmm_usage("--config-dir", str(filled), "--since", "1s")
    assert code == 0 and out.splitlines()[-1] == "No requests in that time."


def test_no_database_yet_is_a_clear_message(tmp_path: Path) -> None:
    code, out, err = cmm_usage("--config-dir", str(tmp_path))
    assert (code, out) == (1, "")
    assert err == (f"cmm: no usage recorded yet: {tmp_path / 'usage.sqlite3'} does not exist. A running cmm "
                   f"(sudo twistd cmm) records every request there.\n")
    assert not (tmp_path / "usage.sqlite3").exists()  # reading made nothing


def test_a_database_being_made_is_no_usage_yet(tmp_path: Path) -> None:
    (tmp_path / "usage.sqlite3").write_bytes(b"")  # the recorder's file before its table
    assert cmm_usage("--config-dir", str(tmp_path)) == (
        1, "", f"cmm: no usage recorded yet in {tmp_path / 'usage.sqlite3'}.\n")


def test_a_bad_since_is_a_usage_error(filled: Path) -> None:
    code, _, err = cmm_usage("--config-dir", str(filled), "--since", "yesterday")
    assert code == 2 and "'yesterday' is neither a span" in err


def test_json_and_csv_together_are_refused(filled: Path) -> None:
    code, _, err = cmm_usage("--config-dir", str(filled), "--json", "--csv")
    assert code == 2 and "not allowed with" in err


def test_a_damaged_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "usage.sqlite3").write_bytes(b"garbage " * 512)
    code, _, err = cmm_usage("--config-dir", str(tmp_path))
    assert code == 1 and err.startswith(f"cmm: cannot read {tmp_path / 'usage.sqlite3'}: file is not a database")


def test_it_reads_while_the_recorder_has_the_database_open(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3")
    try:
        store.write([row_of(record) for record in KNOWN[:2]])
        assert (tmp_path / "usage.sqlite3-wal").exists()  # committed rows still in the WAL
        _, out, _ = cmm_usage("--config-dir", str(tmp_path), "--json")
        assert json.loads(out)["total"]["requests"] == 2
        store.write([row_of(KNOWN[2])])
        _, out, _ = cmm_usage("--config-dir", str(tmp_path), "--json")
        assert json.loads(out)["total"]["requests"] == 3
    finally:
        store.close()


# --- sudo: the user's file, read as the user ----------------------------------------------------


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A config dir of ``nobody``'s (uid 65534) in a place that user can reach."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    directory = Path(tempfile.mkdtemp(prefix="cmm-usage-", dir="/tmp"))
    os.chown(directory, 65534, 65534)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_under_sudo_it_reads_the_users_file_as_that_user(nobodys_dir: Path) -> None:
    database = fill(nobodys_dir)
    for path in nobodys_dir.iterdir():
        os.chown(path, 65534, 65534)
    environ = {"SUDO_UID": "65534", "SUDO_GID": "65534", "HOME": "/root"}
    code, out, err = cmm_usage("--config-dir", str(nobodys_dir), "--json", environ=environ)
    assert (code, err) == (0, "") and json.loads(out)["total"]["requests"] == 6
    made = {path.name: (path.stat().st_uid, path.stat().st_mode & 0o777) for path in nobodys_dir.iterdir()}
    assert made == {name: (65534, 0o600) for name in made} and database.name in made  # nothing of root's


def test_under_sudo_root_never_opens_it_itself(nobodys_dir: Path) -> None:
    """A file there the user cannot read (root's, 0600) cannot be read: root did not open it."""
    fill(nobodys_dir)  # made by root, mode 0600
    environ = {"SUDO_UID": "65534", "SUDO_GID": "65534", "HOME": "/root"}
    code, out, err = cmm_usage("--config-dir", str(nobodys_dir), environ=environ)
    assert (code, out) == (1, "")
    assert err == f"cmm: cannot open {nobodys_dir / 'usage.sqlite3'}: unable to open database file\n"


# --- the queries the dashboard shares ------------------------------------------------------------


@pytest.fixture
def connection(filled: Path) -> Iterator[sqlite3.Connection]:
    connection = query.connect_readonly(filled / "usage.sqlite3")
    yield connection
    connection.close()


def test_totals_without_grouping_and_over_a_closed_window(connection: sqlite3.Connection) -> None:
    [everything] = query.totals(connection, NOW - 7 * 86400)
    assert (everything.key, everything.requests, everything.errors, everything.p99) == (None, 7, 2, 9.0)
    [window] = query.totals(connection, NOW - 550, NOW - 250)
    assert (window.requests, window.p50, window.p99) == (3, 0.3, 0.4)
    [nothing] = query.totals(connection, NOW + 10)
    assert (nothing.requests, nothing.p50, nothing.cache_hit_rate) == (0, None, None)
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        query.totals(connection, 0, by="colour")


def test_series_has_every_bucket_with_requests_tokens_and_median(connection: sqlite3.Connection) -> None:
    buckets = query.series(connection, NOW - 700, NOW, 200)
    assert [bucket.start for bucket in buckets] == [NOW - 700, NOW - 500, NOW - 300, NOW - 100]
    assert [bucket.requests for bucket in buckets] == [1, 2, 2, 1]  # [-700,-500) [-500,-300) [-300,-100) [-100,0)
    assert [bucket.errors for bucket in buckets] == [0, 1, 0, 1]
    assert buckets[1].p50 == 0.2 and buckets[2].p50 == 0.4
    assert buckets[0].tokens == 100 + 10 + 300 and buckets[3].tokens == 50 + 5 + 50
    empty = query.series(connection, NOW + 100, NOW + 400, 100)
    assert [(bucket.requests, bucket.p50) for bucket in empty] == [(0, None)] * 3
    with pytest.raises(ValueError):
        query.series(connection, NOW, NOW, 60)


@pytest.mark.parametrize("text, back", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 7 * 86400),
                                        ("2w", 14 * 86400), ("1.5h", 5400)])
def test_since_spans(text: str, back: float) -> None:
    assert query.parse_since(text, 1e9) == 1e9 - back


def test_since_dates_are_local_unless_they_say_otherwise() -> None:
    assert query.parse_since("2026-11-01", 0) == time.mktime((2026, 11, 1, 0, 0, 0, 0, 0, -1))
    assert query.parse_since("2026-11-01T08:00:00+00:00", 0) == 1793520000.0
    with pytest.raises(ValueError, match="neither a span"):
        query.parse_since("-1d", 0)


def test_cache_hit_rate_is_reads_over_all_input() -> None:
    totals = query.Totals(None, 1, 0, 100, 0, 100, 200, None, None)
    assert totals.cache_hit_rate == 0.5
    assert attrs.evolve(totals, input_tokens=0, cache_creation_input_tokens=0, cache_read_input_tokens=0
                        ).cache_hit_rate is None
