"""The recommended mislabel ranking: attribution evidence combined with label evidence.

Four kinds of evidence per training example i with given label y_i:

- ``self_influence``: the attribution run's suspicion (TRAK: self-influence, how much the example
  props up its own prediction; memorised, hard-to-fit examples score high);
- ``opposes_own_class``: how strongly i opposes the test queries whose label is y_i, against how
  it scores on the others, in units of its own score spread: (mean_other − mean_own) / std. A
  mislabeled 3 given as 5 pulls test 5s away from "5";
- ``label_improbability``: −log p(y_i | x_i) out of sample: K-fold cross-validated probabilities when
  the project can be retrained K times here (``retrain_refusal``), else the mean over the recorded
  trajectory's checkpoints (as area-under-the-margin reads training dynamics), else the final model;
- ``neighbour_disagreement``: the share of its nearest neighbours in the model's penultimate
  feature space that carry another label.

Each is turned into a rank-Gaussian score within the project (so that scales do not matter across
projects), and the ranking is their weighted sum. The weights come from
``mislabel_weights.json``, fitted by ``scripts/fit_triage_weights.py`` on generated validation
projects (``engine.evaluate.suite.FIT_SEEDS``), never on the shipped samples, and nothing here
reads a truth file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import rankdata

from engine.api import cached_scores
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import cross_val_probs, predict_logits, retrain_refusal
from engine.storage.arrays import atomic_save_npy, read_cached_npy, stable_hash

EVIDENCE = ("self_influence", "opposes_own_class", "label_improbability", "neighbour_disagreement")
WEIGHTS_FILE = Path(__file__).with_name("mislabel_weights.json")
FOLDS = 5
# probabilities below this are clipped before the log (a label given probability 1e-6 is as
# suspicious as one given 1e-9)
P_FLOOR = 1e-6
QUERY_BLOCK = 256


def default_weights() -> dict[str, float]:
    """The fitted weights (see module doc); equal weights if the file is absent."""
    if WEIGHTS_FILE.is_file():
        return {k: float(v) for k, v in json.loads(WEIGHTS_FILE.read_text())["weights"].items()}
    return {k: 1.0 for k in EVIDENCE}


def rank_gauss(v: np.ndarray) -> np.ndarray:
    """Ranks mapped to standard-normal quantiles (ties share their mean rank)."""
    v = np.asarray(v, np.float64)
    r = rankdata(np.where(np.isfinite(v), v, -np.inf), method="average")
    return ndtri((r - 0.5) / len(v))


def opposes_own_class(scores, train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(mean score over test queries of another class − mean over queries of the example's own
    class) / the example's score spread, read by query blocks ([C, n_train] held, never [n_q, n_train])."""
    n_q, n = scores.shape
    sums = np.zeros((num_classes, n))
    sq = np.zeros(n)
    for lo in range(0, n_q, QUERY_BLOCK):
        block = np.asarray(scores[lo:lo + QUERY_BLOCK], np.float64)
        onehot = np.eye(num_classes)[test_labels[lo:lo + len(block)]]  # [q, C]
        sums += onehot.T @ block
        sq += (block ** 2).sum(0)
    counts = np.bincount(test_labels, minlength=num_classes).astype(np.float64)
    total = sums.sum(0)
    own_n = counts[train_labels]
    own = sums[train_labels, np.arange(n)] / np.maximum(own_n, 1)
    other = (total - sums[train_labels, np.arange(n)]) / np.maximum(n_q - own_n, 1)
    mean = total / max(n_q, 1)
    std = np.sqrt(np.maximum(sq / max(n_q, 1) - mean ** 2, 0)) + 1e-30
    out = (other - own) / std
    return np.where(own_n > 0, out, 0.0)  # no test query of its class: no evidence either way


def label_probabilities(project: Project, *, folds: int = FOLDS, device: str = "cpu", progress=None) -> tuple[np.ndarray, str]:
    """Class probabilities [n_train, C] of each training example and where they come from:
    "cross-validation (K folds)", "trajectory (N checkpoints)" or "final model"."""
    refusal = retrain_refusal(project, folds) if folds >= 2 else "cross-validation is off"
    if refusal is None:
        key = stable_hash({"data": project.train_data_hash, "ck": project.checkpoint_hash(), "folds": folds, "v": 1})
        path = project.state_dir / "cache" / f"cv_probs_{key}.npy"
        stored = read_cached_npy(path, (len(project.train_dataset), len(project.classes)), mmap=False)
        if stored is not None:  # a damaged file is a miss: recomputed and replaced
            return stored, f"cross-validation ({folds} folds)"
        probs = cross_val_probs(project, folds=folds, device=device, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, probs)
        return probs, f"cross-validation ({folds} folds)"
    x = project.train_dataset.x
    cks = project.run_checkpoints(project.model_ids()[0]) if project.model_ids() else []
    cks = [c for c in cks if getattr(c, "step", 1) != 0] or project.final_checkpoints()
    probs = None
    for ck in cks:
        p = torch.softmax(predict_logits(project.load_model(ck), x, device=device), 1).double().numpy()
        probs = p if probs is None else probs + p
    source = f"trajectory ({len(cks)} checkpoints)" if len(cks) > 1 else "final model"
    return probs / len(cks), source


def mislabel_evidence(project: Project, method: str = "trak", settings=None, *, device: str = "auto",
                      progress=None, folds: int = FOLDS) -> dict:
    """Raw evidence arrays [n_train] for each of ``EVIDENCE`` (absent when a project cannot give it),
    the probabilities used, and where each came from."""
    y = project.train_dataset.y.numpy().astype(np.int64)
    ev, sources = {}, {}
    res = cached_scores(project, method, settings, device=device, progress=progress)
    susp = np.asarray(res["suspicion"], np.float64)
    if np.isfinite(susp).all():
        ev["self_influence"] = susp
        sources["self_influence"] = f"{method} suspicion (run {res['key']})"
    test_y = project.test_dataset.y.numpy().astype(np.int64)
    ev["opposes_own_class"] = opposes_own_class(res["scores"], y, test_y, project.num_classes)
    sources["opposes_own_class"] = f"{method} scores against {len(test_y)} labelled test queries"
    probs, src = label_probabilities(project, folds=folds, device="cpu" if device == "auto" else device, progress=progress)
    ev["label_improbability"] = -np.log(np.clip(probs[np.arange(len(y)), y], P_FLOOR, 1.0))
    sources["label_improbability"] = f"−log p(given label), {src}"
    knn = cached_scores(project, "knn", None, device=device, progress=progress)
    ev["neighbour_disagreement"] = np.asarray(knn["suspicion"], np.float64)
    sources["neighbour_disagreement"] = "share of 10 nearest neighbours (penultimate features) with another label"
    return {"evidence": ev, "sources": sources, "probs": probs, "run": res["key"]}


def combine(evidence: dict[str, np.ndarray], weights: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(score, per-evidence contributions): Σ weight · rank-Gaussian(evidence) over what is present."""
    contrib = {k: weights.get(k, 0.0) * rank_gauss(v) for k, v in evidence.items()}
    if not contrib:
        raise ProponentError("no mislabel evidence is available for this project")
    return np.sum(list(contrib.values()), axis=0), contrib


def recommended_ranking(project: Project, method: str = "trak", settings=None, *, device: str = "auto",
                        progress=None, limit: int | None = None, weights: dict | None = None) -> dict:
    """{"method": "recommended", "evidence_sources", "weights", "items": [{"index", "score", "label",
    "suggested_label", "model_probability_of_label", "evidence": {name: value}, "contributions": {...}}]},
    most suspicious first."""
    from engine.workflows.triage import suggest_labels, suspect_item  # triage dispatches here lazily: no cycle

    got = mislabel_evidence(project, method, settings, device=device, progress=progress)
    w = weights or default_weights()
    score, contrib = combine(got["evidence"], w)
    y = project.train_dataset.y.numpy().astype(np.int64)
    probs = got["probs"]
    suggested = suggest_labels(probs, y)
    order = np.argsort(-score, kind="mergesort")
    if limit:
        order = order[:limit]
    items = [{**suspect_item(project, int(i), float(score[i]), y, suggested, probs),
              "evidence": {k: float(v[i]) for k, v in got["evidence"].items()},
              "contributions": {k: float(v[i]) for k, v in contrib.items()}} for i in order]
    return {"method": "recommended", "attribution_method": method, "run": got["run"], "weights": w,
            "evidence_sources": got["sources"], "items": items}

