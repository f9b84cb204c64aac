"""Materialise the wine sample: scikit-learn's wine recognition data (178 wines, 13 chemical
measurements, 3 cultivars) as train/test CSVs. The data is left clean: the benchmark plants its
own label flips and leaks in temporary copies."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def materialise(root: Path, *, seed: int = 0, n_test: int = 40) -> dict:
    from sklearn.datasets import load_wine

    ds = load_wine()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds.target))
    test_idx, train_idx = order[:n_test], order[n_test:]
    cols = [c.replace("/", "_").replace(" ", "_") for c in ds.feature_names]
    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        lines = [",".join(cols + ["label"])]
        lines += [",".join(f"{v:.6g}" for v in ds.data[i]) + f",{int(ds.target[i])}" for i in idx]
        (data / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return {"n_train": len(train_idx), "n_test": len(test_idx)}
