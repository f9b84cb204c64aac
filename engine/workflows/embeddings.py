"""Influence and penultimate embeddings of the training set, reduced to 2-D maps and cached on disk.

kind "influence": margin gradients at the final checkpoint, randomly projected (TRAK's features)
and normalised to unit length, so the map shows influence directions rather than gradient size.
The margin is taken for the model's *predicted* class, not the given label: gradients of the given
label's margin split the map by given label (ten pure clusters on digits), which hides exactly the
examples triage looks for; with the predicted class a mislabeled example sits among its true
class and shows up in the colour of its given label (scripts/bench_embeddings.py measures this).
kind "penultimate": inputs of the model's last Linear layer.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from engine.autodiff import GradientComputer, make_projector
from engine.autodiff.embeddings import penultimate_features
from engine.autodiff.features import project_gradients
from engine.core.errors import Cancelled, ProponentError
from engine.core.project import Project
from engine.storage.arrays import atomic_write_bytes

EMBED_MAX_POINTS = 3000
EMBED_KINDS = ("influence", "penultimate")
REDUCERS = ("umap", "pca")
_CHUNK = 256


LABELS = ("predicted", "given")


def embedding_path(project: Project, kind: str, reducer: str, label: str = "predicted") -> Path:
    tag = f"{kind}-{label}" if kind == "influence" else kind
    return project.state_dir / "embeddings" / f"{tag}-{reducer}-{project.checkpoint_hash()}-{project.data_hash()}.npz"


def cached_embedding(project: Project, kind: str, reducer: str, label: str = "predicted") -> dict | None:
    p = embedding_path(project, kind, reducer, label)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def compute_embedding(project: Project, kind: str = "influence", reducer: str = "umap", *,
                      max_points: int = EMBED_MAX_POINTS, proj_dim: int = 256, label: str = "predicted",
                      progress=None, cancel=None) -> dict:
    """{"xy": [m, 2], "index": [m] training rows, "n_total"}: a seeded subsample of at most
    ``max_points`` rows, read by chunks of 256 (memory bounded by the chunk, not by n)."""
    if kind not in EMBED_KINDS:
        raise ProponentError(f"embedding kind must be one of {', '.join(EMBED_KINDS)}, not {kind!r}")
    if reducer not in REDUCERS:
        raise ProponentError(f"layout must be one of {', '.join(REDUCERS)}, not {reducer!r}")
    if label not in LABELS:
        raise ProponentError(f"embedding label must be one of {', '.join(LABELS)}, not {label!r}")
    cached = cached_embedding(project, kind, reducer, label)
    if cached is not None:
        return cached
    n = len(project.train_dataset)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    stage = f"features ({kind})"
    if progress:
        progress(stage, 0, len(idx))
    model = project.load_model()
    computer = GradientComputer(model) if kind == "influence" else None
    projector = (make_projector("auto", computer.n_params, min(proj_dim, computer.n_params), seed=0)
                 if computer is not None else None)
    feats = []
    for lo in range(0, len(idx), _CHUNK):
        if cancel and cancel():
            raise Cancelled("embedding cancelled")
        rows = torch.as_tensor(idx[lo:lo + _CHUNK])
        x, y = project.train_dataset.x[rows], project.train_dataset.y[rows]
        if computer is not None:
            if label == "predicted":
                with torch.no_grad():
                    y = computer.outputs(x).argmax(1).cpu()
            feats.append(project_gradients(computer, projector, x, y, "margin").numpy())
        else:
            feats.append(penultimate_features(model, x).numpy())
        if progress:
            progress(stage, min(len(idx), lo + _CHUNK), len(idx))
    F = np.concatenate(feats, 0).astype(np.float32)
    if kind == "influence":
        F = F / np.maximum(1e-12, np.linalg.norm(F, axis=1, keepdims=True))
    if progress:
        progress(f"layout ({reducer})", 0, 1)
    xy = reduce_2d(F, reducer)
    if progress:
        progress(f"layout ({reducer})", 1, 1)
    out = {"xy": xy.astype(np.float32), "index": idx.astype(np.int64), "n_total": np.array(n)}
    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(embedding_path(project, kind, reducer, label), buf.getvalue())
    return out


def reduce_2d(F: np.ndarray, reducer: str = "umap") -> np.ndarray:
    if reducer == "pca":
        Fc = F - F.mean(0)
        _, _, vt = np.linalg.svd(Fc, full_matrices=False)
        return Fc @ vt[:2].T
    if reducer == "umap":
        import umap  # umap imports numba and takes seconds; only the UMAP layout needs it

        return umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(F)
    raise ProponentError(f"layout must be one of {', '.join(REDUCERS)}, not {reducer!r}")
