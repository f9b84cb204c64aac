"""Tabular splits read chunk by chunk: the model inputs of a table built without holding the table.

A split of a tabular project is parsed in row chunks (pandas' chunked CSV and JSONL readers,
pyarrow's Parquet batches). Each chunk is checked as it arrives (labels, finite numbers,
categories), and an error names the file and the row in the whole file. The numeric columns go
to a scratch file; standardisation (training statistics) and one-hot encoding then run over it
block by block into the split's float32 input array, which is memory-mapped from an unlinked
temporary file. So memory is one chunk plus what the OS keeps of the mapped file, not the table
(loading a 1M-row, 20-column CSV whole peaked 579 MB above the import, chunk by chunk 206 MB, in a
scratch measurement; scripts/bench_scale.py measures the whole TRAK run).

The statistics are numpy's own float32 reductions over each column held contiguous, as the
column-major array pandas hands out was (:func:`column_mean_std`), so the inputs (and the data
hashes that recorded trajectories are checked against) are bit-identical to reading the table whole.

The raw table (``Project.train_df``) is read only when something asks for it (the app's preview,
leak search on text, exports), not to attribute.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from engine.core.errors import ValidationError
from engine.storage.arrays import disk_error, scratch_array, scratch_file

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
CHUNK_BYTES = 64 << 20  # a parsed chunk (pandas holds numbers as 8-byte values) stays about this size
MAX_CHUNK_ROWS = 1 << 16
BLOCK_BYTES = 8 << 20  # float32 blocks of the passes over the scratch and input arrays (a pass makes ~3 temporaries)


def csv_options(text_columns=()) -> dict:
    """pandas.read_csv options for every table Proponent reads. Only an empty cell is missing: by
    default pandas also reads "NA", "N/A", "None", "null", "nan" ... as missing, so a class named NA
    (North America) or a text "None" could not be used, and the error said "empty". ``text_columns``
    are kept as written ("007" stays "007")."""
    opts = {"keep_default_na": False, "na_values": [""]}
    if text_columns:
        opts["dtype"] = {c: str for c in text_columns}
    return opts


def table_kind(path: Path) -> str:
    return TABLE_SUFFIXES.get(path.suffix.lower(), "csv")


def chunk_rows(n_columns: int) -> int:
    """Rows per parsed chunk for a table of ``n_columns`` columns."""
    return int(max(256, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (8 * max(n_columns, 1)))))


def parse_error(path: Path, kind: str, e: Exception) -> ValidationError:
    """The one line for a table pandas or pyarrow could not parse. Their messages give a byte offset in
    a buffer (a bad JSON line, a byte that is not UTF-8), so the file is scanned for the line instead."""
    name = "JSONL" if kind == "jsonl" else kind.upper()
    located = _bad_line(path, kind, e)
    if located is not None:
        line, problem = located
        return ValidationError(f"cannot parse {name}: line {line}: {problem}", file=str(path))
    return ValidationError(f"cannot parse {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           file=str(path))


def _bad_line(path: Path, kind: str, e: Exception) -> tuple[int, str] | None:
    """(1-based line, problem) of the first line of a CSV or JSONL file that is not UTF-8 text or (JSONL)
    not a JSON object; None when no line is at fault or the file cannot be read."""
    if kind == "parquet" or not (isinstance(e, UnicodeDecodeError) or kind == "jsonl"):
        return None
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as u:
                    return i, (f"byte 0x{raw[u.start]:02x} at column {u.start + 1} is not UTF-8 text; "
                               f"save the file as UTF-8")
                if kind != "jsonl" or not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as j:
                    return i, f"not valid JSON ({j.msg} at column {j.colno})"
                if not isinstance(obj, dict):
                    return i, f"expected a JSON object per line, got {type(obj).__name__}"
    except OSError:
        return None
    return None


def check_unique_header(path: Path) -> list[str]:
    """A CSV's header; a repeated name is an error (pandas would rename it "name.1")."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    seen = set()
    for name in header:
        if name in seen:
            raise ValidationError(f"column {name!r} appears twice in the header", file=str(path))
        seen.add(name)
    return header


def _raw_chunks(path: Path, kind: str, rows: int | None, n_columns: int,
                text_columns=()) -> Iterator[pd.DataFrame]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        rows = rows or chunk_rows(pf.metadata.num_columns)
        for batch in pf.iter_batches(batch_size=rows):
            yield batch.to_pandas()
    elif kind == "jsonl":
        with pd.read_json(path, lines=True, chunksize=rows or 16384) as reader:
            yield from reader
    else:
        rows = rows or chunk_rows(n_columns)
        with pd.read_csv(path, chunksize=rows, **csv_options(text_columns)) as reader:
            yield from reader


def check_labels(df: pd.DataFrame, label_column: str, path: Path, first_row: int = 0) -> None:
    """The label column is there and no label in it is empty (the error gives the row in the file)."""
    if label_column not in df.columns:
        raise ValidationError(
            f"label column {label_column!r} not found (columns: {', '.join(map(str, df.columns))})", file=str(path))
    missing = df[label_column].isna().to_numpy()
    if missing.any():
        raise ValidationError(f"empty label in column {label_column!r}", file=str(path),
                              row=first_row + int(np.argmax(missing)))


def iter_table(path: Path, label_column: str, *, rows: int | None = None,
               text_columns=()) -> Iterator[tuple[int, pd.DataFrame]]:
    """(first row, chunk) over a CSV, Parquet or JSONL file, with :func:`engine.core.data.read_table`'s
    checks: the file exists and parses, has the label column and at least one row, and no label
    is empty (the error gives the row in the whole file)."""
    if not path.is_file():
        raise ValidationError("file not found", file=str(path))
    kind = table_kind(path)
    n_columns = len(check_unique_header(path)) if kind == "csv" else 0
    chunks = _raw_chunks(path, kind, rows, n_columns, text_columns)
    lo = 0
    while True:
        try:
            df = next(chunks)
        except StopIteration:
            break
        except ValidationError:
            raise
        except Exception as e:  # pandas/pyarrow raise many types; the user needs one line
            raise parse_error(path, kind, e) from None
        df.columns = [str(c) for c in df.columns]
        check_labels(df, label_column, path, lo)
        if len(df):
            df.index = pd.RangeIndex(lo, lo + len(df))
            yield lo, df
        lo += len(df)
    if lo == 0:
        raise ValidationError("no data rows", file=str(path))


def _block_rows(width: int) -> int:
    return max(1, BLOCK_BYTES // (4 * max(width, 1)))


# ----------------------------------------------------------------------------- labels and categories
def native(v):
    """numpy scalars → Python values, so labels print and compare plainly."""
    return v.item() if hasattr(v, "item") else v


def class_order(values) -> list:
    return sorted(values, key=lambda v: (str(type(v)), v))


class FirstSeen:
    """Codes of a column's values in order of first appearance, chunk by chunk (int32 per row);
    remapped to a sorted order once every value has been seen."""

    def __init__(self, key=native):
        self.key = key
        self.ids: dict = {}
        self.codes: list[np.ndarray] = []

    def add(self, values: pd.Series) -> None:
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
        ids = np.array([self.ids.setdefault(self.key(u), len(self.ids)) for u in uniques], np.int32)
        self.codes.append(ids[codes] if len(ids) else np.zeros(len(values), np.int32))

    def merge_by_text(self) -> None:
        """Values known by their text where pandas read the column as numbers in one chunk or file and as text in
        another (a chunk holding a non-numeric value): 1 and '1' are then one value, '1'."""
        if len({isinstance(k, str) for k in self.ids}) < 2:
            return
        merged: dict = {}
        lut = np.array([merged.setdefault(str(k), len(merged)) for k in self.ids], np.int32)
        self.codes = [lut[c] for c in self.codes]
        self.ids = merged

    def remapped(self, order: list) -> np.ndarray:
        where = {v: i for i, v in enumerate(order)}
        lut = np.array([where[v] for v in self.ids], np.int64)
        return lut[np.concatenate(self.codes)] if self.codes else np.zeros(0, np.int64)


def _codes_in(values: pd.Series, index: dict, key, on_unknown) -> np.ndarray:
    """Codes of ``values`` in a fixed ``index`` (test split); ``on_unknown(position)`` raises."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    lut = np.empty(len(uniques), np.int64)
    for j, u in enumerate(uniques):
        k = key(u)
        if k not in index:
            on_unknown(int(np.argmax(codes == j)))
        lut[j] = index[k]
    return lut[codes]


def class_list(labels: FirstSeen, label_column: str, train_file: Path) -> list:
    """The training classes in their printed order; a single class is an error."""
    labels.merge_by_text()
    classes = class_order(labels.ids)
    if len(classes) < 2:
        raise ValidationError(f"the training data has a single class ({classes[0]!r} in column {label_column!r}); "
                              f"classification needs at least two", file=str(train_file))
    return classes


def test_class_codes(values: pd.Series, class_index: dict, file: Path, first_row: int = 0) -> np.ndarray:
    """Class indexes of test labels; a class the training data lacks is an error naming its row."""
    def unknown(r: int):
        raise ValidationError(f"class {native(values.iloc[r])!r} is in test but not in train", file=str(file),
                              row=first_row + r)

    # a test file pandas read with another type than the training labels (numbers there, text here, or the
    # reverse) still finds its classes by their text
    by_text = {**{str(k): i for k, i in class_index.items()}, **class_index}

    def key(v):
        v = native(v)
        return v if v in class_index else str(v)

    return _codes_in(values, by_text, key, unknown)


def _category_key(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


# ----------------------------------------------------------------------------- statistics
def column_mean_std(raw: np.ndarray, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-column float32 mean and (population) standard deviation of a float32 [n, d] array (a
    memory map), bit for bit what numpy gives for the column-major array pandas hands out
    (``DataFrame.to_numpy()`` is a transposed block, so numpy sums each contiguous column
    pairwise). Columns are gathered a few at a time, contiguous, into a buffer of at most
    ``max_bytes`` (at least one column), so nothing holds the n × d table or numpy's n × d
    temporary of ``std``."""
    raw = np.asarray(raw)  # a plain view of the map: reductions return arrays, not memmaps
    n, d = raw.shape
    max_bytes = max_bytes or BLOCK_BYTES
    mean, std = np.zeros(d, np.float32), np.ones(d, np.float32)
    group = max(1, min(d, max_bytes // max(4 * n, 1)))
    step = _block_rows(group)
    for c0 in range(0, d, group):
        c1 = min(d, c0 + group)
        cols = np.empty((c1 - c0, n), np.float32)  # each row a contiguous column
        for lo in range(0, n, step):
            cols[:, lo:lo + step] = raw[lo:lo + step, c0:c1].T
        for j in range(c1 - c0):
            mean[c0 + j], std[c0 + j] = cols[j].mean(), cols[j].std()
    return mean, std


# ----------------------------------------------------------------------------- one split
@dataclass
class _ParsedSplit:
    file: Path
    n: int
    raw: np.ndarray | None  # float32 [n, numeric] memory map of the scratch file
    categories: dict[str, np.ndarray]  # column → int64 codes into the training categories


@dataclass
class TabularSplits:
    x_train: np.ndarray  # float32 [n, features] memory maps
    x_test: np.ndarray
    y_train: np.ndarray  # int64 class indexes
    y_test: np.ndarray
    classes: list
    feature_names: list[str]
    mean: np.ndarray  # of the numeric columns (float32)
    std: np.ndarray
    categories: dict[str, list[str]]


def _numeric_block(df: pd.DataFrame, numeric: list[str], file: Path, lo: int) -> np.ndarray:
    block = df[numeric]
    for c in numeric:
        # pandas would turn dates and durations into nanosecond counts: numbers, but not features
        if block[c].dtype.kind in "mM":
            raise ValidationError(f"column {c!r} holds {'dates' if block[c].dtype.kind == 'M' else 'durations'} "
                                  f"({block[c].dtype}), not numbers; leave it out with [data] feature_columns, "
                                  f"or store it as a number", file=str(file))
    num = block.apply(pd.to_numeric, errors="coerce")
    bad = num.isna().to_numpy() | ~np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        value = block.iat[r, c]
        if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
            # an empty CSV cell, a JSON null or absent key, a Parquet null, or a NaN
            problem = "has no value (empty, null, missing or NaN)"
        else:
            problem = f"value {str(value)!r} is not a finite number"
        raise ValidationError(f"column {numeric[c]!r}: {problem}", file=str(file), row=lo + r)
    return num.to_numpy(dtype=np.float32)


def load_tabular_splits(train_file: Path, test_file: Path, label_column: str, feature_columns: list[str] | None,
                        categorical_columns: list[str], exclude: set[str], scratch_dir: Path | None = None,
                        rows: int | None = None) -> TabularSplits:
    """Both splits of a tabular project as float32 inputs (numeric columns standardised with the
    training split's statistics, then one-hot categorical columns), read chunk by chunk."""
    lc, cats = label_column, list(categorical_columns)
    state: dict = {}

    def columns_of(df: pd.DataFrame, file: Path) -> None:
        if "cols" not in state:
            if feature_columns is not None:
                cols = list(feature_columns) + [c for c in cats if c not in feature_columns]
            else:
                cols = [c for c in df.columns if c != lc and c not in exclude]
            state["cols"] = cols
        cols = state["cols"]
        for c in list(cols) + [c for c in cats if c not in cols]:
            if c not in df.columns:
                kind = "categorical" if c in cats else "feature"
                raise ValidationError(f"{kind} column {c!r} not found (columns: {', '.join(map(str, df.columns))})",
                                      file=str(file))
        if lc in cols or lc in cats:
            kind = "categorical" if lc in cats else "feature"
            raise ValidationError(f"[data] label column {lc!r} cannot also be a {kind} column", file=str(train_file))
        if not cols:
            raise ValidationError("no feature columns", file=str(train_file))

    def parse(file: Path, train: bool) -> tuple[_ParsedSplit, object]:
        f, where = scratch_file(scratch_dir, "table")
        labels = FirstSeen() if train else []
        cat_codes: dict[str, object] = {c: (FirstSeen(_category_key) if train else []) for c in cats}
        n, numeric = 0, None
        try:
            for lo, df in iter_table(file, lc, rows=rows):
                columns_of(df, file)
                numeric = [c for c in state["cols"] if c not in cats]
                if train:
                    labels.add(df[lc])
                else:
                    labels.append(test_class_codes(df[lc], state["class_index"], file, lo))
                for c in cats:
                    if train:
                        missing = df[c].isna().to_numpy()
                        if missing.any():
                            raise ValidationError(f"empty value in categorical column {c!r}", file=str(file),
                                                  row=lo + int(np.argmax(missing)))
                        cat_codes[c].add(df[c])
                    else:
                        known = state["category_index"][c]

                        def unknown_category(r, lo=lo, df=df, c=c):
                            v = native(df[c].iloc[r])
                            raise ValidationError(f"categorical column {c!r}: value {v!r} is not among the training "
                                                  f"categories ({', '.join(state['categories'][c])})",
                                                  file=str(file), row=lo + r)

                        cat_codes[c].append(_codes_in(df[c], known, _category_key, unknown_category))
                try:
                    f.write(_numeric_block(df, numeric, file, lo).tobytes())
                except OSError as e:
                    raise disk_error(e, where, "parsed table") from None
                n += len(df)
            f.flush()
            width = len(numeric or [])
            raw = (np.memmap(f, dtype=np.float32, mode="r", shape=(n, width)) if n * width
                   else np.zeros((n, width), np.float32))
        finally:
            f.close()  # the map keeps its own handle
        if train:
            classes = class_list(labels, lc, train_file)
            state["classes"] = classes
            state["class_index"] = {c: i for i, c in enumerate(classes)}
            y = labels.remapped(classes)
            state["categories"] = {c: sorted(cat_codes[c].ids) for c in cats}
            state["category_index"] = {c: {v: i for i, v in enumerate(state["categories"][c])} for c in cats}
            codes = {c: cat_codes[c].remapped(state["categories"][c]) for c in cats}
        else:
            y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            codes = {c: np.concatenate(cat_codes[c]) for c in cats}
        return _ParsedSplit(file, n, raw, codes), y

    train, y_train = parse(train_file, True)
    test, y_test = parse(test_file, False)
    mean, std = column_mean_std(train.raw)
    std[std == 0] = 1.0
    categories = state["categories"]
    numeric = [c for c in state["cols"] if c not in cats]
    names = [str(c) for c in numeric] + [f"{c}={v}" for c in cats for v in categories[c]]
    xs = [_inputs(s, mean, std, [len(categories[c]) for c in cats], cats, len(names), scratch_dir)
          for s in (train, test)]
    return TabularSplits(xs[0], xs[1], y_train, y_test, state["classes"], names, mean, std, categories)


def _inputs(split: _ParsedSplit, mean: np.ndarray, std: np.ndarray, sizes: list[int], cats: list[str],
            width: int, scratch_dir: Path | None) -> np.ndarray:
    """The split's model inputs: ``(raw - mean) / std`` then the one-hot columns, block by block
    into a preallocated float32 map (a full disk fails before any row is written)."""
    out = scratch_array((split.n, width), np.float32, scratch_dir, "table's inputs")
    step = _block_rows(width)
    for lo in range(0, split.n, step):
        hi = min(split.n, lo + step)
        parts = [(split.raw[lo:hi] - mean) / std]
        for c, k in zip(cats, sizes):
            hot = np.zeros((hi - lo, k), np.float32)
            hot[np.arange(hi - lo), split.categories[c][lo:hi]] = 1.0
            parts.append(hot)
        out[lo:hi] = np.concatenate(parts, axis=1)
    split.raw = None  # unmaps the scratch file (its pages leave memory)
    return out


__all__ = ["csv_options", "iter_table", "check_labels", "parse_error", "load_tabular_splits", "column_mean_std", "check_unique_header", "table_kind",
           "chunk_rows", "TabularSplits", "TABLE_SUFFIXES", "native", "class_order", "FirstSeen", "class_list",
           "test_class_codes"]
