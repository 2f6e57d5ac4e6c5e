"""Make docs/dashboard.png: the dashboard over a week of made-up but plausible traffic, in headless
Chromium 1280 pixels wide (a laptop's width; tall enough to show the feed).

``python3 tests/dashboard/screenshot.py [OUT.png]`` from the checkout."""

from __future__ import annotations

import math
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

from browser import start_chromium  # noqa: E402
from store_rows import create_store, insert, request_row  # noqa: E402

from cmm.dashboard import server  # noqa: E402

HAIKU_RULE = "claude-haiku* → gemini-2.5-flash (else anthropic)"
MODELS = (  # model asked, route, rule, served by, upstream, share
    ("claude-sonnet-5-5", "passthrough", None, "claude-sonnet-5-5", "anthropic", 0.45),
    ("claude-haiku-5-5", "intercepted", HAIKU_RULE, "gemini-2.5-flash", "localhost:8317", 0.30),
    ("claude-opus-5-5", "intercepted", "* [subagent,compaction] → gemini-2.5-pro", "gemini-2.5-pro",
     "localhost:8317", 0.10),
    ("claude-opus-5-5", "passthrough", None, "claude-opus-5-5", "anthropic", 0.12),
    ("claude-haiku-5-5", "fallback", HAIKU_RULE, "claude-haiku-5-5", "anthropic", 0.03),
)


def traffic(now: float, rng: random.Random) -> list[dict[str, Any]]:
    """A working week: busy days, quiet nights, a few overloaded answers and fallbacks."""
    rows = []
    t = now - 7 * 86400
    while t < now:
        hour = time.localtime(t).tm_hour
        busy = 0.15 + (0.85 if 9 <= hour < 19 else 0.0) * (0.6 + 0.4 * math.sin(hour / 3))
        t += rng.expovariate(busy / 45)
        if t >= now:
            break
        model, route, rule, served, upstream, _ = rng.choices(MODELS, [m[5] for m in MODELS])[0]
        status = 200 if rng.random() > 0.03 else rng.choice([429, 529, 500])
        fallback = "target 503" if route == "fallback" else None
        slow = 2.5 if "opus" in model else 0.6 if route == "intercepted" else 1.4
        duration = rng.lognormvariate(math.log(slow), 0.5)
        rows.append(request_row(
            time=t, route=route, rule=rule, model=model, served_model=served, upstream=upstream, status=status,
            error=None, fallback=fallback, duration=duration, ttfb=duration * 0.2,
            bytes_in=rng.randint(2_000, 400_000), bytes_out=rng.randint(500, 40_000),
            input_tokens=rng.randint(3, 4_000), output_tokens=rng.randint(20, 2_500),
            cache_creation_input_tokens=rng.choice([0, 0, rng.randint(500, 20_000)]),
            cache_read_input_tokens=rng.randint(5_000, 90_000) if route != "intercepted" else rng.randint(0, 8_000)))
    return rows


async def live() -> dict[str, Any]:
    return {"running": True, "pid": 48213, "note": "", "routes": [
        {"route": HAIKU_RULE, "requests": 412, "errors": 3, "p50_ms": 612.0,
         "p99_ms": 2410.0, "bytes_in": 38_200_000, "bytes_out": 4_100_000},
        {"route": "passthrough", "requests": 903, "errors": 11, "p50_ms": 1380.0, "p99_ms": 7900.0,
         "bytes_in": 121_000_000, "bytes_out": 16_800_000}], "workers": []}


def main(out: Path) -> None:
    from twisted.internet import reactor

    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "usage.sqlite3"
        create_store(store)
        now = time.time()
        insert(store, *traffic(now - 20, random.Random(15)))
        dashboard = server.Dashboard(store, live=live, clock=reactor)
        port = reactor.listenTCP(0, server.site(dashboard), interface="127.0.0.1")
        dashboard.port = port.getHost().port
        thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        thread.start()
        browser = start_chromium(1280, 1400)
        try:
            browser.get(dashboard.url() + "&range=day")
            time.sleep(2)
            for i in range(3):  # arrive while the page is open
                insert(store, request_row(time=time.time(), model="claude-haiku-5-5", rule=HAIKU_RULE, duration=0.4 + i / 10,
                                          input_tokens=812 + i, output_tokens=164, cache_read_input_tokens=2_048))
                time.sleep(1.2)
            browser.save_screenshot(str(out))
            for entry in browser.get_log("browser"):
                print("browser console:", entry["level"], entry["message"], file=sys.stderr)
        finally:
            browser.quit()
            reactor.callFromThread(reactor.stop)
            thread.join(10)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
