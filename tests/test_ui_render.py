"""The console's pure helpers: models by name in every reported form, charts that
escape what they embed, page sizes within bounds."""

from __future__ import annotations

import pytest

from controlplane.ui.charts import GateBar, gate_chart, line_chart, progress_bar
from controlplane.ui.views.common import PAGE_MAX, PAGE_SIZE, active_models, page_size

HOSTILE = '"><script>alert(1)</script>'


@pytest.mark.parametrize(("reported", "shown"), [
    (None, []),
    ({}, []),
    ({"name": "smollm2", "version": "1.0.0", "tier": "micro"}, [("smollm2", "1.0.0")]),
    ([{"name": "qwen", "version": "2.0.0"}, {"name": "embed", "version": "1.1.0"}],
     [("embed", "1.1.0"), ("qwen", "2.0.0")]),
    ({"qwen": {"version": "2.0.0"}, "embed": "1.1.0"}, [("embed", "1.1.0"), ("qwen", "2.0.0")]),
])
def test_active_models_are_listed_by_name_in_every_reported_form(reported, shown) -> None:
    assert active_models(reported) == shown


def test_charts_escape_their_text_and_use_no_inline_style() -> None:
    chart = str(line_chart(HOSTILE, HOSTILE, [(0.0, 1.0), (60.0, 3050.0)]))
    gate = str(gate_chart(GateBar(HOSTILE, "fail", 1.0, 0.0, None, HOSTILE)))
    bar = str(progress_bar(1, 3, HOSTILE))
    for svg in (chart, gate, bar):
        assert "<script>" not in svg and "&lt;script&gt;" in svg
        assert "style=" not in svg
    assert "3,050" in chart and "e+" not in chart
    assert "no data" in str(line_chart("CPU", "%", []))


def test_a_chart_of_many_points_draws_at_most_its_cap() -> None:
    chart = str(line_chart("CPU", "%", [(float(t), float(t % 100)) for t in range(10_000)]))
    points = chart.split('points="')[1].split('"')[0].split()
    assert 2 <= len(points) <= 240


@pytest.mark.parametrize(("raw", "size"), [
    (None, PAGE_SIZE), ("", PAGE_SIZE), ("10", 10), ("0", 1), ("100000", PAGE_MAX),
    ("ten", PAGE_SIZE),
])
def test_page_size_stays_within_bounds(raw, size) -> None:
    assert page_size(raw) == size
