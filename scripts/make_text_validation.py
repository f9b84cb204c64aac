#!/usr/bin/env python
"""Write and train the held-out text projects behind docs/bench/lds-projection-text-*.json.

A user's own text, as `proponent init` sees it: a CSV of sentences and topics, and the model
template init writes for text (a 2^15 × 64 embedding table, mean-pooled, and a Linear head: 2.1M
parameters, every one tracked), trained by `proponent train` with the recipe init writes. The
sentences are made of pseudo-words (another generator than the text sample's docstrings): each
topic draws about 18% of its words from its own 150-word Zipf list, the rest from a 4,000-word
Zipf background, and 30% of sentences borrow one or two words of the next topic; 5% of the
training labels are flipped (recorded in truth.json).

- ``bow3000``: 3,000 training and 400 test sentences, 8 topics, generator seed 5, init's recipe;
- ``bow2000s7``: 2,000 and 300 sentences, generator seed 7, 15 epochs at lr 0.1.

    python scripts/make_text_validation.py DIR          # DIR/<name> for each, trained
    python scripts/lds_variants.py DIR/bow3000 --subsets 24 --queries 100 --cold '[["trak", {}], ...]'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from engine.core.init_project import init_project  # noqa: E402
from make_cnn_validation import edit_recipe, make_and_train  # noqa: E402

PROJECTS = {"bow3000": (3000, 400, 5, ()),
            "bow2000s7": (2000, 300, 7, (("epochs = 20", "epochs = 15"), ("lr = 0.05", "lr = 0.1")))}


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(int(rng.integers(2, 5)))))
    return sorted(out)


def write_topics(root: Path, n_train: int, n_test: int, seed: int, topics: int = 8) -> None:
    rng = np.random.default_rng(seed)
    vocab = _pseudo_words(rng, 6000)
    rng.shuffle(vocab)
    background = vocab[:4000]
    own = [vocab[4000 + i * 150:4000 + (i + 1) * 150] for i in range(topics)]
    zb = 1 / np.arange(1, len(background) + 1) ** 1.05
    zb /= zb.sum()
    zt = 1 / np.arange(1, 151) ** 0.9
    zt /= zt.sum()

    def sentence(t: int) -> str:
        n_words = int(rng.integers(6, 40))
        n_topic = int(rng.binomial(n_words, 0.18))
        words = list(rng.choice(background, n_words - n_topic, p=zb)) + list(rng.choice(own[t], n_topic, p=zt))
        if rng.random() < 0.3:  # a neighbouring topic's words: confusable pairs
            words += list(rng.choice(own[(t + 1) % topics], int(rng.integers(1, 3)), p=zt))
        rng.shuffle(words)
        return " ".join(words).capitalize() + "."

    def rows(n: int):
        y = rng.integers(0, topics, n)
        return [sentence(t) for t in y], y

    root.mkdir(parents=True, exist_ok=True)
    x_train, y_train = rows(n_train)
    x_test, y_test = rows(n_test)
    noisy = y_train.copy()
    flip = rng.random(n_train) < 0.05
    noisy[flip] = (y_train[flip] + rng.integers(1, topics, int(flip.sum()))) % topics
    names = [f"topic{i}" for i in range(topics)]
    pd.DataFrame({"text": x_train, "label": [names[i] for i in noisy]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"text": x_test, "label": [names[i] for i in y_test]}).to_csv(root / "test.csv", index=False)
    # the flipped labels, as the validation suite records them (no method reads truth.json)
    truth = {"flipped": [{"train_index": int(i), "given": names[noisy[i]], "true": names[y_train[i]]}
                         for i in np.flatnonzero(flip)], "leaks": [], "n_train": int(n_train)}
    (root / "truth.json").write_text(json.dumps(truth, indent=1))


def make(name: str, root: Path) -> Path:
    if name not in PROJECTS:
        raise SystemExit(f"unknown project {name!r} (known: {', '.join(PROJECTS)})")
    n_train, n_test, seed, edits = PROJECTS[name]
    write_topics(root, n_train, n_test, seed)
    init_project(root)
    edit_recipe(root, *edits)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--only", default=",".join(PROJECTS))
    a = ap.parse_args(argv)
    make_and_train(a.dir, a.only.split(","), make)
    return 0


if __name__ == "__main__":
    sys.exit(main())
