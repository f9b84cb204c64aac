"""`proponent init DIR`: inspect a folder, write project.toml and a model.py template, say what was guessed."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Project
from engine.cli import main as cli_main


def run_cli(capsys, *args):
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _png(path: Path, size=(8, 8), value=0, mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = size if mode == "L" else (*size, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


def test_init_image_folder_with_weights(tmp_path, capsys):
    root = tmp_path / "tree"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog", "fox"):
            for i in range(n):
                _png(root / split / c / f"{i}.png", size=(12, 10) if i == 0 and c == "cat" else (10, 10), value=i)
    (root / "train" / "dog" / "readme.txt").write_text("x")
    (root / "weights").mkdir()
    (root / "weights" / "final.safetensors").write_bytes(b"")
    code, out, err = run_cli(capsys, "init", root)
    assert code == 0, err
    spec = tomllib.loads((root / "project.toml").read_text())
    assert spec["data"] == {"format": "image_folder", "train": "train", "test": "val", "mode": "grey", "resize": [10, 10]}
    assert spec["model"]["weights"] == ["weights/final.safetensors"] and "training" not in spec
    assert "3 classes (cat, dog, fox), 12 training and 6 test images" in out
    assert "1 file(s) will be skipped" in out and "(not an image file)" in out and "sizes differ, so resize = [10, 10]" in out
    assert "weights: weights/final.safetensors" in out
    # the template builds a model for this data (the user then makes it match their weights)
    p = Project.load(root, check_model=False)
    assert p.input_shape == (1, 10, 10) and p.build_model()(p.train_dataset.x[:2]).shape == (2, 3)
    # never overwritten without --force
    before = (root / "model.py").read_text() + "# my edits\n"
    (root / "model.py").write_text(before)
    code, out, err = run_cli(capsys, "init", root)
    assert code == 2 and err.count("\n") == 1 and f"{root / 'project.toml'}: already exists; pass --force" in err
    assert (root / "model.py").read_text() == before
    code, _, err = run_cli(capsys, "init", root, "--force")
    assert code == 0 and (root / "model.py").read_text() != before


def test_init_image_csv_then_loads_and_trains(tmp_path, capsys):
    root = tmp_path / "csv"
    lines = {"train": ["file,label"], "test": ["file,label"]}
    for split, n in (("train", 6), ("test", 2)):
        for c in (0, 1):
            rel = f"images/{split}_{c}_{{}}.png"
            for i in range(n):
                _png(root / rel.format(i), size=(6, 6), value=10 * c + i, mode="RGB")
                lines[split].append(f"{rel.format(i)},{c}")
    (root / "data").mkdir()
    for split in lines:
        (root / "data" / f"{split}.csv").write_text("\n".join(lines[split]) + "\n")
    code, out, err = run_cli(capsys, "init", root)
    assert code == 0, err
    spec = tomllib.loads((root / "project.toml").read_text())
    assert spec["data"]["format"] == "images" and spec["data"]["image_column"] == "file"
    assert spec["data"]["label_column"] == "label" and spec["data"]["mode"] == "rgb"
    assert spec["training"]["optimizer"] == "sgd" and "weights" not in spec["model"]
    assert "weights: none found" in out
    p = Project.load(root)  # paths resolve relative to the project root
    assert p.input_shape == (3, 6, 6) and p.has_recipe and not p.checkpoints
    # the template's CNN takes its image batches channels_last in the layer passes on the CPU
    code, out, _ = run_cli(capsys, "info", root, "--json")
    assert code == 0 and json.loads(out)["gradients"]["layout"] == "channels_last"
    code, out, _ = run_cli(capsys, "info", root)
    assert "; image batches channels_last" in out


def test_init_tabular_with_categories(tmp_path, capsys):
    root = tmp_path / "tab"
    rng = np.random.default_rng(0)
    import pandas as pd

    root.mkdir()
    for split, n in (("train", 40), ("valid", 10)):
        df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                           "colour": rng.choice(["red", "green"], size=n), "target": rng.integers(0, 2, size=n)})
        df.to_parquet(root / f"{split}.parquet")
    code, out, err = run_cli(capsys, "init", root)
    assert code == 0, err
    spec = tomllib.loads((root / "project.toml").read_text())
    assert spec["data"] == {"train": "train.parquet", "test": "valid.parquet", "label_column": "target",
                            "format": "tabular", "categorical_columns": ["colour"]}
    p = Project.load(root)
    assert p.feature_columns == ["a", "b", "colour=green", "colour=red"]


def test_init_text_template_attributes_over_dict_inputs(tmp_path, capsys):
    from engine.api import cached_scores

    root = tmp_path / "txt"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = {"a": ["apple", "pear", "plum"], "b": ["socket", "port", "host"]}
    import pandas as pd

    for split, n in (("train", 30), ("test", 8)):
        labels = rng.choice(["a", "b"], size=n)
        texts = [" ".join(rng.choice(words[y], size=5)) + " and more words" for y in labels]
        pd.DataFrame({"sentence": texts, "topic": labels}).to_json(root / f"{split}.jsonl", orient="records", lines=True)
    code, out, err = run_cli(capsys, "init", root)
    assert code == 0, err
    spec = tomllib.loads((root / "project.toml").read_text())
    assert spec["data"]["format"] == "text" and spec["data"]["text_column"] == "sentence"
    assert spec["data"]["label_column"] == "topic"  # no conventional name: the last column
    # train the template for a few epochs with the written recipe, then attribute over dict inputs
    text = (root / "project.toml").read_text().replace("epochs = 20", "epochs = 5")
    (root / "project.toml").write_text(text)
    code, _, err = run_cli(capsys, "train", root)
    assert code == 0, err
    p = Project.load(root)
    assert set(p.train_dataset.x.keys()) == {"input_ids", "attention_mask"}
    r = cached_scores(p, "grad-cos", {"proj_dim": 256})
    # 2.1M parameters × 256 is past the dense limit: per layer, not SJLT over a dense gradient
    assert r["meta"]["projection"]["kind"] == "factorized"
    S = np.asarray(r["scores"])
    assert S.shape == (8, 30) and np.isfinite(S).all()
    y_tr, y_te = p.train_dataset.y.numpy(), p.test_dataset.y.numpy()
    assert (y_tr[S.argmax(1)] == y_te).mean() >= 0.75
    # TRAK's default projection over token inputs: per layer, the 2^15 × 64 embedding table gathered
    # by token (no dense 2.1M-entry gradient), nothing left out
    r = cached_scores(p, "trak", {"ensemble": "final"})
    proj = r["meta"]["projection"]
    assert proj["kind"] == "factorized" and proj["left_out"] == []
    assert [layer["layer"] for layer in proj["layers"]] == ["embed", "head"]
    assert proj["in_dim"] == sum(q.numel() for q in p.build_model().parameters())
    S = np.asarray(r["scores"])
    assert S.shape == (8, 30) and (y_tr[S.argmax(1)] == y_te).mean() >= 0.75
    # and `proponent info` says so before anything runs
    code, out, _ = run_cli(capsys, "info", root, "--json")
    assert json.loads(out)["projection"] == {"kind": "factorized", "k": proj["out_dim"], "layers": proj["layers"],
                                             "left_out": []}
    code, out, _ = run_cli(capsys, "info", root)
    assert f"projection: factorized per layer, k {proj['out_dim']} (embed sjlt sketch " in out


def test_init_nothing_recognisable(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("hello")
    code, _, err = run_cli(capsys, "init", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "nothing to make a project from" in err
    assert not (tmp_path / "project.toml").exists() and not (tmp_path / "model.py").exists()
    (tmp_path / "only.csv").write_text("x,label\n1,0\n")
    code, _, err = run_cli(capsys, "init", tmp_path)
    assert code == 2 and "need one table for train and one for test" in err
    assert not (tmp_path / "project.toml").exists()
