"""cleanlab label-quality scores from out-of-sample (K-fold) probabilities."""
from __future__ import annotations

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from engine.evaluate.peers.base import PeerInputs, Recorder


def run(inputs: PeerInputs, method: str, rec: Recorder, opts: dict, settings: dict) -> np.ndarray:
    probs = np.asarray(inputs.cross_val_probs(), dtype=np.float64)  # the K-fold CV is cleanlab's cost
    rec.fit_done()
    labels = inputs.y_train.detach().cpu().numpy().astype(np.int64)
    if probs.shape != (len(labels), inputs.num_classes):
        raise ValueError(f"cross_val_probs has shape {probs.shape}, expected {(len(labels), inputs.num_classes)}")
    q_method = opts.get("quality_method", "self_confidence")
    quality = get_label_quality_scores(labels, probs, method=q_method)
    issues = find_label_issues(labels, probs, n_jobs=1)
    settings.update(
        quality_method=q_method,
        n_label_issues=int(np.sum(issues)),
        label_issue_indices=np.flatnonzero(issues).tolist(),
        fit_note="fit_seconds is the cross_val_probs() call (K-fold cross-validation)",
        orientation="suspicion = 1 - label quality (higher = more likely mislabeled), shape [n_train]",
    )
    return 1.0 - np.asarray(quality, dtype=np.float64)

