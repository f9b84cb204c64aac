"""The tables of a ``proponent bench`` result: generic {title, columns, rows, notes} dicts that
``scripts/make_benchmarks_md.py`` renders into docs/benchmarks.md and the terminal prints."""
from __future__ import annotations

import math
import sys

import numpy as np


def cell(x, nd: int = 3):
    """A table cell: rounded float, '' for missing, 'n/a' for NaN."""
    if x is None:
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return "n/a"
        return round(float(x), nd)
    return str(x)


def accuracy_table(result: dict) -> dict:
    """Every method and peer: accuracy and cost in one row each."""
    lds_m = result["metrics"].get("lds", {})
    loo_m = result["metrics"].get("loo", {})
    mis_m = result["metrics"].get("mislabel", {})
    leak_m = result["metrics"].get("leak", {})
    columns = ["method", "LDS", "LDS noise ceiling", "LOO r", "LOO noise ceiling", "mislabel AUROC", "precision@k",
               "leak recall@1", "leak recall@5", "leak flags P/R", "fit s", "score s", "fit peak MB",
               "featurize ex/s", "skipped / error"]
    table_rows = []
    for r in result["methods"]:
        c = r.get("cost", {})
        mis = r.get("mislabel", {})
        lk = r.get("leak", {})
        det = lk.get("detector") or {}
        flags = f"{cell(det.get('precision'), 2)}/{cell(det.get('recall'), 2)}" if "precision" in det else ""
        table_rows.append([r["label"] or r["method"], cell(r.get("lds")), cell(lds_m.get("noise_ceiling")) if "lds" in r else "",
                           cell(r.get("loo")), cell(loo_m.get("noise_ceiling")) if "loo" in r else "",
                           cell(mis.get("auroc")), cell(mis.get("precision_at_k")), cell(lk.get("recall@1"), 2),
                           cell(lk.get("recall@5"), 2), flags, cell(c.get("fit_seconds"), 2), cell(c.get("score_seconds"), 2),
                           cell(c.get("fit_peak_mb"), 0), cell(c.get("featurize_examples_per_second"), 0),
                           r.get("skipped") or r.get("error") or mis.get("error") or lk.get("error") or c.get("error") or ""])
    for p in result["peers"]:
        mis = p.get("mislabel") or {}
        lk = p.get("leak") or {}
        table_rows.append([f"{p['peer']}: {p['method']} (peer)", cell(p.get("lds")),
                           cell(lds_m.get("noise_ceiling")) if "lds" in p else "", cell(p.get("loo")),
                           cell(loo_m.get("noise_ceiling")) if "loo" in p else "", cell(mis.get("auroc")),
                           cell(mis.get("precision_at_k")), cell(lk.get("recall@1"), 2), cell(lk.get("recall@5"), 2), "",
                           cell(p.get("fit_seconds"), 2), cell(p.get("score_seconds"), 2), cell(p.get("peak_mb"), 0), "",
                           p.get("skipped") or ""])
    proj = result["project"]
    notes = [f"{proj['name']}: {proj['n_train']} train / {proj['n_test']} test, {proj['parameters']} parameters, "
             f"{proj['models']} recorded model(s), {proj['checkpoints']} checkpoints."]
    if lds_m:
        notes.append(f"LDS: M={lds_m['subsets']} random subsets of α={lds_m['alpha']}, R={lds_m['seeds']} retraining seeds "
                     f"each (margins averaged over seeds), {len(result['queries'])} test queries; noise ceiling = the same "
                     f"Spearman between seed 0's and seed 1's margins (one seed predicting another). Methods are scored "
                     f"against the mean of the R seeds, a less noisy target than one seed, so a good method can exceed "
                     f"that ceiling.")
    if loo_m:
        notes.append(f"LOO: Pearson over ({len(loo_m['indices'])} removed examples × queries) of predicted vs retrained "
                     f"margin change, R={loo_m['seeds']} seeds; noise ceiling = seed 0's vs seed 1's measured changes.")
    if mis_m:
        notes.append(f"Mislabel: {mis_m['source']} ({mis_m['n_flipped']} flipped); suspicion = each method's suspicion(); "
                     f"precision@k with k = number flipped. cleanlab gets 5-fold out-of-sample probabilities; its fit s "
                     f"includes the cross-validation.")
    if leak_m:
        notes.append(f"Leak: {leak_m['source']} ({leak_m['n_leaks']} planted copies); recall@k = share of leaked queries whose "
                     f"planted twin is among its top-k proponents. Leak flags P/R: engine.workflows.leaks.detect_leaks over all "
                     f"test queries.")
    not_run = result.get("registry_not_run") or []
    if not_run:
        notes.append(f"Registry methods not in this run's --methods: {', '.join(not_run)}.")
    notes.append("Peers run on the same checkpoints and queries (TRAK-style: the same ensemble members as our TRAK; "
                 "TracIn-style: the whole trajectory; others: the final checkpoint). fit/score s of methods are fresh fits "
                 "on a copy of the project without its cached state (cost metric); peak MB is the process RSS peak.")
    return {"title": f"Accuracy and cost: {proj['name']}", "columns": columns, "rows": table_rows,
            "notes": " ".join(notes)}


def counterfactual_table(result: dict) -> dict | None:
    proj = result["project"]
    cf = result["metrics"].get("counterfactual")
    if not cf:
        return None
    ks = [str(k) for k in cf["k_values"]]
    cols = ["method"] + [c for k in ks for c in (f"Δmargin top-{k}", f"Δmargin random-{k}", f"flipped top-{k}")]
    rws = []
    for r in result["methods"]:
        c = r.get("counterfactual")
        if c:
            rws.append([r["label"] or r["method"]] + [x for k in ks for x in (
                cell(c[k]["mean_change_top"]), cell(c[k]["mean_change_random"]), cell(c[k]["flipped_share"], 2))])
    return {"title": f"Counterfactual check: {proj['name']}", "columns": cols, "rows": rws,
            "notes": f"Mean over {len(cf['queries'])} test queries of the margin change after removing the "
                     f"query's top-k proponents and retraining (seed 0), against k random removals "
                     f"({cf['random_trials']} draws); flipped = share of queries whose prediction flips."}


def scaling_table(result: dict) -> dict | None:
    proj = result["project"]
    sc = result["metrics"].get("cost", {}).get("scaling")
    if not sc:
        return None
    cols = ["method"] + [f"n={n} s" for n in sc["sizes"]] + ["growth exponent (time ∝ n^b)", "errors"]
    rws = []
    for m in sc["methods"]:
        by = dict(zip(m["sizes"], (np.asarray(m["fit_seconds"]) + np.asarray(m["score_seconds"])).tolist()))
        rws.append([m["method"]] + [cell(by.get(n), 2) for n in sc["sizes"]] + [cell(m.get("growth_exponent"), 2),
                                                                               "; ".join(m.get("errors", []))])
    return {"title": f"Cost growth as the training set doubles: {proj['name']}", "columns": cols, "rows": rws,
            "notes": f"Fit + scoring of {sc['n_queries']} queries, fresh fit at each size; each size is a random "
                     f"subsample of the training set, retrained with the recipe."}


def trak_vs_traker_table(result: dict) -> dict | None:
    proj = result["project"]
    tp = result["metrics"].get("cost", {}).get("featurize_examples_per_second")
    tv = result.get("trak_vs_traker")
    if not tv:
        return None
    rws = [[r["implementation"], r["seed"], cell(r.get("lds")), cell(r.get("fit_seconds"), 2), cell(r.get("score_seconds"), 2),
            r.get("error", "")] for r in tv["rows"]]
    s = tv.get("summary", {})
    note = (f"Same {len(tv['checkpoints'])} checkpoints, k={tv['proj_dim']} Rademacher projection, no damping, two "
            f"projection seeds each.")
    if s:
        note += (f" Mean LDS: proponent {s['mean_lds_proponent']:.3f}, traker {s['mean_lds_traker']:.3f}; gap "
                 f"{s['gap']:.3f} vs projection-seed spread {s['projection_seed_spread']:.3f} → "
                 f"{'within' if s['within_seed_noise'] else 'NOT within'} seed noise.")
    if tp:
        note += (" Featurization (per-example margin gradients + projection, final checkpoint): proponent "
                 f"{tp.get('proponent', float('nan')):.0f} ex/s" +
                 (f", traker {tp['traker']:.0f} ex/s." if "traker" in tp else "."))
    return {"title": f"TRAK: proponent vs traker at the same checkpoints: {proj['name']}",
            "columns": ["implementation", "projection seed", "LDS", "fit s", "score s", "error"],
            "rows": rws, "notes": note}


def make_tables(result: dict) -> list[dict]:
    """The tables of one project's benchmark, in the generic form docs/benchmarks.md renders."""
    tables = [accuracy_table(result), counterfactual_table(result), scaling_table(result), trak_vs_traker_table(result)]
    return [t for t in tables if t is not None]


def emit_document(doc: dict, json_path: str | None) -> None:
    """Print a bench document's tables, and write it as JSON when asked."""
    import sys

    from engine.storage.arrays import atomic_write_json, jsonable

    for t in doc["tables"]:
        print_table(t)
        print()
    if json_path:
        atomic_write_json(json_path, jsonable(doc))
        print(f"wrote {json_path}", file=sys.stderr)


def print_table(table: dict, stream=None) -> None:
    stream = stream or sys.stdout  # looked up per call: tests and callers may redirect stdout
    cols = table["columns"]
    rows = [[str(c) for c in r] for r in table["rows"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    stream.write(table["title"] + "\n")
    stream.write("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "\n")
    for r in rows:
        stream.write("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "\n")
