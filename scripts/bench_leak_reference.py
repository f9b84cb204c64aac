#!/usr/bin/env python
"""TRAK's leak flag (``proponent leaks --method trak``): what the self-match is measured against.

The flag is self_match = −|log(s₁ / c(i₁))| above a threshold that holds ``fpr`` on a null of
training rows used as queries. Under the training-time rule (TRAK v6+) the test scores use a lighter
or heavier ridge than self-influence, which keeps the ratio rule's kernel for triage. Variants, all
from one TRAK run per project (nothing retrained beyond the project itself):

- ``self-influence``: c = the run's self-scores (what leak search used through TRAK v7);
- ``copy scores``: c = the test-score function's own diagonal (engine.api.copy_scores);
- ``copy scores + leverage``: and each null row's scores × 1 / (1 − h̄) (TRAK.training_query_scale),
  what a training row would score were it not in the kernel: the shipped rule;
- ``ratio rule`` (+ leverage): TRAK with damping_rule='ratio' (one kernel for test scores and
  self-influence), the null as it was and corrected.

On generated validation projects (engine.evaluate.suite: tabular MLPs and 16×16 shape CNNs with
planted exact and perturbed copies of test rows and flipped labels). The shipped variant is checked
against engine.workflows.leaks.detect_leaks itself (same flags).

Usage: python scripts/bench_leak_reference.py --workdir DIR [--seeds 1,2,3] [--kinds tabular,shapes]
       [--fpr 0.01] [--json docs/bench/leak-copy-scores.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.api import cached_scores, copy_scores, fit_method  # noqa: E402
from engine.evaluate.detection import leak_recall  # noqa: E402
from engine.evaluate.suite import NOISE_KINDS, SuiteProject, make_suite_project  # noqa: E402
from engine.methods.base import Queries  # noqa: E402
from engine.workflows.leaks import detect_leaks, row_statistics  # noqa: E402

N_NULL = 300  # detect_leaks' default


def suite_specs(seeds, kinds) -> list[SuiteProject]:
    """The validation suite's rule for sizes and noise rates, at any seeds."""
    out = []
    for kind in kinds:
        for j, seed in enumerate(seeds):
            for noise in NOISE_KINDS:
                n = (600, 900, 400)[j % 3] if kind == "tabular" else (500, 700, 400)[j % 3]
                out.append(SuiteProject(kind, seed, noise, (0.08, 0.15, 0.05)[j % 3], n))
    return out


def flags(S_test, S_null, null_idx, reference, fpr) -> np.ndarray:
    null = row_statistics(S_null, reference, exclude=null_idx)["self_match"]
    null = null[np.isfinite(null)]
    threshold = float(np.quantile(null, 1.0 - fpr, method="higher"))
    st = row_statistics(S_test, reference)
    return st["self_match"] > threshold, st["train_index"]


def measure(p, settings: dict, fpr: float) -> dict:
    """Flags of each reference variant for one TRAK setting."""
    res = cached_scores(p, "trak", settings, device="cpu")
    S = np.asarray(res["scores"], np.float64)
    n = len(p.train_dataset)
    null_idx = np.sort(np.random.default_rng(0).choice(n, size=min(N_NULL, n), replace=False))
    att, _ = fit_method(p, "trak", settings, device="cpu")
    S_null = att.scores(Queries.resolve(p, ("train", null_idx)))
    scale = att.training_query_scale(null_idx)
    self_s = np.asarray(res["self_scores"], np.float64)
    copy_s = copy_scores(p, "trak", settings, res, device="cpu")
    h = 1.0 - 1.0 / att.training_query_scale(np.arange(n))
    out = {"lambda_median": float(np.median(res["meta"]["lambda"])), "h_median": float(np.median(h)),
           "h_p90": float(np.quantile(h, 0.9)), "scores": S}
    variants = {"self-influence": (self_s, S_null), "copy scores": (copy_s, S_null),
                "copy scores + leverage": (copy_s, S_null * scale[:, None])}
    out["variants"] = {name: flags(S, null_s, null_idx, ref, fpr) for name, (ref, null_s) in variants.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--kinds", default="tabular,shapes")
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    seeds = [int(s) for s in a.seeds.split(",")]
    kinds = a.kinds.split(",")
    t0 = time.perf_counter()
    per_project, totals = [], {}
    for spec in suite_specs(seeds, kinds):
        p = make_suite_project(spec, Path(a.workdir) / spec.name)
        truth = json.loads((p.root / "truth.json").read_text())  # the benchmark reads truth; the flag never does
        twins = {l["test_index"]: l["train_index"] for l in truth["leaks"]}
        q = np.array(sorted(twins))
        clean = np.setdiff1d(np.arange(len(p.test_dataset)), q)
        for setting_name, settings in (("default (training-time rule)", {}), ("damping_rule='ratio'", {"damping_rule": "ratio"})):
            m = measure(p, settings, a.fpr)
            rec = leak_recall(m["scores"][q], [twins[t] for t in q])
            # ratio rule: copy scores are its self-scores; without and with the leverage-corrected null
            names = (m["variants"] if not settings else
                     {"ratio rule": m["variants"]["copy scores"], "ratio rule + leverage": m["variants"]["copy scores + leverage"]})
            for label, (flagged, top) in names.items():
                found = int(sum(flagged[t] and top[t] == twins[t] for t in q))
                false = int(flagged.sum()) - found
                row = {"project": spec.name, "kind": spec.kind, "variant": label, "recall@1": rec["recall@1"],
                       "recall@5": rec["recall@5"], "found": found, "planted": len(q), "false_flags": false,
                       "clean": int(len(clean)), "lambda_median": m["lambda_median"], "h_median": m["h_median"],
                       "h_p90": m["h_p90"]}
                per_project.append(row)
                print(json.dumps(row), flush=True)
            if not settings:  # the shipped rule is what detect_leaks does
                det = detect_leaks(p, "trak", None, device="cpu", fpr=a.fpr)
                shipped, _ = m["variants"]["copy scores + leverage"]
                got = np.array([x["flagged"] for x in det["pairs"]])
                if not np.array_equal(got, shipped):
                    raise SystemExit(f"{spec.name}: detect_leaks flags differ from the shipped variant here")
    for r in per_project:
        t = totals.setdefault((r["kind"], r["variant"]), {"projects": 0, "r1": 0, "r5": 0, "found": 0, "planted": 0,
                                                          "false": 0, "clean": 0, "h": []})
        t["projects"] += 1
        t["r1"] += round(r["recall@1"] * r["planted"])
        t["r5"] += round(r["recall@5"] * r["planted"])
        t["found"] += r["found"]
        t["planted"] += r["planted"]
        t["false"] += r["false_flags"]
        t["clean"] += r["clean"]
        t["h"].append(r["h_median"])
    rows = []
    for (kind, variant), t in totals.items():
        nf = t["found"] + t["false"]
        rows.append([kind, variant, t["projects"], f"{t['r1']}/{t['planted']}", f"{t['r5']}/{t['planted']}",
                     f"{t['found']}/{t['planted']}", round(t["found"] / nf, 3) if nf else None,
                     f"{t['false']}/{t['clean']}", round(t["false"] / t["clean"], 4),
                     round(float(np.median(t["h"])), 3)])
    doc = {
        "title": "TRAK leak flag: the self-match reference and the null under the training-time rule",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python scripts/bench_leak_reference.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "tables": [{
            "title": f"Planted copies flagged by `proponent leaks --method trak` (fpr {a.fpr}), summed over projects",
            "columns": ["kind", "reference", "projects", "twin recall@1", "twin recall@5", "flagged (right twin)",
                        "flag precision", "clean queries flagged", "clean flag rate", "median leverage h"],
            "rows": rows,
            "notes": "Generated suite projects (engine.evaluate.suite) at seeds " + a.seeds + ", both noise kinds: 10 "
                     "planted copies each (tabular: exact and noisy; shapes: exact, noise, shift, brightness, crop). "
                     "recall@k: the planted twin among the leaked query's top-k proponents (the test scores; the "
                     "same for the three default-rule rows). A flag counts when it names the planted twin. 'self-influence' "
                     "is TRAK v7's leak search; 'copy scores + leverage' is what ships; 'ratio rule': TRAK with "
                     "damping_rule='ratio', whose test scores and self-influence share one kernel (v7's null, and "
                     "with the leverage correction that now applies to it too).",
        }],
        "notes": [f"{len(per_project)} rows in {time.perf_counter() - t0:.0f} s; per-project rows in 'projects'."],
        "projects": per_project,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
