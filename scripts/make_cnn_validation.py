#!/usr/bin/env python
"""Write and train the held-out CNN validation projects behind docs/bench/lds-weight-decay.json.

Three projects the EK-FAC weight-decay rule was checked on after it was formed (on another one):

- ``rgb-adam-s23``: the 32×32 RGB generator of scripts/bench_gpu.py at seed 23, 1,500 training
  images, its BatchNorm CNN (94,762 parameters), Adam (lr 0.002, cosine, 14 epochs);
- ``rgb-bn-const-s29``: the same generator at seed 29, 1,000 images, SGD at a constant lr of 0.02;
- ``shapes-cnn-s9``: the validation suite's shapes generator at seed 9, 1,300 images, 5% uniform
  label noise, a 16/32-channel CNN without normalisation, SGD at a constant learning rate.

    python scripts/make_cnn_validation.py DIR          # DIR/<name> for each, trained
    python scripts/lds_variants.py DIR/<name> --subsets 24 --queries 64 '[["ekfac", {}], ...]'
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gpu  # noqa: E402
from engine import Project  # noqa: E402
from engine.core.train import accuracy, record_training  # noqa: E402
from engine.evaluate.suite import SuiteProject, make_suite_project  # noqa: E402

NO_NORM_CNN = '''from torch import nn


def build(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes))
'''


def edit_recipe(root: Path, *edits: tuple[str, str]) -> None:
    toml = (root / "project.toml").read_text()
    for old, new in edits:
        if old not in toml:
            raise SystemExit(f"{root / 'project.toml'}: expected {old!r} in the generated recipe")
        toml = toml.replace(old, new)
    (root / "project.toml").write_text(toml)


def make(name: str, root: Path) -> Path:
    if name == "rgb-adam-s23":
        bench_gpu.make_cnn_project(root, 1500, seed=23)
        edit_recipe(root, ('optimizer = "sgd"', 'optimizer = "adam"'), ("lr = 0.05", "lr = 0.002"),
                     ("momentum = 0.9\n", ""), ("epochs = 10", "epochs = 14"))
    elif name == "rgb-bn-const-s29":
        bench_gpu.make_cnn_project(root, 1000, seed=29)
        edit_recipe(root, ('lr_schedule = "cosine"\n', ""), ("lr = 0.05", "lr = 0.02"))
    elif name == "shapes-cnn-s9":
        make_suite_project(SuiteProject("shapes", 9, "uniform", 0.05, 1300), root, train=False)
        (root / "model.py").write_text(NO_NORM_CNN)
    else:
        raise SystemExit(f"unknown project {name!r}")
    return root


def make_and_train(folder: str, names: list[str], make) -> None:
    """``make(name, root)`` writes each project (one that exists is left as it is); then it is
    trained by its recipe and its size and test accuracy printed."""
    for name in names:
        root = Path(folder) / name
        if (root / "project.toml").exists():
            print(f"{root}: exists, left as it is")
            continue
        t0 = time.perf_counter()
        p = Project.load(make(name, root))
        record_training(p)
        p = Project.load(root)
        model = p.load_model(p.final_checkpoints()[0])
        print(f"{root}: {sum(q.numel() for q in model.parameters()):,} parameters, test accuracy "
              f"{accuracy(model, p.test_dataset.x, p.test_dataset.y):.3f}, {time.perf_counter() - t0:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--only", default="rgb-adam-s23,rgb-bn-const-s29,shapes-cnn-s9")
    a = ap.parse_args(argv)
    make_and_train(a.dir, a.only.split(","), make)
    return 0


if __name__ == "__main__":
    sys.exit(main())
