#!/usr/bin/env python
"""Memory and time of TRAK at scale: generated tabular projects (default 50,000, 200,000 and
1,000,000 training rows, a 1.2k-parameter MLP), TRAK on the final checkpoint, each measured in a
fresh process (peak RSS from /proc's VmHWM, and the stage it peaked in) for this tree and, in the
same job, for a reference tree (``--before DIR``: a git worktree of an earlier commit), so ratios
are taken under the same machine load. The project is loaded inside the measured process (a
table parsed there counts); its training is not (done once per size beforehand).

    git worktree add /tmp/before <commit>
    python scripts/bench_scale.py [--sizes 50000,200000,1000000] [--before /tmp/before] [--repeats 1]

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
import json, os, sys, threading, time
import numpy as np

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

stage = {"now": "load", "peak": 0.0, "at": ""}

def sample():  # which stage resident memory peaks in
    while True:
        mb = rss_mb()
        if mb > stage["peak"]:
            stage["peak"], stage["at"] = mb, stage["now"]
        time.sleep(0.01)

from engine import Project
from engine.api import cached_scores
import_mb = rss_mb()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
p = Project.load(sys.argv[1])
len(p.train_dataset)
loaded_mb = rss_mb()

def progress(st, done, total):
    stage["now"] = st

r = cached_scores(p, "trak", {"ensemble": "final"}, progress=progress)
dt = time.perf_counter() - t0
# VmHWM, read here so a --before tree measures the same way (ru_maxrss carries the parent's peak
# over exec: engine/evaluate/memory.py); taken before the slice below reads scores
peak = next(int(l.split()[1]) / 1024.0 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
np.save(sys.argv[2], np.asarray(r["scores"][:50, :5000], dtype=np.float64))  # a bounded slice to compare trees
print(json.dumps({"seconds": dt, "peak_mb": peak, "import_mb": import_mb, "loaded_mb": loaded_mb,
                  "peak_stage": stage["at"], "shape": list(r["scores"].shape)}))
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
    ap.add_argument("--sizes", default="50000,200000,1000000", help="training rows, comma-separated")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--before", help="a tree of an earlier commit, measured in the same job")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "scale-tabular.json"))
    a = ap.parse_args()
    sizes = [int(v) for v in a.sizes.split(",") if v.strip()]
    from engine import Project
    from engine.core.train import record_training

    trees = {"this tree": ROOT} | ({"before": Path(a.before).resolve()} if a.before else {})
    rows, notes, peaks, secs = [], [], {}, {}
    work = Path(tempfile.mkdtemp(prefix="proponent-scale-"))
    try:
        for n in sizes:
            base = make_project(work / f"base_{n}", n, a.n_test)
            record_training(Project.load(base))
            results = {name: [] for name in trees}
            for rep in range(a.repeats):
                for name, tree in trees.items():  # interleaved, so both see the same load
                    tag = f"{name.replace(' ', '_')}_{n}_{rep}"
                    proj = work / tag
                    shutil.copytree(base, proj, ignore=shutil.ignore_patterns(".proponent"))
                    results[name].append(run_child(tree, proj, work / f"{tag}.npy"))
                    shutil.rmtree(proj)
                    print(name, n, results[name][-1], flush=True)
            for name, runs in results.items():
                med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_mb", "loaded_mb", "import_mb")}
                peaks[(name, n)], secs[(name, n)] = med["peak_mb"], med["seconds"]
                rows.append([name, n, round(med["seconds"], 2), round(med["peak_mb"], 1),
                             round(med["peak_mb"] - med["import_mb"], 1), round(med["loaded_mb"] - med["import_mb"], 1),
                             runs[0]["peak_stage"]])
            if a.before:
                s_new = np.load(work / f"this_tree_{n}_0.npy")
                s_old = np.load(work / f"before_{n}_0.npy")
                rel = float(np.abs(s_new - s_old).max() / np.abs(s_old).max())
                notes.append(f"{n:,} rows: largest difference between the two trees' scores (50 queries × 5,000 "
                             f"training rows), relative to the largest score: {rel:.2e}")
            shutil.rmtree(base)
        lo, hi = min(sizes), max(sizes)
        for name in trees:
            if lo != hi:
                notes.append(f"{name}: peak RSS at {hi:,} rows / at {lo:,} rows = {peaks[(name, hi)] / peaks[(name, lo)]:.2f}× "
                             f"(the issue asks ≤ 1.3×); seconds {secs[(name, hi)] / secs[(name, lo)]:.1f}× for "
                             f"{hi / lo:.0f}× the rows")
        doc = {"title": "TRAK at scale: tabular, " + ", ".join(f"{n:,}" for n in sizes) + " training rows",
               "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
               "tables": [{"title": "TRAK (final checkpoint, default projection): load the project, fit, score every test query",
                           "columns": ["code", "training rows", "seconds (median)", "peak RSS MB (median)",
                                       "peak above import MB", "after load, above import MB", "RSS peaks in"],
                           "rows": rows, "notes": notes}],
               "notes": [f"{a.n_test} test queries; 20 features, 3 classes, MLP 20-48-3; one fresh process per run "
                         f"(PROPONENT_THREADS=1); {a.repeats} repeat(s). The seconds include parsing the CSV; "
                         f"training is done beforehand, once per size. 'RSS peaks in' is the stage the sampled "
                         f"resident memory peaked in (file-backed pages of mapped stores count)."]}
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
