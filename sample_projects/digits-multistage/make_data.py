"""Materialise the multi-stage digits sample: pre-train on upright 8×8 digits, fine-tune on
digits tilted by 10-20 degrees; the test set comes from the fine-tuning domain.

The training CSV has a `part` column (pretrain | finetune) that the recipe's stages select on.
No planted problems: truth.json only records the split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_TEST = 360
N_FINETUNE = 437


def _transform(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import rotate

    angle = rng.uniform(10, 20)  # a consistent tilt: a domain shift that fine-tuning can learn
    out = rotate(img.astype(np.float32), angle, reshape=False, order=1, mode="constant")
    return np.clip(out, 0, 255)


def materialise(root: Path, *, seed: int = 0) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().clip(0, 255).astype(np.float32)
    labels = digits.target.astype(int)
    order = rng.permutation(len(labels))
    test_idx = order[:N_TEST]
    fine_idx = order[N_TEST:N_TEST + N_FINETUNE]
    pre_idx = order[N_TEST + N_FINETUNE:]
    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    train = [(i, "pretrain", images[i]) for i in pre_idx] + [(i, "finetune", _transform(images[i], rng)) for i in fine_idx]
    perm = rng.permutation(len(train))
    for r, j in enumerate(perm):
        i, part, img = train[j]
        rel = f"images/train_{r:04d}.png"
        Image.fromarray(img.round().astype(np.uint8), mode="L").save(data / rel)
        rows.append(f"{rel},{int(labels[i])},{part}")
    (data / "train.csv").write_text("path,label,part\n" + "\n".join(rows) + "\n")
    rows = []
    for t, i in enumerate(test_idx):
        rel = f"images/test_{t:04d}.png"
        Image.fromarray(_transform(images[i], rng).round().astype(np.uint8), mode="L").save(data / rel)
        rows.append(f"{rel},{int(labels[i])}")
    (data / "test.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    truth = {"n_train": len(train), "n_test": N_TEST, "n_pretrain": int(len(pre_idx)), "n_finetune": N_FINETUNE,
             "flipped": [], "leaks": [], "seed": seed}
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
