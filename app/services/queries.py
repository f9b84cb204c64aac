"""Uploaded inputs used as queries, and training examples asked about as queries (a suspect's own
proponents and opponents)."""
from __future__ import annotations

import base64
import dataclasses
import io
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import UnidentifiedImageError

from engine.api import attribute
from engine.autodiff.measurement import correct_class_margin
from engine.core.errors import ProponentError
from engine.core.images import read_raw_image
from engine.core.project import Project
from engine.core.train import predict_logits
from engine.storage.arrays import atomic_save_npy, load_npy, stable_hash


def query_from_upload(project: Project, data: bytes, filename: str = "") -> np.ndarray:
    """An uploaded input as one query [1, *input_shape], preprocessed like the project's data:
    an image (PNG/JPEG; resized to the training images' size if it differs) or a one-row CSV with
    the training table's feature columns (numbers standardised with the training statistics,
    categories one-hot with the training categories) or with the model's encoded columns."""
    if project.data_format == "text":
        raise ProponentError("uploaded queries are not supported for text projects yet; pick a test sentence",
                             file=filename or None)
    if project.data_format == "images":
        return _image_query(project, data, filename)
    return _table_query(project, data, filename)


def _image_query(project: Project, data: bytes, filename: str) -> np.ndarray:
    c, h, w = project.input_shape
    file = filename or None
    try:
        im = read_raw_image(data)
    except UnidentifiedImageError:  # PIL's own message names only the in-memory buffer
        raise ProponentError("unreadable image: not an image file PIL can read (PNG, JPEG, BMP, ...)",
                             file=file) from None
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as e:
        # (a damaged file reaches PIL's decoders as any of these)
        raise ProponentError(f"unreadable image: {e}", file=file) from None
    # the project's own preprocessing (bit depth, colours, resize, normalize), so an upload is
    # converted or refused exactly as a training file would be, in the size the model takes
    prep = dataclasses.replace(project.preprocessing, mode="grey" if c == 1 else "rgb",
                               resize=project.preprocessing.resize or (h, w))
    try:
        arr = prep.apply(im)
    except (OSError, ValueError) as e:
        raise ProponentError(f"image cannot be used: {e}", file=file) from None
    return arr[None].astype(np.float32)


def _table_query(project: Project, data: bytes, filename: str) -> np.ndarray:
    file = filename or None
    try:
        df = pd.read_csv(io.BytesIO(data))
    except Exception as e:
        raise ProponentError(f"cannot parse CSV: {str(e).splitlines()[0]}", file=file) from None
    df.columns = [str(col) for col in df.columns]
    if len(df) != 1:
        raise ProponentError(f"expected one data row, found {len(df)}", file=file)
    features, cats = list(project.feature_columns), dict(project.categories or {})
    # feature_columns are the numeric columns, then one "column=value" per category (tables.load_tabular_splits)
    numeric = features[:len(features) - sum(len(v) for v in cats.values())]
    mean = np.asarray(project.feature_mean, np.float32)
    std = np.asarray(project.feature_std, np.float32)
    raw_columns = numeric + list(cats)
    if all(col in df.columns for col in raw_columns):
        hot = [_one_hot_of_value(col, df[col].iloc[0], known, file) for col, known in cats.items()]
    elif cats and all(col in df.columns for col in features):
        hot, at = [], len(numeric)
        for col, known in cats.items():
            hot.append(_checked_one_hot(col, df[features[at:at + len(known)]].iloc[0], file))
            at += len(known)
    else:
        missing = next(col for col in raw_columns if col not in df.columns)
        raise ProponentError(f"feature column {missing!r} missing (expected the training table's columns: "
                             f"{', '.join(raw_columns)})", file=file)
    values = df[numeric].iloc[0]
    row = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(row).all():
        bad = numeric[int(np.argmax(~np.isfinite(row)))]
        problem = "has no value" if pd.isna(values[bad]) else f"value {str(values[bad])!r} is not a finite number"
        raise ProponentError(f"column {bad!r} {problem}", file=file, row=0)
    k = len(numeric)
    # float32 arithmetic, as the training inputs were made (tables._inputs): the same row, the same input
    x = (row.astype(np.float32) - mean[:k]) / std[:k]
    return np.concatenate([x] + hot).astype(np.float32)[None]


def _category_keys(v) -> list[str]:
    """How a CSV cell may be spelt among the training categories (kept as text: tables._category_key);
    a one-row CSV parses 3 as an integer where the training column held 3.0, or the reverse."""
    keys = [str(v)]
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        f = float(v)
        keys.append(str(f))
        if f.is_integer():
            keys.append(str(int(f)))
    return keys


def _one_hot_of_value(column: str, v, known: list, file: str | None) -> np.ndarray:
    if pd.isna(v):
        raise ProponentError(f"categorical column {column!r} has no value (the training categories: "
                             f"{', '.join(map(str, known))})", file=file, row=0)
    index = {str(k): i for i, k in enumerate(known)}
    hit = next((index[k] for k in _category_keys(v) if k in index), None)
    if hit is None:
        raise ProponentError(f"categorical column {column!r}: value {str(v)!r} is not among the training categories "
                             f"({', '.join(map(str, known))})", file=file, row=0)
    out = np.zeros(len(known), np.float32)
    out[hit] = 1.0
    return out


def _checked_one_hot(column: str, values: pd.Series, file: str | None) -> np.ndarray:
    """An already-encoded group: every cell 0 or 1 and exactly one 1, or the model would be asked
    about an input no training row could have been."""
    nums = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isin(nums, (0.0, 1.0)).all():
        bad = values.index[int(np.argmax(~np.isin(nums, (0.0, 1.0))))]
        shown = "empty" if pd.isna(values[bad]) else repr(str(values[bad]))
        raise ProponentError(f"one-hot column {bad!r} of categorical column {column!r} is {shown}; "
                             f"it must be 0 or 1 (or give {column!r} itself, as in the training table)",
                             file=file, row=0)
    if nums.sum() != 1:
        raise ProponentError(f"categorical column {column!r}: its one-hot columns ({', '.join(values.index)}) must "
                             f"hold exactly one 1, found {int(nums.sum())} (or give {column!r} itself, as in the "
                             f"training table)", file=file, row=0)
    return nums.astype(np.float32)


def save_query(project: Project, x: np.ndarray) -> str:
    """Store an uploaded query's input under .proponent/queries; returns its id."""
    qid = stable_hash(base64.b64encode(np.ascontiguousarray(x).tobytes()).decode(), 12)
    atomic_save_npy(project.state_dir / "queries" / f"{qid}-x.npy", x)
    return qid


def query_scores_path(project: Project, qid: str, key: str, label: int) -> Path:
    return project.state_dir / "queries" / f"{qid}-{key}-y{int(label)}.npy"


def score_uploaded_query(project: Project, qid: str, method: str, settings: dict, key: str, label: int,
                         device: str = "auto", progress=None, cancel=None) -> dict:
    """Scores [n_train] of an uploaded query (explaining its margin for class ``label``)."""
    x = load_npy(project.state_dir / "queries" / f"{qid}-x.npy", mmap=False)
    S = attribute(project, method, (torch.as_tensor(x), torch.tensor([int(label)])), settings or None, device=device,
                  progress=progress, cancel=cancel)
    row = np.asarray(S, dtype=np.float32).reshape(-1)
    atomic_save_npy(query_scores_path(project, qid, key, label), row)
    return {"qid": qid, "key": key, "label": int(label)}


def train_query_scores_path(project: Project, index: int, key: str) -> Path:
    return project.state_dir / "queries" / f"train{int(index)}-{key}.npy"


def score_train_query(project: Project, index: int, method: str, settings: dict, key: str, device: str = "auto",
                      progress=None, cancel=None) -> dict:
    """Scores [n_train] of training example ``index`` used as the query (the margin of its given label):
    which training examples hold its label up, and which pull against it."""
    n = len(project.train_dataset)
    if not 0 <= int(index) < n:
        raise ProponentError(f"training index {index} out of range (the project has {n} training examples)")
    S = attribute(project, method, ("train", np.array([int(index)])), settings or None, device=device,
                  progress=progress, cancel=cancel)
    row = np.asarray(S, dtype=np.float32).reshape(-1)
    atomic_save_npy(train_query_scores_path(project, index, key), row)
    return {"index": int(index), "key": key}


def uploaded_prediction(project: Project, x: np.ndarray) -> dict:
    logits = predict_logits(project.load_model(), torch.as_tensor(x))
    probs = torch.softmax(logits, 1).numpy()[0]
    return {"probs": probs, "pred": int(probs.argmax()),
            "margins": [float(correct_class_margin(logits, torch.tensor([c]))[0]) for c in range(project.num_classes)]}
