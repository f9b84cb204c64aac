"""Shared fixtures: small ready projects made in temporary folders (never the repo's samples)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PROPONENT_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _main_module_kept():
    """Streamlit's script runner (AppTest) installs the page it runs as ``sys.modules["__main__"]`` and
    leaves it there; a process that later test spawns would re-run that page as its ``__main__`` and
    die (AppTest.from_function's page cannot run outside AppTest). Each test gets the real one back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def digits_project(tmp_path_factory):
    """The digits sample, data + one recorded model (15 checkpoints). Read-only for tests:
    copy it (``copy_project``) before changing anything."""
    from engine.core.samples import prepare_sample

    root = tmp_path_factory.mktemp("digits")
    prepare_sample("digits", root / "digits", train=True, models=1)
    from engine import Project

    return Project.load(root / "digits")


@pytest.fixture(scope="session")
def digits_ensemble_project(tmp_path_factory):
    """The digits sample with 3 independently trained models."""
    from engine.core.samples import prepare_sample

    root = tmp_path_factory.mktemp("digits3")
    prepare_sample("digits", root / "digits", train=True, models=3)
    from engine import Project

    return Project.load(root / "digits")


@pytest.fixture
def copy_project(tmp_path):
    """Copy a project folder (without its .proponent state) into a fresh temporary folder."""
    def _copy(project, name="copy"):
        from engine import Project

        dest = tmp_path / name
        shutil.copytree(project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
        return Project.load(dest)
    return _copy


LINEAR_MODEL = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes)
'''

MLP_MODEL = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.Tanh(), nn.Linear(16, num_classes))
'''


def write_tabular_project(root: Path, *, n_train: int = 80, n_test: int = 20, d: int = 5, classes: int = 3,
                          seed: int = 0, model: str = LINEAR_MODEL, training: str | None = None,
                          spread: float = 1.5) -> Path:
    """A small tabular project (Gaussian blobs). Default recipe: full-batch L-BFGS with weight
    decay, i.e. a convex model trained to convergence, so retraining is exact ground truth."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, (classes, d))
    n = n_train + n_test
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(0, 1.0, (n, d))
    root.mkdir(parents=True, exist_ok=True)
    cols = [f"f{j}" for j in range(d)]
    for name, sl in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
        lines = [",".join(cols + ["label"])]
        lines += [",".join(f"{v:.6f}" for v in row) + f",{lab}" for row, lab in zip(x[sl], y[sl])]
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    (root / "model.py").write_text(model)
    training = training or 'optimizer = "lbfgs"\nweight_decay = 0.01\nepochs = 20\nseed = 0\n'
    (root / "project.toml").write_text(
        '[project]\nname = "tab"\ntask = "classification"\n\n[data]\nformat = "tabular"\ntrain = "train.csv"\n'
        'test = "test.csv"\nlabel_column = "label"\n\n[model]\nfactory = "model.py:build"\ncheckpoints = "checkpoints"\n\n'
        f'[training]\n{training}')
    return root


@pytest.fixture(scope="session")
def logreg_project(tmp_path_factory):
    """Multinomial logistic regression on 80 tabular points, trained to convergence (L-BFGS)."""
    from engine import Project
    from engine.core.train import record_training

    root = write_tabular_project(tmp_path_factory.mktemp("logreg") / "logreg")
    p = Project.load(root)
    record_training(p)
    return p
