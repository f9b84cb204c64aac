"""Generated validation projects: the suite that defaults are tuned on and judged by.

None of these is a shipped sample. Each project is drawn from a generator (tabular
``make_classification`` with an MLP, 16×16 rendered shapes with a small CNN, the text sample's
generator at another seed), a size, a seed and a noise kind:

- ``uniform``: a fraction of the training labels flipped, each to a uniformly chosen other class;
- ``class-conditional``: the flips follow a fixed confusion (class c becomes class c+1 mod C), as
  a careless annotator confusing two similar classes would.

Test examples are also planted back into the training set as copies (exact, noise, a one-pixel
shift, brightness, a crop for images; exact and noise for tabular; the text generator's light
edits for text), with their correct labels. Everything planted is recorded in ``truth.json``,
which only the benchmark reads.

Two disjoint seed ranges: ``FIT_SEEDS`` are the projects that weights and thresholds may be
fitted on; ``EVAL_SEEDS`` are the projects the benchmark reports.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import record_training
from engine.storage.arrays import atomic_write_text

KINDS = ("tabular", "shapes", "text")
NOISE_KINDS = ("uniform", "class-conditional")
FIT_SEEDS = (101, 102, 103)
EVAL_SEEDS = (1, 2)
IMAGE_LEAK_KINDS = ("exact", "noise", "shift", "brightness", "crop")
TABULAR_LEAK_KINDS = ("exact", "noise")


@dataclasses.dataclass(frozen=True)
class SuiteProject:
    kind: str
    seed: int
    noise: str = "uniform"
    rate: float = 0.1
    n_train: int = 600
    n_leaks: int = 10

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.noise}-{int(round(self.rate * 100))}pct-n{self.n_train}-s{self.seed}"


def default_suite(seeds=EVAL_SEEDS, kinds=("tabular", "shapes")) -> list[SuiteProject]:
    """Every kind × noise kind × seed, with noise rates and sizes varied across seeds."""
    out = []
    for kind in kinds:
        for j, seed in enumerate(seeds):
            if kind == "text":
                out.append(SuiteProject("text", seed, "uniform", 0.06, 0, 8))
                continue
            for noise in NOISE_KINDS:
                rate = (0.08, 0.15, 0.05)[j % 3]
                n = (600, 900, 400)[j % 3] if kind == "tabular" else (500, 700, 400)[j % 3]
                out.append(SuiteProject(kind, seed, noise, rate, n))
    return out


# ----------------------------------------------------------------------------- labels
def noisy_labels(y: np.ndarray, rate: float, num_classes: int, noise: str, rng, exclude=()) -> tuple[np.ndarray, np.ndarray]:
    """(labels with ``round(rate · n)`` flipped, sorted flipped indices); ``exclude`` rows never flip."""
    y = np.asarray(y, np.int64)
    pool = np.setdiff1d(np.arange(len(y)), np.asarray(exclude, np.int64))
    if noise == "uniform":
        idx = rng.choice(pool, size=max(1, int(round(rate * len(y)))), replace=False)
        new = y.copy()
        new[idx] = (y[idx] + rng.integers(1, num_classes, len(idx))) % num_classes
    elif noise == "class-conditional":
        # half the classes are confused with their successor, at twice the rate, so the total matches
        src = rng.choice(num_classes, size=max(1, num_classes // 2), replace=False)
        cand = pool[np.isin(y[pool], src)]
        idx = rng.choice(cand, size=min(len(cand), max(1, int(round(rate * len(y))))), replace=False)
        new = y.copy()
        new[idx] = (y[idx] + 1) % num_classes
    else:
        raise ProponentError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, not {noise!r}")
    return new, np.sort(idx)


# ----------------------------------------------------------------------------- generators
TABULAR_MODEL = '''from torch import nn


def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, num_classes))
'''
SHAPES_MODEL = '''from torch import nn


def build(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * (h // 4) * (w // 4), num_classes))
'''
RECIPE = ('[training]\noptimizer = "sgd"\nlr = {lr}\nmomentum = 0.9\nweight_decay = 0.0005\nepochs = {epochs}\n'
          'batch_size = 32\nseed = 0\ncheckpoints_per_epoch = 1\n')
SHAPES = ("circle", "square", "triangle", "cross", "bar")


def _toml(name: str, data: str, recipe: str) -> str:
    return (f'[project]\nname = "{name}"\ntask = "classification"\n\n[data]\n{data}\n'
            '[model]\nfactory = "model.py:build"\ncheckpoints = "checkpoints"\n\n' + recipe)


def _render_shape(kind: int, rng, size: int = 16) -> np.ndarray:
    from PIL import Image, ImageDraw

    s = 4 * size  # drawn large, then downsampled: anti-aliased edges
    img = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * s
    cx, cy = rng.uniform(r + 2, s - r - 2, 2)
    ink = int(rng.uniform(150, 255))
    width = max(2, int(rng.uniform(0.05, 0.12) * s))
    fill = rng.random() < 0.5
    name = SHAPES[kind]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink if fill else None, outline=ink, width=width)
    elif name == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=ink if fill else None, outline=ink, width=width)
    elif name == "triangle":
        pts = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
        d.polygon(pts, fill=ink if fill else None, outline=ink, width=width)
    elif name == "cross":
        d.line([cx - r, cy, cx + r, cy], fill=ink, width=2 * width)
        d.line([cx, cy - r, cx, cy + r], fill=ink, width=2 * width)
    else:  # bar: a thick stroke at a random angle
        a = rng.uniform(0, np.pi)
        dx, dy = r * np.cos(a), r * np.sin(a)
        d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=ink, width=3 * width)
    x = np.asarray(img.resize((size, size), Image.BILINEAR), np.float64)
    x = x + rng.normal(0, 18, x.shape)  # sensor noise: natural near-twins are never pixel-equal
    return np.clip(x, 0, 255)


def perturb_image(x: np.ndarray, kind: str, rng) -> np.ndarray:
    """A near-copy of an image array [..., H, W] (0..255) of the given kind."""
    from PIL import Image

    x = np.asarray(x, np.float64)
    if kind == "noise":
        x = x + rng.normal(0, 12, x.shape)
    elif kind == "shift":
        x = np.roll(x, 1, axis=-1)
    elif kind == "brightness":
        x = x * 0.85 + 10
    elif kind == "crop":  # cut one pixel off every side and scale back up, channel by channel
        h, w = x.shape[-2:]
        planes = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, h, w)
        x = np.stack([np.asarray(Image.fromarray(c[1:-1, 1:-1]).resize((w, h), Image.BILINEAR), np.float64)
                      for c in planes]).reshape(x.shape)
    elif kind != "exact":
        raise ProponentError(f"unknown copy kind {kind!r}")
    return np.clip(x, 0, 255)


def _plant_order(n_train: int, n_leaks: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the original rows and of the planted copies in the shuffled training set."""
    perm = rng.permutation(n_train + n_leaks)
    pos = np.empty_like(perm)
    pos[perm] = np.arange(len(perm))
    return pos[:n_train], pos[n_train:]


def _write_tabular(spec: SuiteProject, root: Path, rng) -> dict:
    import pandas as pd
    from sklearn.datasets import make_classification

    classes = 4
    n_test = 200
    x, y = make_classification(n_samples=spec.n_train + n_test, n_features=12, n_informative=7, n_redundant=2,
                               n_classes=classes, n_clusters_per_class=2, class_sep=1.2, flip_y=0.0,
                               random_state=spec.seed)
    xtr, ytr, xte, yte = x[:spec.n_train], y[:spec.n_train], x[spec.n_train:], y[spec.n_train:]
    leak_test = rng.choice(n_test, size=spec.n_leaks, replace=False)
    kinds = [TABULAR_LEAK_KINDS[j % len(TABULAR_LEAK_KINDS)] for j in range(spec.n_leaks)]
    copies = xte[leak_test].copy()
    std = xtr.std(0)
    for j, k in enumerate(kinds):
        if k == "noise":
            copies[j] += rng.normal(0, 0.05, copies.shape[1]) * std
    orig_pos, leak_pos = _plant_order(spec.n_train, spec.n_leaks, rng)
    n = spec.n_train + spec.n_leaks
    X = np.empty((n, x.shape[1]))
    Y = np.empty(n, np.int64)
    X[orig_pos], Y[orig_pos] = xtr, ytr
    X[leak_pos], Y[leak_pos] = copies, yte[leak_test]
    noisy, flipped = noisy_labels(Y, spec.rate, classes, spec.noise, rng, exclude=leak_pos)
    cols = [f"x{j}" for j in range(x.shape[1])]
    names = np.array([f"c{c}" for c in range(classes)])
    pd.DataFrame(np.round(X, 6), columns=cols).assign(label=names[noisy]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(np.round(xte, 6), columns=cols).assign(label=names[yte]).to_csv(root / "test.csv", index=False)
    (root / "model.py").write_text(TABULAR_MODEL)
    (root / "project.toml").write_text(_toml(spec.name, 'format = "tabular"\ntrain = "train.csv"\ntest = "test.csv"\n'
                                             'label_column = "label"\n', RECIPE.format(lr=0.05, epochs=30)))
    return {"flipped": flipped, "true": Y, "noisy": noisy, "leaks": list(zip(leak_test, leak_pos, kinds)), "names": names}


def _write_shapes(spec: SuiteProject, root: Path, rng) -> dict:
    import pandas as pd
    from PIL import Image

    classes = len(SHAPES)
    n_test = 200
    y_all = rng.integers(0, classes, spec.n_train + n_test)
    imgs = np.stack([_render_shape(int(c), rng) for c in y_all])
    xtr, ytr, xte, yte = imgs[:spec.n_train], y_all[:spec.n_train], imgs[spec.n_train:], y_all[spec.n_train:]
    leak_test = rng.choice(n_test, size=spec.n_leaks, replace=False)
    kinds = [IMAGE_LEAK_KINDS[j % len(IMAGE_LEAK_KINDS)] for j in range(spec.n_leaks)]
    copies = np.stack([perturb_image(xte[t], k, rng) for t, k in zip(leak_test, kinds)])
    orig_pos, leak_pos = _plant_order(spec.n_train, spec.n_leaks, rng)
    n = spec.n_train + spec.n_leaks
    X = np.empty((n,) + xtr.shape[1:])
    Y = np.empty(n, np.int64)
    X[orig_pos], Y[orig_pos] = xtr, ytr
    X[leak_pos], Y[leak_pos] = copies, yte[leak_test]
    noisy, flipped = noisy_labels(Y, spec.rate, classes, spec.noise, rng, exclude=leak_pos)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = np.array(SHAPES)
    for split, arr, labels in (("train", X, noisy), ("test", xte, yte)):
        paths = []
        for i, a in enumerate(arr):
            rel = f"img/{split}_{i:05d}.png"
            Image.fromarray(np.round(a).astype(np.uint8), mode="L").save(root / rel)
            paths.append(rel)
        pd.DataFrame({"path": paths, "label": names[labels]}).to_csv(root / f"{split}.csv", index=False)
    (root / "model.py").write_text(SHAPES_MODEL)
    (root / "project.toml").write_text(_toml(spec.name, 'format = "images"\ntrain = "train.csv"\ntest = "test.csv"\n'
                                             'label_column = "label"\nimage_column = "path"\n',
                                             RECIPE.format(lr=0.05, epochs=15)))
    return {"flipped": flipped, "true": Y, "noisy": noisy, "leaks": list(zip(leak_test, leak_pos, kinds)), "names": names}


def make_suite_project(spec: SuiteProject, root: str | Path, *, train: bool = True, progress=None) -> Project:
    """Write (and train) one validation project under ``root``; returns it loaded. truth.json records
    what was planted."""
    root = Path(root)
    if spec.kind not in KINDS:
        raise ProponentError(f"suite kind must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    if (root / "project.toml").is_file() and (root / "truth.json").is_file():
        p = Project.load(root)
        if train and not p.checkpoints and p.has_recipe:
            record_training(p, progress=progress)
            p = Project.load(root)
        return p
    root.mkdir(parents=True, exist_ok=True)
    if spec.kind == "text":
        from engine.core.samples import prepare_sample

        # the text generator plants its own flips (uniform, 6%) and light-edit copies at this seed
        prepare_sample("text", root, train=train, progress=progress, seed=spec.seed)
        return Project.load(root)
    rng = np.random.default_rng(spec.seed)
    made = (_write_tabular if spec.kind == "tabular" else _write_shapes)(spec, root, rng)
    names = made["names"]
    truth = {"flipped": [{"train_index": int(i), "given": str(names[made["noisy"][i]]),
                          "true": str(names[made["true"][i]])} for i in made["flipped"]],
             "leaks": [{"test_index": int(t), "train_index": int(i), "kind": k} for t, i, k in made["leaks"]],
             "n_train": int(len(made["noisy"])), "suite": dataclasses.asdict(spec)}
    atomic_write_text(root / "truth.json", json.dumps(truth, indent=1))
    p = Project.load(root)
    if train:
        record_training(p, progress=progress)
        p = Project.load(root)
    return p
