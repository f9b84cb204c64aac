"""``proponent bench --suite``: triage, leak detection and each method's LDS on generated validation projects.

Every project of ``engine.evaluate.suite.default_suite`` (at ``EVAL_SEEDS`` unless told otherwise;
the recommended ranking's weights were fitted on ``FIT_SEEDS``) is generated, trained, and then:

- mislabel: AUROC and precision@k (k = number flipped) of the recommended ranking, of each method's
  own suspicion, and of cleanlab's label-quality score on the same probabilities the recommended
  ranking uses (5-fold out of sample with a recipe; without one, the final model's);
- leaks: per kind of planted copy, recall@1 of the detector's pair and of each method's top
  proponent, recall@5 of each method, and the flags' precision and recall; beside them a
  FiftyOne-style near-duplicate baseline: the raw-input cosine nearest neighbour, flagged above a
  threshold calibrated on the same null of training queries at the same false-positive rate.

Tables give the mean and spread (± standard deviation over projects) per project kind.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from engine.api import cached_scores
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.evaluate.bench.suite_lds import LDS_METHODS, LDS_PEERS, lds_project, lds_table
from engine.evaluate.detection import leak_recall, mislabel_metrics
from engine.evaluate.peers import PEER_METHODS, project_inputs, run_peer
from engine.methods import list_methods
from engine.evaluate.suite import EVAL_SEEDS, KINDS, default_suite, make_suite_project
from engine.workflows.leaks import DETECTOR_FPR, TEXT_DETECTOR_FPR, calibrate_threshold, detect_copies

SUITE_METHODS = ("trak", "grad-dot", "tracin", "knn")


def _int_list(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {s!r}") from None


def build_suite_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="proponent bench --suite",
                                 description="Triage and leak detection on generated validation projects.")
    ap.add_argument("--suite", action="store_true", required=True)
    ap.add_argument("--kinds", default="tabular,shapes,text", help=f"comma-separated, of {','.join(KINDS)}")
    ap.add_argument("--suite-seeds", default=",".join(map(str, EVAL_SEEDS)), type=_int_list,
                    help="comma-separated project seeds (default: the evaluation seeds)")
    ap.add_argument("--methods", default=",".join(SUITE_METHODS), help="methods whose own suspicion and top "
                                                                       "proponents are reported")
    ap.add_argument("--workdir", default=None, help="where the projects are written (default: a temporary folder; "
                                                    "kept, so a rerun reuses trained projects and cached runs)")
    ap.add_argument("--parts", default="triage,lds", help="comma-separated: triage (mislabel and leaks), lds (each "
                                                           "method's defaults against retraining)")
    ap.add_argument("--lds-methods", default=",".join(LDS_METHODS), help="methods for the LDS part")
    ap.add_argument("--lds-peers", default=",".join(LDS_PEERS), help="peers for the LDS part (peer:method, or none)")
    ap.add_argument("--lds-kinds", default="tabular,shapes", help="project kinds for the LDS part")
    ap.add_argument("--lds-subsets", type=int, default=40, help="retrained half-subsets per project (×2 seeds)")
    ap.add_argument("--lds-queries", type=int, default=32, help="test queries per project for LDS")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--title", default="Validation suite: mislabel triage, leak detection and LDS (generated projects)")
    return ap


def raw_cosine_baseline(project: Project, fpr: float, n_null: int = 2000, seed: int = 0) -> list[dict]:
    """FiftyOne-style near-duplicates: nearest training example by raw-input cosine (no centring, no
    shift tolerance), flagged above the (1 − fpr) quantile of the same statistic on training queries."""
    from engine.workflows.leaks import unit_inputs

    tr = unit_inputs(project, "train")
    te = unit_inputs(project, "test")
    sparse = hasattr(tr, "multiply")

    def nearest(q, exclude=None):
        sim = np.asarray((q @ tr.T).todense()) if sparse else np.asarray(q @ tr.T)
        if exclude is not None:
            sim[np.arange(len(exclude)), exclude] = -np.inf
        j = sim.argmax(1)
        return j, sim[np.arange(len(j)), j]

    n = tr.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(n_null, n), replace=False))
    null_vals = np.concatenate([nearest(tr[idx[lo:lo + 512]], idx[lo:lo + 512])[1] for lo in range(0, len(idx), 512)])
    thr = calibrate_threshold(null_vals, fpr, True)
    pairs = []
    for lo in range(0, te.shape[0], 512):
        j, v = nearest(te[lo:lo + 512])
        pairs += [{"test_index": lo + k, "train_index": int(j[k]), "cosine": float(v[k]), "flagged": bool(v[k] > thr)}
                  for k in range(len(j))]
    return pairs


def _flag_metrics(pairs: list[dict], leaks: list[dict]) -> dict:
    by_test = {p["test_index"]: p for p in pairs}
    twins = {l["test_index"]: l["train_index"] for l in leaks}
    flagged = [p for p in pairs if p["flagged"]]

    def right(p) -> bool:  # the planted row, or a training row identical to it that the pair lists
        t = twins.get(p["test_index"])
        return t is not None and (t == p["train_index"] or t in p.get("identical_train", ()))

    tp = sum(1 for p in flagged if right(p))
    per_kind = defaultdict(lambda: {"n": 0, "recall@1": 0, "flag_recall": 0})
    for l in leaks:
        p = by_test[l["test_index"]]
        k = per_kind[l["kind"]]
        k["n"] += 1
        k["recall@1"] += right(p)
        k["flag_recall"] += p["flagged"] and right(p)
    return {"precision": tp / len(flagged) if flagged else float("nan"), "recall": tp / max(1, len(leaks)),
            "n_flagged": len(flagged), "per_kind": {k: dict(v) for k, v in per_kind.items()}}


def bench_project(p: Project, methods, log) -> dict:
    truth = json.loads((p.root / "truth.json").read_text())  # the benchmark reads truth; methods never do
    n = len(p.train_dataset)
    flips = np.array([f["train_index"] for f in truth["flipped"]], np.int64)
    leaks = truth["leaks"]
    out = {"n_train": n, "n_flipped": int(len(flips)), "n_leaks": len(leaks), "mislabel": {}, "leaks": {}}
    from engine.workflows.mislabel import label_probabilities, recommended_ranking

    t0 = time.perf_counter()
    rec = recommended_ranking(p, device="cpu")
    score = np.empty(n)
    for it in rec["items"]:
        score[it["index"]] = it["score"]
    out["mislabel"]["recommended"] = {**mislabel_metrics(score, flips, n), "seconds": time.perf_counter() - t0,
                                      "label_evidence": rec["evidence_sources"]["label_improbability"]}
    for m in methods:
        t0 = time.perf_counter()
        try:
            res = cached_scores(p, m, None, device="cpu")
            susp = np.asarray(res["suspicion"], np.float64)
            out["mislabel"][m] = {**mislabel_metrics(susp, flips, n), "seconds": time.perf_counter() - t0}
            q = np.array([l["test_index"] for l in leaks], np.int64)
            r = leak_recall(np.asarray(res["scores"][q], np.float64), [l["train_index"] for l in leaks])
            per = defaultdict(lambda: [0, 0, 0])
            for l, rank in zip(leaks, r["twin_rank"]):
                per[l["kind"]][0] += 1
                per[l["kind"]][1] += rank < 1
                per[l["kind"]][2] += rank < 5
            out["leaks"][m] = {"recall@1": r["recall@1"], "recall@5": r["recall@5"],
                               "per_kind": {k: {"n": v[0], "recall@1": v[1], "recall@5": v[2]} for k, v in per.items()}}
        except Exception as e:  # noqa: BLE001 - a method's failure is its row
            out["mislabel"][m] = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    # cleanlab on the very probabilities the recommended ranking reads: out of sample (K-fold) with a
    # recipe; without one (text) the recorded trajectory's or the final model's, and the row says so
    probs, src = label_probabilities(p)
    res = run_peer("cleanlab", "label-quality", project_inputs(p, device="cpu", cross_val_probs=lambda: probs))
    out["mislabel"]["cleanlab"] = ({"skipped": res.skipped} if res.skipped else
                                   {**mislabel_metrics(res.scores, flips, n), "probabilities": src})
    t0 = time.perf_counter()
    det = detect_copies(p, "trak", device="cpu")
    out["leaks"]["detector"] = {**_flag_metrics(det["pairs"], leaks), "seconds": time.perf_counter() - t0}
    out["leaks"]["fiftyone-style cosine"] = _flag_metrics(raw_cosine_baseline(p, det["fpr"]), leaks)
    log(f"{p.name}: recommended AUROC {out['mislabel']['recommended']['auroc']:.3f}, cleanlab "
        f"{out['mislabel']['cleanlab'].get('auroc', float('nan')):.3f}; detector P/R "
        f"{out['leaks']['detector']['precision']:.2f}/{out['leaks']['detector']['recall']:.2f}")
    return out


def _mean_sd(vals) -> str:
    v = np.array([x for x in vals if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def suite_tables(projects: dict[str, dict]) -> list[dict]:
    kinds = sorted({r["kind"] for r in projects.values()})
    mis_rows, leak_rows, kind_rows = [], [], []
    for kind in kinds:
        rs = [r for r in projects.values() if r["kind"] == kind]
        names = list(dict.fromkeys(m for r in rs for m in r["mislabel"]))
        for m in names:
            a = [r["mislabel"].get(m, {}).get("auroc") for r in rs]
            pk = [r["mislabel"].get(m, {}).get("precision_at_k") for r in rs]
            for noise in sorted({r["noise"] for r in rs}):
                sub = [r for r in rs if r["noise"] == noise]
                mis_rows.append([kind, noise, len(sub), m,
                                 _mean_sd([r["mislabel"].get(m, {}).get("auroc") for r in sub]),
                                 _mean_sd([r["mislabel"].get(m, {}).get("precision_at_k") for r in sub])])
            mis_rows.append([kind, "all", len(rs), m, _mean_sd(a), _mean_sd(pk)])
        for m in list(dict.fromkeys(d for r in rs for d in r["leaks"])):
            ls = [r["leaks"][m] for r in rs if m in r["leaks"]]
            if "precision" in ls[0]:
                leak_rows.append([kind, m, _mean_sd([x["precision"] for x in ls]), _mean_sd([x["recall"] for x in ls]),
                                  "", ""])
            for ck in sorted({k for x in ls for k in x["per_kind"]}):
                tot = sum(x["per_kind"].get(ck, {}).get("n", 0) for x in ls)
                r1 = sum(x["per_kind"].get(ck, {}).get("recall@1", 0) for x in ls)
                r5 = sum(x["per_kind"].get(ck, {}).get("recall@5", 0) for x in ls)
                fr = sum(x["per_kind"].get(ck, {}).get("flag_recall", 0) for x in ls)
                kind_rows.append([kind, m, ck, tot, f"{r1}/{tot}",
                                  f"{r5}/{tot}" if "precision" not in ls[0] else "",
                                  f"{fr}/{tot}" if "precision" in ls[0] else ""])
    return [
        {"title": "Mislabel triage: AUROC and precision@k (k = number flipped), mean ± sd over projects",
         "columns": ["kind", "noise", "projects", "ranking", "AUROC", "precision@k"], "rows": mis_rows,
         "notes": "recommended = `proponent triage` with no --method; each method row is that method's own suspicion; "
                  "cleanlab = label-quality (self-confidence) on the same probabilities as the recommended ranking (5-fold "
                  "out of sample with a recipe; text has none, so there both read the final model). Weights "
                  "of the recommended ranking were fitted on other seeds (engine/workflows/mislabel_weights.json)."},
        {"title": "Leak flags: precision and recall of the flagged pairs, mean ± sd over projects",
         "columns": ["kind", "detector", "flag precision", "flag recall", "", ""], "rows": leak_rows,
         "notes": f"detector = `proponent leaks` with no --method (fpr {DETECTOR_FPR}; text {TEXT_DETECTOR_FPR}). "
                  "FiftyOne-style cosine = nearest "
                  "training example by raw-input cosine, flagged above a threshold calibrated on the same null at the "
                  "same rate. A flag counts as right only when its pair is the planted copy."},
        {"title": "Leaks by kind of copy: recall@1, recall@5 (methods' top proponents) and flagged (detectors)",
         "columns": ["kind", "method", "copy", "planted", "recall@1", "recall@5", "flagged"], "rows": kind_rows,
         "notes": "Counts pooled over the projects of a kind."},
    ]


def suite_cli(argv: list[str]) -> int:
    a = build_suite_parser().parse_args(argv)
    seeds = a.suite_seeds
    kinds = tuple(k for k in a.kinds.split(",") if k.strip())
    methods = [m for m in a.methods.split(",") if m.strip()]
    import tempfile

    work = Path(a.workdir or tempfile.mkdtemp(prefix="proponent-suite-"))
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    if not parts or parts - {"triage", "lds"}:
        raise ProponentError(f"--parts takes triage and/or lds, not {a.parts!r}")
    lds_kinds = {k.strip() for k in a.lds_kinds.split(",") if k.strip()}
    peers = [x.strip() for x in a.lds_peers.split(",") if x.strip() and x.strip() != "none"]
    lds_methods = [m.strip() for m in a.lds_methods.split(",") if m.strip()]
    # every name checked before any project is trained: a typo costs one line, not a long run
    known = {c.name for c in list_methods()}
    for flag, names, ok in (("--kinds", kinds, KINDS), ("--lds-kinds", lds_kinds, KINDS),
                            ("--methods", methods, known), ("--lds-methods", lds_methods, known)):
        bad = [x for x in names if x not in ok]
        if bad:
            raise ProponentError(f"{flag}: unknown {bad[0]!r} (known: {', '.join(sorted(ok))})")
    for item in peers:
        peer, _, method = item.partition(":")
        if method not in PEER_METHODS.get(peer, ()):
            raise ProponentError(f"--lds-peers: unknown peer:method {item!r} (e.g. kronfluence:ekfac)")
    projects = {}
    for spec in default_suite(seeds, kinds):
        p = make_suite_project(spec, work / spec.name)
        row = {"kind": spec.kind, "noise": spec.noise, "rate": spec.rate, "seed": spec.seed}
        if "triage" in parts:
            row.update(bench_project(p, methods, log))
        # LDS needs retraining; one noise kind per seed keeps the run affordable on a laptop
        if "lds" in parts and spec.kind in lds_kinds and spec.noise == "uniform" and p.has_recipe:
            row["lds"] = lds_project(p, lds_methods, peers,
                                     subsets=a.lds_subsets, n_queries=a.lds_queries, log=log)
        projects[spec.name] = row
    tables = suite_tables({k: v for k, v in projects.items() if "mislabel" in v}) if "triage" in parts else []
    if "lds" in parts:
        tables.append(lds_table(projects, _mean_sd))
    from engine.evaluate.bench.config import machine_description
    from engine.evaluate.bench.tables import emit_document

    doc = {"title": a.title, "date": _dt.date.today().isoformat(), "machine": machine_description(),
           "command": "proponent bench " + " ".join(shlex.quote(x) for x in argv), "tables": tables,
           "notes": f"{len(projects)} generated projects (seeds {list(seeds)}), {(time.perf_counter() - t0) / 60:.1f} min.",
           "projects": projects}
    emit_document(doc, a.json)
    return 0
