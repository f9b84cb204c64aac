#!/usr/bin/env python
"""Per-example gradients: the gradient computer's two backends, torch.func (vmap over grad) and
the per-layer pass (engine/autodiff/per_layer.py: one batched backward with respect to the layers'
outputs, then each parameter's gradient in closed form, the trick Opacus and BackPACK use), on the
CPU, same process, interleaved repeats, at the batch size the engine itself uses for the model
(``GradientComputer.auto_batch_size``: the memory budget, activations counted) and at 256. The
per-layer result is checked against vmap first.

    python scripts/bench_per_example.py [--repeats 7] [--threads 1,2]

Writes docs/bench/per-example-grads.json (rendered into docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.autodiff.per_example import GradientComputer  # noqa: E402


def models() -> dict:
    sys.path.insert(0, str(ROOT / "sample_projects" / "digits-cnn"))
    from engine.evaluate import suite

    ns: dict = {}
    exec(suite.SHAPES_MODEL, ns)
    digits_cnn = {}
    exec((ROOT / "sample_projects" / "digits-cnn" / "model.py").read_text(), digits_cnn)
    cnn32 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(96 * 16, 10))
    mlp = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 3))
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    bn_cnn = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))  # scripts/bench_gpu.py's CNN
    mlp_ln = nn.Sequential(nn.Linear(32, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                           nn.Linear(256, 10))
    mlp_bn = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 5))
    return {"digits CNN sample (1×8×8)": (digits_cnn["build"]((1, 8, 8), 10), (1, 8, 8), 10),
            "suite shapes CNN (1×16×16)": (ns["build"]((1, 16, 16), 5), (1, 16, 16), 5),
            "3-conv CNN (3×32×32)": (cnn32, (3, 32, 32), 10),
            "BatchNorm CNN (3×32×32)": (bn_cnn, (3, 32, 32), 10),
            "MLP 20-48-48-3": (mlp, (20,), 3),
            "MLP 32-256-256-10, LayerNorm": (mlp_ln, (32,), 10),
            "MLP 64-128-5, BatchNorm1d": (mlp_bn, (64,), 5)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "per-example-grads.json"))
    a = ap.parse_args()
    rows = []
    for name, (model, shape, classes) in models().items():
        torch.manual_seed(0)
        model.eval()
        vm = GradientComputer(model, backend="vmap")
        auto = GradientComputer(model).backend
        for batch in sorted({256, vm.auto_batch_size(torch.zeros(2, *shape))}):
            layers = GradientComputer(model, backend="layers")
            x = torch.randn(batch, *shape)
            y = torch.randint(0, classes, (batch,))
            ref = vm.per_example(x, y, "margin")
            got = layers.per_example(x, y, "margin")  # also times each convolution's two forms once
            if layers.backend != "layers":
                raise SystemExit(f"{name}: the per-layer pass fell back ({layers.backend_reason})")
            err = float((got - ref).abs().max() / ref.abs().max())
            convs = ", ".join(f"{k}: {v}" for k, v in layers._layers.conv_methods.items()) or "-"
            for threads in (int(t) for t in a.threads.split(",")):
                torch.set_num_threads(threads)
                tv, tl = [], []
                for _ in range(a.repeats):  # interleaved: both see the same load
                    t0 = time.perf_counter()
                    vm.per_example(x, y, "margin")
                    tv.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    layers.per_example(x, y, "margin")
                    tl.append(time.perf_counter() - t0)
                v, h = statistics.median(tv), statistics.median(tl)
                rows.append([name, vm.n_params, batch, threads, round(v * 1e3, 1), round(h * 1e3, 1), round(h / v, 2),
                             f"{err:.0e}", convs, auto])
                print(rows[-1], flush=True)
    doc = {"title": "Per-example gradients: torch.func vmap vs the per-layer pass (CPU)",
           "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "command": "python scripts/bench_per_example.py " + " ".join(sys.argv[1:]),
           "tables": [{"title": f"margin gradients of one batch, median of {a.repeats}",
                       "columns": ["model", "parameters", "batch", "threads", "vmap ms", "per-layer ms",
                                   "per-layer / vmap", "max |Δ| / max |g|", "convolution weight form (timed)",
                                   "backend 'auto' takes"],
                       "rows": rows,
                       "notes": ["per-layer / vmap > 1: vmap is faster. The larger batch is the engine's own "
                                 "(GradientComputer.batch_size, a 512 MB budget).",
                                 "max |Δ| 0: the same arithmetic (torch.func's batching rules for Linear and a "
                                 "convolution's weight gradient are the same batched products)."]}]}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
