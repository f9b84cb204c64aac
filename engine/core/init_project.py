"""``proponent init DIR``: inspect a data folder, write ``project.toml`` and a ``model.py`` template,
and say what was guessed.

What it recognises, in this order:

- an ImageFolder tree: ``DIR/train/<class>/*.png`` and a test split beside it (``test``, ``val``,
  ``valid`` or ``validation``);
- a table (CSV, Parquet or JSONL) for train and one for test (file names containing ``train``
  and ``test``/``val``, in DIR or DIR/data): a column of image paths makes it an image project,
  a column of prose makes it text, anything else is tabular (non-numeric columns become
  ``categorical_columns``).

The label column is the first of label/labels/target/class/y/category, else the last column.
Weight files found in DIR, DIR/weights or DIR/models are listed in ``[model] weights``;
without any, a ``[training]`` recipe is written so ``proponent train`` can make them. Nothing
is overwritten without ``force``; both files are written atomically, only after inspection
succeeded.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from engine.core.checkpoints import WEIGHT_SUFFIXES
from engine.core.data import (
    IMAGE_EXTENSIONS,
    TABLE_SUFFIXES,
    read_table,
    resolve_image_path,
    scan_image_folder,
)
from engine.core.errors import ProponentError, ValidationError
from engine.storage.arrays import atomic_write_text

TEST_SPLITS = ("test", "val", "valid", "validation")
LABEL_NAMES = ("label", "labels", "target", "class", "y", "category")
WEIGHT_DIRS = (".", "weights", "models")
TEXT_MIN_MEAN_CHARS = 20  # a string column averaging this many characters, with spaces, is prose


@dataclass
class InitResult:
    root: Path
    guessed: dict = field(default_factory=dict)  # what went into [data] / [model]
    report: list[str] = field(default_factory=list)  # the lines `proponent init` prints
    written: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- inspection
def _image_folder(root: Path) -> dict | None:
    train = root / "train"
    test = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        return None
    subdirs = [e for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")]
    if not subdirs or not any(f.lower().endswith(IMAGE_EXTENSIONS) for d in subdirs for f in os.listdir(d.path)):
        return None
    classes, train_samples, skipped = scan_image_folder(train)
    _, test_samples, skipped_test = scan_image_folder(test, classes)
    facts = {"format": "image_folder", "train": "train", "test": test.name}
    facts.update(_image_facts([p for p, _ in train_samples]))
    notes = [f"ImageFolder tree: {len(classes)} classes ({_short(classes)}), {len(train_samples)} training and "
             f"{len(test_samples)} test images; rows in (class folder, file name) order, as torchvision's ImageFolder"]
    if skipped or skipped_test:
        first, why = (skipped + skipped_test)[0]
        notes.append(f"{len(skipped) + len(skipped_test)} file(s) will be skipped, e.g. "
                     f"{first.relative_to(root)} ({why})")
    return {"data": facts, "notes": notes, "num_classes": len(classes)}


def _image_facts(paths: list[Path], limit: int = 200) -> dict:
    """The image size and mode to write: the most common size among (up to ``limit``) files;
    ``resize`` when they differ."""
    from PIL import Image  # heavy optional import kept local to image projects

    sizes, modes = Counter(), Counter()
    for p in paths[:limit]:
        try:
            with Image.open(p) as im:
                sizes[(im.height, im.width)] += 1
                modes["grey" if im.mode in ("1", "L", "I", "I;16", "F", "LA") else "rgb"] += 1
        except OSError:
            continue
    out: dict = {}
    if modes:
        out["mode"] = modes.most_common(1)[0][0]
    if len(sizes) > 1:
        out["resize"] = list(sizes.most_common(1)[0][0])
    out["_size"] = sizes.most_common(1)[0][0] if sizes else None
    return out


def _table_files(root: Path) -> tuple[Path, Path] | None:
    for folder in (root, root / "data"):
        if not folder.is_dir():
            continue
        tables = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES
                        and not p.name.startswith(".") and p.name not in ("manifest.json", "truth.json"))
        train = [p for p in tables if "train" in p.stem.lower()]
        test = [p for p in tables if any(s in p.stem.lower() for s in TEST_SPLITS) and p not in train]
        if train and test:
            return train[0], test[0]
        if tables:
            raise ProponentError(f"found {', '.join(p.name for p in tables)} but need one table for train and one for "
                                 f"test, with 'train' and 'test' (or 'val') in their names", file=str(folder))
    return None


def _label_column(df: pd.DataFrame) -> str:
    lower = {c.lower(): c for c in df.columns}
    for name in LABEL_NAMES:
        if name in lower:
            return lower[name]
    return str(df.columns[-1])


def _is_image_column(s: pd.Series) -> bool:
    v = s.dropna()
    return len(v) > 0 and v.map(lambda t: isinstance(t, str) and t.lower().endswith(IMAGE_EXTENSIONS)).mean() > 0.9


def _is_text_column(s: pd.Series) -> bool:
    v = s.dropna()
    if len(v) == 0 or not all(isinstance(t, str) for t in v):
        return False
    return v.str.len().mean() >= TEXT_MIN_MEAN_CHARS and v.str.contains(" ").mean() > 0.5


def _table(root: Path, train: Path, test: Path) -> dict:
    probe = read_table(train, _label_column(_peek(train)))
    label = _label_column(probe)
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    facts = {"train": rel(train), "test": rel(test), "label_column": label}
    others = [c for c in probe.columns if c != label]
    image_col = next((c for c in others if _is_image_column(probe[c])), None)
    text_col = next((c for c in others if _is_text_column(probe[c])), None)
    n_classes = probe[label].nunique()
    if image_col is not None:
        facts.update(format="images", image_column=image_col)
        paths = [resolve_image_path(str(v), train, root, None, r) for r, v in enumerate(probe[image_col].head(200))]
        facts.update(_image_facts(paths))
        notes = [f"image CSV: paths in column {image_col!r}, labels in {label!r} ({n_classes} classes), "
                 f"{len(probe)} training rows"]
    elif text_col is not None:
        facts.update(format="text", text_column=text_col)
        notes = [f"text table: text in column {text_col!r} (mean {probe[text_col].str.len().mean():.0f} characters), "
                 f"labels in {label!r} ({n_classes} classes), {len(probe)} training rows"]
    else:
        facts["format"] = "tabular"
        numeric = [c for c in others if pd.api.types.is_numeric_dtype(probe[c])]
        cats = [c for c in others if c not in numeric]
        if cats:
            facts["categorical_columns"] = cats
        notes = [f"table: {len(numeric)} numeric feature column(s)"
                 + (f", {len(cats)} categorical ({_short(cats)}, one-hot with the training categories)" if cats else "")
                 + f"; labels in {label!r} ({n_classes} classes), {len(probe)} training rows"]
    return {"data": facts, "notes": notes, "num_classes": n_classes}


def _peek(path: Path) -> pd.DataFrame:
    kind = TABLE_SUFFIXES.get(path.suffix.lower(), "csv")
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, nrows=50)
        return pd.read_csv(path, nrows=50)
    except Exception as e:  # pandas/pyarrow raise many types; the user needs one line
        raise ValidationError(f"cannot parse: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                              file=str(path)) from None


def _weights(root: Path) -> list[str]:
    found = []
    for d in WEIGHT_DIRS:
        folder = root / d
        if folder.is_dir():
            found += sorted(p.relative_to(root).as_posix() for p in folder.iterdir()
                            if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return found


def _short(items: list, n: int = 5) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", … ({len(items)} in all)" if len(items) > n else "")


def inspect_folder(root: str | Path) -> dict:
    """What ``init`` would write for ``root``: {"data": [data] keys, "weights": [...], "notes": [...],
    "num_classes"}. One-line error when nothing usable is found."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ProponentError("folder not found", file=str(root))
    found = _image_folder(root)
    if found is None:
        files = _table_files(root)
        if files is None:
            raise ProponentError("nothing to make a project from: expected train/ and test/ folders with one "
                                 "sub-folder per class, or train and test tables (CSV, Parquet, JSONL)", file=str(root))
        found = _table(root, *files)
    found["weights"] = _weights(root)
    return found


# ----------------------------------------------------------------------------- writing
def _toml_value(v) -> str:
    if isinstance(v, str):
        # JSON's string escapes are TOML's basic-string escapes (\n, \t, \uXXXX for other control
        # characters); DEL is the one character TOML also refuses raw
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def project_toml(name: str, found: dict) -> str:
    data = {k: v for k, v in found["data"].items() if not k.startswith("_")}
    lines = ["# written by `proponent init`; check every guess, then run `proponent info .`", "[project]",
             f"name = {_toml_value(name)}", 'task = "classification"', "", "[data]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items()]
    if data["format"] in ("images", "image_folder"):
        lines.append("# preprocessing must match how the model was trained, e.g.")
        if "resize" not in data:
            lines.append("# resize = [224, 224]")
        lines.append("# normalize = {mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]}")
    lines += ["", "[model]", 'factory = "model.py:build"']
    if found["weights"]:
        lines.append(f"weights = {_toml_value(found['weights'])}   # one file per independently trained model")
    else:
        lines.append('# weights = ["model.safetensors"]   # your trained weights; without them: proponent train')
    lines.append('# attribute = ["head.*"]   # attribute only these parameters (globs); default: all trainable')
    if found["weights"]:
        lines += ["", "# No [training]: train, LDS, Verify and what-if retraining need a recipe, e.g.",
                  "# [training]", '# optimizer = "sgd"', "# lr = 0.05", "# epochs = 20", "# batch_size = 64"]
    else:
        lines += ["", "[training]   # how `proponent train` trains (and LDS/Verify retrain) the model",
                  'optimizer = "sgd"', "lr = 0.05", "momentum = 0.9", "weight_decay = 0.0005", "epochs = 20",
                  "batch_size = 64", "seed = 0"]
    return "\n".join(lines) + "\n"


IMAGE_MODEL = '''"""Model template written by `proponent init`: replace it with your own architecture.

Proponent calls build(input_shape, num_classes) -> torch.nn.Module, with input_shape =
(channels, height, width) after [data] preprocessing. To load weights you trained elsewhere,
build exactly the module you trained: the parameter names and shapes must match the file.
"""
from torch import nn


def build(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))
'''

TABULAR_MODEL = '''"""Model template written by `proponent init`: replace it with your own architecture.

Proponent calls build(input_shape, num_classes) -> torch.nn.Module, with input_shape = (features,)
after standardisation (and one-hot encoding of categorical_columns). To load weights you trained
elsewhere, build exactly the module you trained.
"""
from torch import nn


def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 64), nn.ReLU(), nn.Linear(64, num_classes))
'''

TEXT_MODEL = '''"""Model template written by `proponent init`: replace it with your own tokenizer and model.

Proponent calls tokenize(texts) -> dict of tensors (one row per text, every row the same length)
and build(num_classes) -> torch.nn.Module, whose forward takes that dict. This template needs no
download: words are hashed into VOCAB ids and averaged by an embedding bag. For a pretrained
encoder, tokenize with its tokenizer and wrap it with a classification head (see
sample_projects/text/model.py), and set [model] attribute = ["head.*"] so only the head is tracked.
"""
import re
import zlib

import torch
from torch import nn

VOCAB = 2**15
MAX_TOKENS = 64


def tokenize(texts):
    ids = torch.zeros(len(texts), MAX_TOKENS, dtype=torch.long)
    mask = torch.zeros(len(texts), MAX_TOKENS, dtype=torch.long)
    for i, t in enumerate(texts):
        words = re.findall(r"\\w+", t.lower())[:MAX_TOKENS]
        for j, w in enumerate(words):
            ids[i, j] = 1 + zlib.crc32(w.encode()) % (VOCAB - 1)  # 0 is padding
            mask[i, j] = 1
    return {"input_ids": ids, "attention_mask": mask}


class BagOfWords(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64, padding_idx=0)
        self.head = nn.Linear(64, num_classes)

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def build(num_classes):
    return BagOfWords(num_classes)
'''


def model_template(fmt: str) -> str:
    return {"images": IMAGE_MODEL, "image_folder": IMAGE_MODEL, "tabular": TABULAR_MODEL, "text": TEXT_MODEL}[fmt]


def init_project(directory: str | Path, *, force: bool = False, name: str | None = None) -> InitResult:
    """Inspect ``directory``, write project.toml and model.py there, and report what was guessed."""
    root = Path(directory).expanduser().resolve()
    targets = [root / "project.toml", root / "model.py"]
    if not force:
        for t in targets:
            if t.exists():
                raise ProponentError("already exists; pass --force to overwrite it", file=str(t))
    found = inspect_folder(root)
    fmt = found["data"]["format"]
    res = InitResult(root=root, guessed={"data": {k: v for k, v in found["data"].items() if not k.startswith("_")},
                                         "weights": found["weights"]})
    atomic_write_text(targets[0], project_toml(name or root.name, found))
    atomic_write_text(targets[1], model_template(fmt))
    res.written = targets
    res.report.append(f"wrote {targets[0]} and {targets[1]} (a template: edit it to build your model)")
    res.report += [f"  {n}" for n in found["notes"]]
    d = found["data"]
    if d.get("_size"):
        h, w = d["_size"]
        res.report.append(f"  images: {h}×{w}, {d.get('mode', 'rgb')}"
                          + (f"; sizes differ, so resize = [{h}, {w}] (the most common)" if "resize" in d else ""))
    if found["weights"]:
        res.report.append(f"  weights: {', '.join(found['weights'])} (no [training]: final-weights methods run; "
                          f"retraining needs a recipe)")
    else:
        res.report.append("  weights: none found; add [model] weights = [\"...\"] or run `proponent train` "
                          "with the [training] recipe written")
    res.report.append(f"  next: check the guesses, then `proponent info {root}`")
    return res


__all__ = ["init_project", "inspect_folder", "project_toml", "model_template", "InitResult"]
