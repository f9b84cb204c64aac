"""Project loading and validation: every bad input is one line naming file, row and problem."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Project, ValidationError
from tests.conftest import write_tabular_project

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.fixture
def digits_copy(digits_project, tmp_path):
    dest = tmp_path / "d"
    shutil.copytree(digits_project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    return dest


def _assert_one_line_error(root: Path, *needles: str):
    with pytest.raises(ValidationError) as e:
        Project.load(root)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    # the CLI: exit 2, one line on stderr, no traceback, nothing written
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    r = _cli("train", str(root))
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr
    after = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert after == before, set(after) ^ set(before)
    return msg


def test_loads_digits(digits_project):
    p = digits_project
    assert len(p.train_dataset) == 1445 and len(p.test_dataset) == 360
    x, y = p.train_dataset[0]
    assert tuple(x.shape) == (1, 8, 8) and isinstance(y, int)
    assert p.num_classes == 10 and len(p.checkpoints) == 15
    m = p.load_model(p.checkpoints[-1])
    assert m(p.test_dataset.x[:3]).shape == (3, 10)


def test_missing_train_csv(digits_copy):
    (digits_copy / "data" / "train.csv").unlink()
    _assert_one_line_error(digits_copy, "train.csv", "file not found")


def test_unknown_label_column(digits_copy):
    t = digits_copy / "project.toml"
    t.write_text(t.read_text().replace('label_column = "label"', 'label_column = "digit"'))
    _assert_one_line_error(digits_copy, "train.csv", "label column 'digit' not found")


def test_unreadable_image(digits_copy):
    (digits_copy / "data" / "images" / "train_0007.png").write_bytes(b"not a png at all")
    _assert_one_line_error(digits_copy, "train.csv", "row 7", "unreadable image")


def test_missing_image(digits_copy):
    (digits_copy / "data" / "images" / "test_0003.png").unlink()
    _assert_one_line_error(digits_copy, "test.csv", "row 3", "image file not found")


def test_ragged_image_sizes(digits_copy):
    from PIL import Image

    Image.new("L", (9, 8)).save(digits_copy / "data" / "images" / "train_0011.png")
    _assert_one_line_error(digits_copy, "train.csv", "row 11", "shape")


def test_test_class_missing_from_train(digits_copy):
    test = digits_copy / "data" / "test.csv"
    lines = test.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",42"
    test.write_text("\n".join(lines) + "\n")
    _assert_one_line_error(digits_copy, "test.csv", "row 4", "class 42 is in test but not in train")


def test_model_output_size_mismatch(digits_copy):
    (digits_copy / "model.py").write_text("from torch import nn\ndef build(s, c):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))\n")
    _assert_one_line_error(digits_copy, "model.py", "10 classes")


def test_non_numeric_feature(tmp_path):
    root = write_tabular_project(tmp_path / "t")
    lines = (root / "train.csv").read_text().splitlines()
    parts = lines[13].split(",")
    parts[2] = "abc"
    lines[13] = ",".join(parts)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    _assert_one_line_error(root, "train.csv", "row 12", "'f2'", "'abc'", "not a finite number")


def test_nan_feature(tmp_path):
    root = write_tabular_project(tmp_path / "t")
    lines = (root / "test.csv").read_text().splitlines()
    parts = lines[2].split(",")
    parts[0] = "nan"
    lines[2] = ",".join(parts)
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    _assert_one_line_error(root, "test.csv", "row 1", "column 'f0': value 'nan' is not a finite number")


def test_missing_project_toml(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(tmp_path / "empty", "project.toml")


def test_tabular_standardised_with_train_statistics(tmp_path):
    p = Project.load(write_tabular_project(tmp_path / "t"))
    x = p.train_dataset.x.numpy()
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    assert abs(p.test_dataset.x.numpy().mean()) > 1e-6  # test uses train's statistics, not its own


def test_weights_are_not_unpickled(digits_copy):
    """A pickle posing as weights is rejected as unreadable safetensors, never executed."""
    import pickle

    p = Project.load(digits_copy)
    ck = p.checkpoints[-1]

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(digits_copy / "pwned"),))

    ck.weights.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValidationError, match="cannot read safetensors"):
        p.load_model(ck)
    assert not (digits_copy / "pwned").exists()


def test_a_file_is_not_a_project_folder(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(ValidationError, match="not a folder") as e:
        Project.load(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("name", ["digits", "digits-cnn", "digits-multistage", "digits-noisy", "wine", "text"])
# every listed sample is covered: a new sample must be added here
def test_every_shipped_sample_materialises_and_loads(tmp_path, name):
    """`proponent prepare NAME` must work for every sample it lists (a stale import once broke digits-cnn)."""
    from engine.core.samples import available_samples, prepare_sample

    assert name in available_samples()
    # the text sample's project names its trained weights file, so it is loadable only once trained
    p = Project.load(prepare_sample(name, tmp_path / name, train=name == "text"))
    assert len(p.train_dataset) > 0 and len(p.test_dataset) > 0


def test_decoded_images_are_cached_until_a_file_changes(digits_copy):
    """The second load reads the decoded split from .proponent/cache (memory-mapped) instead of
    decoding every file; an edited image misses the cache, and a corrupted one is still an error.
    Nothing is cached by a load that writes no state."""
    from PIL import Image

    first = Project.load(digits_copy)
    x0 = first.train_dataset.x[:]
    assert not (digits_copy / ".proponent" / "cache").exists()  # a load alone writes nothing
    first.state_dir  # the project keeps state: the decoded splits are kept with it
    cached = sorted(p.name for p in (digits_copy / ".proponent" / "cache").glob("images-*.npy"))
    assert [n.split("-")[1] for n in cached] == ["test", "train"]
    import engine.core.images as images

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded although the cache holds it")

    real, images._decode_problem = images._decode_problem, no_decoding
    try:
        second = Project.load(digits_copy)
    finally:
        images._decode_problem = real
    assert torch.equal(second.train_dataset.x[:], x0) and second.data_hash() == first.data_hash()
    # an edited image: the cache misses and the new pixels are read
    img = digits_copy / "data" / "images" / "train_0003.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    third = Project.load(digits_copy)
    assert float(third.train_dataset.x[3].abs().sum()) != float(x0[3].abs().sum())
    assert torch.equal(third.train_dataset.x[4], x0[4])
    third.state_dir
    assert len(list((digits_copy / ".proponent" / "cache").glob("images-train-*.npy"))) == 1  # the stale one went
    # a corrupted image is still reported, cache or not
    img.write_bytes(b"not a png")
    with pytest.raises(ValidationError, match="unreadable image"):
        Project.load(digits_copy)
