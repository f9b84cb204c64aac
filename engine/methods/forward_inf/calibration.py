"""Calibration of method settings on a validation split of the TRAINING data (never the test queries).

``calibrate_forward_inf`` chooses Forward-INF's ``steps`` and ``lr``. The rule:

1. Hold out ``n_val`` random training examples V (the validation split); the rest is R.
2. Draw ``n_subsets`` random halves of R and retrain the project's recipe on each (V never
   trained on), recording the correct-class margin of every v ∈ V.
3. For every (steps, lr) on the grid, score V (as queries) against R with the recorded final
   checkpoint, and compute the LDS of those scores against the retrained margins.
4. Keep the grid point with the highest LDS; ties within 0.005 go to fewer steps, then the
   smaller lr (the choice closest to the first-order, Grad-Dot-like regime).

The result is cached under ``.proponent/calibration/`` keyed by the checkpoints, data, recipe
and the arguments, so each project pays for the retraining once.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from engine.autodiff.functional import TrackedParameters
from engine.autodiff.measurement import correct_class_margin
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import train_model
from engine.methods.forward_inf.mirror import MirrorEngine, resolve_dtype
from engine.storage.arrays import atomic_write_json, stable_hash

GRIDS = {"adam": {"steps": (1, 3), "lr": (1e-3, 3e-3, 1e-2, 3e-2)},
         "sgd": {"steps": (1, 3), "lr": (1e-3, 1e-2, 1e-1, 3e-1)}}
RULE = ("max LDS on {n_val} held-out training points over {m} half-subset retrainings; ties (≤0.005) to fewer steps, "
        "then smaller lr")


def _margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return correct_class_margin(model.eval()(x), y).double().numpy()


def calibrate_forward_inf(project: Project, *, optimizer: str = "adam", direction: str = "descent",
                          normalize: str = "none", precision: str = "auto", n_val: int = 40, n_subsets: int = 12,
                          alpha: float = 0.5, seed: int = 0, grid: dict | None = None, device: str = "cpu",
                          progress=None) -> dict:
    """{"steps", "lr", "rule", "table": [[steps, lr, lds], ...], "n_val", "n_subsets"} (see module docstring)."""
    if optimizer not in GRIDS:
        raise ProponentError(f"calibration: optimizer must be one of {', '.join(GRIDS)}, not {optimizer!r}")
    grid = grid or GRIDS[optimizer]
    ds = project.train_dataset
    n = len(ds)
    n_val = int(min(n_val, max(2, n // 5)))
    if n - n_val < 10 or n_subsets < 3:
        raise ProponentError(f"calibration needs at least {n_val + 10} training examples and 3 subsets")
    key = stable_hash({"ck": project.checkpoint_hash(), "data": project.data_hash(), "recipe": project.recipe.fingerprint(),
                       "opt": optimizer, "dir": direction, "norm": normalize, "prec": precision, "n_val": n_val,
                       "m": n_subsets, "alpha": alpha, "seed": seed, "grid": grid, "v": 1})
    path = project.state_dir / "calibration" / f"forward-inf-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rng = np.random.default_rng(seed)
    val = np.sort(rng.choice(n, size=n_val, replace=False))
    rest = np.setdiff1d(np.arange(n), val)
    k = int(round(alpha * len(rest)))
    subsets = np.zeros((n_subsets, len(rest)), dtype=bool)
    for m in range(n_subsets):
        subsets[m, rng.choice(len(rest), size=k, replace=False)] = True
    # here, not at the top: every method registers by importing this module, and scipy.stats/sklearn
    # (which the LDS metric brings) cost about a second of start-up in every CLI run and job
    from engine.evaluate.lds import lds

    t0 = time.perf_counter()
    margins = np.empty((n_subsets, n_val))
    for m in range(n_subsets):
        if progress:
            progress("calibrate: retrain", m, n_subsets)
        model = train_model(project, indices=rest[subsets[m]], seed=project.recipe.seed + m)
        margins[m] = _margins(model, ds.x[val], ds.y[val])
    retrain_s = time.perf_counter() - t0
    engine = MirrorEngine(project.load_model(project.final_checkpoint()), TrackedParameters.of(project), device=device,
                          dtype=resolve_dtype(precision, device))
    base = engine.losses(ds.x[rest], ds.y[rest])
    base_val = engine.losses(ds.x[val], ds.y[val])
    xr, yr = ds.x[rest], ds.y[rest]
    table = []
    for steps in grid["steps"]:
        for lr in grid["lr"]:
            P = engine.step(ds.x[val], ds.y[val], steps=steps, lr=lr, optimizer=optimizer, direction=direction)
            moved = torch.cat([engine.stacked_losses(P, xr[b:b + 512], yr[b:b + 512]) for b in range(0, len(rest), 512)], 1)
            d = base[None, :] - moved if direction == "descent" else moved - base[None, :]
            S = d.double().cpu().numpy()
            if normalize == "self":
                Ps = engine.step(xr, yr, steps=steps, lr=lr, optimizer=optimizer, direction=direction)
                own = engine.own_losses(Ps, xr, yr)
                sd = (base - own) if direction == "descent" else (own - base)
                S = S / np.sqrt(np.maximum(np.abs(sd.double().cpu().numpy()), 1e-300))[None, :]
            if not np.isfinite(S).all():
                table.append([steps, lr, float("nan")])
                continue
            table.append([steps, lr, float(lds(S, subsets, margins)["lds"])])
    del base_val
    finite = [r for r in table if np.isfinite(r[2])]
    if not finite:
        raise ProponentError("forward-inf calibration: every grid point diverged; set steps and lr by hand")
    best = max(r[2] for r in finite)
    steps, lr, score = sorted([r for r in finite if r[2] >= best - 0.005], key=lambda r: (r[0], r[1]))[0]
    out = {"steps": int(steps), "lr": float(lr), "lds": score, "table": table, "n_val": n_val,
           "n_subsets": n_subsets, "retrain_seconds": retrain_s,
           "rule": RULE.format(n_val=n_val, m=n_subsets), "validation_indices": val.tolist()}
    if progress:
        progress("calibrate: retrain", n_subsets, n_subsets)
    atomic_write_json(path, out)
    return out
