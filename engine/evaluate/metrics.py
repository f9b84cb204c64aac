"""Small, exactly checkable metric functions shared by triage, the benchmark and the app.

Ranks, Spearman and AUROC come from scipy and scikit-learn; these wrappers only fix the
conventions the rest of the code relies on (0-based average ranks, NaN when undefined).
"""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score


def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based, along the last axis."""
    return stats.rankdata(np.asarray(a, dtype=np.float64), method="average", axis=-1) - 1.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(rankdata(np.ravel(a)), rankdata(np.ravel(b)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN (not a warning) when either side is constant."""
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (ties count one half)."""
    positives = np.asarray(positives, bool)
    if positives.all() or not positives.any():
        return float("nan")
    return float(roc_auc_score(positives, np.asarray(scores, np.float64)))


def precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int | None = None) -> float:
    """Share of true positives among the k highest scores (k defaults to the number of positives)."""
    positives = np.asarray(positives, bool)
    k = int(positives.sum()) if k is None else int(k)
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")[:k]
    return float(positives[top].mean())
