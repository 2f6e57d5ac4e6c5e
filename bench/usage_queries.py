"""How long the dashboard's JSON answers take on a busy usage store.

Fills a scratch store (the recorder's schema) with ``--rows`` requests spread over the last week,
then times ``/api/series`` and ``/api/summary`` for each range and ``/api/panels`` (what the page
redraws: both at once), called as the server calls them but without HTTP, best of ``--runs``:
cold (a dashboard just started) and, for the charts, redrawn after one more request was recorded
(each run adds one row to the store).

    python3 bench/usage_queries.py [--rows 200000] [--runs 3] [--keep PATH]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cmm, not an installed one
from cmm.dashboard import server  # noqa: E402
from cmm.usage.schema import COLUMNS, CREATE  # noqa: E402

from components import best  # noqa: E402  (the bench folder is sys.path[0] when run as a script)

WEEK = 7 * 86400
RULES = (("intercepted", "haiku", "localhost:8317"), ("intercepted", "sonnet", "localhost:8317"),
         ("passthrough", None, "anthropic"), ("fallback", "opus", "anthropic"))


def fill(path: Path, rows: int, now: float, seed: int = 15) -> None:
    """``rows`` plausible requests over the week before ``now``, in time order as the recorder writes them."""
    chance = random.Random(seed)
    names = [name for name, _ in COLUMNS]
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in CREATE:
            db.execute(statement)
        times = sorted(now - chance.random() * WEEK for _ in range(rows))
        batch = []
        for moment in times:
            route, rule, upstream = chance.choice(RULES)
            status = chance.choices((200, 429, 500, None), (96, 2, 1, 1))[0]
            values: dict[str, Any] = {
                "time": moment, "route": route, "rule": rule, "model": f"claude-{rule or 'opus'}-4-5",
                "served_model": "gemini-2.5-flash" if route == "intercepted" else None, "upstream": upstream,
                "request_class": chance.choice(("main", "title", "quota")), "method": "POST",
                "path": "/v1/messages", "status": status, "error": None if status else "client went away",
                "fallback": "anthropic 429" if route == "fallback" else None,
                "duration": chance.lognormvariate(0, 1), "ttfb": chance.random(), "bytes_in": chance.randrange(500, 200_000),
                "bytes_out": chance.randrange(200, 50_000), "input_tokens": chance.randrange(1, 5000),
                "output_tokens": chance.randrange(1, 2000), "cache_creation_input_tokens": chance.randrange(0, 3000),
                "cache_read_input_tokens": chance.randrange(0, 60_000),
            }
            batch.append([values[name] for name in names])
        with db:
            db.executemany(f"INSERT INTO requests ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", batch)
    finally:
        db.close()


class _Asked:
    """The little of a twisted.web request the answer functions read: the query arguments."""

    def __init__(self, **args: str) -> None:
        self.args = {name.encode(): [value.encode()] for name, value in args.items()}


def _one_more(path: Path, now: float) -> None:
    """A request just recorded, in the last bucket of every range (what a live dashboard sees between redraws)."""
    names = [name for name, _ in COLUMNS]
    values: dict[str, Any] = {name: None for name in names}
    values.update(time=now - 1, route="intercepted", rule="haiku", method="POST", path="/v1/messages", status=200,
                  duration=0.5, bytes_in=1000, bytes_out=2000)
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute(f"INSERT INTO requests ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                       [values[name] for name in names])
    finally:
        db.close()


def measure(path: Path, now: float, runs: int) -> list[tuple[str, float]]:
    """Each answer cold (a dashboard just started) and, for the charts, redrawn after one new request."""
    found = []
    answers = {"series": server.series_answer, "summary": server.summary_answer, "panels": server.panels_answer}
    for name in ("hour", "day", "week"):
        asked: Any = _Asked(range=name)
        for endpoint, answer in answers.items():
            def cold() -> object:
                return answer(server.Dashboard(path, now=lambda: now), asked)  # noqa: B023 - called in this turn

            found.append((f"/api/{endpoint}?range={name}", best(runs, cold)))
            if endpoint == "summary":
                continue
            warm = server.Dashboard(path, now=lambda: now)
            answer(warm, asked)
            redraws = []
            for _ in range(runs):
                _one_more(path, now)
                redraws.append(best(1, lambda: answer(warm, asked)))  # noqa: B023 - called in this turn
            found.append((f"/api/{endpoint}?range={name} redrawn", min(redraws)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="use (or make) the store here instead of a scratch one")
    args = parser.parse_args()
    now = 1_800_000_000.0 + 1234.5  # fixed, so two runs over a kept store ask the same questions
    with tempfile.TemporaryDirectory() as scratch:
        path = args.keep or Path(scratch) / "usage.sqlite3"
        if not path.exists():
            began = time.perf_counter()
            fill(path, args.rows, now)
            print(f"filled {path} with {args.rows:,} rows in {time.perf_counter() - began:.1f} s")
        for what, seconds in measure(path, now, args.runs):
            print(f"{what:36} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
