#!/usr/bin/env python
"""Memory and time of TRAK at scale: a generated tabular project (default 100,000 training rows,
a 1.2k-parameter MLP), TRAK on the final checkpoint, measured in a fresh process per run (peak RSS
from getrusage) for this tree and, in the same job, for a reference tree (``--before DIR``: a git
worktree of an earlier commit), so the ratio is taken under the same machine load.

    git worktree add /tmp/before <commit>
    python scripts/bench_scale.py [--n-train 100000] [--before /tmp/before] [--repeats 1]

Writes docs/bench/scale-tabular.json (rendered into docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = '''import torch
from torch import nn


def build(input_shape, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_shape[0], 48), nn.ReLU(), nn.Linear(48, num_classes))
'''

CHILD = r'''
import json, resource, sys, time
import numpy as np
from engine import Project
from engine.api import cached_scores
p = Project.load(sys.argv[1])
t0 = time.perf_counter()
r = cached_scores(p, "trak", {"ensemble": "final"})
dt = time.perf_counter() - t0
s = np.asarray(r["scores"][:50], dtype=np.float64)
np.save(sys.argv[2], s)
print(json.dumps({"seconds": dt, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  "shape": list(r["scores"].shape)}))
'''


def make_project(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_train + n_test, n_features=20, n_informative=10, n_classes=3,
                               flip_y=0.05, random_state=seed)
    root.mkdir(parents=True)
    cols = [f"f{j}" for j in range(20)]
    import pandas as pd

    for name, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        df = pd.DataFrame(x[sl], columns=cols)
        df["label"] = y[sl]
        df.to_csv(root / f"{name}.csv", index=False, float_format="%.5f")
    (root / "model.py").write_text(MODEL)
    (root / "project.toml").write_text(
        '[project]\nname = "scale"\n\n[data]\nformat = "tabular"\ntrain = "train.csv"\ntest = "test.csv"\n'
        'label_column = "label"\n\n[model]\nfactory = "model.py:build"\ncheckpoints = "checkpoints"\n\n'
        '[training]\noptimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\nbatch_size = 512\nepochs = 2\nseed = 0\n')
    return root


def run_child(tree: Path, project: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), PROPONENT_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(project), str(out)], cwd=str(tree), env=env,
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--before", help="a tree of an earlier commit, measured in the same job")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "scale-tabular.json"))
    a = ap.parse_args()
    from engine import Project
    from engine.core.train import record_training

    work = Path(tempfile.mkdtemp(prefix="proponent-scale-"))
    try:
        base = make_project(work / "base", a.n_train, a.n_test)
        record_training(Project.load(base))
        trees = {"this tree": ROOT} | ({"before": Path(a.before).resolve()} if a.before else {})
        results = {name: [] for name in trees}
        for rep in range(a.repeats):
            for name, tree in trees.items():  # interleaved, so both see the same load
                proj = work / f"{name.replace(' ', '_')}_{rep}"
                shutil.copytree(base, proj, ignore=shutil.ignore_patterns(".proponent"))
                results[name].append(run_child(tree, proj, work / f"{name.replace(' ', '_')}_{rep}.npy"))
                shutil.rmtree(proj)
        rows = []
        for name, runs in results.items():
            rows.append([name, a.n_train, statistics.median(r["seconds"] for r in runs),
                         statistics.median(r["peak_mb"] for r in runs)])
        notes = []
        if a.before:
            s_new = np.load(work / "this_tree_0.npy")
            s_old = np.load(work / "before_0.npy")
            rel = float(np.abs(s_new - s_old).max() / np.abs(s_old).max())
            notes.append(f"largest difference between the two trees' scores (first 50 queries), relative to the "
                         f"largest score: {rel:.2e}")
            notes.append(f"peak memory ratio before / this tree: {rows[1][3] / rows[0][3]:.2f}×; time ratio "
                         f"{rows[1][2] / rows[0][2]:.2f}×")
        doc = {"title": f"TRAK at scale: tabular, {a.n_train:,} training rows",
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
               "tables": [{"title": "TRAK (final checkpoint, default projection), fit + score every test query",
                           "columns": ["code", "training rows", "seconds (median)", "peak RSS MB (median)"],
                           "rows": rows, "notes": notes}],
               "notes": [f"{a.n_test} test queries; 20 features, 3 classes, MLP 20-48-3; one fresh process per run; "
                         f"{a.repeats} repeat(s)."]}
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
