"""Runs of attribution methods: listing, loading, settings, top-k and run comparison, optional workflows."""
from __future__ import annotations

import importlib
import importlib.util

import numpy as np

from app.services.flags import db_for
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods import describe_settings, get_method, list_methods
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
    from engine.api import run_dir

    out = []
    for r in list_runs(project):
        if r["status"] == "done" and (run_dir(project, r["key"]) / "scores.npy").is_file():
            out.append(r)
    return out


def run_label(run: dict) -> str:
    cost = (run.get("fit_s") or 0) + (run.get("score_s") or 0)
    return f"{run['method']} · {run['key'][-6:]} · {cost:.1f}s"


def load_run(project: Project, key: str) -> dict:
    """A finished run's arrays: scores [n_test, n_train], self_scores and suspicion [n_train]."""
    from engine.api import run_dir

    folder = run_dir(project, key)
    if not (folder / "scores.npy").is_file():
        raise ProponentError(f"run {key} has no scores on disk", file=str(folder))
    out = {"key": key}
    for n in ("scores", "self_scores", "suspicion"):
        f = folder / f"{n}.npy"
        out[n] = np.asarray(load_npy(f, mmap=False)) if f.is_file() else None
    return out


def methods_info(project: Project | None = None) -> list[dict]:
    out = []
    for cls in list_methods():
        out.append({"name": cls.name, "label": cls.label or cls.name, "description": cls.description,
                    "settings": describe_settings(cls), "extension": bool(getattr(cls, "extension", False)),
                    "unsupported": (cls.supports(project) if project is not None else None)})
    return out


def coerce_ui_settings(method: str, values: dict) -> dict:
    """Keep only the settings that differ from the defaults (so the run key is the CLI's)."""
    from engine.methods import coerce_settings, settings_dict

    cls = get_method(method)
    s = settings_dict(coerce_settings(cls, values))
    defaults = {d["name"]: d["default"] for d in describe_settings(cls)}
    return {k: v for k, v in s.items() if v != defaults.get(k)}


def run_key_for(project: Project, method: str, settings: dict) -> str:
    from engine.api import run_key
    from engine.methods import coerce_settings

    return run_key(project, method, coerce_settings(get_method(method), settings))


def topk(scores_row: np.ndarray, k: int) -> dict:
    row = np.asarray(scores_row, dtype=np.float64)
    k = min(k, len(row))
    top = np.argsort(-row, kind="stable")[:k]
    bot = np.argsort(row, kind="stable")[:k]
    return {"proponents": top, "proponent_scores": row[top], "opponents": bot, "opponent_scores": row[bot]}


def compare_rows(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """Agreement of two methods on one query: top-k proponent overlap and Spearman rank correlation."""
    from scipy.stats import spearmanr

    ta, tb = set(topk(a, k)["proponents"].tolist()), set(topk(b, k)["proponents"].tolist())
    rho = spearmanr(np.asarray(a), np.asarray(b)).statistic
    return {"overlap": len(ta & tb) / max(1, k), "overlap_count": len(ta & tb), "spearman": float(rho)}


def optional_module(name: str):
    """Import an engine module another engineer may not have delivered yet; None if absent."""
    if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
        return None
    try:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)
    except ImportError:
        return None


def verify_available(project: Project) -> str | None:
    """None if the counterfactual Verify check can run, else why it is off."""
    mod = optional_module("engine.workflows.counterfactual")
    if mod is None or not hasattr(mod, "counterfactual_check"):
        return "the counterfactual retraining check (engine.workflows.counterfactual) is not installed in this build"
    if not project.has_recipe:
        return "Verify retrains the model and this project has no training recipe ([training] in project.toml)"
    if not project.checkpoints:
        return "no recorded training run to retrain from"
    n_params = sum(p.numel() for p in project.build_model().parameters())
    if n_params * len(project.train_dataset) > 5e9:
        return f"this model ({n_params:,} parameters × {len(project.train_dataset):,} examples) is too costly to retrain here"
    return None


def whatif_available() -> str | None:
    mod = optional_module("engine.workflows.whatif")
    if mod is None or not hasattr(mod, "predict_edit"):
        return "the GIF what-if engine (engine.workflows.whatif.predict_edit) is not installed in this build"
    return None


def leaks_available() -> str | None:
    mod = optional_module("engine.workflows.leaks")
    if mod is None or not hasattr(mod, "detect_leaks"):
        return "the calibrated leak detector (engine.workflows.leaks.detect_leaks) is not installed in this build"
    return None


def verify_kwargs(fn, *, query: int, method: str, settings: dict | None, scores_row=None,
                  k_values=(5, 10, 20), seeds=(0, 1), random_trials: int = 3) -> dict:
    """Arguments for engine.workflows.counterfactual.counterfactual_check, keeping only the names
    its signature has (JSON-able: they travel through the jobs table)."""
    import inspect

    cands = {"query": int(query), "method": method, "settings": settings or None,
             "scores_row": None if scores_row is None else [float(v) for v in np.asarray(scores_row).ravel()],
             "k_values": [int(k) for k in k_values], "seeds": [int(s) for s in seeds],
             "random_trials": int(random_trials)}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in cands.items() if k in params and v is not None}


def verify_frame(result: dict):
    """The Verify result as a table: per k, the margin change from removing the top-k proponents
    against the mean change from k random removals."""
    import pandas as pd

    return pd.DataFrame([{"k": r["k"], "margin after": r["margin"], "change (top-k removed)": r["change"],
                          "change (k random, mean)": r["random_change_mean"],
                          "random std": r["random_change_std"], "prediction flipped": r["flipped"]}
                         for r in result.get("rows", [])])
