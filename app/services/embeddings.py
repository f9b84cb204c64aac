"""Influence and penultimate embeddings reduced to 2-D maps."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.storage.arrays import atomic_write_bytes

EMBED_MAX_POINTS = 3000


def embedding_path(project: Project, kind: str, reducer: str) -> Path:
    return project.state_dir / "embeddings" / f"{kind}-{reducer}-{project.checkpoint_hash()}-{project.data_hash()}.npz"


def cached_embedding(project: Project, kind: str, reducer: str) -> dict | None:
    p = embedding_path(project, kind, reducer)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def compute_embedding(project: Project, kind: str = "influence", reducer: str = "umap", *, max_points: int = EMBED_MAX_POINTS,
                      proj_dim: int = 256, progress=None, cancel=None) -> dict:
    """A 2-D layout of training examples, cached on disk under .proponent/embeddings.

    kind "influence": margin gradients at the final checkpoint, randomly projected (TRAK's
    features; engine.autodiff GradientComputer + make_projector). kind "penultimate": inputs of the
    last Linear layer. Sets larger than ``max_points`` are subsampled (seeded)."""
    from engine.autodiff import GradientComputer, make_projector
    from engine.autodiff.embeddings import penultimate_features
    from engine.autodiff.features import project_gradients

    cached = cached_embedding(project, kind, reducer)
    if cached is not None:
        return cached
    n = len(project.train_dataset)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    x, y = project.train_dataset.x[idx], project.train_dataset.y[idx]
    if progress:
        progress(f"features ({kind})", 0, len(idx))
    model = project.load_model()
    if kind == "influence":
        computer = GradientComputer(model)
        k = min(proj_dim, computer.n_params)
        projector = make_projector("auto", computer.n_params, k, seed=0)
        feats = []
        for lo in range(0, len(idx), 256):
            if cancel and cancel():
                from engine.core.errors import Cancelled
                raise Cancelled("embedding cancelled")
            feats.append(project_gradients(computer, projector, x[lo:lo + 256], y[lo:lo + 256], "margin").numpy())
            if progress:
                progress(f"features ({kind})", min(len(idx), lo + 256), len(idx))
        F = np.concatenate(feats, 0)
        # cosine geometry: influence directions matter more than gradient size
        F = F / np.maximum(1e-12, np.linalg.norm(F, axis=1, keepdims=True))
    elif kind == "penultimate":
        F = penultimate_features(model, x).numpy()
    else:
        raise ProponentError(f"embedding kind must be 'influence' or 'penultimate', not {kind!r}")
    if progress:
        progress(f"layout ({reducer})", 0, 1)
    xy = reduce_2d(F.astype(np.float32), reducer)
    if progress:
        progress(f"layout ({reducer})", 1, 1)
    out = {"xy": xy.astype(np.float32), "index": idx.astype(np.int64), "n_total": np.array(n)}
    path = embedding_path(project, kind, reducer)
    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(path, buf.getvalue())
    return out


def reduce_2d(F: np.ndarray, reducer: str = "umap") -> np.ndarray:
    if reducer == "pca":
        Fc = F - F.mean(0)
        _, _, vt = np.linalg.svd(Fc, full_matrices=False)
        return Fc @ vt[:2].T
    if reducer == "umap":
        import umap

        return umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(F)
    raise ProponentError(f"layout must be 'umap' or 'pca', not {reducer!r}")


def embedding_frame(project: Project, emb: dict, colour: str, *, flags: dict | None = None, run: dict | None = None,
                    preds: dict | None = None):
    """The scatter's data: x, y, index (customdata), and the colour column."""
    import pandas as pd

    idx = emb["index"]
    labels = project.train_dataset.y.numpy()[idx]
    df = pd.DataFrame({"x": emb["xy"][:, 0], "y": emb["xy"][:, 1], "index": idx,
                       "label": [str(project.class_name(c)) for c in labels]})
    if preds is not None:
        df["prediction"] = [str(project.class_name(c)) for c in preds["pred"][idx]]
    flags = flags or {}
    df["flag"] = [str(flags.get(int(i), {}).get("flag") or "none") for i in idx]
    if run is not None and run.get("self_scores") is not None:
        df["self_influence"] = np.asarray(run["self_scores"])[idx]
    return df
