"""Fit the recommended mislabel ranking's weights on generated validation projects.

The projects are ``engine.evaluate.suite`` projects at ``FIT_SEEDS`` (never the shipped samples,
never the seeds the benchmark reports). For each, the four kinds of evidence are computed exactly
as ``proponent triage`` computes them; a logistic regression of "flipped" on their rank-Gaussian
scores, pooled over projects, gives the weights, written to
engine/workflows/mislabel_weights.json with the per-project AUROC of every single kind of
evidence and of the combination (leave-one-project-out).

    python scripts/fit_triage_weights.py [--workdir /tmp/proponent-fit-suite]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.evaluate.metrics import auroc, precision_at_k  # noqa: E402
from engine.evaluate.suite import FIT_SEEDS, default_suite, make_suite_project  # noqa: E402
from engine.workflows.mislabel import EVIDENCE, WEIGHTS_FILE, combine, mislabel_evidence, rank_gauss  # noqa: E402


def fit_weights(blocks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    X = np.concatenate([b[0] for b in blocks])
    y = np.concatenate([b[1] for b in blocks])
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(X, y)
    w = lr.coef_[0]
    return w / np.abs(w).sum()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/proponent-fit-suite")
    ap.add_argument("--kinds", default="tabular,shapes")
    a = ap.parse_args()
    specs = default_suite(FIT_SEEDS, kinds=tuple(a.kinds.split(",")))
    data = []
    for spec in specs:
        p = make_suite_project(spec, Path(a.workdir) / spec.name)
        truth = json.loads((p.root / "truth.json").read_text())  # the fitting script reads truth; methods never do
        pos = np.zeros(len(p.train_dataset), bool)
        pos[[f["train_index"] for f in truth["flipped"]]] = True
        ev = mislabel_evidence(p, device="cpu")["evidence"]
        X = np.stack([rank_gauss(ev[k]) for k in EVIDENCE], 1)
        data.append((spec.name, X, pos, ev))
        print(spec.name, {k: round(auroc(ev[k], pos), 3) for k in EVIDENCE}, flush=True)
    rows = []
    for j, (name, X, pos, ev) in enumerate(data):
        w = fit_weights([(d[1], d[2]) for i, d in enumerate(data) if i != j])  # leave this project out
        s, _ = combine(ev, dict(zip(EVIDENCE, w)))
        rows.append([name] + [round(auroc(ev[k], pos), 4) for k in EVIDENCE] + [round(auroc(s, pos), 4),
                                                                                  round(precision_at_k(s, pos), 4)])
        print(rows[-1], flush=True)
    w = fit_weights([(d[1], d[2]) for d in data])
    doc = {"weights": {k: round(float(v), 4) for k, v in zip(EVIDENCE, w)},
           "fitted_on": [d[0] for d in data], "date": datetime.date.today().isoformat(),
           "command": "python scripts/fit_triage_weights.py",
           "leave_one_project_out": {"columns": ["project"] + [f"AUROC {k}" for k in EVIDENCE] +
                                     ["AUROC combined", "precision@k combined"], "rows": rows}}
    WEIGHTS_FILE.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["weights"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
