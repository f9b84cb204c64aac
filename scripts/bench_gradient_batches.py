#!/usr/bin/env python
"""Per-example gradient batches sized with and without the activations autograd saves.

For each model of scripts/bench_per_example.py and each backend: the batch the gradient computer
picks at its default 512 MB budget (``GradientComputer.auto_batch_size``), the peak RSS above the
process's resident size while it computes the gradients of ``--rows`` rows (fresh process per run,
/proc VmHWM after clear_refs), and the seconds per 1,000 rows. "without" is the sizing before
2026-12-06 (three [p] copies and the inputs only); "with" adds ACTIVATION_FACTOR × the bytes
autograd saves per example. Runs are interleaved; medians over ``--repeats``.

    python scripts/bench_gradient_batches.py [--repeats 2] [--rows 3000] [--threads 2]

Writes docs/bench/gradient-batches.json (rendered into docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("BatchNorm CNN (3×32×32)", "3-conv CNN (3×32×32)", "digits CNN sample (1×8×8)",
          "MLP 32-256-256-10, LayerNorm")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, backend: str, sizing: str, rows: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_per_example import models

    from engine.autodiff.per_example import GradientComputer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, shape, classes = models()[name]
    comp = GradientComputer(model.eval(), backend=backend)
    x, y = torch.randn(rows, *shape), torch.randint(0, classes, (rows,))
    if sizing == "without":
        comp.saved_bytes_per_example = lambda x: 0.0
    batch = comp.auto_batch_size(x)
    # warm-up, not timed: the per-layer pass's self-check against autograd and the timing of each
    # convolution's two forms (on its first batch of 32 rows or more), one-time costs of a computer
    comp.per_example(x[:32], y[:32], "loss")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current RSS
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    for _, _, g in comp.iter_batches(x, y, "loss"):
        del g
    seconds = time.perf_counter() - t0
    return {"batch": batch, "backend": comp.backend, "peak_mb": _status("VmHWM") - rss0,
            "s_per_1000": seconds / rows * 1000, "saved_kb": comp.saved_bytes_per_example(x) / 1024}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "gradient-batches.json"))
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs: dict = {}
    for _ in range(a.repeats):
        for name in MODELS:
            for backend in ("layers", "vmap"):
                for sizing in ("without", "with"):
                    r = subprocess.run([sys.executable, __file__, "--child", name, backend, sizing, str(a.rows),
                                        str(a.threads)], capture_output=True, text=True, env=env, cwd=str(ROOT))
                    if r.returncode != 0:
                        raise SystemExit(f"{name} {backend} {sizing}: {r.stderr.strip().splitlines()[-1]}")
                    out = json.loads(r.stdout.strip().splitlines()[-1])
                    runs.setdefault((name, backend, sizing), []).append(out)
                    print(name, backend, sizing, out, flush=True)
    rows = []
    for (name, backend, sizing), rs in runs.items():
        rows.append([name, backend, f"{sizing} activations", rs[0]["batch"], round(rs[0]["saved_kb"]),
                     round(statistics.median(r["peak_mb"] for r in rs)), round(statistics.median(r["s_per_1000"] for r in rs), 3)])
    doc = {"date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} threads",
           "command": "python scripts/bench_gradient_batches.py " + " ".join(sys.argv[1:]),
           "title": "Per-example gradient batches at the default 512 MB budget, with and without the activations",
           "tables": [{"title": f"{a.rows:,} rows of random inputs per run, fresh process, medians of {a.repeats}",
                       "columns": ["model", "backend", "sizing", "batch", "saved KB / example", "peak RSS MB",
                                   "s / 1,000 rows"],
                       "rows": rows,
                       "notes": ["peak RSS: /proc VmHWM above the RSS just before the pass (clear_refs), so the "
                                 "model, the inputs and the warm-up are not counted; the budget is 512 MB.",
                                 "'saved KB / example': what autograd saves for one example's gradient, measured "
                                 "by the gradient computer (a forward of two rows minus one of one row, each "
                                 "saved tensor once)."]}]}
    Path(a.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
