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

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from engine.autodiff import GradientComputer, make_projector
from engine.autodiff.compute import resolve_device
from engine.autodiff.embeddings import penultimate_features
from engine.autodiff.features import project_gradients
from engine.core.errors import Cancelled, ProponentError
from engine.core.project import Project
from engine.storage.arrays import atomic_write_bytes, stable_hash

EMBED_MAX_POINTS = 3000
EMBED_KINDS = ("influence", "penultimate")
REDUCERS = ("tsne", "umap", "pca")
DEFAULT_REDUCER = "tsne"
PLACE_NEIGHBOURS = 10
# 250 early-exaggeration iterations (sklearn's fixed first phase) and 100 more: on 4 validation digits
# projects 350 shows mislabels as well as 500 (mean AUROC 0.990 influence, 0.995 penultimate, both) in
# 1.69 s a map instead of 2.44 s (`scripts/bench_embeddings.py --reducers tsne --tsne-iterations 500`, then 350)
TSNE_ITERATIONS = 350
# Barnes-Hut's accuracy/speed trade-off: 0.7 (sklearn's default is 0.5) took a single-thread t-SNE of
# digits from 6.7 to 4.6 s with the same mislabel visibility on validation digits projects
# (scripts/bench_embeddings.py)
TSNE_ANGLE = 0.7
UMAP_NEIGHBOURS = 15
UMAP_MIN_DIST = 0.1
EMBED_PROJ_DIM = 256
_CHUNK = 256
PLACE_CHUNK = 4096  # rows placed on the map per step (features and layout transform), bounded memory


LABELS = ("predicted", "given")


def layout_key(reducer: str, max_points: int = EMBED_MAX_POINTS, proj_dim: int = EMBED_PROJ_DIM) -> str:
    """What a map depends on besides the checkpoints and the data: the layout's settings, so a
    cached map made with other settings (another t-SNE length, sample size or feature width) is
    not shown as the current one."""
    settings = {"reducer": reducer, "max_points": int(max_points), "proj_dim": int(proj_dim),
                "place_neighbours": PLACE_NEIGHBOURS}
    if reducer == "tsne":
        settings |= {"iterations": TSNE_ITERATIONS, "angle": TSNE_ANGLE}
    elif reducer == "umap":
        settings |= {"n_neighbors": UMAP_NEIGHBOURS, "min_dist": UMAP_MIN_DIST}
    return stable_hash(settings, 8)


def embedding_path(project: Project, kind: str, reducer: str, label: str = "predicted", *,
                   max_points: int = EMBED_MAX_POINTS, proj_dim: int = EMBED_PROJ_DIM) -> Path:
    tag = f"{kind}-{label}" if kind == "influence" else kind
    return project.state_dir / "embeddings" / (f"{tag}-{reducer}-{layout_key(reducer, max_points, proj_dim)}-"
                                                f"{project.checkpoint_hash()}-{project.data_hash()}.npz")


def cached_embedding(project: Project, kind: str, reducer: str, label: str = "predicted", *,
                     max_points: int = EMBED_MAX_POINTS, proj_dim: int = EMBED_PROJ_DIM) -> dict | None:
    p = embedding_path(project, kind, reducer, label, max_points=max_points, proj_dim=proj_dim)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def compute_embedding(project: Project, kind: str = "influence", reducer: str = DEFAULT_REDUCER, *,
                      max_points: int = EMBED_MAX_POINTS, proj_dim: int = EMBED_PROJ_DIM, label: str = "predicted",
                      progress=None, cancel=None, device: str = "auto", threads: int | None = None) -> dict:
    """{"xy": [m, 2], "index": [m] training rows, "n_total", and "xy_all" [n, 2] when n > m}: the layout
    is fitted on a seeded subsample of at most ``max_points`` rows (what the page draws); every other
    row is then placed on it (PCA's projection, UMAP's ``transform``, t-SNE's nearest layout rows) by
    chunks of ``PLACE_CHUNK``, so a selection covers the whole set. Features are read by chunks of 256:
    memory is bounded by the chunk, plus the [n, 2] coordinates. ``threads``: OpenMP/BLAS threads of
    the layout (the app runs both maps at once on a share of the cores: on 2 cores the two digits maps
    took 25.7 s with two spinning OpenMP threads each, 8.4 s with one)."""
    if kind not in EMBED_KINDS:
        raise ProponentError(f"embedding kind must be one of {', '.join(EMBED_KINDS)}, not {kind!r}")
    if reducer not in REDUCERS:
        raise ProponentError(f"layout must be one of {', '.join(REDUCERS)}, not {reducer!r}")
    if label not in LABELS:
        raise ProponentError(f"embedding label must be one of {', '.join(LABELS)}, not {label!r}")
    cached = cached_embedding(project, kind, reducer, label, max_points=max_points, proj_dim=proj_dim)
    if cached is not None:
        return cached
    n = len(project.train_dataset)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    stage = f"features ({kind})"
    if progress:
        progress(stage, 0, len(idx))
    device = resolve_device(device)
    model = project.load_model()
    computer = GradientComputer(model, device=device) if kind == "influence" else None
    # the same projection on either device (see engine/autodiff/projection.py): the same map features
    projector = (make_projector("auto", computer.n_params, min(proj_dim, computer.n_params), seed=0, device=device)
                 if computer is not None else None)
    feats = []
    for lo in range(0, len(idx), _CHUNK):
        if cancel and cancel():
            raise Cancelled("embedding cancelled")
        feats.append(_features(project, idx[lo:lo + _CHUNK], model, computer, projector, label, device))
        if progress:
            progress(stage, min(len(idx), lo + _CHUNK), len(idx))
    F = _normalise(np.concatenate(feats, 0).astype(np.float32), kind)
    if progress:
        progress(f"layout ({reducer})", 0, 1)
    with threadpool_limits(threads) if threads else contextlib.nullcontext():
        xy, place = fit_layout(F, reducer)
    if progress:
        progress(f"layout ({reducer})", 1, 1)
    out = {"xy": xy.astype(np.float32), "index": idx.astype(np.int64), "n_total": np.array(n)}
    if n > len(idx):
        # every other row placed on the same map, chunk by chunk: the page draws the layout sample
        # and selects on all rows
        xy_all = np.empty((n, 2), np.float32)
        xy_all[idx] = xy
        rest = np.setdiff1d(np.arange(n), idx)
        stage = f"placing the other rows ({reducer})"
        for lo in range(0, len(rest), PLACE_CHUNK):
            if cancel and cancel():
                raise Cancelled("embedding cancelled")
            rows = rest[lo:lo + PLACE_CHUNK]
            xy_all[rows] = place(_normalise(_features(project, rows, model, computer, projector, label, device), kind))
            if progress:
                progress(stage, min(len(rest), lo + PLACE_CHUNK), len(rest))
        out["xy_all"] = xy_all
    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(embedding_path(project, kind, reducer, label, max_points=max_points, proj_dim=proj_dim),
                       buf.getvalue())
    return out


def _normalise(F: np.ndarray, kind: str) -> np.ndarray:
    if kind == "influence":
        F = F / np.maximum(1e-12, np.linalg.norm(F, axis=1, keepdims=True))
    return F


def _features(project: Project, rows: np.ndarray, model, computer, projector, label: str,
              device: str = "cpu") -> np.ndarray:
    """Features of training ``rows`` (margin gradients projected, or penultimate activations), by chunks."""
    feats = []
    for lo in range(0, len(rows), _CHUNK):
        r = torch.as_tensor(rows[lo:lo + _CHUNK])
        x, y = project.train_dataset.x[r], project.train_dataset.y[r]
        if computer is not None:
            if label == "predicted":
                with torch.no_grad():
                    y = computer.outputs(x).argmax(1).cpu()
            feats.append(project_gradients(computer, projector, x, y, "margin").numpy())
        else:
            feats.append(penultimate_features(model, x, device=device).numpy())
    return np.concatenate(feats, 0).astype(np.float32)


def fit_layout(F: np.ndarray, reducer: str = DEFAULT_REDUCER):
    """(xy of F [m, 2], place(F_new) -> xy_new): the 2-D layout and a way to put new rows on it."""
    if reducer == "pca":
        mean = F.mean(0)
        _, _, vt = np.linalg.svd(F - mean, full_matrices=False)
        comps = vt[:2].T
        return (F - mean) @ comps, lambda G: (G - mean) @ comps
    if reducer == "tsne":
        return _tsne_layout(F)
    if reducer == "umap":
        import umap  # umap imports numba and takes seconds; only the UMAP layout needs it

        fitted = umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, min_dist=UMAP_MIN_DIST, random_state=0,
                           n_jobs=1)
        return fitted.fit_transform(F), fitted.transform
    raise ProponentError(f"layout must be one of {', '.join(REDUCERS)}, not {reducer!r}")


def _tsne_layout(F: np.ndarray):
    """sklearn's Barnes-Hut t-SNE (no JIT: UMAP's first use in a process compiles numba code for
    about 17 s on this 2-core machine, t-SNE starts at once). t-SNE has no transform, so a new row is
    placed at the distance-weighted mean of its ``PLACE_NEIGHBOURS`` nearest layout rows."""
    from sklearn.manifold import TSNE
    from sklearn.neighbors import NearestNeighbors

    m = len(F)
    if m < 4:  # t-SNE needs perplexity < m; a handful of points is laid out by PCA
        return fit_layout(F, "pca")
    tsne = TSNE(n_components=2, perplexity=min(30.0, (m - 1) / 3), init="pca", learning_rate="auto",
                max_iter=TSNE_ITERATIONS, angle=TSNE_ANGLE, random_state=0, n_jobs=1)
    xy = tsne.fit_transform(F)
    nn = NearestNeighbors(n_neighbors=min(PLACE_NEIGHBOURS, m)).fit(F)

    def place(G: np.ndarray) -> np.ndarray:
        dist, idx = nn.kneighbors(G)
        w = 1.0 / np.maximum(dist, 1e-6)
        return (xy[idx] * w[:, :, None]).sum(1) / w.sum(1, keepdims=True)

    return xy, place


def reduce_2d(F: np.ndarray, reducer: str = DEFAULT_REDUCER) -> np.ndarray:
    return fit_layout(F, reducer)[0]
