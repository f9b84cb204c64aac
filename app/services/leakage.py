"""Leak pairs for the Leakage page."""
from __future__ import annotations

import numpy as np

from app.services.runs import load_run
from engine.core.project import Project
from engine.workflows.leaks import candidate_cosines, paired_cosines, unit_inputs


def quick_check(project: Project, key: str, xn_tr, xn_te) -> dict[tuple[int, int], dict]:
    """Each test query's input-closest among its top proponents in this run, flagged when the
    input-space cosine is at least ``QUICK_LEAK_COSINE``."""
    S = load_run(project, key)["scores"]  # memory-mapped; read by query blocks
    m = min(QUICK_LEAK_TOP, S.shape[1])
    cand = np.concatenate([np.argpartition(-np.asarray(S[lo:lo + 256]), m - 1, axis=1)[:, :m]
                           for lo in range(0, S.shape[0], 256)])  # each query's top-m proponents
    cos_c = candidate_cosines(xn_te, xn_tr, cand)
    best = cand[np.arange(len(S)), cos_c.argmax(1)]
    cosines = cos_c.max(1)
    return {(int(t), int(best[t])): {"test_index": int(t), "train_index": int(best[t]), "score": float(S[t, best[t]]),
                                     "cosine": float(cosines[t]), "quick": bool(cosines[t] >= QUICK_LEAK_COSINE)}
            for t in range(len(S))}


def leak_pairs(project: Project, key: str, detector: dict | None = None, max_pairs: int = 60,
               copies: dict | None = None) -> dict:
    """Suspected train/test duplicates with every decision side by side: the quick check (always),
    the copy detector (``copies``: engine.workflows.leaks.detect_copies, the default of `proponent
    leaks`) and the attribution-calibrated detector (``detector``: detect_leaks), each run as a
    background job. A pair is flagged when any decision flags it, so the page never shows a worse
    decision than the quick check; each pair says why (``why``)."""
    xn_tr, xn_te = unit_inputs(project, "train"), unit_inputs(project, "test")  # text: bags of words
    pairs = quick_check(project, key, xn_tr, xn_te)
    for p in pairs.values():
        p["calibrated"] = None
        p["copy"] = None
    if copies is not None:
        S = load_run(project, key)["scores"]
        for p in pairs.values():
            p["copy"] = False
        for d in copies.get("pairs", []):
            t, i = int(d["test_index"]), int(d["train_index"])
            cur = pairs.get((t, i))
            if cur is None:
                if not d.get("flagged"):
                    continue  # an unflagged best match adds nothing to the quick check's own pair
                cur = {"test_index": t, "train_index": i, "score": float(S[t, i]),
                       "cosine": float(paired_cosines(xn_te, [t], xn_tr, [i])[0]), "quick": False, "calibrated": None}
                pairs[(t, i)] = cur
            cur["copy"] = bool(d.get("flagged"))
            cur["copy_reason"] = d.get("reason")
            cur["attribution"] = d.get("attribution")
    stat = rule_cal = None
    if detector is not None:
        stat, thr = detector.get("statistic", "score"), detector.get("threshold")
        cal = detector.get("calibration", {}) or {}
        rule_cal = (f"calibrated detector ({detector.get('method')}): {stat} > {thr:.4g} "
                    f"(null of training queries, false-positive rate {cal.get('fpr', '—')})")
        for d in detector.get("pairs", []):
            t, i = int(d["test_index"]), int(d["train_index"])
            c = d.get("input_cosine")
            cur = pairs.get((t, i)) or {"test_index": t, "train_index": i, "score": float(d["score"]),
                                         "cosine": float(c if c is not None else paired_cosines(xn_te, [t], xn_tr, [i])[0]),
                                         "quick": False, "copy": None if copies is None else False}
            cur["calibrated"] = bool(d.get("flagged"))
            cur["statistic"] = float(d.get(stat, d["score"]))
            pairs[(t, i)] = cur
    for p in pairs.values():
        why = []
        if p["quick"]:
            why.append(f"input cosine {p['cosine']:.4f} ≥ {QUICK_LEAK_COSINE} among the query's top proponents")
        if p.get("copy"):
            why.append(f"copy detector: {p['copy_reason']}")
        if p.get("calibrated"):
            why.append(f"{stat} {p['statistic']:.4g} above the calibrated threshold")
        p["flagged"] = bool(why)
        p["why"] = "; ".join(why) or "not flagged"
    ordered = sorted(pairs.values(), key=lambda p: (not p["flagged"], -p["cosine"]))
    rule_quick = f"quick check: input-space cosine ≥ {QUICK_LEAK_COSINE} with one of the query's top-{QUICK_LEAK_TOP} proponents"
    rule_copy = None
    if copies is not None:
        thr = copies.get("thresholds") or {}
        rule_copy = ("copy detector: an identical input, or input evidence past thresholds set on a null of "
                     f"training queries (false-positive rate {copies.get('fpr', '—')}"
                     + (f"; cosine > {thr['cosine']:.4f}" if "cosine" in thr else "")
                     + (f"; perceptual hash < {thr['hash']:.0f} bits" if "hash" in thr else "")
                     + (f"; fewer than {thr['edits']:.0f} words added or dropped" if "edits" in thr else "") + ")")
    return {"source": "quick check" + (" + copy detector" if copies is not None else "")
                      + (" + calibrated detector" if detector is not None else ""),
            "threshold": QUICK_LEAK_COSINE, "pairs": ordered[:max_pairs],
            "rule": rule_quick + (f"; or {rule_copy}" if rule_copy else "") + (f"; or {rule_cal}" if rule_cal else ""),
            "quick_flagged": sum(p["quick"] for p in pairs.values()),
            "copy_flagged": None if copies is None else sum(bool(p.get("copy")) for p in pairs.values()),
            "calibrated_flagged": None if detector is None else sum(bool(p["calibrated"]) for p in pairs.values())}


QUICK_LEAK_TOP = 100

# how well each method's top proponent finds planted copies: recall@1 pooled over the validation
# suite's shapes and tabular projects (docs/bench/suite-triage-leaks.json, proponent bench --suite; the
# 2026-12-06 rerun with TRAK v6)
LEAK_SEARCH = {
    "knn": "suited to leak search: its top neighbour was the planted copy for 75 of 80 in the validation suite",
    "trak": "partly suited: its top proponent was the planted copy for 45 of 80 in the validation suite",
    "tracin": "poorly suited: its top proponent was the planted copy for 12 of 80 in the validation suite",
    "grad-dot": "poorly suited: its top proponent was the planted copy for 6 of 80 in the validation suite",
}


def leak_search_note(method: str) -> str:
    """What the validation suite says about finding copies with this method's top proponents."""
    return LEAK_SEARCH.get(method, "not measured for leak search; the copy detector does not depend on it")


# natural near-twins (8×8 digits) reach 0.98–0.99; copies, noisy and re-brightened copies ≥ 0.995
QUICK_LEAK_COSINE = 0.995
