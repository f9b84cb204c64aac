"""Mislabel triage: rank training data by a method's suspicion, with a suggested label."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.api import cached_scores
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import predict_logits


def ensemble_probabilities(project: Project, split: str = "train") -> np.ndarray:
    """Class probabilities averaged over the final checkpoint of every trained model."""
    ds = project.train_dataset if split == "train" else project.test_dataset
    probs = None
    finals = project.final_checkpoints()
    if not finals:  # deleted or never recorded: no model to ask (not a TypeError from None / 0)
        raise ProponentError("no trained checkpoints to compute class probabilities from; run `proponent train` "
                             "(or `proponent import`) first", file=str(project.checkpoint_dir))
    for ck in finals:
        p = torch.softmax(predict_logits(project.load_model(ck), ds.x), 1).numpy()
        probs = p if probs is None else probs + p
    return probs / len(finals)


def suggest_labels(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The most probable class other than the given one (the class the model would move it to)."""
    p = probs.copy()
    p[np.arange(len(labels)), labels] = -1
    return p.argmax(1)


RECOMMENDED = "recommended"


def triage(project: Project, method: str | None = None, settings=None, *, device: str = "auto", progress=None,
           limit: int | None = None) -> dict:
    """{"method", "items": [{"index", "score", "label", "suggested_label", "model_probability_of_label"}...]},
    most suspicious first. With no method (or "recommended"), the recommended ranking that combines
    attribution and label evidence (engine.workflows.mislabel), each item carrying its evidence;
    with a method, that method's own suspicion."""
    if method in (None, RECOMMENDED):
        from engine.workflows.mislabel import recommended_ranking

        return recommended_ranking(project, settings=settings, device=device, progress=progress, limit=limit)
    res = cached_scores(project, method, settings, device=device, progress=progress)
    susp = np.asarray(res["suspicion"], dtype=np.float64)
    if np.isnan(susp).all():
        reason = (res.get("meta") or {}).get("self_scores_unavailable", "it has no self-scores")
        raise ProponentError(f"{method} cannot rank suspects on this project: {reason}")
    labels = project.train_dataset.y.numpy()
    probs = ensemble_probabilities(project)
    suggested = suggest_labels(probs, labels)
    order = np.argsort(-susp, kind="mergesort")
    if limit:
        order = order[:limit]
    items = [suspect_item(project, int(i), float(susp[i]), labels, suggested, probs) for i in order]
    return {"method": method, "run": res["key"], "items": items}


def suspect_item(project: Project, i: int, score: float, labels: np.ndarray, suggested: np.ndarray,
                 probs: np.ndarray) -> dict:
    """One ranked suspect: index, score, given and suggested label, the model's probability of the given one."""
    return {"index": i, "score": score, "label": _plain(project.class_name(labels[i])),
            "suggested_label": _plain(project.class_name(suggested[i])),
            "model_probability_of_label": float(probs[i, labels[i]])}


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def load_truth(project: Project) -> dict | None:
    """Planted problems of a sample project (for evaluation and the demo; methods never read it)."""
    path = Path(project.root) / "truth.json"
    return json.loads(path.read_text()) if path.is_file() else None
