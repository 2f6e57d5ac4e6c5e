"""A dashboard whose "running cmm" is a JSON file the test rewrites, redrawing its charts every
second: ``python3 live_server.py STORE STATUS``.

Prints the address as ``cmm dashboard`` does; serves until killed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from cmm.dashboard import server


def main(store: Path, status: Path) -> None:
    async def live() -> dict[str, Any]:
        found: dict[str, Any] = json.loads(status.read_text())
        return found

    dashboard = server.Dashboard(store, live=live, clock=reactor, refresh=1.0)
    port = reactor.listenTCP(0, server.site(dashboard), interface="127.0.0.1")  # type: ignore[attr-defined]
    dashboard.port = port.getHost().port
    print(f"cmm dashboard: {dashboard.url()}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
