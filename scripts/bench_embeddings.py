#!/usr/bin/env python
"""Does the influence map show mislabeled examples? Validation digits projects (seeds other than the
shipped sample's, two flip rates), each embedded three ways: influence features from the *given*
label's margin (the old default), from the *predicted* class's margin (the default now), and
penultimate features. On each 2-D layout, an example's score is the share of its 10 nearest
neighbours (in 2-D) whose given label differs from its own; the AUROC of that score against the
planted flips says how visible mislabels are on the map (0.5: invisible).

    python scripts/bench_embeddings.py [--seeds 1 2] [--flips 0.08 0.15] [--reducers tsne umap pca]

One table per layout, with the seconds each map took (features and layout, in this process: UMAP's
first map includes its numba compilation). Writes docs/bench/embeddings-digits.json.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Project  # noqa: E402
from engine.core.train import record_training  # noqa: E402
from engine.workflows.embeddings import compute_embedding  # noqa: E402


def visibility(xy: np.ndarray, labels: np.ndarray, flipped: np.ndarray, k: int = 10) -> float:
    nn = NearestNeighbors(n_neighbors=k + 1).fit(xy)
    idx = nn.kneighbors(xy, return_distance=False)[:, 1:]
    score = (labels[idx] != labels[:, None]).mean(1)
    return float(roc_auc_score(flipped, score))


def make_digits(dest: Path, seed: int, flip: float) -> Project:
    src = ROOT / "sample_projects" / "digits"
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".toml", ".py"):
            shutil.copy2(f, dest / f.name)
    spec = importlib.util.spec_from_file_location("_digits_make", dest / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.materialise(dest, seed=seed, flip_fraction=flip)
    p = Project.load(dest)
    record_training(p)
    return p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--flips", type=float, nargs="+", default=[0.08, 0.15])
    ap.add_argument("--reducers", nargs="+", default=["tsne", "umap", "pca"], choices=["tsne", "umap", "pca"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "embeddings-digits.json"))
    ap.add_argument("--tsne-iterations", type=int, default=None,
                    help="t-SNE iterations instead of the default (to compare a candidate default in one session)")
    a = ap.parse_args()
    if a.tsne_iterations is not None:
        import engine.workflows.embeddings as workflow

        workflow.TSNE_ITERATIONS = a.tsne_iterations
    work = Path(tempfile.mkdtemp(prefix="proponent-emb-"))
    rows = {r: [] for r in a.reducers}
    kinds = (("influence", "given"), ("influence", "predicted"), ("penultimate", "predicted"))
    try:
        for seed in a.seeds:
            for flip in a.flips:
                p = make_digits(work / f"d{seed}_{flip}", seed, flip)
                truth = json.loads((p.root / "truth.json").read_text())
                labels = p.train_dataset.y.numpy()
                flipped = np.zeros(len(labels), bool)
                flipped[[f["train_index"] for f in truth["flipped"]]] = True
                for reducer in a.reducers:
                    row, seconds = [seed, flip, int(flipped.sum())], []
                    for kind, label in kinds:
                        t0 = time.perf_counter()
                        e = compute_embedding(p, kind, reducer, label=label)
                        seconds.append(time.perf_counter() - t0)
                        idx = e["index"]
                        row.append(round(visibility(e["xy"], labels[idx], flipped[idx]), 3))
                    rows[reducer].append(row + [round(float(np.median(seconds)), 2)])
                    print(reducer, rows[reducer][-1], flush=True)
        tables = []
        for reducer in a.reducers:
            rs = rows[reducer]
            mean = ["mean", "", ""] + [round(float(np.mean([r[j] for r in rs])), 3) for j in range(3, 7)]
            tables.append({"title": f"AUROC of 2-D neighbour label disagreement against the planted flips ({reducer})",
                           "columns": ["seed", "flip rate", "flipped", "influence, given label (old)",
                                       "influence, predicted class (default)", "penultimate", "median s per map"],
                           "rows": rs + [mean],
                           "notes": ["Validation projects: the digits generator with seeds and flip rates other than the "
                                     "shipped sample's; the MLP trained by the recipe. Seconds: one process on a shared "
                                     "2-core machine; UMAP's first map in the process includes numba's compilation."]})
        doc = {"title": "Influence map: are mislabeled examples visible?",
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "command": "python scripts/bench_embeddings.py " + " ".join(sys.argv[1:]),
               "tables": tables}
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
