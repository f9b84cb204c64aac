"""The counterfactual check: remove a query's top-k proponents, retrain, and see what happens.

For one test query and each k: retrain without its k highest-scoring training examples (per
the chosen method) and, as a control, without k random examples; report the change in the
query's correct-class margin against the full-data retrain under the same seeds, and the
smallest k whose removal flips the prediction (TRAK's "brittleness").

Only what is needed is retrained: ``len(seeds) × (1 + len(k_values) × (1 + random_trials))``
models. Retrains go through ``groundtruth.retrain_margins``, so they are cached and a
check that is stopped resumes.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from engine.api import fit_method, run_dir, run_key
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.evaluate.groundtruth import retrain_margins
from engine.methods.base import coerce_settings, get_method
from engine.storage.arrays import read_cached_npy

ProgressFn = Callable[[str, int, int], None]

__all__ = ["counterfactual_check", "query_scores"]


def query_scores(project: Project, query: int, method: str, settings=None, *, device: str = "auto") -> np.ndarray:
    """One test query's scores [n_train]: from the cached run when there is one, else fit and score just it."""

    cls = get_method(method)
    s = coerce_settings(cls, settings)
    cached = run_dir(project, run_key(project, method, s)) / "scores.npy"
    arr = read_cached_npy(cached, (len(project.test_dataset), len(project.train_dataset)))
    if arr is not None:
        return np.asarray(arr[query], np.float64)
    att, _ = fit_method(project, method, s, device=device)
    return np.asarray(att.scores(("test", np.array([query])))[0], np.float64)


def counterfactual_check(project: Project, query: int, method: str | None = None, *, scores_row=None, settings=None,
                         k_values: Sequence[int] = (5, 10, 20, 40), seeds: Sequence[int] = (0, 1),
                         random_trials: int = 3, seed: int = 0, device: str = "auto",
                         progress: ProgressFn | None = None, processes: int | None = None) -> dict:
    """Remove the top-k proponents of test query ``query`` and retrain, against k random removals.

    Give either ``method`` (its scores for the query are computed or read from its cached run)
    or ``scores_row`` [n_train]. Returns a dict with the full-data margin, one row per k
    (``margin``, ``change``, ``random_change_mean``/``_std``, ``flipped``) and ``flip_k``: the
    smallest k in ``k_values`` whose removal flips the predicted class (None if none does).
    Changes are ``margin after − margin with all data``: negative means the margin dropped.
    """
    project.require_recipe("Verify (retraining without the top-k proponents)")
    t0 = time.perf_counter()
    n_train, n_test = len(project.train_dataset), len(project.test_dataset)
    try:
        query = int(query)
    except (TypeError, ValueError):
        raise ProponentError(f"query must be a test index, not {query!r}") from None
    if not 0 <= query < n_test:
        raise ProponentError(f"test index {query} is out of range 0..{n_test - 1}", file=str(project.test_csv))
    if scores_row is None:
        if method is None:
            raise ProponentError("counterfactual check needs a method or a scores row")
        scores_row = query_scores(project, query, method, settings, device=device)
    row = np.asarray(scores_row, np.float64).reshape(-1)
    if row.shape != (n_train,):
        raise ProponentError(f"scores row must have {n_train} entries (one per training example), not {row.size}")
    if not np.isfinite(row).all():
        raise ProponentError("scores row contains NaN or inf")
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] < 1 or ks[-1] >= n_train:
        raise ProponentError(f"k values must be between 1 and {n_train - 1}, not {list(k_values)}")
    seeds = [int(s) for s in seeds]
    if random_trials < 0:
        raise ProponentError("random_trials must be ≥ 0")
    order = np.argsort(-row, kind="mergesort")
    rng = np.random.default_rng(seed)
    masks = [np.ones(n_train, bool)]
    labels = ["full"]
    for k in ks:
        m = np.ones(n_train, bool)
        m[order[:k]] = False
        masks.append(m)
        labels.append(("top", k))
        for t in range(random_trials):
            m = np.ones(n_train, bool)
            m[rng.choice(n_train, size=k, replace=False)] = False
            masks.append(m)
            labels.append(("random", k))
    margins = retrain_margins(project, subsets=np.stack(masks), seeds=seeds, progress=progress, processes=processes)
    mq = margins[:, :, query]  # [n_masks, R]
    base = mq[0]
    y = int(project.test_dataset.y[query])
    rows = []
    flip_k = None
    base_sign = np.sign(base.mean())
    for k in ks:
        top = [i for i, l in enumerate(labels) if l == ("top", k)][0]
        rnd = [i for i, l in enumerate(labels) if l == ("random", k)]
        change = mq[top] - base  # per seed
        rchange = (mq[rnd] - base[None, :]).mean(1) if rnd else np.zeros(0)
        after = float(mq[top].mean())
        flipped = bool(np.sign(after) != base_sign and after != 0.0)
        if flipped and flip_k is None:
            flip_k = k
        rows.append({"k": k, "margin": after, "change": float(change.mean()), "change_per_seed": change.tolist(),
                     "random_change_mean": float(rchange.mean()) if len(rchange) else float("nan"),
                     "random_change_std": float(rchange.std()) if len(rchange) > 1 else float("nan"),
                     "flipped": flipped, "removed": order[:k].tolist()})
    return {"query": query, "label": project.class_name(y), "method": method, "base_margin": float(base.mean()),
            "base_margin_per_seed": base.tolist(), "predicted_correct": bool(base.mean() > 0), "rows": rows,
            "flip_k": flip_k, "k_values": ks, "seeds": seeds, "random_trials": int(random_trials),
            "retrains": int(len(masks) * len(seeds)), "seconds": time.perf_counter() - t0,
            "note": "change = margin after removal − margin with all data, same seeds; negative = margin dropped"}
