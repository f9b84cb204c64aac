"""Materialise the digits sample: scikit-learn's 8×8 digits as PNGs plus planted problems.

Planted (recorded in truth.json, which no method reads): about 8% of training labels flipped
to another class, and a few test images copied into the training set, exactly and with small
perturbations (noise, a one-pixel shift, a brightness change).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def materialise(root: Path, *, seed: int = 0, flip_fraction: float = 0.08, n_leaks: int = 8) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    order = rng.permutation(len(labels))
    n_test = 360
    test_idx, train_idx = order[:n_test], order[n_test:]

    train_imgs, train_labels = list(images[train_idx]), list(labels[train_idx])
    origin = [f"digits:{i}" for i in train_idx]
    # leaks: copies of test images placed in train, exact and perturbed
    leak_test = rng.choice(n_test, size=n_leaks, replace=False)
    kinds = ["exact", "exact", "exact", "noise", "noise", "shift", "brightness", "brightness"][:n_leaks]
    leaks = []
    for t, kind in zip(leak_test, kinds):
        img = images[test_idx[t]].astype(np.float32)
        if kind == "noise":
            img = img + rng.normal(0, 12, img.shape)
        elif kind == "shift":
            img = np.roll(img, 1, axis=1)
        elif kind == "brightness":
            img = img * 0.85 + 10
        train_imgs.append(np.clip(img, 0, 255).round().astype(np.uint8))
        train_labels.append(int(labels[test_idx[t]]))
        origin.append(f"leak:test{t}")
        leaks.append({"test_index": int(t), "kind": kind})
    # shuffle so planted rows are not all at the end
    perm = rng.permutation(len(train_labels))
    train_imgs = [train_imgs[i] for i in perm]
    train_labels = np.array([train_labels[i] for i in perm])
    origin = [origin[i] for i in perm]
    pos = {int(old): new for new, old in enumerate(perm)}
    n_orig = len(train_idx)
    for j, leak in enumerate(leaks):
        leak["train_index"] = pos[n_orig + j]
    # flipped labels, never on leaked copies
    candidates = np.array([i for i in range(len(train_labels)) if not origin[i].startswith("leak")])
    n_flip = int(round(flip_fraction * len(train_labels)))
    flip = np.sort(rng.choice(candidates, size=n_flip, replace=False))
    true_labels = train_labels.copy()
    for i in flip:
        train_labels[i] = int(rng.choice([c for c in range(10) if c != true_labels[i]]))

    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, y) in enumerate(zip(train_imgs, train_labels)):
        rel = f"images/train_{i:04d}.png"
        Image.fromarray(img, mode="L").save(data / rel)
        rows.append(f"{rel},{int(y)}")
    (data / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    rows = []
    for t, i in enumerate(test_idx):
        rel = f"images/test_{t:04d}.png"
        Image.fromarray(images[i], mode="L").save(data / rel)
        rows.append(f"{rel},{int(labels[i])}")
    (data / "test.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    truth = {"flipped": [{"train_index": int(i), "given_label": int(train_labels[i]), "true_label": int(true_labels[i])}
                         for i in flip],
             "leaks": leaks, "n_train": len(train_labels), "n_test": n_test, "seed": seed}
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
