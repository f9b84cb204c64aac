"""Materialise the noisy, non-converged digits sample: 8×8 digits with 20% of the training
labels flipped to another class (recorded in truth.json, which no method reads). The recipe
trains only three epochs, so the model is far from converged. The test labels are clean.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_TEST = 360


def materialise(root: Path, *, seed: int = 0, flip_fraction: float = 0.2) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    order = rng.permutation(len(labels))
    test_idx, train_idx = order[:N_TEST], order[N_TEST:]
    given = labels[train_idx].copy()
    flip = np.sort(rng.choice(len(train_idx), size=int(round(flip_fraction * len(train_idx))), replace=False))
    for i in flip:
        given[i] = int(rng.choice([c for c in range(10) if c != labels[train_idx[i]]]))
    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for r, i in enumerate(train_idx):
        rel = f"images/train_{r:04d}.png"
        Image.fromarray(images[i], mode="L").save(data / rel)
        rows.append(f"{rel},{int(given[r])}")
    (data / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    rows = []
    for t, i in enumerate(test_idx):
        rel = f"images/test_{t:04d}.png"
        Image.fromarray(images[i], mode="L").save(data / rel)
        rows.append(f"{rel},{int(labels[i])}")
    (data / "test.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    truth = {"flipped": [{"train_index": int(i), "given_label": int(given[i]), "true_label": int(labels[train_idx[i]])}
                         for i in flip], "leaks": [], "n_train": int(len(train_idx)), "n_test": N_TEST, "seed": seed}
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
