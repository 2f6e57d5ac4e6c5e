"""The SVG charts: well-formed, escaped, labelled for screen readers, and drawn to scale."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import timezone

import pytest
from hypothesis import given, strategies as st

from cmm.dashboard import charts
from cmm.dashboard.charts import Band, bar_chart, line_chart, nice_ceiling, number
from cmm.dashboard.store import Bucket

SVG = "{http://www.w3.org/2000/svg}"
PLOT_HEIGHT = charts.HEIGHT - charts._TOP - charts._BOTTOM


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on anything not well-formed


def test_a_bar_chart_is_an_image_named_by_its_title_and_description() -> None:
    root = parse(bar_chart("c1", "Requests", ["10:00", "10:01"], [Band("ok", (3.0, 1.0))]))
    assert root.get("role") == "img"
    ids = root.get("aria-labelledby", "").split()
    found = {element.get("id"): element for element in root.iter() if element.get("id")}
    assert [found[i].tag for i in ids] == [f"{SVG}title", f"{SVG}desc"]
    assert found["c1-t"].text == "Requests"
    assert found["c1-d"].text == "4 in total over 2 intervals (ok 4); most at 10:00: 3."


def test_text_from_the_store_is_escaped() -> None:
    hostile = '<script>alert(1)</script>&"'
    svg = bar_chart('x"><script>', hostile, [hostile], [Band(hostile, (1.0,), color='red"/><script>')])
    assert "<script>" not in svg
    root = parse(svg)
    assert root.find(f"{SVG}title").text == hostile  # type: ignore[union-attr]
    assert any(t.text == hostile for t in root.iter(f"{SVG}text"))


def test_stacked_bars_are_to_scale_and_each_says_its_numbers() -> None:
    root = parse(bar_chart("c", "Tokens", ["a", "b", "c"], [
        Band("input", (100.0, 0.0, 50.0)), Band("output", (100.0, 0.0, None))]))
    groups = [g for g in root.iter(f"{SVG}g")]
    assert [g.find(f"{SVG}title").text for g in groups] == [  # type: ignore[union-attr]
        "a: 200 (input 100, output 100)", "c: 50 (input 50, output 0)"]  # the empty bucket draws nothing
    heights = [float(r.get("height", 0)) for g in groups for r in g.iter(f"{SVG}rect")]
    assert heights == pytest.approx([PLOT_HEIGHT / 2, PLOT_HEIGHT / 2, PLOT_HEIGHT / 4])  # top: 200
    assert all(float(r.get("y", 0)) >= charts._TOP - 0.01 for g in groups for r in g.iter(f"{SVG}rect"))


def test_a_line_breaks_where_nothing_was_measured() -> None:
    root = parse(line_chart("l", "Latency", ["a", "b", "c", "d", "e"],
                            [Band("p50", (10.0, 20.0, None, 30.0, 40.0))], unit=" ms"))
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    points = [c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")]  # type: ignore[union-attr]
    assert points == ["a: p50 10 ms", "b: p50 20 ms", "d: p50 30 ms", "e: p50 40 ms"]
    assert root.find(f"{SVG}desc").text == "p50: highest 40 ms, lowest 10 ms."  # type: ignore[union-attr]


def test_an_empty_period_says_so() -> None:
    for draw in (bar_chart, line_chart):
        root = parse(draw("e", "Empty", ["a", "b"], [Band("x", (None, None))]))
        assert root.find(f"{SVG}desc").text == "Nothing recorded in this period."  # type: ignore[union-attr]


@pytest.mark.parametrize("labels, bands", [
    (["a", "b"], [Band("x", (1.0,))]),
    (["a"], []),
])
def test_mismatched_data_is_refused(labels: list[str], bands: list[Band]) -> None:
    with pytest.raises(ValueError):
        bar_chart("m", "M", labels, bands)


@given(st.floats(min_value=1e-6, max_value=1e12))
def test_the_axis_top_holds_the_highest_value_without_wasting_space(value: float) -> None:
    top = nice_ceiling(value)
    assert value <= top * (1 + 1e-9) and top <= value * 2.0 * (1 + 1e-9)


@pytest.mark.parametrize("value, text", [(0, "0"), (950, "950"), (1200, "1.2k"), (1000, "1k"), (3_400_000, "3.4M"),
                                         (0.25, "0.25"), (2.5e9, "2.5G")])
def test_numbers_are_short(value: float, text: str) -> None:
    assert number(value) == text


def test_the_usage_charts_label_buckets_in_the_given_zone() -> None:
    buckets = [Bucket(1_800_000_000.0 + 60 * i, requests=i, errors=1 if i else 0, input_tokens=5, p50_ms=100.0,
                      p95_ms=200.0) for i in range(3)]
    drawn = charts.usage_charts(buckets, 60, timezone.utc)
    assert set(drawn) == {"requests", "tokens", "latency"}
    requests = parse(drawn["requests"])
    titles = [g.find(f"{SVG}title").text for g in requests.iter(f"{SVG}g")]  # type: ignore[union-attr]
    assert titles == ["08:01: 1 (answered 0, failed 1)", "08:02: 2 (answered 1, failed 1)"]
    assert charts.bucket_labels([1_800_000_000.0], 3 * 3600, timezone.utc) == ["Fri 08:00"]
