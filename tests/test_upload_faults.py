"""Faults in what the app accepts as uploads: project archives (app.services.uploads) and query
inputs (app.services.queries). Each bad upload is one ProponentError line naming the entry or
column, and leaves nothing behind."""
from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.services import queries, uploads
from engine.core.errors import ProponentError

TOML = b'[data]\nformat = "tabular"\ntrain = "train.csv"\ntest = "test.csv"\n[model]\n'
LINEAR = "from torch import nn\ndef build(input_shape, num_classes):\n    return nn.Sequential(nn.Flatten(), " \
         "nn.Linear(int(__import__('math').prod(input_shape)), num_classes))\n"


# ------------------------------------------------------------------------------------ archives
def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted in one test
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo: the name exactly as given, "" and "." too
    return buf.getvalue()


def _patch_second_entry(raw: bytes, *, flag: int = 0, method: int | None = None) -> bytes:
    """Set a flag bit or the compression method of the archive's second entry, in its local header
    and its central directory record (what an encrypting or Deflate64 zip tool writes)."""
    b = bytearray(raw)
    loc = b.find(b"PK\x03\x04", 1)
    cen = b.find(b"PK\x01\x02", b.find(b"PK\x01\x02") + 1)
    b[loc + 6] |= flag
    b[cen + 8] |= flag
    if method is not None:
        b[loc + 8:loc + 10] = struct.pack("<H", method)
        b[cen + 10:cen + 12] = struct.pack("<H", method)
    return bytes(b)


def _bad_archives():
    ok = [("p/project.toml", TOML), ("p/secret.txt", b"hello")]
    yield "encrypted", _patch_second_entry(_zip(ok), flag=0x1), "secret.txt", "encrypted"
    yield "deflate64", _patch_second_entry(_zip(ok), method=9), "secret.txt", "Deflate64"
    yield "empty name", _zip([("project.toml", TOML), ("", b"x")]), "''", "no name"
    yield "dot", _zip([("project.toml", TOML), (".", b"x")]), "'.'", "no name"
    yield "file then folder", _zip([("project.toml", TOML), ("a", b"x"), ("a/b.txt", b"y")]), "'a'", "folder"
    yield "folder then file", _zip([("project.toml", TOML), ("a/", b""), ("a", b"y")]), "'a'", "folder"
    yield "long name", _zip([("project.toml", TOML), ("a" * 300 + ".txt", b"x")]), "aaaa", "255"
    yield "deep", _zip([("project.toml", TOML), ("/".join(["d"] * 3000) + "/f", b"x")]), "d/d/d", "deep"
    # the second copy would silently replace the first
    yield "twice", _zip([("project.toml", TOML), ("project.toml", b"[[[ not toml")]), "project.toml", "twice"


@pytest.mark.parametrize("data,entry,problem", [c[1:] for c in _bad_archives()], ids=[c[0] for c in _bad_archives()])
def test_a_bad_entry_is_one_line_naming_it_and_nothing_is_written(tmp_path, data, entry, problem):
    dest = tmp_path / "uploads"
    with pytest.raises(ProponentError) as e:
        uploads.extract_upload(data, dest)
    msg = str(e.value)
    assert "\n" not in msg and entry in msg and problem in msg and "nothing was extracted" in msg, msg
    assert not dest.exists() or list(dest.iterdir()) == []  # no partial folder left


def test_macos_metadata_is_skipped(tmp_path):
    data = _zip([("p/project.toml", TOML), ("p/img/a.png", b"png"), ("__MACOSX/p/._project.toml", b"\0\5\26\7"),
                 ("__MACOSX/p/img/._a.png", b"\0\5\26\7"), ("p/img/._a.png", b"\0\5\26\7"), ("p/.DS_Store", b"\0")])
    folder = uploads.extract_upload(data, tmp_path / "uploads")
    got = sorted(str(f.relative_to(folder.parent)) for f in folder.parent.rglob("*") if f.is_file())
    assert got == ["p/img/a.png", "p/project.toml"]


def test_windows_backslash_names_become_folders(tmp_path):
    folder = uploads.extract_upload(_zip([("p\\project.toml", TOML), ("p\\data\\train.csv", b"a,b\n")]),
                                    tmp_path / "uploads")
    assert folder.name == "p" and (folder / "project.toml").read_bytes() == TOML
    assert (folder / "data" / "train.csv").is_file()


def test_the_same_archive_uploaded_twice_at_once(tmp_path, monkeypatch):
    """A second session uploads the same archive while the first is still extracting it: both
    get the one complete folder, and neither's temporary folder is wiped by the other."""
    data = _zip([("p/project.toml", TOML)] + [(f"p/data/f{i}.bin", bytes([i]) * 1000) for i in range(20)])
    dest = tmp_path / "uploads"
    real = uploads._extract
    nested = []

    def extract_while_another_finishes(*args, **kwargs):
        if not nested:
            nested.append(None)  # only the first call waits for the other session
            nested[0] = uploads.extract_upload(data, dest)  # the other session, start to finish
        return real(*args, **kwargs)

    monkeypatch.setattr(uploads, "_extract", extract_while_another_finishes)
    first = uploads.extract_upload(data, dest)
    assert first == nested[0] and (first / "project.toml").read_bytes() == TOML
    assert sorted(f.name for f in (first / "data").iterdir()) == sorted(f"f{i}.bin" for i in range(20))
    assert [d.name for d in dest.iterdir()] == [first.parent.name]  # no partial folder left


def test_partial_folders_of_killed_uploads_are_swept(tmp_path):
    dest = tmp_path / "uploads"
    stale, fresh = dest / ".upload-0123456789abcdef.4242.partial", dest / ".upload-0123456789abcdef.x.partial"
    for d in (stale, fresh):
        (d / "p").mkdir(parents=True)
    old = time.time() - 3 * 86400  # days old: no upload takes that long
    os.utime(stale, (old, old))
    uploads.extract_upload(_zip([("p/project.toml", TOML)]), dest)
    assert not stale.exists() and fresh.is_dir()  # a fresh one may be another upload in progress


# ------------------------------------------------------------------------------------ queries
def _tabular_project(root: Path):
    from engine import Project

    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 30), ("test", 9)):
        lines = ["f0,colour,f1,size,label"]
        for i in range(n):
            lines.append(f"{rng.normal():.5f},{['blue', 'red', 'green'][i % 3]},{rng.normal(3, 2):.5f},"
                         f"{[1, 3][i % 2]},{i % 2}")
        (root / "data" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "model.py").write_text(LINEAR)
    (root / "project.toml").write_text('[data]\nformat = "tabular"\ntrain = "data/train.csv"\ntest = "data/test.csv"\n'
                                       'label_column = "label"\ncategorical_columns = ["colour", "size"]\n\n'
                                       '[model]\nfactory = "model.py:build"\n')
    return Project.load(root)


def _image_project(root: Path):
    from engine import Project

    rng = np.random.default_rng(1)
    (root / "data" / "img").mkdir(parents=True)
    for split, n in (("train", 6), ("test", 2)):
        rows = ["path,label"]
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "data" / "img" / f"{split}{i}.png")
            rows.append(f"img/{split}{i}.png,{i % 2}")
        (root / "data" / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "model.py").write_text(LINEAR)
    (root / "project.toml").write_text('[data]\nformat = "images"\ntrain = "data/train.csv"\ntest = "data/test.csv"\n'
                                       'label_column = "label"\nimage_column = "path"\n\n[model]\n'
                                       'factory = "model.py:build"\n')
    return Project.load(root)


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    return _tabular_project(tmp_path_factory.mktemp("tab") / "p")


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    return _image_project(tmp_path_factory.mktemp("img") / "p")


def test_a_row_in_the_training_tables_own_columns_is_encoded_as_training_did(tab):
    assert tab.feature_columns == ["f0", "f1", "colour=blue", "colour=green", "colour=red", "size=1", "size=3"]
    df = tab.train_df
    for i in range(len(df)):
        row = df.iloc[[i]].drop(columns=["label"]).to_csv(index=False).encode()
        x = queries.query_from_upload(tab, row, "q.csv")
        assert x.shape == (1, 7) and x.dtype == np.float32
        assert np.array_equal(x[0], tab.train_dataset.x[i].numpy()), i  # bit for bit the training input
    # 3 where training read 3: the integer and float spellings of a numeric category both match
    x = queries.query_from_upload(tab, b"f0,f1,colour,size\n0,3,red,3.0\n", "q.csv")
    assert x[0, 2:].tolist() == [0, 0, 1, 0, 1]


def test_an_unknown_category_is_one_line_naming_the_column_and_the_categories(tab):
    with pytest.raises(ProponentError) as e:
        queries.query_from_upload(tab, b"f0,f1,colour,size\n0.1,0.2,purple,1\n", "q.csv")
    msg = str(e.value)
    assert "\n" not in msg and "q.csv" in msg and "'colour'" in msg and "purple" in msg and "blue, green, red" in msg


@pytest.mark.parametrize("hot,column", [("7,-3,0,1,0", "colour"), ("1,1,0,1,0", "colour"), ("0,0,0,1,0", "colour"),
                                        ("0,0,1,0.5,0.5", "size"), ("0,0,1,,1", "size")])
def test_an_encoded_row_needs_a_single_1_in_each_one_hot_group(tab, hot, column):
    head = "f0,f1,colour=blue,colour=green,colour=red,size=1,size=3\n"
    with pytest.raises(ProponentError) as e:
        queries.query_from_upload(tab, (head + "0.1,0.2," + hot + "\n").encode(), "q.csv")
    assert "\n" not in str(e.value) and f"categorical column {column!r}" in str(e.value)
    # a valid encoded row is still accepted, and is what the same row in raw columns gives
    good = queries.query_from_upload(tab, (head + "0.1,0.2,0,1,0,0,1\n").encode(), "q.csv")
    assert good[0, 2:].tolist() == [0, 1, 0, 0, 1]
    assert np.array_equal(good, queries.query_from_upload(tab, b"f0,f1,colour,size\n0.1,0.2,green,3\n", "q.csv"))


def _png(size: tuple[int, int], mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("side", [120, 200], ids=["over the limit (PIL warns)", "over twice the limit (PIL raises)"])
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(img, monkeypatch, side):
    # the data path's limit (engine.core.images.read_raw_image: PIL's MAX_IMAGE_PIXELS), made small
    # so the test need not build a 144-megapixel image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ProponentError) as e:
        queries.query_from_upload(img, _png((side, side)), "big.png")
    assert "\n" not in str(e.value) and "big.png" in str(e.value) and "decompression bomb" in str(e.value)
    assert queries.query_from_upload(img, _png((90, 90), "L"), "ok.png").shape == (1, 1, 8, 8)  # under it: resized


def test_an_unreadable_image_names_the_file_not_a_memory_buffer(img):
    with pytest.raises(ProponentError, match="unreadable image") as e:
        queries.query_from_upload(img, b"not an image", "x.png")
    assert "x.png" in str(e.value) and "BytesIO" not in str(e.value)
