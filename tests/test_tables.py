"""Tabular splits read chunk by chunk (engine/core/tables.py): the same inputs, bit for bit, as
reading the table whole; errors that name the row in the whole file; no table held in memory;
nothing left on disk."""
from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import Project
from engine.core import tables
from engine.core.errors import ProponentError, ValidationError
from engine.core.tables import column_mean_std, load_tabular_splits

MODEL = "from torch import nn\ndef build(s, k):\n    return nn.Linear(s[0], k)\n"


def _frame(rng, n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "a": rng.normal(5, 3, n), "b": rng.integers(0, 100, n), "c": rng.choice(["red", "green", "blue"], n),
        "d": rng.normal(-1e3, 1e2, n).astype(np.float32), "e": rng.choice([1, 2, 7], n),
        "label": rng.choice(["cat", "dog", "eel"], n)})


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_csv(path, index=False)
    return path


def _whole_table_inputs(train: pd.DataFrame, test: pd.DataFrame, cats: list[str]):
    """What the loader computed before it streamed: the whole table through pandas and numpy."""
    numeric = [c for c in train.columns if c != "label" and c not in cats]
    mats = [df[numeric].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32) for df in (train, test)]
    mean, std = mats[0].mean(0), mats[0].std(0)
    std[std == 0] = 1.0
    categories = {c: sorted({str(v) for v in train[c].tolist()}) for c in cats}
    out = []
    for m, df in zip(mats, (train, test)):
        hots = []
        for c in cats:
            hot = np.zeros((len(df), len(categories[c])), np.float32)
            hot[np.arange(len(df)), [categories[c].index(str(v)) for v in df[c].tolist()]] = 1.0
            hots.append(hot)
        out.append(np.concatenate([(m - mean) / std] + hots, axis=1).astype(np.float32))
    classes = sorted(train["label"].unique().tolist())
    ys = [np.array([classes.index(v) for v in df["label"]]) for df in (train, test)]
    return out, ys, classes, categories, mean, std


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_chunked_inputs_equal_the_whole_table_bit_for_bit(tmp_path, suffix):
    rng = np.random.default_rng(3)
    train, test = _frame(rng, 1003), _frame(rng, 211)
    ftrain, ftest = _write(train, tmp_path / f"train{suffix}"), _write(test, tmp_path / f"test{suffix}")
    back = [pd.read_parquet(f) if suffix == ".parquet" else
            pd.read_json(f, lines=True) if suffix == ".jsonl" else pd.read_csv(f) for f in (ftrain, ftest)]
    (xtr, xte), (ytr, yte), classes, categories, mean, std = _whole_table_inputs(*back, ["c", "e"])
    for rows in (None, 64, 97):  # one chunk, and chunk edges inside the data
        t = load_tabular_splits(ftrain, ftest, "label", None, ["c", "e"], set(), rows=rows)
        assert t.x_train.tobytes() == xtr.tobytes() and t.x_test.tobytes() == xte.tobytes()
        assert t.y_train.tolist() == ytr.tolist() and t.y_test.tolist() == yte.tolist()
        assert t.classes == classes and t.categories == categories
        assert t.mean.tobytes() == mean.tobytes() and t.std.tobytes() == std.tobytes()
        assert t.feature_names == ["a", "b", "d", "c=blue", "c=green", "c=red", "e=1", "e=2", "e=7"]


@pytest.mark.parametrize("n,d", [(5, 1), (100_000, 1), (70_001, 2), (30_000, 7), (3_000, 40)])
def test_column_statistics_equal_numpy_on_the_frame(n, d):
    rng = np.random.default_rng(n + d)
    df = pd.DataFrame({f"c{j}": rng.standard_normal(n) * rng.uniform(0.1, 1e3) + rng.uniform(-1e4, 1e4)
                       for j in range(d)})
    whole = df.to_numpy(dtype=np.float32)  # column-major, as the loader had it
    for max_bytes in (tables.BLOCK_BYTES, 4 * 3 * 4096):  # several columns at once, and one or two per pass
        mean, std = column_mean_std(np.ascontiguousarray(whole), max_bytes)
        assert mean.tobytes() == whole.mean(0).tobytes()
        assert std.tobytes() == whole.std(0).tobytes()


def _project(root: Path, train: pd.DataFrame, test: pd.DataFrame, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    (root / "model.py").write_text(MODEL)
    (root / "project.toml").write_text(
        '[project]\nname = "t"\n\n[data]\nformat = "tabular"\ntrain = "train.csv"\ntest = "test.csv"\n'
        f'label_column = "label"\n{extra}\n[model]\nfactory = "model.py:build"\ncheckpoints = "checkpoints"\n')
    return root


@pytest.mark.parametrize("edit,expect", [
    (lambda tr, te: tr.__setitem__("a", tr["a"].astype(object)) or tr.at.__setitem__((23, "a"), "oops"),
     ("train.csv", 23, "column 'a': value 'oops' is not a finite number")),
    (lambda tr, te: tr.at.__setitem__((17, "label"), None), ("train.csv", 17, "empty label in column 'label'")),
    (lambda tr, te: te.at.__setitem__((12, "label"), "fox"), ("test.csv", 12, "class 'fox' is in test but not in train")),
    (lambda tr, te: te.at.__setitem__((9, "e"), 5), ("test.csv", 9, "categorical column 'e': value 5 is not among")),
    (lambda tr, te: tr.at.__setitem__((31, "c"), None), ("train.csv", 31, "empty value in categorical column 'c'")),
])
def test_errors_name_the_row_in_the_whole_file(tmp_path, edit, expect):
    rng = np.random.default_rng(0)
    train, test = _frame(rng, 60), _frame(rng, 20)
    edit(train, test)
    root = _project(tmp_path / "p", train, test, 'categorical_columns = ["c", "e"]\n')
    file, row, text = expect
    with pytest.raises(ValidationError) as e:
        load_tabular_splits(root / "train.csv", root / "test.csv", "label", None, ["c", "e"], set(), rows=5)
    msg = str(e.value)
    assert text in msg and file in msg and f"row {row}" in msg, msg
    assert "\n" not in msg


def test_memory_is_bounded_by_the_chunk_not_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "BLOCK_BYTES", 1 << 20)
    d, peaks = 20, {}
    for n in (50_000, 200_000):
        rng = np.random.default_rng(1)
        df = pd.DataFrame(rng.standard_normal((n, d)), columns=[f"f{j}" for j in range(d)])
        df["label"] = rng.integers(0, 3, n)
        root = _project(tmp_path / f"n{n}", df, df.iloc[:50])
        del df
        tracemalloc.start()
        try:
            t = load_tabular_splits(root / "train.csv", root / "test.csv", "label", None, [], set(), rows=4096)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert t.x_train.shape == (n, d) and isinstance(t.x_train, np.memmap)  # inputs in a mapped file
    # per extra row: the labels (codes and class indexes) and one column of the statistics pass, about
    # 8-16 bytes; holding the float32 inputs would add 80 bytes a row, pandas' float64 table 168
    grown = peaks[200_000] - peaks[50_000]
    assert grown < 16 * 150_000, f"{grown / 2**20:.1f} MB more for 150,000 more rows"
    assert peaks[200_000] < 200_000 * d * 4 / 2, f"{peaks[200_000] / 2**20:.1f} MB traced"


def test_train_df_is_read_only_when_asked_and_nothing_is_left_on_disk(tmp_path):
    rng = np.random.default_rng(2)
    root = _project(tmp_path / "p", _frame(rng, 40), _frame(rng, 10), 'categorical_columns = ["c"]\n')
    (root / ".proponent" / "cache").mkdir(parents=True)
    before = sorted(p.name for p in root.rglob("*"))
    p = Project.load(root, check_model=False)
    assert p._data.train_df is None and p._data.test_df is None  # attribution never needs the raw table
    assert len(p.train_dataset) == 40 and p.input_shape == (7,)
    head = p.table_head("train", 3)  # a preview reads the first rows only
    assert p._data.train_df is None and head.equals(pd.read_csv(root / "train.csv", nrows=3))
    assert p.train_df.equals(pd.read_csv(root / "train.csv")) and len(p.test_df) == 10
    assert p.table_head("train", 3).equals(head)  # the same rows from the table once it is read
    assert sorted(q.name for q in root.rglob("*")) == before  # the scratch files were unlinked at once
    assert not [f for f in os.listdir(root / ".proponent" / "cache") if f.startswith("proponent-")]


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    root = _project(tmp_path / "p", _frame(rng, 40), _frame(rng, 10))
    cache = root / ".proponent" / "cache"
    cache.mkdir(parents=True)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ProponentError) as e:
        load_tabular_splits(root / "train.csv", root / "test.csv", "label", None, ["c", "e"], set(), scratch_dir=cache)
    assert "No space left on device" in str(e.value) and str(cache) in str(e.value)
    assert list(cache.iterdir()) == []


def test_labels_read_as_numbers_in_one_chunk_and_text_in_another_are_one_class_each(tmp_path):
    """pandas infers each chunk's (and each file's) label type on its own: a chunk holding a non-numeric label
    reads '0', '1', '2' as text where the others read 0, 1, 2. Each class is then known by its text, once, and
    the test file (all numbers) finds them; a truly unknown test class still names its row."""
    rng = np.random.default_rng(0)
    n = 60
    y = [str(i % 3) for i in range(n)]
    y[45] = "x"  # only the last chunk of 20 rows holds text
    pd.DataFrame({"a": rng.normal(size=n), "label": y}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"a": rng.normal(size=6), "label": [0, 1, 2, 0, 1, 2]}).to_csv(tmp_path / "test.csv", index=False)
    t = tables.load_tabular_splits(tmp_path / "train.csv", tmp_path / "test.csv", "label", None, [], set(), rows=20)
    assert t.classes == ["0", "1", "2", "x"]
    assert [t.classes[i] for i in t.y_train] == y
    assert [t.classes[i] for i in t.y_test] == ["0", "1", "2", "0", "1", "2"]
    pd.DataFrame({"a": rng.normal(size=3), "label": [0, 7, 1]}).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(tables.ValidationError, match="row 1.*class 7 is in test but not in train"):
        tables.load_tabular_splits(tmp_path / "train.csv", tmp_path / "test.csv", "label", None, [], set(), rows=20)
