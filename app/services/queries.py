"""Uploaded inputs used as queries, and training examples asked about as queries (a suspect's own
proponents and opponents)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from engine.api import attribute
from engine.autodiff.measurement import correct_class_margin
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import predict_logits
from engine.storage.arrays import atomic_save_npy, load_npy, stable_hash


def query_from_upload(project: Project, data: bytes, filename: str = "") -> np.ndarray:
    """An uploaded input as one query [1, *input_shape], preprocessed like the project's data:
    an image (PNG/JPEG; resized to the training images' size if it differs) or a one-row CSV with
    the feature columns (standardised with the training statistics)."""
    if project.data_format == "text":
        raise ProponentError("uploaded queries are not supported for text projects yet; pick a test sentence",
                             file=filename or None)
    if project.data_format == "images":
        c, h, w = project.input_shape
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if project.preprocessing.resize is None and im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                # the project's own resize / normalize, exactly as its training data was prepared
                arr = project.preprocess_image(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ProponentError(f"unreadable image: {e}", file=filename or None) from None
        return arr[None].astype(np.float32)

    try:
        df = pd.read_csv(io.BytesIO(data))
    except Exception as e:
        raise ProponentError(f"cannot parse CSV: {str(e).splitlines()[0]}", file=filename or None) from None
    missing = [c for c in project.feature_columns if c not in df.columns]
    if missing:
        raise ProponentError(f"feature column {missing[0]!r} missing", file=filename or None)
    if len(df) != 1:
        raise ProponentError(f"expected one data row, found {len(df)}", file=filename or None)
    row = pd.to_numeric(df[project.feature_columns].iloc[0], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(row).all():
        bad = project.feature_columns[int(np.argmax(~np.isfinite(row)))]
        raise ProponentError(f"column {bad!r} is not a finite number", file=filename or None, row=0)
    return ((row - project.feature_mean) / project.feature_std).astype(np.float32)[None]


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
