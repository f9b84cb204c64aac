"""What-if: the predicted effect of removing or relabelling training rows, and the real retrain.

``predict_edit`` edits the final model's parameters with one generalized-IF solve
(engine.methods.gif.solvers) and evaluates the edited model on the test set; ``retrain_edit`` retrains with
the project's recipe on the edited data (engine.core.train.train_model) and reports the same
metrics, so the Triage page can show the two side by side (``compare_edits``).

Both return::

    {"action", "indices", "n_edited", "method", "before": metrics, "after": metrics,
     "flips": [{"test_index", "label", "before", "after"}, ...], "seconds", ...}

where ``metrics = {"accuracy", "per_class": {class: accuracy}, "n_test"}``. Predicted edits
also carry ``solver = {residual, converged, iterations, ...}``: the quality signal. A solve
that does not converge raises :class:`engine.methods.gif.solvers.SolverNotConverged` (with the residual)
unless ``allow_unconverged=True``, in which case the result says ``converged: False`` and
carries a ``warning``.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch

from engine.autodiff.compute import resolve_device
from engine.autodiff.functional import FunctionalModel, TrackedParameters
from engine.autodiff.hvp import HessianOperator
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import predict_logits, train_model
from engine.methods.gif.solvers import (
    SolverNotConverged,
    generalized_solve,
    relabel_target,
    removal_target,
    require_converged,
    retained_sample,
    select_parameters,
)

ACTIONS = ("remove", "relabel")
METHODS = ("gif", "if", "frozen", "projected")

# Defaults, measured on the digits sample (scripts/bench_gif.py, docs/bench/gif-digits.json):
# - CG on the normal equations: Richardson/LiSSA (μ = 0.9/λ_max) did not even reach a 1e-3
#   relative residual in 1000 iterations, where CG got there in 22 (GIF) / 34 (IF);
# - tol 1e-6: the squared system's residual is a loose guide; the GIF update was still 13% away
#   from its converged value at 1e-5 and 1.3% at 1e-6 (683 iterations);
# - H on every retained row (up to 16384): with 256 / 512 / 1024 of the 1301 retained rows the
#   GIF update moved by 130% / 91% / 52% relative to using all of them, so no subsample was
#   "enough" at this scale.
DEFAULT_HVP_EXAMPLES = 16384
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 2000
DEFAULT_SOLVER = "cg"


def _check_indices(project: Project, indices) -> np.ndarray:
    n = len(project.train_dataset)
    try:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ProponentError("indices must be training row positions (integers)") from None
    if len(idx) == 0:
        raise ProponentError("no training rows given to edit")
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise ProponentError(f"training row {int(idx[bad][0])} does not exist (the training set has {n} rows)",
                             file=str(project.train_csv))
    if len(np.unique(idx)) != len(idx):
        dup = int(np.flatnonzero(np.bincount(idx) > 1)[0])
        raise ProponentError(f"training row {dup} is listed twice", file=str(project.train_csv))
    return idx


def _label_indices(project: Project, idx: np.ndarray, new_labels) -> torch.Tensor:
    if new_labels is None:
        raise ProponentError("relabel needs new_labels (one per index)")
    vals = list(np.asarray(new_labels, dtype=object).reshape(-1))
    if len(vals) != len(idx):
        raise ProponentError(f"relabel got {len(vals)} new labels for {len(idx)} rows")
    lookup = {c: i for i, c in enumerate(project.classes)}
    lookup.update({str(c): i for i, c in enumerate(project.classes)})
    out = []
    for row, v in zip(idx, vals):
        key = v.item() if hasattr(v, "item") else v
        if key not in lookup and str(key) not in lookup:
            raise ProponentError(f"new label {key!r} is not a class of this project "
                                 f"({', '.join(map(str, project.classes))})", file=str(project.train_csv), row=int(row))
        out.append(lookup[key] if key in lookup else lookup[str(key)])
    return torch.tensor(out, dtype=torch.long)


def _check_action(action: str) -> None:
    if action not in ACTIONS:
        raise ProponentError(f"action must be 'remove' or 'relabel', not {action!r}")


def edit_metrics(project: Project, logits: torch.Tensor) -> dict:
    y = project.test_dataset.y
    pred = logits.argmax(1)
    correct = (pred == y)
    per_class = {}
    for c in range(project.num_classes):
        sel = y == c
        per_class[str(project.classes[c])] = float(correct[sel].float().mean()) if sel.any() else None
    return {"accuracy": float(correct.float().mean()), "per_class": per_class, "n_test": int(len(y))}


def _flips(project: Project, before: torch.Tensor, after: torch.Tensor) -> list[dict]:
    y = project.test_dataset.y
    pb, pa = before.argmax(1), after.argmax(1)
    out = []
    for t in torch.nonzero(pb != pa).flatten().tolist():
        out.append({"test_index": int(t), "label": str(project.classes[int(y[t])]),
                    "before": str(project.classes[int(pb[t])]), "after": str(project.classes[int(pa[t])]),
                    "fixed": bool(pa[t] == y[t]), "broken": bool(pb[t] == y[t])})
    return out


def _result(project, action, idx, method, before_logits, after_logits, seconds, **extra) -> dict:
    before, after = edit_metrics(project, before_logits), edit_metrics(project, after_logits)
    return {"action": action, "indices": [int(i) for i in idx], "n_edited": int(len(idx)), "method": method,
            "before": before, "after": after, "accuracy_change": after["accuracy"] - before["accuracy"],
            "flips": _flips(project, before_logits, after_logits),
            "predictions": after_logits.argmax(1).tolist(), "seconds": seconds, **extra}


def predict_edit(project: Project, indices, action: str = "remove", new_labels=None, *, method: str = "gif",
                 ratio: float = 0.05, device: str = "auto", progress: Callable[[str, int, int], None] | None = None,
                 selection: str = "output", solver: str = DEFAULT_SOLVER, tol: float = DEFAULT_TOL,
                 max_iter: int = DEFAULT_MAX_ITER, hvp_examples: int = DEFAULT_HVP_EXAMPLES, damping: float = 0.0,
                 seed: int = 0, allow_unconverged: bool = False, return_model: bool = False) -> dict:
    """Predict the test metrics of the model retrained without ``indices`` (``remove``) or with
    them relabelled to ``new_labels`` (``relabel``), without retraining.

    ``method``: "gif" (update a ``ratio`` fraction of parameters, selected from the edited rows),
    "if" (plain influence, all parameters), "frozen" (H_SS⁻¹ g_S), "projected" ((H⁻¹ g)_S).
    """
    t0 = time.perf_counter()
    _check_action(action)
    if method not in METHODS:
        raise ProponentError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    idx = _check_indices(project, indices)
    device = resolve_device(device)
    ds = project.train_dataset
    n = len(ds)
    y_new = _label_indices(project, idx, new_labels) if action == "relabel" else None
    model = project.load_model(project.final_checkpoint())
    tracked = TrackedParameters.of(project)
    progress = progress or (lambda stage, done, total: None)

    # H: the post-edit objective, on (a sample of) the edited training set
    if action == "remove":
        rows = retained_sample(n, idx, hvp_examples, seed)
        hx, hy = ds.x[rows], ds.y[rows]
    else:
        labels = ds.y.clone()
        labels[torch.as_tensor(idx)] = y_new
        rows = retained_sample(n, np.array([], np.int64), hvp_examples, seed)
        hx, hy = ds.x[rows], labels[rows]
    op = HessianOperator(model, hx, hy, weight_decay=project.recipe.weight_decay, device=device, tracked=tracked)
    xu, yu = ds.x[idx], ds.y[idx]
    if action == "remove":
        g = removal_target(op, xu, yu, n)
        objective = "loss"
    else:
        g = relabel_target(op, xu, yu, y_new, n)

        def objective(logits, yb):  # the relabel target's loss: old-label loss − new-label loss (one batch: U)
            ce = torch.nn.functional.cross_entropy
            return ce(logits, yb, reduction="sum") - ce(logits, y_new.to(logits.device), reduction="sum")

    mask = None
    if method != "if":
        mask = select_parameters(copy.deepcopy(model), xu, yu, ratio=ratio, mode=selection,
                                 objective=objective, seed=seed, device=device, batch_size=max(1, len(idx)),
                                 tracked=tracked)
    res = generalized_solve(op, g, mask, variant=method, method=solver, tol=tol, max_iter=max_iter,
                            damping=damping, progress=progress)
    warning = None
    if not res.converged:
        if not allow_unconverged:
            require_converged(res, f"{method} solve for {action} of {len(idx)} rows")
        warning = (f"solver did not converge (relative residual {res.residual:.3g} after {res.iterations} iterations); "
                   f"the prediction is unreliable")
    before_logits = predict_logits(model, project.test_dataset.x)
    edited = copy.deepcopy(model)
    FunctionalModel(edited, tracked).add_(res.x.to(torch.float32).cpu())
    after_logits = predict_logits(edited, project.test_dataset.x)
    if not torch.isfinite(after_logits).all():
        raise ProponentError(f"{method}: the edited model produces non-finite outputs; the update diverged")
    out = _result(project, action, idx, method, before_logits, after_logits, time.perf_counter() - t0,
                  ratio=(ratio if method != "if" else 1.0), selection=selection if method != "if" else None,
                  parameters_updated=int(mask.sum()) if (mask is not None and method != "if") else int(op.n_params),
                  parameters_total=int(op.n_params), update_norm=float(res.x.norm()),
                  solver={**res.summary(), "tol": tol, "max_iter": max_iter, "hvp_examples": int(len(rows)),
                          "hvp_calls": int(op.calls), "damping": damping},
                  converged=res.converged, residual=res.residual, warning=warning)
    if return_model:
        out["model"] = edited
        out["update"] = res.x
    return out


def retrain_edit(project: Project, indices, action: str = "remove", new_labels=None, *, seed: int | None = None,
                 device: str = "auto", progress: Callable[[str, int, int], None] | None = None,
                 return_model: bool = False) -> dict:
    """Retrain from scratch with the project's recipe on the edited data; same metrics as
    :func:`predict_edit` (``before`` is the recorded final model)."""
    project.require_recipe("what-if retraining")
    t0 = time.perf_counter()
    _check_action(action)
    idx = _check_indices(project, indices)
    device = resolve_device(device)
    ds = project.train_dataset
    model = project.load_model(project.final_checkpoint())
    if action == "remove":
        keep = np.setdiff1d(np.arange(len(ds)), idx)
        if len(keep) == 0:
            raise ProponentError("cannot remove every training row")
        new = train_model(project, indices=keep, seed=seed, device=device, progress=progress)
    else:
        labels = ds.y.clone()
        labels[torch.as_tensor(idx)] = _label_indices(project, idx, new_labels)
        new = train_model(project, labels=labels, seed=seed, device=device, progress=progress)
    before_logits = predict_logits(model, project.test_dataset.x)
    after_logits = predict_logits(new, project.test_dataset.x)
    out = _result(project, action, idx, "retrain", before_logits, after_logits, time.perf_counter() - t0)
    if return_model:
        out["model"] = new
    return out


def compare_edits(predicted: dict, retrained: dict) -> dict:
    """How well a predicted edit matches the real retrain: accuracy gap, prediction agreement,
    and how many of the retrain's flips the prediction found."""
    pa, ra = np.asarray(predicted["predictions"]), np.asarray(retrained["predictions"])
    rf = {f["test_index"] for f in retrained["flips"]}
    pf = {f["test_index"] for f in predicted["flips"]}
    return {"accuracy_predicted": predicted["after"]["accuracy"], "accuracy_retrained": retrained["after"]["accuracy"],
            "accuracy_gap": predicted["after"]["accuracy"] - retrained["after"]["accuracy"],
            "prediction_agreement": float((pa == ra).mean()),
            "flips_found": len(rf & pf), "flips_retrained": len(rf), "flips_predicted": len(pf),
            "speedup": retrained["seconds"] / max(1e-9, predicted["seconds"])}


__all__ = ["predict_edit", "retrain_edit", "compare_edits", "edit_metrics", "SolverNotConverged", "ACTIONS", "METHODS"]
