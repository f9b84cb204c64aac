"""A self-contained, offline HTML report: findings, plotly charts (library embedded inline),
example images as base64 PNG, flag counts and the benchmark table from docs/bench/*.json."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from app import services as svc
from engine.storage.arrays import atomic_write_text

REPO = Path(__file__).resolve().parents[2]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.sub{color:#666}.grid{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:6px;
text-align:center;font-size:12px;width:96px}.card img{image-rendering:pixelated;width:84px;height:84px}
.q img{image-rendering:pixelated;width:120px;height:120px}table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.card:has(.txt){width:240px;text-align:left}.txt{font-size:12px;line-height:1.35;margin-bottom:4px}
.kpi{display:inline-block;margin-right:2em}.kpi b{font-size:1.6em;display:block}.note{color:#555;font-size:13px}
"""


def _img(project, split: str, i: int, size: int = 84) -> str:
    png = svc.image_png(project, split, int(i), size)
    if project.data_format == "text":
        return f"<div class='txt'>{html.escape(svc.example_text(project, split, int(i)) or '')}</div>"
    if png is None:
        row = svc.example_row(project, split, int(i))
        return "<div style='font-size:10px'>" + html.escape(", ".join(f"{k}={v}" for k, v in list(row.items())[:6])) + "</div>"
    return f"<img alt='{split} {i}' src='{svc.data_uri(png)}'>"


def _table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def bench_tables(folder: Path | None = None) -> list[dict]:
    folder = folder or REPO / "docs" / "bench"
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and isinstance(d.get("tables"), list):
            out.append({**d, "file": f.name})
    return out


def build_report(project, key: str, *, method: str = "", n_queries: int = 4, k: int = 8,
                 bench_dir: Path | None = None) -> str:
    run = svc.load_run(project, key)
    S = run["scores"]
    db = svc.db_for(project)
    summ = svc.project_summary(project)
    preds = svc.predictions(project, "test")
    flags = svc.flag_state(db, "train")
    tri = svc.triage_table(project, key, method, flags=flags)
    found = svc.truth_found(project, db)
    charts: list[str] = []

    def chart(fig) -> str:
        first = not charts
        fig.update_layout(height=320, margin=dict(t=50, b=40), template="plotly_white")
        s = fig.to_html(full_html=False, include_plotlyjs=True if first else False, config={"displaylogo": False})
        charts.append(s)
        return s

    parts = [f"<h1>Proponent report: {html.escape(project.name)}</h1>",
             f"<p class='sub'>Method <b>{html.escape(method or key)}</b> (run {html.escape(key)}) · generated "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
             f"<p class='note'>{html.escape(svc.SIGN_HELP)}</p>"]
    # findings
    n_flag = sum(1 for r in flags.values() if r.get("flag") not in (None, "ok", "dismissed"))
    wrong = int((preds["pred"] != preds["label"]).sum())
    kpis = [("test accuracy", f"{summ['test_accuracy']:.1%}" if summ["test_accuracy"] is not None else "—"),
            ("training examples", f"{summ['n_train']:,}"), ("test examples", f"{summ['n_test']:,}"),
            ("misclassified test examples", str(wrong)), ("training examples flagged", str(n_flag))]
    if found:
        kpis.append(("planted mislabels found", f"{found['mislabeled_found']}/{found['mislabeled_planted']}"))
        kpis.append(("planted leaks found", f"{found['leaks_found']}/{found['leaks_planted']}"))
    parts.append("<h2>Findings</h2><div>" + "".join(f"<span class='kpi'><b>{html.escape(v)}</b>{html.escape(n)}</span>"
                                                    for n, v in kpis) + "</div>")
    parts.append(f"<p>The model has {summ['parameters']:,} parameters and was trained for {summ['epochs']:g} epochs "
                 f"({summ['checkpoints']} recorded checkpoints). {n_flag} training examples carry a problem flag.</p>")

    # flag counts
    counts: dict[str, int] = {}
    for r in flags.values():
        counts[r.get("flag") or "note/relabel only"] = counts.get(r.get("flag") or "note/relabel only", 0) + 1
    if counts:
        fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values())))
        fig.update_layout(title="Flags set during review", xaxis_title="flag", yaxis_title="training examples (count)")
        parts.append("<h2>Flags</h2>" + chart(fig))
    else:
        parts.append("<h2>Flags</h2><p>No flags set yet.</p>")

    # suspects
    top = tri.head(16)
    parts.append("<h2>Most suspicious training examples</h2><p class='note'>Ranked by the method's suspicion "
                 "(self-influence weighted by the model's doubt); the suggested label is the ensemble's most probable "
                 "other class.</p><div class='grid'>")
    for _, r in top.iterrows():
        parts.append(f"<div class='card'>{_img(project, 'train', r['index'])}<br>#{r['index']} label {html.escape(r['label'])}"
                     f"<br>suggest {html.escape(r['suggested'])}<br>{html.escape(str(r['flag'] or ''))}</div>")
    parts.append("</div>")
    susp = tri["suspicion"].to_numpy()
    fig = go.Figure(go.Histogram(x=susp, nbinsx=60, hovertemplate="suspicion %{x}<br>%{y} examples<extra></extra>"))
    fig.update_layout(title="Distribution of suspicion scores", xaxis_title="suspicion (higher: more likely mislabeled)",
                      yaxis_title="training examples (count)")
    parts.append(chart(fig))

    # query explanations
    order = np.argsort(preds["margin"])  # the least confident / wrong first
    parts.append(f"<h2>Why did the model predict this?</h2><p class='note'>Test queries with the lowest correct-class "
                 f"margin, with their top-{k} proponents (supporting) and opponents (opposing).</p>")
    for q in order[:n_queries]:
        q = int(q)
        t = svc.topk(S[q], k)
        lab, pr = project.class_name(int(preds["label"][q])), project.class_name(int(preds["pred"][q]))
        parts.append(f"<h3>Test #{q}: label {html.escape(str(lab))}, predicted {html.escape(str(pr))} "
                     f"(margin {preds['margin'][q]:.2f})</h3><div class='grid'><div class='card q'>{_img(project, 'test', q, 120)}"
                     "<br>query</div>")
        for role, ids, sc in (("proponent", t["proponents"], t["proponent_scores"]),
                              ("opponent", t["opponents"], t["opponent_scores"])):
            for i, s in zip(ids, sc):
                parts.append(f"<div class='card'>{_img(project, 'train', i)}<br>{role} #{int(i)}<br>label "
                             f"{html.escape(str(project.class_name(int(project.train_dataset.y[int(i)]))))}<br>{s:+.3g}</div>")
        parts.append("</div>")
        ids = list(t["proponents"]) + list(t["opponents"])[::-1]
        vals = list(t["proponent_scores"]) + list(t["opponent_scores"])[::-1]
        fig = go.Figure(go.Bar(x=[f"#{int(i)}" for i in ids], y=vals,
                               hovertemplate="train %{x}<br>score %{y:.4g}<br>" + html.escape(svc.SIGN_HELP) + "<extra></extra>"))
        fig.update_layout(title=f"Scores for test #{q}", xaxis_title="training example",
                          yaxis_title="attribution score (positive = proponent)")
        parts.append(chart(fig))

    # benchmark
    tables = bench_tables(bench_dir)
    parts.append("<h2>Benchmarks</h2>")
    if not tables:
        parts.append("<p>No benchmark files (docs/bench/*.json) in this build.</p>")
    for b in tables:
        parts.append(f"<h3>{html.escape(str(b.get('title', b['file'])))}</h3><p class='note'>{html.escape(str(b.get('machine', '')))}"
                     f" · {html.escape(str(b.get('date', '')))}</p>")
        for t in b["tables"]:
            parts.append(f"<b>{html.escape(str(t.get('title', '')))}</b>" + _table(t.get("columns", []), t.get("rows", []))
                         + (f"<p class='note'>{html.escape(str(t.get('notes', '')))}</p>" if t.get("notes") else ""))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Proponent report: {html.escape(project.name)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(project, key: str, path: str | Path, **kw) -> Path:
    atomic_write_text(path, build_report(project, key, **kw))
    return Path(path)
