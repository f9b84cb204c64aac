"""Linear datamodeling score (LDS) and leave-one-out correlation, with their noise ceilings."""
from __future__ import annotations

import numpy as np
from scipy import stats

from engine.core.errors import ProponentError
from engine.evaluate.metrics import pearson, spearman

__all__ = ["lds", "loo_correlation", "columnwise_spearman"]


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of a with the same column of b (NaN for constant columns)."""
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    num = (a * b).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per column (ties get average ranks)."""
    ra = stats.rankdata(np.asarray(a, np.float64), axis=0)
    rb = stats.rankdata(np.asarray(b, np.float64), axis=0)
    return _columnwise_pearson(ra, rb)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def lds(scores: np.ndarray, subsets: np.ndarray, margins: np.ndarray, queries=None) -> dict:
    """LDS of ``scores`` [n_q, n_train] against retrained ``margins`` [M, R, n_test] (or [M, n_test]).

    For each query q: Spearman over subsets m between Σ_{i∈S_m} S[q, i] and the measured margin
    (mean over the R seeds); LDS is the mean over queries. ``queries`` selects the test columns
    of ``margins`` that the rows of ``scores`` belong to (default: all, in order).

    ``noise_ceiling`` is the same Spearman, averaged over queries, between the margins of seed 0
    and seed 1 (NaN with one seed): how well one retraining predicts another.
    """
    scores = np.asarray(scores, np.float64)
    subsets = np.asarray(subsets)
    margins = np.asarray(margins, np.float64)
    if margins.ndim == 2:
        margins = margins[:, None, :]
    if margins.ndim != 3:
        raise ProponentError(f"margins must be [M, R, n_test], not shape {margins.shape}")
    M, R, n_test = margins.shape
    if subsets.ndim != 2 or subsets.shape[0] != M:
        raise ProponentError(f"subsets has shape {subsets.shape} but margins has {M} subsets")
    if scores.ndim != 2 or scores.shape[1] != subsets.shape[1]:
        raise ProponentError(f"scores has shape {scores.shape} but subsets cover {subsets.shape[1]} training examples")
    if queries is not None:
        margins = margins[:, :, np.asarray(queries, dtype=np.int64)]
    if scores.shape[0] != margins.shape[2]:
        raise ProponentError(f"scores has {scores.shape[0]} queries but margins has {margins.shape[2]}")
    if M < 3:
        raise ProponentError(f"LDS needs at least 3 subsets (got {M})")
    if not np.isfinite(scores).all():
        raise ProponentError("scores contain NaN or inf")
    predicted = subsets.astype(np.float64) @ scores.T  # [M, n_q]
    measured = margins.mean(1)  # [M, n_q]
    per_query = columnwise_spearman(predicted, measured)
    if R >= 2:
        per_query_ceiling = columnwise_spearman(margins[:, 0, :], margins[:, 1, :])
        ceiling = _nanmean(per_query_ceiling)
    else:
        per_query_ceiling = np.full(margins.shape[2], np.nan)
        ceiling = float("nan")
    return {"lds": _nanmean(per_query), "per_query": per_query, "noise_ceiling": ceiling,
            "per_query_noise_ceiling": per_query_ceiling, "n_subsets": int(M), "n_seeds": int(R),
            "n_queries": int(margins.shape[2])}


def loo_correlation(scores: np.ndarray, indices, loo_effects: np.ndarray, queries=None) -> dict:
    """Pearson correlation between predicted and measured leave-one-out effects.

    ``loo_effects`` is [len(indices), n_test] (margin with all data − margin without the
    example, mean over seeds) or [R, len(indices), n_test] per seed, in which case the noise
    ceiling is the same correlation between seed 0's and seed 1's effects.
    Reported: ``loo`` (Pearson over all (example, query) pairs), ``per_query`` (Pearson over the
    removed examples, per query), ``spearman`` and ``noise_ceiling``.
    """
    scores = np.asarray(scores, np.float64)
    idx = np.asarray(indices, dtype=np.int64)
    eff = np.asarray(loo_effects, np.float64)
    per_seed = None
    if eff.ndim == 3:
        per_seed = eff
        eff = eff.mean(0)
    if eff.ndim != 2 or eff.shape[0] != len(idx):
        raise ProponentError(f"loo_effects must be [len(indices)={len(idx)}, n_test], not shape {eff.shape}")
    if queries is not None:
        q = np.asarray(queries, dtype=np.int64)
        eff = eff[:, q]
        if per_seed is not None:
            per_seed = per_seed[:, :, q]
    if scores.shape[0] != eff.shape[1]:
        raise ProponentError(f"scores has {scores.shape[0]} queries but loo_effects has {eff.shape[1]}")
    pred = scores[:, idx].T  # [k, n_q]
    out = {"loo": pearson(pred.ravel(), eff.ravel()), "spearman": spearman(pred.ravel(), eff.ravel()),
           "per_query": _columnwise_pearson(pred, eff), "n_removed": int(len(idx)),
           "n_seeds": 1 if per_seed is None else int(per_seed.shape[0]), "noise_ceiling": float("nan")}
    out["per_query_mean"] = _nanmean(out["per_query"])
    if per_seed is not None and per_seed.shape[0] >= 2:
        out["noise_ceiling"] = pearson(per_seed[0].ravel(), per_seed[1].ravel())
    return out
