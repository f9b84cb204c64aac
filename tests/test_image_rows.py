"""Image splits read on demand: decoded once through a DataLoader into a uint8 file, then read
row by row as float32 (ImageRows). Values must equal a plain per-file decode, memory must be
bounded by a batch, and a bad file, a full disk or an interrupted decode must leave nothing."""
from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.core.images as images
from engine import Project, ValidationError
from engine.core.errors import ProponentError
from engine.core.images import ImagePreprocessing, ImageRows, decode_split, load_split

MODEL = """import torch.nn as nn

def build(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, num_classes))
"""


def _write_images(folder: Path, n: int, size=(12, 10), mode="RGB", seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        p = folder / f"img_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        paths.append(p)
    return paths


def _image_project(root: Path, n_train=40, n_test=10, normalize=True) -> Path:
    paths = _write_images(root / "data" / "images", n_train + n_test)
    rel = [p.relative_to(root / "data").as_posix() for p in paths]
    labels = [i % 3 for i in range(len(rel))]
    for name, lo, hi in (("train", 0, n_train), ("test", n_train, n_train + n_test)):
        lines = ["image,label"] + [f"{r},{c}" for r, c in zip(rel[lo:hi], labels[lo:hi])]
        (root / "data" / f"{name}.csv").write_text("\n".join(lines) + "\n")
    (root / "model.py").write_text(MODEL)
    norm = 'normalize = {mean = [0.5, 0.4, 0.3], std = [0.2, 0.25, 0.3]}\n' if normalize else ""
    (root / "project.toml").write_text(
        '[project]\nname = "rows"\n[data]\nformat = "images"\ntrain = "data/train.csv"\ntest = "data/test.csv"\n'
        f'image_column = "image"\nlabel_column = "label"\n{norm}'
        '[model]\nfactory = "model.py:build"\n[training]\nepochs = 1\nbatch_size = 8\nlr = 0.05\n')
    return root


def _reference(paths, prep) -> np.ndarray:
    """The float decode written out plainly, as the loader did before splits were read on demand."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert(prep.pil_mode(im)), dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
        if prep.mean is not None:
            arr = (arr - np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)) / np.asarray(prep.std, np.float32).reshape(-1, 1, 1)
        out.append(arr.astype(np.float32))
    return np.stack(out)


def test_rows_equal_a_plain_decode_for_every_kind_of_index(tmp_path):
    paths = _write_images(tmp_path / "im", 30)
    prep = ImagePreprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    ref = _reference(paths, prep)
    x = load_split(paths, [p.name for p in paths], prep, paths, [None] * 30, None, cache=None, pending=None)
    assert isinstance(x, ImageRows) and isinstance(x.pixels, np.memmap) and x.pixels.dtype == np.uint8
    assert x.shape == (30, 3, 12, 10) and len(x) == 30
    assert np.array_equal(x[:].numpy(), ref)  # bit for bit, not approximately
    assert np.array_equal(x[7].numpy(), ref[7]) and np.array_equal(x[-1].numpy(), ref[-1])
    assert np.array_equal(x[3:9].numpy(), ref[3:9])
    idx = [5, 2, 2, 29]
    assert np.array_equal(x[idx].numpy(), ref[idx])
    assert np.array_equal(x[torch.tensor(idx)].numpy(), ref[idx])
    mask = np.zeros(30, bool)
    mask[[1, 4, 8]] = True
    assert np.array_equal(x[mask].numpy(), ref[mask])
    sub = x.subset([10, 11, 20, 3])
    assert len(sub) == 4 and np.array_equal(sub[:].numpy(), ref[[10, 11, 20, 3]])
    assert np.array_equal(sub.subset([3, 0])[:].numpy(), ref[[3, 10]])  # a view of a view
    assert np.array_equal(sub[1:3].numpy(), ref[[11, 20]])
    assert np.array_equal(x[4, 1].numpy(), ref[4, 1]) and np.array_equal(x[2:5, 0, 3].numpy(), ref[2:5, 0, 3])
    with pytest.raises(IndexError):
        x[30]
    with pytest.raises(IndexError):
        x[[0, 31]]
    # the upload path (apply) is the same arithmetic
    with Image.open(paths[4]) as im:
        assert np.array_equal(prep.apply(im), ref[4])


def test_decoding_memory_is_one_batch_not_the_split(tmp_path, monkeypatch):
    """3,000 RGB 32×32 images are 36.9 MB as float32 and 9.2 MB as uint8; decoding them must
    allocate about one batch (here 64 images), so it cannot be holding the split."""
    paths = _write_images(tmp_path / "im", 3000, size=(32, 32))
    monkeypatch.setattr(images, "DECODE_BATCH", 64)
    prep = ImagePreprocessing()
    tracemalloc.start()
    try:
        x = load_split(paths, [p.name for p in paths], prep, paths, [None] * len(paths), None, cache=None, pending=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"decoding peaked at {peak / 1e6:.1f} MB"
    assert np.array_equal(x[[0, 1234, 2999]].numpy(), _reference([paths[i] for i in (0, 1234, 2999)], prep))


def test_worker_processes_decode_the_same_pixels_and_name_a_bad_file(tmp_path, monkeypatch):
    paths = _write_images(tmp_path / "im", 40)
    prep = ImagePreprocessing()
    names, files, rows = [p.name for p in paths], [tmp_path / "train.csv"] * 40, list(range(40))
    monkeypatch.setattr(images, "DECODE_BATCH", 8)
    monkeypatch.setenv("PROPONENT_DECODE_WORKERS", "0")
    serial, _ = decode_split(paths, names, prep, files, rows, None, None)
    monkeypatch.setenv("PROPONENT_DECODE_WORKERS", "2")
    assert images.decode_workers(40) == 2
    parallel, _ = decode_split(paths, names, prep, files, rows, None, None)
    assert np.array_equal(np.asarray(serial), np.asarray(parallel))
    paths[27].write_bytes(b"not a png")
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ValidationError) as e:
        decode_split(paths, names, prep, files, rows, None, cache / "images-train-0123456789abcdef0123.npy")
    msg = str(e.value)
    assert "\n" not in msg and "unreadable image img_00027.png" in msg and "row 27" in msg and "train.csv" in msg
    assert list(cache.iterdir()) == []  # no partial file beside the cache


def test_bad_worker_count_is_one_line(monkeypatch):
    monkeypatch.setenv("PROPONENT_DECODE_WORKERS", "many")
    with pytest.raises(ProponentError, match="PROPONENT_DECODE_WORKERS='many' is not a whole number"):
        images.decode_workers(10)


def test_full_disk_while_decoding_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    paths = _write_images(tmp_path / "im", 5)
    cache = tmp_path / "cache"
    cache.mkdir()

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ProponentError) as e:
        decode_split(paths, [p.name for p in paths], ImagePreprocessing(), paths, [None] * 5, None,
                     cache / "images-train-0123456789abcdef0123.npy")
    assert "cannot write the decoded images" in str(e.value) and "No space left" in str(e.value)
    assert "\n" not in str(e.value) and list(cache.iterdir()) == []


def test_an_interrupted_decode_leaves_no_cache_and_the_next_load_decodes(tmp_path, monkeypatch):
    root = _image_project(tmp_path / "p")
    (root / ".proponent").mkdir()  # the project keeps state: decoding writes beside the cache
    real = images._decode_problem
    calls = {"n": 0}

    def interrupted(path, prep):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(path, prep)

    monkeypatch.setattr(images, "_decode_problem", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Project.load(root, check_model=False)
    assert list((root / ".proponent" / "cache").iterdir()) == []
    monkeypatch.setattr(images, "_decode_problem", real)
    p = Project.load(root, check_model=False)
    cached = sorted(f.name.split("-")[1] for f in (root / ".proponent" / "cache").glob("images-*.npy"))
    assert cached == ["test", "train"]  # decoded straight into the cache, no pending copy
    ref = _reference([p.example_file("train", i) for i in range(40)], p.preprocessing)
    assert np.array_equal(p.train_dataset.x[:].numpy(), ref)


def test_a_load_without_state_leaves_no_file_and_caches_once_state_is_kept(tmp_path):
    """Before the project keeps state the decode lives in an unlinked temporary file (only the
    mapping holds it, so no way of ending the process leaves it behind); state_dir writes the cache."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("proponent-images-*"))
    root = _image_project(tmp_path / "p")
    p = Project.load(root, check_model=False)
    assert not (root / ".proponent").exists()
    assert set(Path(tempfile.gettempdir()).glob("proponent-images-*")) == before  # nothing left on disk
    assert not Path(p.train_dataset.x.pixels.filename).exists()
    ref = _reference([p.example_file("train", i) for i in range(40)], p.preprocessing)
    assert np.array_equal(p.train_dataset.x[:].numpy(), ref)  # still readable through the map
    p.state_dir
    assert sorted(f.name.split("-")[1] for f in (root / ".proponent" / "cache").glob("images-*.npy")) == ["test", "train"]
    again = Project.load(root, check_model=False)
    assert Path(again.train_dataset.x.pixels.filename).parent == root / ".proponent" / "cache"  # mapped, not decoded
    assert np.array_equal(again.train_dataset.x[:].numpy(), ref)


def test_training_on_image_rows_equals_training_on_the_tensor(tmp_path):
    from engine.core.train import fit_model

    p = Project.load(_image_project(tmp_path / "p"))
    ds = p.train_dataset
    a = fit_model(p.build_model, ds.x, ds.y, p.recipe).model.state_dict()
    b = fit_model(p.build_model, ds.x[:], ds.y, p.recipe).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sub = ds.subset([3, 1, 4, 1, 5])
    assert isinstance(sub.x, ImageRows) and torch.equal(sub.x[:], ds.x[[3, 1, 4, 1, 5]])
    assert sub[2][1] == int(ds.y[4])


def test_an_unwritable_cache_folder_decodes_privately(tmp_path, monkeypatch):
    """A project whose .proponent/cache cannot be written (read-only) still loads: the decode goes
    to a private temporary file instead of failing."""
    root = _image_project(tmp_path / "p")
    (root / ".proponent" / "cache").mkdir(parents=True)

    def read_only(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "temp_path_for", read_only)
    p = Project.load(root, check_model=False)
    assert list((root / ".proponent" / "cache").iterdir()) == []
    ref = _reference([p.example_file("train", i) for i in range(40)], p.preprocessing)
    assert np.array_equal(p.train_dataset.x[:].numpy(), ref)


def test_decoding_with_workers_under_a_streamlit_main_and_other_threads_finishes(tmp_path):
    """The app's server runs threads and installs its page script as ``__main__``: spawned decode
    workers re-ran that script and died, and the parent blocked for ever writing them a large split.
    Run in a child process with a time limit, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys
    import textwrap

    paths = _write_images(tmp_path / "im", 3000, size=(8, 8))
    page = tmp_path / "page.py"
    page.write_text("raise SystemExit(1)  # what a page script does outside Streamlit, at best\n")
    script = textwrap.dedent(f"""
        import os, sys, threading, time, types
        from pathlib import Path
        import numpy as np
        os.environ["PROPONENT_DECODE_WORKERS"] = "2"
        from engine.core.images import ImagePreprocessing, load_split
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()  # the server's threads
        main = types.ModuleType("__main__")
        main.__file__ = {str(page)!r}  # as Streamlit's script runner installs the page
        sys.modules["__main__"] = main
        paths = sorted(Path({str(tmp_path / "im")!r}).glob("*.png"))
        x = load_split(paths, [p.name for p in paths], ImagePreprocessing(), paths, [None] * len(paths), None,
                       cache=None, pending=None)
        np.save({str(tmp_path / "x.npy")!r}, x[:].numpy())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.load(tmp_path / "x.npy")
    ordered = sorted(paths)
    assert got.shape[0] == 3000
    assert np.array_equal(got[[0, 1500, 2999]], _reference([ordered[i] for i in (0, 1500, 2999)], ImagePreprocessing()))
