"""Small, exactly checkable metric functions shared by triage, the benchmark and the app."""
from __future__ import annotations

import numpy as np


def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based, along the last axis."""
    a = np.asarray(a, dtype=np.float64)
    flat = a.reshape(-1, a.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        order = np.argsort(row, kind="mergesort")
        ranks = np.empty(len(row))
        ranks[order] = np.arange(len(row))
        sorted_row = row[order]
        # average ties
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_row)) + 1]
        ends = np.r_[starts[1:], len(row)]
        for s, e in zip(starts, ends):
            if e - s > 1:
                ranks[order[s:e]] = (s + e - 1) / 2
        out[r] = ranks
    return out.reshape(a.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    return pearson(ra, rb)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (ties count one half)."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores) + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int | None = None) -> float:
    """Share of true positives among the k highest scores (k defaults to the number of positives)."""
    positives = np.asarray(positives, bool)
    k = int(positives.sum()) if k is None else int(k)
    if k <= 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")[:k]
    return float(positives[top].mean())
