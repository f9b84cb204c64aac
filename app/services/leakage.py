"""Leak pairs for the Leakage page."""
from __future__ import annotations

import numpy as np

from app.services.runs import load_run
from engine.core.project import Project
from engine.workflows.leaks import candidate_cosines, paired_cosines, unit_inputs


def leak_pairs(project: Project, key: str, detector: dict | None = None, max_pairs: int = 60) -> dict:
    """Suspected train/test duplicates. With ``detector`` (the output of engine.workflows.leaks.detect_leaks,
    run as a background job) its calibrated decisions are used; otherwise each test query's
    input-closest among its top proponents in this run, flagged when the input-space cosine is at least
    ``QUICK_LEAK_COSINE``."""
    xn_tr, xn_te = unit_inputs(project, "train"), unit_inputs(project, "test")  # text: bags of words
    if detector is not None:
        pairs = []
        for p in detector.get("pairs", []):
            t, i = int(p["test_index"]), int(p["train_index"])
            c = p.get("input_cosine")
            pairs.append({**p, "cosine": float(c if c is not None else paired_cosines(xn_te, [t], xn_tr, [i])[0])})
        pairs.sort(key=lambda p: (not p.get("flagged"), -float(p.get(detector.get("statistic", "score"), p["score"]))))
        return {"source": f"calibrated detector (engine.workflows.leaks, {detector.get('method')})",
                "threshold": detector.get("threshold"), "pairs": pairs[:max_pairs],
                "rule": f"flagged when {detector.get('statistic')} > {detector.get('threshold'):.4g} "
                        f"(calibration: {detector.get('calibration', {}).get('kind', 'given')}, "
                        f"false-positive rate {detector.get('calibration', {}).get('fpr', '—')})"}
    S = np.asarray(load_run(project, key)["scores"])
    m = min(QUICK_LEAK_TOP, S.shape[1])
    cand = np.argpartition(-S, m - 1, axis=1)[:, :m]  # each query's top-m proponents
    cos_c = candidate_cosines(xn_te, xn_tr, cand)
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
