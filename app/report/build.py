"""A self-contained, offline HTML report for stakeholders, rendered from a jinja2 template with
autoescape: the findings first (counts, the flagged examples with images, explained queries, what-if
and Verify results), then the method's measured accuracy as one short table; the full benchmark
tables and run settings are an appendix. Plotly's library is embedded once, images as base64 PNG."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jinja2
import numpy as np
import plotly.graph_objects as go
import plotly.offline

from app import jobs
from app import services as svc
from engine.storage.arrays import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.4g}"
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


def accuracy_table(benches: list[dict]) -> dict | None:
    """The first benchmark table with a method and an LDS column, cut to method, LDS and its
    noise ceiling (plus mislabel AUROC when present): the one short accuracy table."""
    for b in benches:
        for t in b.get("tables", []):
            cols = [str(c) for c in t.get("columns", [])]
            if "method" in cols and "LDS" in cols:
                keep = [c for c in ("method", "LDS", "LDS noise ceiling", "mislabel AUROC") if c in cols]
                ix = [cols.index(c) for c in keep]
                return {"source": f"{b.get('title', b['file'])}: {t.get('title', '')}", "date": b.get("date", ""),
                        "machine": b.get("machine", ""), "columns": keep,
                        "rows": [[_fmt(r[i]) for i in ix] for r in t.get("rows", []) if len(r) > max(ix)]}
    return None


def _example(project, split: str, i: int, lines: list[str], size: int = 84) -> dict:
    i = int(i)
    text = svc.example_text(project, split, i) if project.data_format == "text" else None
    png = None if text is not None else svc.image_png(project, split, i, size)
    row = "" if (text is not None or png) else ", ".join(f"{k}={v}" for k, v in list(svc.example_row(project, split, i).items())[:6])
    return {"split": split, "index": i, "text": text, "png": svc.data_uri(png) if png else None, "row": row, "lines": lines}


def _chart(fig) -> str:
    fig.update_layout(height=320, margin=dict(t=50, b=40), template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _last_result(project, kind: str) -> dict | None:
    for j in jobs.list_jobs(project, 50):
        if j["kind"] == kind and j["status"] == "done" and j.get("result"):
            return j
    return None


def build_report(project, key: str, *, method: str = "", n_queries: int = 4, k: int = 8,
                 bench_dir: Path | None = None, max_flagged: int = 48) -> str:
    run = svc.load_run(project, key)
    S = run["scores"]
    db = svc.db_for(project)
    summ = svc.project_summary(project)
    preds = svc.predictions(project, "test")
    flags = svc.flag_state(db, "train")
    tri = svc.triage_table(project, key, method, flags=flags)
    found = svc.truth_found(project, db)
    by_index = tri.set_index("index")
    name = project.class_name

    problem = {i: r for i, r in flags.items() if r.get("flag") not in (None, "ok", "dismissed") or r.get("relabel")}
    # a flag set before the training table lost rows may name a row that no longer exists: left out, and said
    n_train = len(project.train_dataset)
    gone = sorted((i for i in problem if not (isinstance(i, int) and 0 <= i < n_train)), key=str)
    for i in gone:
        del problem[i]
    # flags follow their examples (engine.workflows.flag_rows): those whose example left the data
    missing = svc.missing_flags(db)
    gone += [r["old_item"] for k, r in missing.items() if k.startswith("train:")
             and (r.get("flag") not in (None, "ok", "dismissed") or r.get("relabel"))]
    wrong = int((preds["pred"] != preds["label"]).sum())
    kpis = [("test accuracy", f"{summ['test_accuracy']:.1%}" if summ["test_accuracy"] is not None else "—"),
            ("training examples", f"{summ['n_train']:,}"), ("test examples", f"{summ['n_test']:,}"),
            ("misclassified test examples", str(wrong)), ("training examples flagged", str(len(problem)))]
    if found:
        kpis.append(("planted mislabels found", f"{found['mislabeled_found']}/{found['mislabeled_planted']}"))
        kpis.append(("planted leaks found", f"{found['leaks_found']}/{found['leaks_planted']}"))
    counts: dict[str, int] = {}
    for r in problem.values():
        counts[r.get("flag") or "relabel"] = counts.get(r.get("flag") or "relabel", 0) + 1
    summary = (f"The model has {summ['parameters']:,} parameters. Review flagged {len(problem)} training examples"
               + (": " + ", ".join(f"{n} {f}" for f, n in sorted(counts.items())) if counts else "") + ".")
    if gone:
        summary += (f" {len(gone)} flag(s) name training rows that no longer exist (the data has {n_train:,} rows: "
                    + ", ".join(f"#{i}" for i in gone[:10]) + ("…" if len(gone) > 10 else "")
                    + ") and were skipped.")

    flagged = []
    for i in sorted(problem, key=lambda i: -float(by_index.at[i, "suspicion"]) if i in by_index.index else 0)[:max_flagged]:
        r = problem[i]
        lines = [f"#{i} · {r.get('flag') or 'relabel'}", f"given {name(int(project.train_dataset.y[i]))}"]
        if r.get("relabel"):
            lines.append(f"relabel → {r['relabel']}")
        elif i in by_index.index:
            lines.append(f"suggested {by_index.at[i, 'suggested']}")
        flagged.append(_example(project, "train", i, lines))

    suspects = []
    for _, r in tri[tri["flag"].isna()].head(16).iterrows():
        suspects.append(_example(project, "train", r["index"], [f"#{r['index']}", f"given {r['label']}",
                                                                 f"suggested {r['suggested']}"]))
    fig = go.Figure(go.Histogram(x=tri["suspicion"].to_numpy(), nbinsx=60,
                                 hovertemplate="suspicion %{x}<br>%{y} examples<extra></extra>"))
    fig.update_layout(title="Distribution of suspicion scores", xaxis_title="suspicion (higher: more likely mislabeled)",
                      yaxis_title="training examples (count)")

    queries = []
    for q in np.argsort(preds["margin"])[:n_queries]:  # the least confident / wrong first
        q = int(q)
        t = svc.topk(S[q], k)
        ids = list(t["proponents"]) + list(t["opponents"])[::-1]
        vals = list(t["proponent_scores"]) + list(t["opponent_scores"])[::-1]
        bar = go.Figure(go.Bar(x=[f"#{int(i)}" for i in ids], y=vals,
                               marker_color=["#2ca02c" if v > 0 else "#d62728" for v in vals]))
        bar.update_layout(title=f"Scores for test #{q}", xaxis_title="training example",
                          yaxis_title="attribution score (positive = proponent)")
        bar.update_xaxes(type="category")

        def cards(role, idx, sc):
            return [_example(project, "train", i, [f"{role} #{int(i)}", f"label {name(int(project.train_dataset.y[int(i)]))}",
                                                   f"{s:+.3g}"]) for i, s in zip(idx, sc)]

        queries.append({"index": q, "label": name(int(preds["label"][q])), "pred": name(int(preds["pred"][q])),
                        "margin": float(preds["margin"][q]), "example": _example(project, "test", q, ["query"], 120),
                        "proponents": cards("proponent", t["proponents"], t["proponent_scores"]),
                        "opponents": cards("opponent", t["opponents"], t["opponent_scores"]), "chart": _chart(bar)})

    whatif = None
    j = _last_result(project, "whatif")
    if j:
        pred = j["result"]["predicted"]
        whatif = (f"Removing or relabelling the {pred['n_edited']} flagged examples is predicted (GIF) to move test "
                  f"accuracy from {pred['before']['accuracy']:.1%} to {pred['after']['accuracy']:.1%}")
        if "retrained" in j["result"]:
            whatif += f"; a real retrain gave {j['result']['retrained']['after']['accuracy']:.1%}"
        whatif += "."
    verify = None
    j = _last_result(project, "verify")
    if j and j["result"].get("rows"):
        q = (j.get("params") or {}).get("query")
        verify = {"sentence": f"Verify (test #{q}): removing its top-k proponents and retraining changes its margin "
                              f"far more than removing k random examples, as the table shows.",
                  "rows": j["result"]["rows"]}

    benches = bench_tables(bench_dir)
    for b in benches:
        for t in b["tables"]:
            t["rows"] = [[_fmt(v) for v in r] for r in t.get("rows", [])]
            t["notes"] = " ".join(t["notes"]) if isinstance(t.get("notes"), list) else (t.get("notes") or "")
    run_row = next((r for r in svc.list_runs(project) if r["key"] == key), {})
    return _ENV.get_template("report.html.j2").render(
        project_name=project.name, method=method or run_row.get("method") or key, key=key,
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), sign=svc.SIGN_HELP, kpis=kpis,
        summary_sentence=summary, flagged=flagged, n_flagged=len(problem), whatif=whatif, verify=verify, k=k,
        queries=queries, suspects=suspects, suspicion_chart=_chart(fig),
        suspicion_note="Ranked by the run's suspicion score; the suggested label is the model ensemble's most probable "
                       "other class. Flag them in the app's Triage page.",
        accuracy=accuracy_table(benches), benches=[{**b, "title": b.get("title", b["file"])} for b in benches],
        settings=json.dumps(run_row.get("settings") or {}, indent=1), plotly_js=plotly.offline.get_plotlyjs())


def write_report(project, key: str, path: str | Path, **kw) -> Path:
    atomic_write_text(path, build_report(project, key, **kw))
    return Path(path)
