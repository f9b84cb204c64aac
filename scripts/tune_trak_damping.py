"""How TRAK's damping rule was chosen: LDS against the ratio on projects that are NOT the
digits evaluation set (synthetic tabular blobs with an MLP), so the default is not tuned on
the queries it is later judged on. Writes docs/bench/trak-damping.json.

    python scripts/tune_trak_damping.py
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Project, attribute  # noqa: E402
from engine.evaluate.groundtruth import random_subsets, retrain_margins  # noqa: E402
from engine.evaluate.lds import lds  # noqa: E402
from engine.core.train import record_training  # noqa: E402
from tests.conftest import write_tabular_project  # noqa: E402

MLP = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Linear(32, num_classes))
'''
RECIPE = 'optimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\nweight_decay = 0.0005\nepochs = 30\nbatch_size = 32\nseed = 0\ncheckpoints_per_epoch = 1\n'
RATIOS = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]


def main() -> int:
    rows = []
    for data_seed, n_train, d in ((11, 300, 10), (12, 500, 20)):
        root = write_tabular_project(Path(tempfile.mkdtemp()) / f"blobs{data_seed}", n_train=n_train, n_test=60, d=d,
                                     classes=4, seed=data_seed, model=MLP, training=RECIPE)
        p = Project.load(root)
        record_training(p, models=5)
        subsets = random_subsets(n_train, 40, 0.5, seed=1)
        margins = retrain_margins(p, subsets=subsets, seeds=[0, 1])
        n_params = sum(t.numel() for t in p.build_model().parameters())
        for ens in ("final", "models"):
            for r in RATIOS:
                S = attribute(p, "trak", settings={"ensemble": ens, "damping_ratio": r})
                res = lds(S, subsets, margins)
                rows.append([f"blobs n={n_train} d={d} ({n_params} params)", ens, r, round(res["lds"], 4),
                             round(res["noise_ceiling"], 4)])
                print(rows[-1], flush=True)
    doc = {"title": "TRAK damping rule: LDS against damping_ratio (validation projects, not digits)",
           "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, CPU only, 2 cores",
           "command": "python scripts/tune_trak_damping.py",
           "tables": [{"title": "LDS (M=40 subsets, α=0.5, 2 seeds) against λ = ratio × mean eigenvalue of ΦᵀΦ",
                       "columns": ["project", "ensemble", "damping_ratio", "LDS", "noise ceiling"],
                       "rows": rows, "notes": "final = 1 model; models = 5 independently trained models."}]}
    Path("docs/bench/trak-damping.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
