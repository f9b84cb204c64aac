"""The inline SVG charts: round ticks, bars in the given order on the right side of zero, escaped labels."""
import re

import pytest

from app.services.svg_charts import Series, bar_chart, nice_ticks, xy_chart


@pytest.mark.parametrize("lo,hi", [(0, 1), (-0.0131, 0.00461), (0, 1445), (3e-5, 7e-5), (5, 5)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    t = nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi and 2 <= len(t) <= 12
    steps = {round(b - a, 12) for a, b in zip(t, t[1:])}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** __import__("math").floor(__import__("math").log10(step))
    assert round(mantissa, 6) in (1, 2, 2.5, 5, 10)


def _rects(svg):
    return [dict(zip(("x", "y", "w", "h", "fill", "tip"), (float(a), float(b), float(c), float(d), e, f)))
            for a, b, c, d, e, f in re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" '
                                               r'fill="([^"]+)"><title>([^<]*)</title>', svg)]


def test_signed_bars_keep_their_rank_order_and_hang_from_zero():
    labels = ["#683", "#1147", "#1260", "#337"]
    vals = [0.0046, 0.0042, -0.0052, -0.0131]
    svg = bar_chart(labels, [Series("score", vals, tooltips=[f"{x}: {v}" for x, v in zip(labels, vals)])])
    bars = _rects(svg)
    assert [b["tip"].split(":")[0] for b in bars] == labels  # one bar per example, left to right in rank order
    assert all(a["x"] < b["x"] for a, b in zip(bars, bars[1:]))
    zero = float(re.search(r'<line x1="[\d.]+" x2="[\d.]+" y1="([\d.]+)" y2="[\d.]+" stroke="#9a9a9a"', svg).group(1))
    for b, v in zip(bars, vals):
        if v > 0:
            assert b["y"] + b["h"] == pytest.approx(zero, abs=0.02)  # grows up from zero
        else:
            assert b["y"] == pytest.approx(zero, abs=0.02)  # hangs down from zero
    # heights are proportional to the values
    assert bars[3]["h"] / bars[0]["h"] == pytest.approx(0.0131 / 0.0046, rel=0.01)


def test_grouped_bars_have_a_legend_and_labels_are_escaped():
    svg = bar_chart(["<b>cat</b>", "dog"], [Series("train", [10, 20]), Series("test", [3, 4])], title="A & B")
    assert "<b>cat</b>" not in svg and "&lt;b&gt;cat&lt;/b&gt;" in svg and "A &amp; B" in svg
    assert len(_rects(svg)) == 4 and ">train</text>" in svg and ">test</text>" in svg


def test_xy_chart_places_points_and_lines():
    svg = xy_chart([Series("model 0", [0.1, 0.05], x=[0, 100], lines=True), Series("model 1", [0.2], x=[50])],
                   y_from_zero=True)
    pts = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)
    assert len(pts) == 3 and "<polyline" in svg
    (x0, y0), (x1, y1) = [tuple(map(float, p)) for p in pts[:2]]
    assert x1 > x0 and y1 > y0  # larger step to the right, smaller lr lower (SVG y grows downwards)


def test_counts_get_whole_number_ticks():
    assert nice_ticks(0, 2, integer=True) == [0, 1, 2]
    assert nice_ticks(0, 2) == [0, 0.5, 1, 1.5, 2]
    svg = bar_chart(["mislabeled"], [Series("examples", [2])])
    assert ">0.5</text>" not in svg and ">1</text>" in svg
