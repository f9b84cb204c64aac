#!/usr/bin/env python
"""Flag precision and recall of the copy detector's input evidence on generated text projects.

How the text detector's default false-positive rate (engine.workflows.leaks.TEXT_DETECTOR_FPR) and its
choice of views were measured:

    python scripts/text_leak_validation.py --workdir /tmp/txtval --seeds 3-22 --fpr 0.001,0.005,0.01
    python scripts/text_leak_validation.py --workdir /tmp/txtval --seeds 23-42 --fpr 0.001,0.005,0.01

Each seed materialises the text sample's generator (no model is trained: the detector's input views
need none), which plants 8 copies of test sentences in train (4 exact, lower-cased, one word dropped,
one word doubled, period removed). A flag is right when its pair is the planted copy or one of that
copy's identical twins. Prints, per rate, pooled precision and recall, false flags per clean query,
and the one-word copies found.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.project import Project  # noqa: E402
from engine.core.samples import prepare_sample  # noqa: E402
from engine.workflows.leaks import detect_copies  # noqa: E402


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="3-22", help="a seed or an inclusive range, e.g. 3-22")
    ap.add_argument("--fpr", default="0.001,0.01", help="comma-separated false-positive rates")
    a = ap.parse_args(argv)
    projects = []
    for s in _seeds(a.seeds):
        root = Path(a.workdir) / f"text-s{s}"
        if not (root / "truth.json").is_file():
            prepare_sample("text", root, train=False, seed=s)
        projects.append((Project.load(root, check_model=False), json.loads((root / "truth.json").read_text())))
    for fpr in (float(f) for f in a.fpr.split(",")):
        tp = fp = clean = 0
        kinds: dict[str, list[bool]] = {}
        for p, truth in projects:
            leaks = {lk["test_index"]: lk for lk in truth["leaks"]}
            det = detect_copies(p, method=None, fpr=fpr)
            for pair in det["pairs"]:
                lk = leaks.get(pair["test_index"])
                right = lk is not None and lk["train_index"] in [pair["train_index"], *pair["identical_train"]]
                clean += lk is None
                if pair["flagged"]:
                    tp += right
                    fp += not right
                if lk is not None:
                    kinds.setdefault(lk["kind"], []).append(pair["flagged"] and right)
        planted = sum(len(v) for v in kinds.values())
        one_word = {k: f"{sum(v)}/{len(v)}" for k, v in kinds.items() if k in ("drop_word", "double_word")}
        print(f"fpr {fpr:g}: projects {len(projects)} precision {tp / max(tp + fp, 1):.3f} recall {tp / planted:.3f} "
              f"false flags {fp} ({fp / max(clean, 1):.2%} of {clean} clean queries) one-word copies {one_word}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
