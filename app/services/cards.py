"""Example cards as one HTML grid: an image (or a text, or a few feature values) with caption lines.

A page of cards used to be three or four Streamlit elements per example (image, caption, button).
Measured with Playwright on this machine (scratch app, 32 examples): 32 ``st.image`` elements in
columns added 0.18-0.24 s to a page switch, one HTML grid of the same images added about 0.
So the cards are one ``st.html`` element, and each grid has one flag control (a pills widget).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jinja2

# a flag's colour in the cards (the app's ui.FLAG_ICONS use the same hues)
FLAG_COLOURS = {"mislabeled": "#d62728", "ok": "#2ca02c", "ambiguous": "#ff7f0e", "leak": "#1f77b4",
                "dismissed": "#7f7f7f"}
FEATURES_SHOWN = 6  # feature values on a tabular card; the rest are in its tooltip


@dataclass
class Card:
    """One example: ``index`` (shown as #index), ``image`` (a data: URI), else ``text``, else ``row``
    (feature -> value); ``lines`` of caption under it; ``flag``: its current flag, if any."""
    index: int
    lines: list[str] = field(default_factory=list)
    image: str | None = None
    text: str | None = None
    row: dict | None = None
    flag: str | None = None
    title: str | None = None  # a tooltip


_TEMPLATE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<div class="pp-grid" style="display:grid;grid-template-columns:repeat({{ per_row }},minmax(0,1fr));gap:10px 8px;\
font-size:0.8rem;line-height:1.3;color:rgba(49,51,63,0.75)">
{% for c in cards %}
<figure class="pp-card" data-index="{{ c.index }}" style="margin:0;min-width:0"{% if c.title %} title="{{ c.title }}"{% endif %}>
{% if c.image %}
<img src="{{ c.image }}" alt="#{{ c.index }}" width="{{ size }}" height="{{ size }}" style="display:block;\
max-width:100%;height:auto;image-rendering:pixelated;border-radius:3px">
{% elif c.text is not none %}
<div class="pp-text" style="border:1px solid #ddd;border-radius:6px;padding:4px 6px;max-height:9em;overflow:hidden;\
color:#31333f">{{ c.text }}</div>
{% elif c.row %}
<div class="pp-row" style="border:1px solid #ddd;border-radius:6px;padding:4px 6px;color:#31333f">
{% for k, v in c.row_shown %}<div style="overflow:hidden;text-overflow:ellipsis;white-space:nowrap">{{ k }}: {{ v }}\
</div>{% endfor %}
</div>
{% endif %}
<figcaption style="overflow-wrap:anywhere">
{% for line in c.lines %}{{ line }}<br>{% endfor %}
{% if c.flag %}<span class="pp-flag" style="color:{{ colours.get(c.flag, '#7f7f7f') }};font-weight:600">\
⚑ {{ c.flag }}</span>{% endif %}
</figcaption>
</figure>
{% endfor %}
{% if note %}
<div class="pp-note" style="grid-column:span {{ note_span }};min-width:0;overflow-wrap:anywhere">
{% for line in note %}{{ line }}<br>{% endfor %}
</div>
{% endif %}
</div>""")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cards_html(cards: list[Card], per_row: int = 8, size: int = 84, note: list[str] | None = None) -> str:
    """The grid's HTML; every caption, text, feature and flag is escaped (they come from user data).
    ``note``: lines shown after the cards, across the rest of the last row (e.g. why a pair was flagged)."""
    view = []
    for c in cards:
        row_shown = [(k, _fmt(v)) for k, v in list((c.row or {}).items())[:FEATURES_SHOWN]]
        title = c.title
        if c.row and len(c.row) > FEATURES_SHOWN and title is None:
            title = ", ".join(f"{k}={_fmt(v)}" for k, v in c.row.items())
        view.append(dict(index=int(c.index), lines=list(c.lines), image=c.image, text=c.text, row=c.row,
                         row_shown=row_shown, flag=c.flag, title=title))
    per_row = max(1, int(per_row))
    note_span = per_row - len(view) % per_row if len(view) % per_row else per_row
    return _TEMPLATE.render(cards=view, per_row=per_row, size=int(size), colours=FLAG_COLOURS,
                            note=[str(x) for x in note or []], note_span=note_span)


_TABLE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<table class="pp-table" style="border-collapse:collapse;font-size:0.85rem;width:100%">
<thead><tr>{% for c in columns %}<th style="text-align:left;border-bottom:1px solid #ddd;padding:3px 8px;\
color:rgba(49,51,63,0.75);font-weight:600">{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in rows %}<tr>{% for v in r %}<td style="border-bottom:1px solid #f0f0f0;padding:3px 8px;\
overflow-wrap:anywhere">{{ v }}</td>{% endfor %}</tr>
{% endfor %}
</tbody></table>""")


def table_html(columns: list[str], rows: list[list]) -> str:
    """A small read-only table as one HTML block (escaped): a data grid element costs a page switch
    far more to draw, and a table of a few rows needs neither its sorting nor its scrolling."""
    return _TABLE.render(columns=[str(c) for c in columns], rows=[["" if v is None else _fmt(v) for v in r] for r in rows])
