"""Broken projects, table-driven: every case ends in exit code 2 with one line naming the file,
row or key, no traceback, and nothing outside ``.proponent/`` changed.

Each case copies a small, trained, valid project, breaks it in one way, runs one CLI command
in-process, and compares a hash of the project tree before and after.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import Project
from engine.cli import main as cli
from engine.core.train import record_training

MLP = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(__import__("math").prod(input_shape)), 8), nn.Tanh(),
                         nn.Linear(8, num_classes))
'''
RECIPE = ('[training]\noptimizer = "sgd"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.0\nepochs = 2\n'
          'batch_size = 16\nseed = 0\ncheckpoints_per_epoch = 1\n')


def _toml(data: str, model: str = 'factory = "model.py:build"\ncheckpoints = "checkpoints"\n',
          training: str = RECIPE, project: str = 'name = "broken"\ntask = "classification"\n') -> str:
    return f"[project]\n{project}\n[data]\n{data}\n[model]\n{model}\n{training}"


TAB_DATA = 'format = "tabular"\ntrain = "data/train.csv"\ntest = "data/test.csv"\nlabel_column = "label"\n'
IMG_DATA = 'format = "images"\ntrain = "data/train.csv"\ntest = "data/test.csv"\nlabel_column = "label"\nimage_column = "path"\n'


def _write_tabular(root: Path, n_train=48, n_test=12, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % 3
        x = rng.normal(0, 1, (n, 4)) + y[:, None]
        lines = ["f0,f1,f2,f3,label"] + [",".join(f"{v:.5f}" for v in r) + f",{c}" for r, c in zip(x, y)]
        (root / "data" / f"{name}.csv").write_text("\n".join(lines) + "\n")
    (root / "model.py").write_text(MLP)
    (root / "project.toml").write_text(_toml(TAB_DATA))
    return root


def _write_images(root: Path, n_train=24, n_test=6) -> Path:
    rng = np.random.default_rng(1)
    (root / "data" / "img").mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        rows = ["path,label"]
        for i in range(n):
            c = i % 2
            arr = (rng.random((8, 8)) * 80 + 120 * c).astype(np.uint8)
            rel = f"img/{name}_{i}.png"
            Image.fromarray(arr).save(root / "data" / rel)
            rows.append(f"{rel},{c}")
        (root / "data" / f"{name}.csv").write_text("\n".join(rows) + "\n")
    (root / "model.py").write_text(MLP)
    (root / "project.toml").write_text(_toml(IMG_DATA))
    return root


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for kind, writer in (("tab", _write_tabular), ("img", _write_images)):
        root = writer(tmp_path_factory.mktemp(kind) / "p")
        record_training(Project.load(root))
        out[kind] = root
    return out


def tree_hash(root: Path) -> str:
    """Every path and byte outside .proponent/ (and outside the project: the sibling 'elsewhere')."""
    h = hashlib.sha256()
    for p in sorted(root.parent.rglob("*")):
        rel = p.relative_to(root.parent)
        if rel.parts and (rel.parts[0] != root.name and rel.parts[0] != "elsewhere"):
            continue
        if ".proponent" in rel.parts:
            continue
        h.update(str(rel).encode())
        if p.is_file() and not p.is_symlink():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------- mutations
def edit_toml(old: str, new: str) -> Callable[[Path], None]:
    def f(root: Path):
        t = (root / "project.toml").read_text()
        assert old in t, old
        (root / "project.toml").write_text(t.replace(old, new, 1))
    return f


def set_training(line: str) -> Callable[[Path], None]:
    def f(root: Path):
        t = (root / "project.toml").read_text()
        key = line.split("=")[0].strip()
        lines = [ln for ln in t.splitlines() if not ln.startswith(key + " ")]
        i = lines.index("[training]")
        lines.insert(i + 1, line)
        (root / "project.toml").write_text("\n".join(lines) + "\n")
    return f


def write_file(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def f(root: Path):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f


def remove(rel: str) -> Callable[[Path], None]:
    def f(root: Path):
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f


def csv_edit(rel: str, fn: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    def f(root: Path):
        p = root / rel
        p.write_text("\n".join(fn(p.read_text().splitlines())) + "\n")
    return f


def cell(row: int, col: int, value: str):
    def fn(lines):
        parts = lines[row + 1].split(",")
        parts[col] = value
        lines[row + 1] = ",".join(parts)
        return lines
    return fn


def trajectory(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def f(root: Path):
        p = root / "checkpoints" / "trajectory.json"
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return f


def drop_step(log):
    del log["checkpoints"][0]["step"]
    return log


def pickled_weights(root: Path):
    torch.save({"w": torch.zeros(2), "evil": object()}, root / "w.pt")
    edit_toml('checkpoints = "checkpoints"', 'checkpoints = "ck2"\nweights = ["w.pt"]')(root)


def misfit_weights(root: Path):
    save_file({"0.weight": torch.zeros(3, 3)}, str(root / "w.safetensors"))
    edit_toml('checkpoints = "checkpoints"', 'checkpoints = "ck2"\nweights = ["w.safetensors"]')(root)


def outside_image(root: Path):
    other = root.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(other / "x.png")
    csv_edit("data/train.csv", cell(0, 0, str(other / "x.png")))(root)


def dotdot_image(root: Path):
    other = root.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(other / "y.png")
    csv_edit("data/train.csv", cell(1, 0, "../../elsewhere/y.png"))(root)


def linked_image(root: Path):
    """A row's image is a link (in the project's own image folder, beside the others) to a file elsewhere."""
    other = root.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(other / "z.png")
    (root / "data" / "img" / "train_2.png").unlink()
    (root / "data" / "img" / "train_2.png").symlink_to(other / "z.png")


def ragged_image(root: Path):
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "data" / "img" / "train_3.png")


def bomb_image(root: Path):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "data" / "img" / "train_2.png")


def empty_class_folder(root: Path):
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / "folders" / split / c
            d.mkdir(parents=True)
            if not (split == "train" and c == "b"):
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "0.png")
    edit_toml(IMG_DATA, 'format = "image_folder"\ntrain = "folders/train"\ntest = "folders/test"\n')(root)


def class_folder_only_in_test(root: Path):
    for split, classes in (("train", ("a", "b")), ("test", ("a", "b", "zebra"))):
        for c in classes:
            d = root / "folders" / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "0.png")
    edit_toml(IMG_DATA, 'format = "image_folder"\ntrain = "folders/train"\ntest = "folders/test"\n')(root)


def png_with_bad_crc(root: Path):
    data = bytearray((root / "data" / "img" / "train_5.png").read_bytes())
    data[-20] ^= 0xFF  # inside the IDAT payload
    (root / "data" / "img" / "train_5.png").write_bytes(bytes(data))


def no_param_model(root: Path):
    (root / "model.py").write_text("from torch import nn\nclass M(nn.Module):\n    def forward(self, x):\n"
                                   "        return x[:, :3]\ndef build(s, k):\n    return M()\n")


def big_batch_fails(root: Path):
    (root / "model.py").write_text(MLP + "\nclass Picky(__import__('torch').nn.Module):\n"
                                   "    def __init__(self, inner):\n        super().__init__(); self.inner = inner\n"
                                   "    def forward(self, x):\n        assert len(x) <= 2, 'batch too big'\n"
                                   "        return self.inner(x)\n_b = build\ndef build(s, k):\n    return Picky(_b(s, k))\n")


def shorten_train(root: Path):
    csv_edit("data/train.csv", lambda lines: lines[:-5])(root)


def weights_outside(root: Path):
    """A trajectory entry whose weights file lies outside the checkpoint folder (moved, then named by ../)."""
    other = root.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    log = json.loads((root / "checkpoints" / "trajectory.json").read_text())
    rel = log["checkpoints"][-1]["weights"]
    shutil.move(root / "checkpoints" / rel, other / "w.safetensors")
    log["checkpoints"][-1]["weights"] = "../../elsewhere/w.safetensors"
    (root / "checkpoints" / "trajectory.json").write_text(json.dumps(log))


def as_table(kind: str, edit_train: Callable[[list[dict]], list] | None = None) -> Callable[[Path], None]:
    """Both CSV splits rewritten as JSON Lines or Parquet (``edit_train``: changes the training records;
    a string record is written as that raw line) and project.toml pointed at them."""
    def f(root: Path):
        import pandas as pd
        for split in ("train", "test"):
            records = pd.read_csv(root / "data" / f"{split}.csv").to_dict("records")
            if split == "train" and edit_train:
                records = edit_train(records)
            if kind == "jsonl":
                (root / "data" / f"{split}.jsonl").write_text(
                    "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
            else:
                pd.DataFrame(records).to_parquet(root / "data" / f"{split}.parquet")
            (root / "data" / f"{split}.csv").unlink()
        edit_toml('train = "data/train.csv"\ntest = "data/test.csv"',
                  f'train = "data/train.{kind}"\ntest = "data/test.{kind}"')(root)
    return f


def set_record(i: int, **values) -> Callable[[list[dict]], list]:
    """Record ``i`` with ``values`` set (a value of ... removes the key)."""
    def fn(records):
        rec = {k: v for k, v in records[i].items() if values.get(k, 0) is not ...}
        records[i] = {**rec, **{k: v for k, v in values.items() if v is not ...}}
        return records
    return fn


def weights_file(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    """``[model] weights`` set to the recorded final weights, changed by ``fn``."""
    def f(root: Path):
        from safetensors.torch import load_file
        log = json.loads((root / "checkpoints" / "trajectory.json").read_text())
        state = load_file(str(root / "checkpoints" / log["checkpoints"][-1]["weights"]))
        save_file(fn(state), str(root / "w.safetensors"))
        edit_toml('checkpoints = "checkpoints"', 'checkpoints = "ck2"\nweights = ["w.safetensors"]')(root)
    return f


def not_utf8(root: Path):
    lines = (root / "data" / "train.csv").read_bytes().split(b"\n")
    lines[7] = lines[7][:-1] + b"\xe9"  # a Latin-1 "é" as the label's last byte, on line 8
    (root / "data" / "train.csv").write_bytes(b"\n".join(lines))


def rgb_among_grey(root: Path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "data" / "img" / "train_3.png")


def manifest_import(rows: str, name: str = "manifest.csv") -> Callable[[Path], None]:
    """A folder of the user's checkpoints (a copy of the recorded final one) with the manifest ``rows``."""
    def f(root: Path):
        src = root / "theirs"
        src.mkdir()
        log = json.loads((root / "checkpoints" / "trajectory.json").read_text())
        shutil.copy(root / "checkpoints" / log["checkpoints"][-1]["weights"], src / "a.safetensors")
        (src / name).write_text(rows)
    return f


T, I = "tab", "img"
IMPORT = ["import", "{p}", "--checkpoints", "{p}/theirs"]
INFO = ["info", "{p}"]
TRAIN = ["train", "{p}"]
TRAK = ["attribute", "{p}", "--method", "trak", "--no-cache"]

# (id, base, mutation, command, what the one line must name)
CASES = [
    ("no-toml", T, remove("project.toml"), INFO, "project.toml"),
    ("bad-toml", T, write_file("project.toml", "[data\nx=1"), INFO, "invalid TOML"),
    ("no-data-table", T, edit_toml("[data]\n" + TAB_DATA, ""), INFO, "[data] is required"),
    ("no-model-table", T, edit_toml("[model]\n", "[modell]\n"), INFO, "modell"),
    ("typo-table", T, edit_toml("[training]", "[trainng]"), INFO, "did you mean 'training'"),
    ("typo-data-key", T, edit_toml("label_column", "lable_column"), INFO, "did you mean 'label_column'"),
    ("typo-model-key", T, edit_toml('checkpoints = "checkpoints"', 'checkpoint = "checkpoints"'), INFO, "did you mean 'checkpoints'"),
    ("typo-training-key", T, set_training("lrr = 0.1"), INFO, "lrr"),
    ("lr-bool", T, set_training("lr = true"), INFO, "[training] lr"),
    ("lr-negative", T, set_training("lr = -0.1"), TRAIN, "[training] lr"),
    ("lr-zero", T, set_training("lr = 0"), TRAIN, "[training] lr"),
    ("lr-string", T, set_training('lr = "0.1"'), INFO, "[training] lr"),
    ("momentum-negative", T, set_training("momentum = -0.5"), INFO, "momentum"),
    ("momentum-one", T, set_training("momentum = 1.0"), INFO, "momentum"),
    ("epochs-zero", T, set_training("epochs = 0"), TRAIN, "epochs"),
    ("epochs-negative", T, set_training("epochs = -2"), TRAIN, "epochs"),
    ("epochs-fraction", T, set_training("epochs = 2.7"), TRAIN, "epochs"),
    ("batch-zero", T, set_training("batch_size = 0"), TRAIN, "batch_size"),
    ("batch-negative", T, set_training("batch_size = -8"), TRAIN, "batch_size"),
    ("optimizer-typo", T, set_training('optimizer = "sgdd"'), INFO, "optimizer"),
    ("weight-decay-negative", T, set_training("weight_decay = -1.0"), INFO, "weight_decay"),
    ("checkpoints-per-epoch-zero", T, set_training("checkpoints_per_epoch = 0"), INFO, "checkpoints_per_epoch"),
    ("schedule-unknown", T, set_training('lr_schedule = "exp"'), INFO, "lr_schedule"),
    ("seed-negative", T, set_training("seed = -1"), INFO, "seed"),
    ("stages-string", T, set_training('stages = "all"'), INFO, "stages"),
    ("stage-epochs-text", T, edit_toml("[training]", '[[training.stages]]\nepochs = "two"\n[training]'), INFO, "epochs"),
    ("training-string", T, lambda r: (edit_toml(RECIPE, "")(r), write_file("project.toml", 'training = "fast"\n' + (r / "project.toml").read_text())(r)), INFO, "[training] must be a table"),
    ("train-number", T, edit_toml('train = "data/train.csv"', "train = 5"), INFO, "[data] train"),
    ("format-unknown", T, edit_toml('format = "tabular"', 'format = "imgs"'), INFO, "format"),
    ("task-unknown", T, edit_toml('task = "classification"', 'task = "regression"'), INFO, "task"),
    ("checkpoints-root", T, edit_toml('checkpoints = "checkpoints"', 'checkpoints = "."'), TRAIN, "project folder"),
    ("checkpoints-empty", T, edit_toml('checkpoints = "checkpoints"', 'checkpoints = ""'), TRAIN, "checkpoints"),
    ("checkpoints-data", T, edit_toml('checkpoints = "checkpoints"', 'checkpoints = "data"'), TRAIN, "training data"),
    ("checkpoints-outside", T, edit_toml('checkpoints = "checkpoints"', 'checkpoints = "../elsewhere"'), TRAIN, "outside"),
    ("checkpoints-foreign", T, edit_toml('checkpoints = "checkpoints"', 'checkpoints = "mine"'), TRAIN, None),
    ("factory-outside", T, edit_toml('factory = "model.py:build"', 'factory = "../../elsewhere/model.py:build"'), INFO, "outside"),
    ("factory-missing", T, remove("model.py"), INFO, "model.py"),
    ("factory-no-function", T, edit_toml('factory = "model.py:build"', 'factory = "model.py:nope"'), INFO, "nope"),
    ("factory-exits-on-import", T, write_file("model.py", "import sys\nsys.exit(3)\n"), INFO, "called sys.exit(3)"),
    ("factory-exits-in-build", T, write_file("model.py", "import sys\ndef build(s, k):\n    sys.exit(0)\n"), INFO, "build((4,), 3) failed: it called sys.exit(0)"),
    ("factory-import-error", T, write_file("model.py", "import not_a_module_xyz\n"), INFO, "model.py"),
    ("model-wrong-classes", T, write_file("model.py", "from torch import nn\ndef build(s, k):\n    return nn.Linear(4, 7)\n"), INFO, "classes"),
    ("model-no-parameters", T, no_param_model, INFO, "no parameters"),
    ("model-returns-a-tuple", T, write_file("model.py", "from torch import nn\nclass Two(nn.Module):\n"
                                            "    def __init__(self):\n        super().__init__()\n"
                                            "        self.fc = nn.Linear(4, 3)\n"
                                            "    def forward(self, x):\n        return self.fc(x), x\n"
                                            "def build(s, k):\n    return Two()\n"), INFO,
     "model forward returned a tuple (Tensor[2, 3], Tensor[2, 4]), not a logits tensor"),
    ("model-fails-big-batch", T, big_batch_fails, INFO, "batch of"),
    ("weights-missing", T, edit_toml('checkpoints = "checkpoints"', 'checkpoints = "ck2"\nweights = ["nope.safetensors"]'), INFO, "nope.safetensors"),
    ("weights-pickled", T, pickled_weights, INFO, "w.pt"),
    ("weights-misfit", T, misfit_weights, INFO, "w.safetensors"),
    ("train-csv-missing", T, remove("data/train.csv"), INFO, "train.csv"),
    ("label-column-missing", T, edit_toml('label_column = "label"', 'label_column = "target"'), INFO, "target"),
    ("label-column-twice", T, csv_edit("data/train.csv", lambda ls: [ls[0].replace("f3", "label")] + ls[1:]), INFO, "appears twice"),
    ("feature-column-twice", T, csv_edit("data/train.csv", lambda ls: [ls[0].replace("f2", "f1")] + ls[1:]), INFO, "appears twice"),
    ("feature-nan", T, csv_edit("data/train.csv", cell(3, 1, "nan")), INFO, "row 3"),
    ("feature-text", T, csv_edit("data/train.csv", cell(4, 2, "abc")), INFO, "row 4"),
    ("label-empty", T, csv_edit("data/train.csv", cell(5, 4, "")), INFO, "row 5"),
    ("single-class", T, csv_edit("data/train.csv", lambda ls: [ls[0]] + [",".join(l.split(",")[:4] + ["1"]) for l in ls[1:]]), INFO, "single class"),
    ("test-class-unknown", T, csv_edit("data/test.csv", cell(0, 4, "9")), INFO, "in test but not in train"),
    ("train-no-rows", T, csv_edit("data/train.csv", lambda ls: ls[:1]), INFO, "no data rows"),
    ("feature-columns-missing", T, edit_toml('label_column = "label"', 'label_column = "label"\nfeature_columns = ["f0", "zz"]'), INFO, "zz"),
    ("feature-columns-repeated", T, edit_toml('label_column = "label"', 'label_column = "label"\nfeature_columns = ["f0", "f0"]'), INFO, "twice"),
    ("categorical-unseen", T, lambda r: (csv_edit("data/train.csv", lambda ls: [ls[0].replace("f3", "color")] + [",".join(l.split(",")[:3] + ["red" if i % 2 else "blue", l.split(",")[4]]) for i, l in enumerate(ls[1:])])(r),
                                         csv_edit("data/test.csv", lambda ls: [ls[0].replace("f3", "color")] + [",".join(l.split(",")[:3] + ["green", l.split(",")[4]]) for l in ls[1:]])(r),
                                         edit_toml('label_column = "label"', 'label_column = "label"\ncategorical_columns = ["color"]')(r)), INFO, "green"),
    ("parquet-corrupt", T, lambda r: (write_file("data/train.parquet", b"PAR1garbage")(r), edit_toml("data/train.csv", "data/train.parquet")(r)), INFO, "train.parquet"),
    ("trajectory-corrupt", T, write_file("checkpoints/trajectory.json", "{not json"), TRAK, "trajectory.json"),
    ("trajectory-list", T, write_file("checkpoints/trajectory.json", "[]"), TRAK, "trajectory.json"),
    ("trajectory-no-step", T, trajectory(drop_step), TRAK, "step"),
    ("train-shortened", T, shorten_train, ["attribute", "{p}", "--method", "source", "--no-cache"], "trajectory was recorded on"),
    ("checkpoint-weights-deleted", T, remove("checkpoints/model_0"), TRAK, "model_0"),
    ("set-unknown", T, lambda r: None, ["attribute", "{p}", "--method", "trak", "--set", "projction=none"], "did you mean 'projection'"),
    ("set-bad-bool", T, lambda r: None, ["attribute", "{p}", "--method", "forward-inf", "--set", "absolute=ture"], "absolute"),
    ("set-bad-int", T, lambda r: None, ["attribute", "{p}", "--method", "trak", "--set", "proj_dim=abc"], "proj_dim"),
    ("set-out-of-range", T, lambda r: None, ["attribute", "{p}", "--method", "trak", "--set", "damping_ratio=-3"], "damping_ratio"),
    ("method-unknown", T, lambda r: None, ["attribute", "{p}", "--method", "trakk"], "trakk"),
    ("attribute-glob-nothing", T, edit_toml('factory = "model.py:build"', 'factory = "model.py:build"\nattribute = ["head.*"]'), TRAK, "head.*"),
    ("set-without-equals", T, lambda r: None, ["attribute", "{p}", "--method", "trak", "--set", "proj_dim"], "NAME=VALUE"),
    ("image-absolute-outside", I, outside_image, INFO, "outside the project"),
    ("image-dotdot-outside", I, dotdot_image, INFO, "outside the project"),
    ("image-link-outside", I, linked_image, INFO, "outside the project"),
    ("image-corrupt", I, write_file("data/img/train_4.png", b"\x89PNG\r\n\x1a\nnot really"), INFO, "row 4"),
    ("image-bad-crc", I, png_with_bad_crc, INFO, "row 5"),
    ("image-missing", I, remove("data/img/train_6.png"), INFO, "row 6"),
    ("image-ragged", I, ragged_image, INFO, "row 3"),
    ("image-bomb", I, bomb_image, INFO, "decompression bomb"),
    ("image-root-outside", I, edit_toml('image_column = "path"', 'image_column = "path"\nimage_root = "../elsewhere"'), INFO, "outside"),
    ("image-column-missing", I, edit_toml('image_column = "path"', 'image_column = "file"'), INFO, "file"),
    ("image-empty-path", I, csv_edit("data/train.csv", cell(2, 0, "")), INFO, "row 2"),
    ("folder-empty-class", I, empty_class_folder, INFO, "no images"),
    ("folder-class-only-in-test", I, class_folder_only_in_test, INFO, "zebra"),
    ("resize-bad", I, edit_toml('image_column = "path"', 'image_column = "path"\nresize = [8]'), INFO, "resize"),
    ("categorical-is-the-label", T, edit_toml('label_column = "label"', 'label_column = "label"\ncategorical_columns = ["label"]'), INFO, "cannot also be a categorical column"),
    ("categorical-missing", T, edit_toml('label_column = "label"', 'label_column = "label"\ncategorical_columns = ["nope"]'), INFO, "categorical column 'nope' not found"),
    ("trajectory-weights-outside", T, weights_outside, TRAK, "is outside the checkpoint folder"),
    ("trajectory-lr-nan", T, write_file("checkpoints/trajectory.json", '{"checkpoints": [{"model_id": 0, "index": 0, "step": 3, "epoch": 1, "lr": NaN, "weights": "model_0/x.safetensors"}]}'), TRAK, "checkpoints.0.lr"),
    ("trajectory-lr-negative", T, trajectory(lambda log: {**log, "checkpoints": [{**c, "lr": -0.1} for c in log["checkpoints"]]}), TRAK, "checkpoints.0.lr"),
    ("import-step-negative", T, manifest_import("file,step,lr\na.safetensors,-5,0.05\n"), IMPORT, "step: -5 is negative"),
    ("import-step-infinite", T, manifest_import("file,step,lr\na.safetensors,inf,0.05\n"), IMPORT, "step: inf is not a finite number"),
    ("import-step-huge-json", T, manifest_import('[{"file": "a.safetensors", "step": 1e400, "lr": 0.05}]', "manifest.json"), IMPORT, "not a finite number"),
    ("import-step-fraction", T, manifest_import("file,step,lr\na.safetensors,2.5,0.05\n"), IMPORT, "not a whole number"),
    ("import-lr-negative", T, manifest_import("file,step,lr\na.safetensors,5,-0.05\n"), IMPORT, "lr: -0.05 is negative"),
    ("import-lr-text", T, manifest_import("file,step,lr\na.safetensors,5,fast\n"), IMPORT, "lr: 'fast' is not a number"),
    ("import-file-outside", T, manifest_import("file,step,lr\n../../elsewhere/a.safetensors,5,0.05\n"), IMPORT, "not a path inside"),
    ("normalize-mean-nan", I, edit_toml('image_column = "path"', 'image_column = "path"\nnormalize = { mean = [nan], std = [1.0] }'), INFO, "mean"),
    ("normalize-std-inf", I, edit_toml('image_column = "path"', 'image_column = "path"\nnormalize = { mean = [0.5], std = [inf] }'), INFO, "std"),
    ("resize-huge", I, edit_toml('image_column = "path"', 'image_column = "path"\nresize = [100000, 100000]'), INFO, "resize"),
    ("csv-not-utf8", T, not_utf8, INFO, "line 8: byte 0xe9 at column"),
    ("jsonl-bad-line", T, as_table("jsonl", lambda rs: rs[:5] + ["{broken"] + rs[6:]), INFO, "line 6: not valid JSON"),
    ("jsonl-not-an-object", T, as_table("jsonl", lambda rs: rs[:3] + ["[1, 2]"] + rs[4:]), INFO, "line 4: expected a JSON object"),
    ("jsonl-null-feature", T, as_table("jsonl", set_record(5, f1=None)), INFO, "row 5 (line 6): column 'f1': has no value"),
    ("jsonl-key-missing", T, as_table("jsonl", set_record(5, f1=...)), INFO, "row 5 (line 6): column 'f1': has no value"),
    ("jsonl-label-missing", T, as_table("jsonl", set_record(7, label=...)), INFO, "row 7 (line 8): empty label"),
    ("parquet-nan-feature", T, as_table("parquet", set_record(5, f1=float("nan"))), INFO, "train.parquet: row 5: column 'f1': has no value"),
    ("parquet-dates", T, as_table("parquet", lambda rs: [{**r, "f1": __import__("pandas").Timestamp("2024-01-01")} for r in rs]), INFO, "column 'f1' holds dates"),
    ("image-rgb-among-grey", I, rgb_among_grey, INFO, 'set [data] mode = "rgb"'),
    ("weights-integers", T, weights_file(lambda st: {k: v.to(torch.int32) for k, v in st.items()}), INFO, "holds int32 values but model.py builds float32"),
    ("weights-nan", T, weights_file(lambda st: {k: v.clone().fill_(float("nan")) if i == 1 else v for i, (k, v) in enumerate(st.items())}), INFO, "NaN or infinite"),
    ("weights-a-folder", T, lambda r: ((r / "w.safetensors").mkdir(), edit_toml('checkpoints = "checkpoints"', 'checkpoints = "ck2"\nweights = ["w.safetensors"]')(r)), INFO, "is a folder, not a weights file"),
    ("import-json-entry-has-no-line", T, manifest_import('[{"file": "a.safetensors", "step": 3, "lr": 0.05}, {"file": "a.safetensors", "step": -1, "lr": 0.05}]', "manifest.json"), IMPORT, "manifest.json: row 1: step: -1 is negative"),
    ("normalize-std-zero", I, edit_toml('image_column = "path"', 'image_column = "path"\nnormalize = { mean = [0.5], std = [0] }'), INFO, "std"),
]


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_project_is_one_line_and_changes_nothing(case, bases, tmp_path, capsys, monkeypatch):
    name, base, mutate, command, expected = case
    root = tmp_path / "p"
    shutil.copytree(bases[base], root, ignore=shutil.ignore_patterns(".proponent"))
    if name == "image-bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64×64 image is then 4× over: a "bomb"
    if name == "checkpoints-foreign":  # the user's own folder of files where checkpoints would go
        (root / "mine").mkdir()
        (root / "mine" / "notes.txt").write_text("my notes")
    mutate(root)
    before = tree_hash(root)
    capsys.readouterr()
    rc = cli([a.replace("{p}", str(root)) for a in command])
    err = capsys.readouterr().err.strip()
    assert rc == 2, (name, rc, err)
    assert "Traceback" not in err
    assert "\n" not in err and err.startswith("proponent: error: "), err
    if expected:
        assert expected in err, (name, err)
    assert tree_hash(root) == before, f"{name}: files outside .proponent/ changed"
    if (root / "mine").exists():
        assert (root / "mine" / "notes.txt").read_text() == "my notes"


def test_broken_project_in_a_real_process_exits_2_without_traceback(bases, tmp_path):
    """The same contract through the installed entry point, for one case."""
    import subprocess
    import sys

    root = tmp_path / "p"
    shutil.copytree(bases[T], root, ignore=shutil.ignore_patterns(".proponent"))
    set_training("epochs = 0")(root)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", str(root)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "epochs" in r.stderr
