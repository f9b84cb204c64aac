"""Runs of attribution methods: listing, loading, settings, top-k and run comparison, optional workflows."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from app.services.flags import db_for
from engine.api import run_dir, run_key
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import RETRAIN_BUDGET, retrain_refusal  # noqa: F401 - re-exported for the pages
from engine.methods import (
    coerce_settings,
    describe_settings,
    get_method,
    list_methods,
    settings_dict,
)
from engine.storage.arrays import read_cached_npy


def list_runs(project: Project) -> list[dict]:
    """Every recorded run, newest first. ``stale``: why a run recorded as done does not describe the
    project now (its data or checkpoints changed, or its stored arrays are not this project's
    shape), else None; the pages offer only :func:`done_runs`."""
    out = []
    for r in db_for(project).list_runs():
        out.append({"key": r["key"], "method": r["method"], "status": r["status"],
                    "settings": r.get("settings") or {}, "device": r.get("device"),
                    "fit_s": r.get("fit_seconds"), "score_s": r.get("score_seconds"), "peak_mb": r.get("peak_mb"),
                    "created": r.get("created"), "message": r.get("message")})
        out[-1]["stale"] = stale_reason(project, out[-1]) if r["status"] == "done" else None
    return out


def stale_reason(project: Project, run: dict) -> str | None:
    """None if the finished ``run`` belongs to the project as it is now, else why not. A run's key
    hashes its method, settings, data and checkpoints (engine.api.run_key): a run of other data or
    weights has another key, and its score matrix would index other rows."""
    try:
        cls = get_method(run["method"])
        current = run_key(project, run["method"], coerce_settings(cls, run.get("settings") or {}))
        n_test, n_train = len(project.test_dataset), len(project.train_dataset)
    except ProponentError as e:
        return f"cannot be checked against the project: {e}"
    if current != run["key"]:
        return "the data, checkpoints or method version changed since it ran"
    folder = run_dir(project, run["key"])
    if read_cached_npy(folder / "scores.npy", (n_test, n_train)) is None:
        return f"its scores are missing, damaged or not {n_test}×{n_train}"
    for n in ("self_scores", "suspicion"):
        f = folder / f"{n}.npy"
        if f.exists() and read_cached_npy(f, (n_train,)) is None:
            return f"its {n}.npy is damaged or not {n_train} long"
    return None


def done_runs(project: Project) -> list[dict]:
    """Finished runs of the project as it is now (see :func:`stale_reason`), newest first."""
    return [r for r in list_runs(project) if r["status"] == "done" and r["stale"] is None]


def run_label(run: dict) -> str:
    cost = (run.get("fit_s") or 0) + (run.get("score_s") or 0)
    return f"{run['method']} · {run['key'][-6:]} · {cost:.1f}s"


def load_run(project: Project, key: str) -> dict:
    """A finished run's arrays: scores [n_test, n_train] (memory-mapped), self_scores and suspicion [n_train].
    A file that is truncated, not a .npy (never unpickled) or of another shape is a one-line error."""
    folder = run_dir(project, key)
    n_test, n_train = len(project.test_dataset), len(project.train_dataset)
    out = {"key": key}
    for n, shape in (("scores", (n_test, n_train)), ("self_scores", (n_train,)), ("suspicion", (n_train,))):
        f = folder / f"{n}.npy"
        if not f.is_file() and n != "scores":
            out[n] = None
            continue
        # the [n_test, n_train] scores stay memory-mapped: pages read the rows and columns they show
        arr = read_cached_npy(f, shape, mmap=n == "scores")
        if arr is None:
            raise ProponentError(f"run {key} cannot be used: {n}.npy is missing, damaged or not of shape "
                                 f"{shape} (the project has {n_test} test and {n_train} training rows); "
                                 "run the method again", file=str(f))
        out[n] = arr if n == "scores" else np.asarray(arr)
    return out


def methods_info(project: Project | None = None) -> list[dict]:
    out = []
    for cls in list_methods():
        unsupported = cls.supports(project) if project is not None else None  # may build the model: once
        out.append({"name": cls.name, "label": cls.label or cls.name, "description": cls.description,
                    "settings": describe_settings(cls), "extension": bool(getattr(cls, "extension", False)),
                    "unsupported": unsupported,
                    "advisories": (cls.advisories(project, coerce_settings(cls, None))
                                   if project is not None and not unsupported else [])})
    return out


def coerce_ui_settings(method: str, values: dict) -> dict:
    """Keep only the settings that differ from the defaults (so the run key is the CLI's)."""
    cls = get_method(method)
    s = settings_dict(coerce_settings(cls, values))
    defaults = {d["name"]: d["default"] for d in describe_settings(cls)}
    return {k: v for k, v in s.items() if v != defaults.get(k)}


def run_key_for(project: Project, method: str, settings: dict) -> str:
    return run_key(project, method, coerce_settings(get_method(method), settings))


def topk(scores_row: np.ndarray, k: int) -> dict:
    row = np.asarray(scores_row, dtype=np.float64)
    k = min(k, len(row))
    top = np.argsort(-row, kind="stable")[:k]
    bot = np.argsort(row, kind="stable")[:k]
    return {"proponents": top, "proponent_scores": row[top], "opponents": bot, "opponent_scores": row[bot]}


def compare_rows(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """Agreement of two methods on one query: top-k proponent overlap and Spearman rank correlation."""
    ta, tb = set(topk(a, k)["proponents"].tolist()), set(topk(b, k)["proponents"].tolist())
    rho = spearmanr(np.asarray(a), np.asarray(b)).statistic
    return {"overlap": len(ta & tb) / max(1, k), "overlap_count": len(ta & tb), "spearman": float(rho)}


def verify_retrains(k_values, seeds=(0, 1), random_trials: int = 3) -> int:
    return len(seeds) * max(1, len(k_values)) * (1 + int(random_trials))


def verify_available(project: Project, k_values=(5, 10, 20), seeds=(0, 1), random_trials: int = 3) -> str | None:
    """None if the counterfactual Verify check can run, else why it is off."""
    return retrain_refusal(project, verify_retrains(k_values, seeds, random_trials))


def verify_kwargs(*, query: int, method: str, settings: dict | None, scores_row=None,
                  k_values=(5, 10, 20), seeds=(0, 1), random_trials: int = 3) -> dict:
    """JSON-able arguments of engine.workflows.counterfactual.counterfactual_check (they travel
    through the jobs table)."""
    kw = {"query": int(query), "method": method, "settings": settings or None,
          "scores_row": None if scores_row is None else [float(v) for v in np.asarray(scores_row).ravel()],
          "k_values": [int(k) for k in k_values], "seeds": [int(s) for s in seeds],
          "random_trials": int(random_trials)}
    return {k: v for k, v in kw.items() if v is not None}


def verify_frame(result: dict):
    """The Verify result as a table: per k, the margin change from removing the top-k proponents
    against the mean change from k random removals."""
    return pd.DataFrame([{"k": r["k"], "margin after": r["margin"], "change (top-k removed)": r["change"],
                          "change (k random, mean)": r["random_change_mean"],
                          "random std": r["random_change_std"], "prediction flipped": r["flipped"]}
                         for r in result.get("rows", [])])
