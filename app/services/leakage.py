"""Leak pairs for the Leakage page."""
from __future__ import annotations

import numpy as np

from app.services.runs import load_run
from engine.core.project import Project


def leak_pairs(project: Project, key: str, detector: dict | None = None, max_pairs: int = 60) -> dict:
    """Suspected train/test duplicates. With ``detector`` (the output of engine.workflows.leaks.detect_leaks,
    run as a background job) its calibrated decisions are used; otherwise each test query's
    input-closest among its top proponents in this run, flagged when the input-space cosine is at least
    ``QUICK_LEAK_COSINE``."""
    x_tr = project.train_dataset.x.reshape(len(project.train_dataset), -1).numpy().astype(np.float64)
    x_te = project.test_dataset.x.reshape(len(project.test_dataset), -1).numpy().astype(np.float64)
    xn_tr = x_tr / np.maximum(1e-12, np.linalg.norm(x_tr, axis=1, keepdims=True))
    xn_te = x_te / np.maximum(1e-12, np.linalg.norm(x_te, axis=1, keepdims=True))
    if detector is not None:
        pairs = []
        for p in detector.get("pairs", []):
            t, i = int(p["test_index"]), int(p["train_index"])
            c = p.get("input_cosine")
            pairs.append({**p, "cosine": float(c if c is not None else xn_te[t] @ xn_tr[i])})
        pairs.sort(key=lambda p: (not p.get("flagged"), -float(p.get(detector.get("statistic", "score"), p["score"]))))
        return {"source": f"calibrated detector (engine.workflows.leaks, {detector.get('method')})",
                "threshold": detector.get("threshold"), "pairs": pairs[:max_pairs],
                "rule": f"flagged when {detector.get('statistic')} > {detector.get('threshold'):.4g} "
                        f"(calibration: {detector.get('calibration', {}).get('kind', 'given')}, "
                        f"false-positive rate {detector.get('calibration', {}).get('fpr', '—')})"}
    S = np.asarray(load_run(project, key)["scores"])
    m = min(QUICK_LEAK_TOP, S.shape[1])
    cand = np.argpartition(-S, m - 1, axis=1)[:, :m]  # each query's top-m proponents
    cos_c = np.einsum("qk,qmk->qm", xn_te, xn_tr[cand])
    best = cand[np.arange(len(S)), cos_c.argmax(1)]
    cosines = cos_c.max(1)
    threshold = QUICK_LEAK_COSINE
    order = np.argsort(-cosines, kind="stable")[:max_pairs]
    pairs = [{"test_index": int(t), "train_index": int(best[t]), "score": float(S[t, best[t]]),
              "cosine": float(cosines[t]), "flagged": bool(cosines[t] >= threshold)} for t in order]
    return {"source": f"quick check: the input-closest of each query's top-{m} proponents", "threshold": threshold,
            "pairs": pairs, "rule": f"flagged when the input-space cosine of a test query and that proponent "
                                    f"is ≥ {threshold}"}


QUICK_LEAK_TOP = 100


# natural near-twins (8×8 digits) reach 0.98–0.99; copies, noisy and re-brightened copies ≥ 0.995
QUICK_LEAK_COSINE = 0.995
