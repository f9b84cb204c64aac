"""Small static charts as inline SVG: bars (grouped or signed), a scatter and lines, with hover
tooltips (SVG <title>), axes and a legend.

Why not plotly for these: in Chromium on this 2-core machine each plotly chart added 0.1-0.3 s to a
page switch (Playwright, pages with and without their charts), an inline SVG of the same bars
about 0 (a scratch two-page app: one plotly bar chart +0.09 s, Vega-Lite +0.03 s, SVG +0.00 s).
The interactive maps (lasso selection) stay plotly. Every label comes from user data (class names,
flags), so the SVG is rendered by jinja2 with autoescape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import jinja2

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
LEFT, RIGHT, TOP, BOTTOM = 70, 14, 30, 52  # margins (px of the viewBox) for tick labels, title and axis titles


@dataclass
class Series:
    """One series: ``values`` per category (bars) or per point; ``colours``: one per value, else the
    series' ``colour``; ``tooltips``: one per value (hover text)."""
    name: str
    values: list
    colour: str | None = None
    colours: list | None = None
    tooltips: list | None = None
    x: list | None = None  # scatter and lines: the x of each value
    lines: bool = False  # a line through the points (with markers)


@dataclass
class _Chart:
    width: int
    height: int
    title: str
    x_title: str
    y_title: str
    shapes: list = field(default_factory=list)  # dicts with a "kind"
    ticks_y: list = field(default_factory=list)
    ticks_x: list = field(default_factory=list)
    legend: list = field(default_factory=list)


_TEMPLATE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<svg class="pp-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {{ c.width }} {{ c.height }}" \
width="{{ c.width }}" height="{{ c.height }}" role="img" aria-label="{{ c.title }}" \
style="font-family:'Source Sans Pro',sans-serif;font-size:12px;max-width:100%;height:auto">
<text x="{{ left }}" y="16" font-size="14" font-weight="600" fill="#31333f">{{ c.title }}</text>
{% for t in c.ticks_y %}
<line x1="{{ left }}" x2="{{ c.width - right }}" y1="{{ t.y }}" y2="{{ t.y }}" stroke="{{ '#9a9a9a' if t.zero else '#e6e6e6' }}"/>
<text x="{{ left - 6 }}" y="{{ t.y + 4 }}" text-anchor="end" fill="#555">{{ t.label }}</text>
{% endfor %}
{% for t in c.ticks_x %}
{% if t.rotate %}
<text transform="translate({{ t.x }},{{ c.height - bottom + 14 }}) rotate(-40)" text-anchor="end" fill="#555">{{ t.label }}</text>
{% else %}
<text x="{{ t.x }}" y="{{ c.height - bottom + 16 }}" text-anchor="middle" fill="#555">{{ t.label }}</text>
{% endif %}
{% endfor %}
{% for s in c.shapes %}
{% if s.kind == "rect" %}
<rect x="{{ s.x }}" y="{{ s.y }}" width="{{ s.w }}" height="{{ s.h }}" fill="{{ s.fill }}"><title>{{ s.tip }}</title></rect>
{% elif s.kind == "circle" %}
<circle cx="{{ s.x }}" cy="{{ s.y }}" r="{{ s.r }}" fill="{{ s.fill }}" fill-opacity="0.8"><title>{{ s.tip }}</title></circle>
{% elif s.kind == "path" %}
<polyline points="{{ s.points }}" fill="none" stroke="{{ s.fill }}" stroke-width="2"/>
{% endif %}
{% endfor %}
<text x="{{ left + (c.width - left - right) / 2 }}" y="{{ c.height - 6 }}" text-anchor="middle" fill="#31333f">\
{{ c.x_title }}</text>
<text transform="translate(14,{{ top + (c.height - top - bottom) / 2 }}) rotate(-90)" text-anchor="middle" \
fill="#31333f">{{ c.y_title }}</text>
{% for l in c.legend %}
<rect x="{{ l.x }}" y="{{ top - 12 }}" width="10" height="10" fill="{{ l.fill }}"/>
<text x="{{ l.x + 14 }}" y="{{ top - 3 }}" fill="#31333f">{{ l.name }}</text>
{% endfor %}
</svg>""")


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] with about ``n`` steps (1, 2, 2.5 or 5 times a power of ten);
    ``integer``: counts, so no step below 1."""
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= step * m:
            step *= m
            break
    if integer:
        step = max(1.0, round(step))
    k0, k1 = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(k0, k1 + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}"


def _render(c: _Chart) -> str:
    return _TEMPLATE.render(c=c, left=LEFT, right=RIGHT, top=TOP, bottom=BOTTOM)


def _legend(c: _Chart, names_colours: list[tuple[str, str]]) -> None:
    x = c.width - RIGHT
    for name, colour in reversed(names_colours):
        x -= 14 + 7 * len(str(name)) + 12
        c.legend.insert(0, {"x": x, "fill": colour, "name": name})


def bar_chart(categories: list, series: list[Series], *, title: str = "", x_title: str = "", y_title: str = "",
              width: int = 640, height: int = 280, y_range: tuple[float, float] | None = None) -> str:
    """Bars per category, one bar per series side by side; negative values hang below zero."""
    vals = [float(v) for s in series for v in s.values]
    lo, hi = y_range if y_range else (min([0.0] + vals), max([0.0] + vals))
    ticks = nice_ticks(lo, hi, integer=all(float(v).is_integer() for v in vals))
    lo, hi = (y_range if y_range else (ticks[0], ticks[-1]))
    c = _Chart(width, height, title, x_title, y_title)
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def py(v: float) -> float:
        return TOP + ph * (hi - min(max(v, lo), hi)) / (hi - lo)

    c.ticks_y = [{"y": round(py(t), 2), "label": _label(t), "zero": abs(t) < 1e-12} for t in ticks if lo <= t <= hi]
    n = max(1, len(categories))
    group = pw / n
    bar = min(group * 0.8 / max(1, len(series)), 48.0)  # a few categories do not make slabs
    pad = (group - bar * len(series)) / 2
    rotate = n > 12 or max((len(str(x)) for x in categories), default=0) * 7 > group
    for j, cat in enumerate(categories):
        c.ticks_x.append({"x": round(LEFT + group * (j + 0.5), 2), "label": str(cat), "rotate": rotate})
    for si, s in enumerate(series):
        colour = s.colour or PALETTE[si % len(PALETTE)]
        for j, v in enumerate(s.values):
            v = float(v)
            y0, y1 = py(max(v, 0.0)), py(min(v, 0.0))
            tip = s.tooltips[j] if s.tooltips else f"{categories[j]}: {_label(v)}"
            c.shapes.append({"kind": "rect", "x": round(LEFT + group * j + pad + bar * si, 2),
                             "y": round(y0, 2), "w": round(bar, 2), "h": round(max(y1 - y0, 0.5), 2),
                             "fill": s.colours[j] if s.colours else colour, "tip": tip})
    if len(series) > 1:
        _legend(c, [(s.name, s.colour or PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)])
    return _render(c)


def xy_chart(series: list[Series], *, title: str = "", x_title: str = "", y_title: str = "", width: int = 640,
             height: int = 280, y_from_zero: bool = False) -> str:
    """Points (a scatter) or lines with markers, on numeric axes."""
    xs = [float(x) for s in series for x in (s.x or [])]
    ys = [float(y) for s in series for y in s.values]
    tx = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
    ty = nice_ticks(min(ys + ([0.0] if y_from_zero else []), default=0.0), max(ys, default=1.0))
    c = _Chart(width, height, title, x_title, y_title)
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(v: float) -> float:
        return LEFT + pw * (v - tx[0]) / (tx[-1] - tx[0])

    def py(v: float) -> float:
        return TOP + ph * (ty[-1] - v) / (ty[-1] - ty[0])

    c.ticks_y = [{"y": round(py(t), 2), "label": _label(t), "zero": abs(t) < 1e-12} for t in ty]
    c.ticks_x = [{"x": round(px(t), 2), "label": _label(t), "rotate": False} for t in tx]
    for si, s in enumerate(series):
        colour = s.colour or PALETTE[si % len(PALETTE)]
        pts = [(px(float(x)), py(float(y))) for x, y in zip(s.x or [], s.values)]
        if s.lines and len(pts) > 1:
            c.shapes.append({"kind": "path", "fill": colour,
                             "points": " ".join(f"{x:.2f},{y:.2f}" for x, y in pts)})
        for j, (x, y) in enumerate(pts):
            tip = s.tooltips[j] if s.tooltips else f"{s.name}: ({_label(s.x[j])}, {_label(s.values[j])})"
            c.shapes.append({"kind": "circle", "x": round(x, 2), "y": round(y, 2), "r": 4 if not s.lines else 3,
                             "fill": s.colours[j] if s.colours else colour, "tip": tip})
    if len(series) > 1:
        _legend(c, [(s.name, s.colour or PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)])
    return _render(c)
