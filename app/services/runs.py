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
from engine.storage.arrays import load_npy


def list_runs(project: Project) -> list[dict]:
    out = []
    for r in db_for(project).list_runs():
        out.append({"key": r["key"], "method": r["method"], "status": r["status"],
                    "settings": r.get("settings") or {}, "device": r.get("device"),
                    "fit_s": r.get("fit_seconds"), "score_s": r.get("score_seconds"), "peak_mb": r.get("peak_mb"),
                    "created": r.get("created"), "message": r.get("message")})
    return out


def done_runs(project: Project) -> list[dict]:
    """Finished runs whose score files exist, newest first."""
    out = []
    for r in list_runs(project):
        if r["status"] == "done" and (run_dir(project, r["key"]) / "scores.npy").is_file():
            out.append(r)
    return out


def run_label(run: dict) -> str:
    cost = (run.get("fit_s") or 0) + (run.get("score_s") or 0)
    return f"{run['method']} · {run['key'][-6:]} · {cost:.1f}s"


def load_run(project: Project, key: str) -> dict:
    """A finished run's arrays: scores [n_test, n_train] (memory-mapped), self_scores and suspicion [n_train]."""
    folder = run_dir(project, key)
    if not (folder / "scores.npy").is_file():
        raise ProponentError(f"run {key} has no scores on disk", file=str(folder))
    out = {"key": key}
    for n in ("scores", "self_scores", "suspicion"):
        f = folder / f"{n}.npy"
        # the [n_test, n_train] scores stay memory-mapped: pages read the rows and columns they show
        out[n] = (load_npy(f, mmap=True) if n == "scores" else np.asarray(load_npy(f, mmap=False))) if f.is_file() else None
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
