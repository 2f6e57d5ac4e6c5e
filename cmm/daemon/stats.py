"""Live counters for ``cmm status``: per route (each rule by its label, and passthrough) and per worker.

Kept in the master from the request records the workers send, so no worker holds shared state.
Durations go into fixed log-spaced buckets: p50/p99 cost a few hundred integers per route no
matter how long cmm runs, with at most ~6 % error.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from typing import Any, Callable

import attrs

from cmm.core.failover import Cooldown, CooldownTable
from cmm.core.records import RequestRecord

_RATIO = 1.12
_BOUNDS = [0.0001 * _RATIO**i for i in range(int(math.log(3600 / 0.0001, _RATIO)) + 2)]  # 0.1 ms .. 1 h


@attrs.define
class Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * (len(_BOUNDS) + 1))
    total: int = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self.total += 1

    def quantile(self, q: float) -> float | None:
        if not self.total:
            return None
        wanted = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= wanted and count:
                return _BOUNDS[min(index, len(_BOUNDS) - 1)]
        return _BOUNDS[-1]


@attrs.define
class RouteStats:
    requests: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)  # by status ("-" when none was sent)
    bytes_in: int = 0
    bytes_out: int = 0
    durations: Histogram = attrs.field(factory=Histogram)

    def add(self, record: RequestRecord) -> None:
        self.requests += 1
        if record.error is not None or record.status is None or record.status >= 400:
            self.errors["-" if record.status is None else str(record.status)] += 1
        self.bytes_in += record.bytes_in
        self.bytes_out += record.bytes_out
        self.durations.add(record.duration)

    def snapshot(self) -> dict[str, Any]:
        p50, p99 = self.durations.quantile(0.5), self.durations.quantile(0.99)
        return {
            "requests": self.requests,
            "errors": dict(sorted(self.errors.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        }


RECENT_WINDOW = 3600.0  # seconds: what ``cmm status`` and ``cmm doctor`` call lately
UNMATCHED_MAX = 20  # models kept that no mapping matched: the most recently seen
MODEL_NAME_MAX = 100  # a client's model name is kept this long at most


@attrs.define
class Seen:
    last: float  # wall-clock seconds
    count: int = 0  # since start


@attrs.define
class RecentModels:
    """Which mapping matched lately, and which models no mapping matched: a mapping whose source
    names last year's models shows at a glance, beside the names Claude Code asks for today.

    Bounded whatever clients send: one entry per mapping source, :data:`UNMATCHED_MAX` models.
    """

    window: float = RECENT_WINDOW
    matched: dict[str, Seen] = attrs.field(factory=dict)  # by mapping source
    unmatched: dict[str, Seen] = attrs.field(factory=dict)  # by model

    def add(self, record: RequestRecord) -> None:
        if record.model is None:  # not a request routed by model
            return
        if record.mapping is not None:
            table, key = self.matched, record.mapping
        else:
            table, key = self.unmatched, record.model[:MODEL_NAME_MAX]
        seen = table.setdefault(key, Seen(record.started))
        seen.last, seen.count = max(seen.last, record.started), seen.count + 1
        if len(self.unmatched) > UNMATCHED_MAX:
            del self.unmatched[min(self.unmatched, key=lambda model: self.unmatched[model].last)]

    def snapshot(self, now: float) -> dict[str, Any]:
        def lately(table: dict[str, Seen]) -> dict[str, Any]:
            return {key: {"last": seen.last, "count": seen.count} for key, seen in sorted(table.items())
                    if now - seen.last <= self.window}

        return {"window_s": self.window, "matched": lately(self.matched), "unmatched": lately(self.unmatched)}


@attrs.define
class LiveStats:
    routes: dict[str, RouteStats] = attrs.field(factory=dict)
    workers: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    recent: RecentModels = attrs.field(factory=RecentModels)
    clock: Callable[[], float] = time.time  # wall clock, as the records' ``started``
    fallbacks: dict[str, Counter[str]] = attrs.field(factory=dict)  # per rule: failed-over requests by cause
    cooldowns: CooldownTable = attrs.field(factory=lambda: CooldownTable(time.time))

    def add(self, record: RequestRecord, worker: str) -> None:
        # Each rule counts apart (even a passthrough it chose); requests no rule chose, together;
        # tunnels apart, as their minutes would skew passthrough's p50/p99.
        key = record.rule or (f"{record.mapping}* → {record.target}" if record.intercepted else
                              "tunnel" if record.route == "tunnel" else "passthrough")
        self.routes.setdefault(key, RouteStats()).add(record)
        self.recent.add(record)
        if record.fallback is not None:
            rule = record.rule or f"{record.mapping}* → {record.target}"
            self.fallbacks.setdefault(rule, Counter())[record.fallback] += 1
        self.workers.setdefault(worker, {}).setdefault("requests", 0)
        self.workers[worker]["requests"] += 1

    def gauges(self, worker: str, values: dict[str, Any]) -> None:
        self.workers.setdefault(worker, {"requests": 0}).update(values)

    def cooldown(self, cooldown: Cooldown) -> None:
        self.cooldowns.extend(cooldown)

    def forget_worker(self, worker: str) -> None:
        self.workers.pop(worker, None)

    def snapshot(self) -> dict[str, Any]:
        return {"routes": {name: stats.snapshot() for name, stats in sorted(self.routes.items())},
                "workers": dict(sorted(self.workers.items())),
                "recent": self.recent.snapshot(self.clock()),
                "fallbacks": {rule: dict(sorted(causes.items())) for rule, causes in sorted(self.fallbacks.items())},
                "cooldowns": [{"rule": c.rule, "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.until)),
                               "cause": c.cause} for c in self.cooldowns.current()]}
