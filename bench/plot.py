"""The shapes a table hides, as one PNG: cost against concurrency, body size and open streams.

Drawn from a run's raw results (``bench/run.py --scaling`` and ``--streams``; ``--full`` has
both) with matplotlib, which the benchmark needs for this alone: ``pip install '.[bench]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def missing_dependency() -> str | None:
    """Why no plot can be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "no plot: matplotlib is not installed (pip install '.[bench]')"
    return None


def plot(measurements: dict[str, Any], path: Path) -> bool:
    """Write the panels there are figures for to ``path``; False if there were none."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    panels = []
    if "scaling" in measurements:
        panels.append(_connections)
        if measurements["scaling"].get("sizes"):
            panels.append(_sizes)
    if "streams" in measurements:
        panels.append(_streams)
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for draw, axis in zip(panels, axes[0]):
        draw(measurements, axis)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle("cmm against the direct run (one benchmark run, shared 2-core machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _connections(m: dict[str, Any], axis: Any) -> None:
    runs = m["scaling"]["runs"]
    counts = sorted(runs, key=int)
    for way, style in (("direct", "o--"), ("via", "o-")):
        axis.plot([int(c) for c in counts], [runs[c][way].get("rps", 0) for c in counts], style,
                  label=f"routed, {'direct' if way == 'direct' else 'via cmm'}")
    axis.set_xscale("log", base=2)
    axis.set_xticks([int(c) for c in counts], counts)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("concurrent connections (wrk, keep-alive)")
    axis.set_ylabel("requests per second")
    axis.set_title("Small requests against connections")


def _sizes(m: dict[str, Any], axis: Any) -> None:
    sizes = m["scaling"]["sizes"]
    order = sorted(sizes, key=int)
    for route in ("routed", "passthrough"):
        for way, style in (("direct", "--"), ("via", "-")):
            points = [(int(s), sizes[s][route][way]["median_s"]) for s in order if route in sizes[s]]
            points = [(x, y * 1000) for x, y in points if y is not None]
            if not points:
                continue
            axis.plot(*zip(*points), "o" + style, label=f"{route}, {'direct' if way == 'direct' else 'via cmm'}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("request body, bytes (model first)")
    axis.set_ylabel("median latency, ms")
    axis.set_title("Latency against body size")


def kb_per_stream(sizes: dict[str, Any], total: str) -> float:
    """cmm's memory per stream with ``total`` open, in KB, against the idle RSS before the
    first (smallest) run: runs share one cmm, and memory an earlier run left allocated and a
    later one reused counts as the later one's, the conservative reading."""
    idle = sizes[min(sizes, key=int)]["idle_kib"]["VmRSS"]
    return (sizes[total]["open_kib"]["VmRSS"] - idle) * 1.024 / int(total)


def _streams(m: dict[str, Any], axis: Any) -> None:
    sizes = m["streams"]["sizes"]
    order = sorted(sizes, key=int)
    axis.plot([int(n) for n in order], [kb_per_stream(sizes, n) for n in order], "o-",
              label="cmm RSS per open stream (master + workers)")
    axis.axhline(32, color="grey", linestyle=":", label="target: 32 KB")
    axis.set_xscale("log")
    axis.set_xlabel("concurrent open streams (routed)")
    axis.set_ylabel("KB per stream")
    axis.set_ylim(bottom=0)
    axis.set_title("Memory against open streams")
