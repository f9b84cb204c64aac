"""Projected per-example gradient features, written in chunks so a stopped run resumes."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

import engine.autodiff.distributed as distributed
from engine.autodiff.compute import all_finite
from engine.autodiff.factorized import FactorizedGradients
from engine.autodiff.functional import TrackedParameters, batch_rows
from engine.autodiff.per_example import GradientComputer
from engine.autodiff.projection import Projector, make_projector
from engine.core.errors import Cancelled, ProponentError
from engine.storage.arrays import ChunkedArray

ProgressFn = Callable[[str, int, int], None]
FEATURE_DTYPES = ("float32", "float16")


def project_gradients(computer: GradientComputer, projector: Projector, x: torch.Tensor, y: torch.Tensor,
                      kind: str = "margin", *, batch_size: int | None = None) -> torch.Tensor:
    """In-memory [n, k] projected gradients (for queries and small sets)."""
    out = [p.float().cpu() for _, _, p in computer.iter_batches(x, y, kind, batch_size, then=projector.project)]
    return torch.cat(out, 0) if out else torch.empty(0, projector.out_dim)


def project_margins(computer: GradientComputer, projector: Projector, x: torch.Tensor, y: torch.Tensor, *,
                    batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`project_gradients` of the margin, and each row's 1 − p(y|x) from the same forward pass ([n] float64)."""
    feats, scales = [], []
    for _, _, (p, s) in computer.iter_margins(x, y, batch_size, then=projector.project):
        feats.append(p.float().cpu())
        scales.append(s.detach().double().cpu())
    if not feats:
        return torch.empty(0, projector.out_dim), torch.empty(0, dtype=torch.float64)
    return torch.cat(feats, 0), torch.cat(scales, 0)


def margin_scale_store(store: ChunkedArray) -> ChunkedArray:
    """The [n, 1] float32 companion of a margin feature store: each row's 1 − p(y|x) at the store's
    checkpoint, chunked as the store, in its folder's ``margin_scale`` subfolder (with the store's
    request as its own, so it resets when the store does). Under torchrun, open it on rank 0 first."""
    return ChunkedArray(store.folder / "margin_scale", store.n_rows, store.chunk_rows, meta=store.meta, width=1)


def featurize(computer: GradientComputer, projector: Projector, x: torch.Tensor, y: torch.Tensor, folder: str | Path,
              *, kind: str = "margin", chunk_rows: int = 1024, meta: dict | None = None,
              progress: ProgressFn | None = None, stage: str = "featurize", cancel: Callable[[], bool] | None = None,
              dtype: str = "float32", margin_scale: bool = False) -> ChunkedArray:
    """Write [n, k] projected gradients to ``folder`` in chunks, skipping chunks already written.

    ``meta`` must identify the request (model, projection, kind); a folder holding another
    request's chunks is cleared rather than mixed. ``dtype="float16"`` halves the store; a chunk
    whose values exceed float16's range is stored scaled by a power of two (readers get float32).
    ``margin_scale`` (kind "margin"): each row's 1 − p(y|x) from the forward pass its gradients take
    anyway, written to the companion store :func:`margin_scale_store` before the chunk's features
    (so a chunk done in the store is done there too, from the same pass).
    """
    if dtype not in FEATURE_DTYPES:
        raise ProponentError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype!r}")
    if margin_scale and kind != "margin":
        raise ValueError(f"margin_scale comes with kind 'margin', not {kind!r}")
    meta = {**(meta or {}), "kind": kind, **projector.describe(), **({"dtype": dtype} if dtype != "float32" else {})}

    def open_store() -> ChunkedArray:
        return ChunkedArray(folder, len(y), chunk_rows, meta=meta, width=projector.out_dim, dtype=dtype)

    # under torchrun rank 0 checks (if need be resets) and allocates the store before any rank writes
    store = open_store() if distributed.is_main() else None
    scales = margin_scale_store(store) if margin_scale and store is not None else None
    distributed.barrier()
    store = store or open_store()
    scales = scales or (margin_scale_store(store) if margin_scale else None)
    missing = distributed.agree(store.missing_chunks())
    mine = distributed.my_share(missing)  # round-robin over the missing chunks: each rank writes its own

    def rows_of(chunks):
        return sum(store.chunk_bounds(c)[1] - store.chunk_bounds(c)[0] for c in chunks)

    already = len(y) - rows_of(missing)  # written by an earlier run: progress starts there
    total = already + rows_of(mine)  # a rank counts what it has to do
    done_rows = already
    if progress:
        progress(stage, done_rows, total)
    for c in mine:
        if cancel is not None and cancel():
            raise Cancelled(f"{stage} cancelled after {done_rows} of {total} examples; rerun to resume")
        lo, hi = store.chunk_bounds(c)
        if scales is None:
            block = project_gradients(computer, projector, batch_rows(x, lo, hi), y[lo:hi], kind)
        else:
            block, scale = project_margins(computer, projector, batch_rows(x, lo, hi), y[lo:hi])
        if not all_finite(block):
            bad = int(torch.nonzero(~torch.isfinite(block).all(1))[0, 0]) + lo
            raise ProponentError(f"non-finite gradient for training row {bad}; the checkpoint may have diverged")
        if scales is not None:
            scales.write_chunk(c, scale.numpy().astype(np.float32)[:, None])
        store.write_chunk(c, block.numpy())
        done_rows += hi - lo
        if progress:
            progress(stage, done_rows, total)
    store.rows_written = done_rows - already
    distributed.barrier()  # every rank's chunks are on disk before anyone reads the store
    return store


def checkpoint_feature_store(project, checkpoint, folder: str | Path, *, kind: str, projection: str,
                             proj_dim: int | None, seed: int, model_id: int, device: str,
                             x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                             progress: ProgressFn | None = None, cancel=None,
                             stage: str = "featurize", dtype: str = "float32", precision: str = "float32",
                             margin_scale: bool = False,
                             ) -> tuple[ChunkedArray, GradientComputer | FactorizedGradients, Projector]:
    """Projected per-example gradients of the training set (or ``x, y``) at one checkpoint, as an
    on-disk chunked store read chunk by chunk.

    Gradients are over the project's tracked parameters (``[model] attribute``). Returns the store
    plus the gradient computer and projector, so queries are projected with exactly the same matrix.
    ``margin_scale``: see :func:`featurize`.
    """
    model = project.load_model(checkpoint)
    if projection == "factorized" and proj_dim:
        if precision != "float32":
            raise ProponentError(f"projection 'factorized' runs in float32; grad_precision {precision!r} needs another projection")
        computer = FactorizedGradients(model, proj_dim, tracked=TrackedParameters.of(project), device=device, seed=seed,
                                       model_id=model_id)
        projector = computer.projector
    else:
        computer = GradientComputer(model, tracked=TrackedParameters.of(project), device=device, precision=precision)
        projector = make_projector("auto" if projection == "factorized" else projection, computer.n_params, proj_dim,
                                   seed=seed, model_id=model_id, device=computer.device)
    if x is None:
        x, y = project.train_dataset.x, project.train_dataset.y
    store = featurize(computer, projector, x, y, folder, kind=kind, progress=progress, stage=stage, cancel=cancel,
                      meta={"checkpoint": checkpoint.key, "seed": seed, "model_id": model_id,
                            **({"precision": precision} if precision != "float32" else {})}, dtype=dtype,
                      margin_scale=margin_scale)
    return store, computer, projector


def checkpoint_features(project, checkpoint, folder: str | Path, **kw) -> tuple[np.ndarray, GradientComputer, Projector]:
    """:func:`checkpoint_feature_store` read whole into memory ([n, k]); for methods whose
    training side is small (Grad-Dot/Cos keep it in memory)."""
    store, computer, projector = checkpoint_feature_store(project, checkpoint, folder, **kw)
    return store.to_array(), computer, projector
