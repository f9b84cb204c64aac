"""Inputs that used to be read wrong without a word, or to hang: high-bit-depth and float images,
links and special files in image folders, values pandas takes for missing, non-text text cells,
tokenizers that return nothing or NaN, and names that `init` must quote."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Project
from engine.cli import main as cli
import engine.core.images as images
from tests.test_broken_projects import MLP, _toml
from tests.test_text import TOY_MODEL

FOLDER_DATA = 'format = "image_folder"\ntrain = "data/train"\ntest = "data/test"\n'


def image_folder(root: Path, n: int = 4, save=None) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((8, 8)) * 80 + 120 * c).astype(np.uint8)
                (save or (lambda a, p: Image.fromarray(a).save(p)))(arr, d / f"{i}.png")
    (root / "model.py").write_text(MLP)
    (root / "project.toml").write_text(_toml(FOLDER_DATA))
    return root


def one_line_error(capsys, *args) -> str:
    capsys.readouterr()
    rc = cli([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err, (rc, err)
    return err


# ----------------------------------------------------------------------------- bit depths
def test_sixteen_bit_and_float_images_are_scaled_not_clipped():
    sixteen = Image.fromarray(np.array([[0, 257, 30000, 65535]], np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert images.ImagePreprocessing().pixels(sixteen).tolist() == [[[0, 1, 117, 255]]]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert images.ImagePreprocessing().pixels(floats).tolist() == [[[0, 128, 255]]]
    wide = Image.fromarray(np.array([[0, 70000]], np.int32))
    with pytest.raises(ValueError, match="do not fit 16 bits"):
        images.eight_bit(wide)
    with pytest.raises(ValueError, match="must lie in 0..1"):
        images.eight_bit(Image.fromarray(np.array([[0.0, 3.0]], np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        images.eight_bit(Image.fromarray(np.array([[0.0, np.nan]], np.float32)))


def test_a_sixteen_bit_image_folder_trains_on_its_pixels(tmp_path):
    """Before, every 16-bit scan became one flat white image: both classes looked the same."""
    root = image_folder(tmp_path / "p", save=lambda a, p: Image.fromarray(a.astype(np.uint16) * 257).save(p))
    assert images.read_raw_image(root / "data" / "train" / "cat" / "0.png").mode.startswith("I")
    p = Project.load(root)
    x = p.train_dataset.x[:]
    cats, dogs = x[p.train_dataset.y == 0], x[p.train_dataset.y == 1]
    assert float(dogs.mean() - cats.mean()) > 0.3  # 120 of 255 apart, as in the 8-bit originals
    assert len(np.unique(x.numpy())) > 50


def test_a_float_image_out_of_range_is_one_line(tmp_path, capsys):
    root = image_folder(tmp_path / "p")
    Image.fromarray(np.full((8, 8), 7.0, np.float32)).save(root / "data" / "train" / "cat" / "9.tif")
    err = one_line_error(capsys, "info", root)
    assert "9.tif" in err and "must lie in 0..1" in err


# ----------------------------------------------------------------------------- image folders
def test_links_that_loop_or_repeat_a_class_are_refused(tmp_path, capsys):
    loop = image_folder(tmp_path / "loop")
    os.symlink("..", loop / "data" / "train" / "cat" / "up")
    assert "a loop" in one_line_error(capsys, "info", loop)
    twice = image_folder(tmp_path / "twice")
    os.symlink("cat", twice / "data" / "train" / "kitten")
    err = one_line_error(capsys, "info", twice)
    assert "kitten" in err and "already read as class 'cat'" in err and "two labels" in err


def test_hidden_stray_and_special_files_are_skipped_and_named(tmp_path, capsys):
    root = image_folder(tmp_path / "p")
    cat = root / "data" / "train" / "cat"
    (cat / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(cat / ".ipynb_checkpoints" / "0-checkpoint.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(cat / ".hidden.png")
    (cat / "._1.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X AppleDouble")
    os.mkfifo(cat / "pipe.png")  # opening it for reading would wait for a writer for ever
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "data" / "train" / "stray.png")
    capsys.readouterr()
    assert cli(["info", str(root)]) == 0
    err = capsys.readouterr().err
    for name, why in ((".ipynb_checkpoints", "hidden folder"), (".hidden.png", "hidden file"),
                      ("._1.png", "hidden file"), ("pipe.png", "not a regular file"),
                      ("stray.png", "outside any class folder")):
        assert any(name in line and why in line for line in err.splitlines()), (name, err)
    assert len(Project.load(root).train_dataset) == 8


def test_a_csv_row_naming_a_fifo_is_one_line_not_a_hang(tmp_path):
    root = image_folder(tmp_path / "p")
    rows = ["path,label"] + [f"train/{c}/{i}.png,{c}" for c in ("cat", "dog") for i in range(4)]
    os.mkfifo(root / "data" / "train" / "cat" / "pipe.png")
    rows[2] = "train/cat/pipe.png,cat"
    (root / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "data" / "test.csv").write_text("\n".join(["path,label"] + [f"test/{c}/0.png,{c}" for c in ("cat", "dog")]) + "\n")
    (root / "project.toml").write_text(_toml('format = "images"\ntrain = "data/train.csv"\ntest = "data/test.csv"\n'
                                             'label_column = "label"\nimage_column = "path"\n'))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "info", str(root)], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "row 1 (line 3)" in r.stderr and "not a regular file" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- tables and text
def text_project(root: Path, train: str, test: str = "text,label\nred apple,fruit\nopen port,net\n",
                 model: str = TOY_MODEL, data_extra: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "model.py").write_text(model)
    (root / "train.csv").write_text(train)
    (root / "test.csv").write_text(test)
    (root / "project.toml").write_text(f'[data]\nformat = "text"\ntrain = "train.csv"\ntest = "test.csv"\n{data_extra}\n'
                                       '[model]\nattribute = ["head.*"]\n\n[training]\nepochs = 1\nbatch_size = 4\n')
    return root


def test_na_and_none_are_values_not_missing(tmp_path):
    """A class named NA (North America) and the texts "None" and "007" are read as written."""
    root = text_project(tmp_path / "t", "text,label\nNone,NA\n007,NA\nopen port,EU\ntcp host,EU\n",
                        "text,label\nnull,NA\nopen port,EU\n")
    p = Project.load(root)
    assert sorted(map(str, p.classes)) == ["EU", "NA"]
    assert [p.text("train", i) for i in (0, 1)] == ["None", "007"]
    assert p.text("test", 0) == "null"


def test_na_in_a_numeric_column_names_the_value(tmp_path, capsys):
    from tests.conftest import write_tabular_project

    root = write_tabular_project(tmp_path / "t")
    lines = (root / "train.csv").read_text().splitlines()
    lines[4] = "NA," + lines[4].split(",", 1)[1]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    assert "row 3 (line 5)" in (err := one_line_error(capsys, "info", root)) and "value 'NA' is not a finite number" in err


@pytest.mark.parametrize("kind, body, expected", [
    ("jsonl", '{"text": ["a", "b"], "label": "fruit"}', "(list) is not text"),
    ("jsonl", '{"text": true, "label": "fruit"}', "(bool) is not text"),
    ("jsonl", '{"text": 12, "label": "fruit"}', "(int) is not text"),
])
def test_a_text_cell_that_is_not_text_is_named(tmp_path, capsys, kind, body, expected):
    root = text_project(tmp_path / "t", "text,label\nx,fruit\n")
    rows = ['{"text": "red apple", "label": "fruit"}', body, '{"text": "open port", "label": "net"}']
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    (root / "project.toml").write_text((root / "project.toml").read_text().replace("train.csv", "train.jsonl"))
    err = one_line_error(capsys, "info", root)
    assert "row 1 (line 2)" in err and expected in err


def test_text_column_cannot_be_the_label(tmp_path, capsys):
    root = text_project(tmp_path / "t", "text,label\nred apple,fruit\nopen port,net\n", data_extra='text_column = "label"\n')
    assert "the model would read its own label" in one_line_error(capsys, "info", root)


@pytest.mark.parametrize("change, expected", [
    ("{k: v[:, :0] for k, v in out.items()}", "no values per text"),
    ("{**out, 'attention_mask': out['attention_mask'].float() * float('nan')}", "holds NaN or infinite values"),
])
def test_a_tokenizer_returning_nothing_or_nan_is_one_line(tmp_path, capsys, change, expected):
    model = TOY_MODEL + f"\n_tok = tokenize\ndef tokenize(texts):\n    out = _tok(texts)\n    return {change}\n"
    root = text_project(tmp_path / "t", "text,label\nred apple,fruit\ngreen pear,fruit\nopen port,net\ntcp host,net\n",
                        model=model)
    err = one_line_error(capsys, "info", root)
    assert "model.py" in err and expected in err


# ----------------------------------------------------------------------------- CLI values
def test_init_quotes_control_characters_in_names(tmp_path, capsys):
    src = image_folder(tmp_path / "src")
    odd = tmp_path / "line\nbreak\x7f"
    (odd / "train").mkdir(parents=True)
    (odd / "test").mkdir()
    for split in ("train", "test"):
        os.rename(src / "data" / split / "cat", odd / split / "cat")
        os.rename(src / "data" / split / "dog", odd / split / "dog")
    capsys.readouterr()
    assert cli(["init", str(odd)]) == 0
    spec = tomllib.loads((odd / "project.toml").read_text())
    assert spec["project"]["name"] == odd.name
    assert cli(["info", str(odd)]) == 0


def test_prepare_refuses_an_empty_dir_and_zero_models(tmp_path, capsys):
    assert "--dir is empty" in one_line_error(capsys, "prepare", "wine", "--dir", "", "--no-train")
    capsys.readouterr()
    for n in ("0", "-1"):
        with pytest.raises(SystemExit) as e:  # argparse's own usage error
            cli(["prepare", "wine", "--dir", str(tmp_path / "w"), "--models", n])
        assert e.value.code == 2 and "--models: must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
