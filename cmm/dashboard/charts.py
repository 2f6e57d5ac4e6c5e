"""The dashboard's charts as SVG text: values in, markup out, no I/O.

Drawn by the server so the page needs no chart library and nothing from outside. Every text that
reaches the markup is escaped; each chart is an ``role="img"`` with a ``<title>`` and a
``<desc>`` that sums it up for a screen reader, and each bar or point carries its own
``<title>`` (the tooltip a mouse user sees). Colours are attributes, not ``style``, so a strict
Content-Security-Policy that forbids inline styles still shows them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, tzinfo
from html import escape

import attrs

from cmm.dashboard.store import Bucket

WIDTH = 480
HEIGHT = 230
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 8, 28, 26

#: Okabe-Ito: told apart with the common kinds of colour blindness
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")


@attrs.frozen
class Band:
    """One series: a name for the legend and a value per bucket (None: nothing measured)."""

    name: str
    values: tuple[float | None, ...]
    color: str = PALETTE[0]


def number(value: float) -> str:
    """Short and readable: 950, 1.2k, 3.4M, 0.25."""
    size = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if size >= limit:
            text = f"{value / limit:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    if size and size < 10 and value != int(value):
        return f"{value:.2g}"
    return f"{value:.0f}"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value`` (1 for nothing)."""
    if not value > 0 or math.isinf(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10 * power


def _check(labels: Sequence[str], bands: Sequence[Band]) -> None:
    if not bands:
        raise ValueError("a chart needs at least one band")
    for band in bands:
        if len(band.values) != len(labels):
            raise ValueError(f"band {band.name!r} has {len(band.values)} values for {len(labels)} labels")


def _frame(ident: str, title: str, summary: str, top: float, unit: str, labels: Sequence[str],
           bands: Sequence[Band]) -> list[str]:
    """The opening tag, title, description, axes, ticks and legend."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-labelledby="{escape(ident)}-t {escape(ident)}-d" preserveAspectRatio="xMidYMid meet">',
        f'<title id="{escape(ident)}-t">{escape(title)}</title>',
        f'<desc id="{escape(ident)}-d">{escape(summary)}</desc>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - fraction)
        parts.append(f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor" '
                     f'stroke-opacity="{0.5 if fraction == 0 else 0.15}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="currentColor">'
                     f'{escape(number(top * fraction))}{escape(unit) if fraction else ""}</text>')
    count = len(labels)
    if count:
        slot = plot_w / count
        for index in sorted({0, count // 2, count - 1}):
            x = _LEFT + slot * (index + 0.5)
            anchor = "start" if index == 0 and count > 2 else "end" if index == count - 1 and count > 2 else "middle"
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" font-size="11" '
                         f'fill="currentColor">{escape(labels[index])}</text>')
    x = WIDTH - _RIGHT
    for band in reversed(bands):  # right-aligned legend, first band leftmost
        text_width = 6.5 * len(band.name) + 20
        x -= text_width
        parts.append(f'<rect x="{x:.1f}" y="8" width="10" height="10" fill="{escape(band.color)}"/>'
                     f'<text x="{x + 14:.1f}" y="17" font-size="11" fill="currentColor">{escape(band.name)}</text>')
    return parts


def bar_chart(ident: str, title: str, labels: Sequence[str], bands: Sequence[Band], unit: str = "") -> str:
    """Stacked bars, one per label; ``ident`` makes the title and description ids unique on a page."""
    _check(labels, bands)
    totals = [sum(band.values[i] or 0 for band in bands) for i in range(len(labels))]
    top = nice_ceiling(max(totals, default=0))
    grand = sum(totals)
    if grand:
        peak = max(range(len(totals)), key=totals.__getitem__)
        summary = (f"{number(grand)}{unit} in total over {len(labels)} intervals "
                   f"({', '.join(f'{band.name} {number(sum(v or 0 for v in band.values))}' for band in bands)}); "
                   f"most at {labels[peak]}: {number(totals[peak])}{unit}.")
    else:
        summary = "Nothing recorded in this period."
    parts = _frame(ident, title, summary, top, unit, labels, bands)
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(labels), 1)
    gap = min(2.0, slot * 0.2)
    for index, label in enumerate(labels):
        if not totals[index]:
            continue
        base = 0.0
        details = ", ".join(f"{band.name} {number(band.values[index] or 0)}" for band in bands)
        parts.append(f"<g><title>{escape(f'{label}: {number(totals[index])}{unit} ({details})')}</title>")
        for band in bands:
            value = band.values[index] or 0
            if value <= 0:
                continue
            height = plot_h * value / top
            y = _TOP + plot_h - plot_h * base / top - height
            parts.append(f'<rect x="{_LEFT + slot * index + gap / 2:.1f}" y="{y:.1f}" '
                         f'width="{max(slot - gap, 0.5):.1f}" height="{height:.1f}" fill="{escape(band.color)}"/>')
            base += value
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def line_chart(ident: str, title: str, labels: Sequence[str], bands: Sequence[Band], unit: str = "") -> str:
    """A line per band with a point per measured value; an unmeasured bucket breaks the line."""
    _check(labels, bands)
    measured = [v for band in bands for v in band.values if v is not None]
    top = nice_ceiling(max(measured, default=0))
    if measured:
        summary = "; ".join(
            f"{band.name}: highest {number(max(vs))}{unit}, lowest {number(min(vs))}{unit}"
            for band in bands if (vs := [v for v in band.values if v is not None])) + "."
    else:
        summary = "Nothing recorded in this period."
    parts = _frame(ident, title, summary, top, unit, labels, bands)
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(labels), 1)
    for band in bands:
        runs: list[list[tuple[float, float]]] = [[]]
        points = []
        for index, value in enumerate(band.values):
            if value is None:
                runs.append([])
                continue
            x, y = _LEFT + slot * (index + 0.5), _TOP + plot_h * (1 - value / top)
            runs[-1].append((x, y))
            points.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{escape(band.color)}">'
                          f"<title>{escape(f'{labels[index]}: {band.name} {number(value)}{unit}')}</title></circle>")
        for run in runs:
            if len(run) > 1:
                coordinates = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{escape(band.color)}" '
                             f'stroke-width="1.5"/>')
        parts.extend(points)
    parts.append("</svg>")
    return "".join(parts)


def bucket_labels(starts: Sequence[float], width: int, zone: tzinfo | None = None) -> list[str]:
    """Each bucket's start as local clock time (with the weekday when buckets are hours or more)."""
    pattern = "%a %H:%M" if width >= 3600 else "%H:%M"
    return [datetime.fromtimestamp(start, zone).strftime(pattern) for start in starts]


def usage_charts(buckets: Sequence[Bucket], width: int, zone: tzinfo | None = None) -> dict[str, str]:
    """The dashboard's three charts (requests, tokens, latency) of one period's buckets."""
    labels = bucket_labels([b.start for b in buckets], width, zone)
    ok = tuple(float(b.requests - b.errors) for b in buckets)
    return {
        "requests": bar_chart("chart-requests", "Requests", labels, (
            Band("answered", ok, PALETTE[0]),
            Band("failed", tuple(float(b.errors) for b in buckets), PALETTE[4]),
        )),
        "tokens": bar_chart("chart-tokens", "Tokens", labels, (
            Band("input", tuple(float(b.input_tokens) for b in buckets), PALETTE[0]),
            Band("output", tuple(float(b.output_tokens) for b in buckets), PALETTE[1]),
            Band("cache read", tuple(float(b.cache_read_input_tokens) for b in buckets), PALETTE[2]),
            Band("cache write", tuple(float(b.cache_creation_input_tokens) for b in buckets), PALETTE[3]),
        )),
        "latency": line_chart("chart-latency", "Latency", labels, (
            Band("p50", tuple(b.p50_ms for b in buckets), PALETTE[0]),
            Band("p95", tuple(b.p95_ms for b in buckets), PALETTE[4]),
        ), unit=" ms"),
    }
