#!/usr/bin/env python
"""Per-example gradients: torch.func (vmap over grad, the engine's one implementation) against
per-layer hooks (one batched backward, then each Linear/Conv2d weight gradient as the outer
product of the layer's output gradient and its input, unfolded for convolutions: the trick
Opacus and BackPACK use), on the CPU, same process, interleaved repeats.

The hook variant is built from the curvature module's layer capture (the same activations and
output gradients EK-FAC uses), and checked equal to vmap before it is timed.

    python scripts/bench_per_example.py [--batch 256] [--repeats 7]

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

from engine.autodiff import curvature as cv  # noqa: E402
from engine.autodiff.measurement import correct_class_margin  # noqa: E402
from engine.autodiff.per_example import GradientComputer  # noqa: E402


def hook_gradients(model: nn.Module, layers, blocks, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[b, p] margin gradients from one batched backward: only the layers' output gradients are
    needed, so the parameters do not require grad and the input does."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    cap = cv._Capture(layers)
    try:
        with torch.enable_grad():
            out = model(x.clone().requires_grad_(True))
            correct_class_margin(out, y).sum().backward()
        mats = [torch.bmm(cv._out_grads(L, cap.grads[L.name]).transpose(1, 2), cv._activations(L, cap.inputs[L.name]))
                for L in layers]
    finally:
        cap.close()
        for p, flag in saved:
            p.requires_grad_(flag)
    return blocks.to_flat(mats)


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
    return {"digits CNN sample (1×8×8)": (digits_cnn["build"]((1, 8, 8), 10), (1, 8, 8), 10),
            "suite shapes CNN (1×16×16)": (ns["build"]((1, 16, 16), 5), (1, 16, 16), 5),
            "3-conv CNN (3×32×32)": (cnn32, (3, 32, 32), 10),
            "MLP 20-48-48-3": (mlp, (20,), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "per-example-grads.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (model, shape, classes) in models().items():
        model.eval()
        comp = GradientComputer(model)
        layers, left = cv.curvature_layers(model, comp.names)
        assert not left, left
        blocks = cv.LayerBlocks(layers, comp.layout)
        x = torch.randn(a.batch, *shape)
        y = torch.randint(0, classes, (a.batch,))
        ref = comp.per_example(x, y, "margin")
        err = float((hook_gradients(model, layers, blocks, x, y) - ref).abs().max() / ref.abs().max())
        if err > 1e-5:
            raise SystemExit(f"{name}: hook gradients differ from vmap (relative {err:.1e})")
        for threads in (int(t) for t in a.threads.split(",")):
            torch.set_num_threads(threads)
            tv, th = [], []
            for _ in range(a.repeats):  # interleaved: both see the same load
                t0 = time.perf_counter()
                comp.per_example(x, y, "margin")
                tv.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                hook_gradients(model, layers, blocks, x, y)
                th.append(time.perf_counter() - t0)
            v, h = statistics.median(tv), statistics.median(th)
            rows.append([name, comp.n_params, threads, round(v * 1e3, 1), round(h * 1e3, 1), round(h / v, 2),
                         f"{err:.0e}"])
            print(rows[-1], flush=True)
    doc = {"title": "Per-example gradients: torch.func vmap vs per-layer hooks (CPU)",
           "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "command": "python scripts/bench_per_example.py " + " ".join(sys.argv[1:]),
           "tables": [{"title": f"margin gradients of a batch of {a.batch}, median of {a.repeats}",
                       "columns": ["model", "parameters", "threads", "vmap ms", "hooks ms", "hooks / vmap",
                                   "max |Δ| / max |g|"],
                       "rows": rows,
                       "notes": ["hooks / vmap > 1: vmap is faster. The engine keeps vmap where it is not slower."]}]}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
