"""traker (MadryLab TRAK) on our checkpoints: the margin on both sides, as in the TRAK paper."""
from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import torch
from torch import nn
from trak import TRAKer
from trak.projectors import BasicProjector, ProjectionType

from engine.evaluate.peers.base import (
    PeerInputs,
    Recorder,
    batches,
    count_params,
    grad_batch_size,
    model_at,
)


def _make_traker(inputs: PeerInputs, model: nn.Module, save_dir: str, opts: dict, settings: dict):
    n_params = count_params(model)
    proj_type = opts.get("proj_type", "rademacher")
    projector = None
    if not str(inputs.device).startswith("cuda"):
        # No CUDA: TRAKer would pick BasicProjector itself, but only with a normal projection
        # because of float16; we pass it explicitly in float32 so the Rademacher JL matrix
        # of the TRAK paper can be used.
        projector = BasicProjector(
            grad_dim=n_params,
            proj_dim=inputs.proj_dim,
            seed=inputs.seed,
            proj_type=ProjectionType(proj_type),
            device=inputs.device,
            dtype=torch.float32,
            block_size=opts.get("block_size", 100),
        )
    lambda_reg = 0.0 if inputs.damping is None else float(inputs.damping)
    traker = TRAKer(
        model=model,
        task="image_classification",  # model output = log(p/(1-p)) = our margin exactly
        train_set_size=len(inputs.x_train),
        save_dir=save_dir,
        load_from_save_dir=True,  # fresh temp dir; True is the path traker expects (creates experiments.json)
        device=inputs.device,
        projector=projector,  # None on CUDA: TRAKer picks its CudaProjector if fast_jl works
        proj_dim=inputs.proj_dim,
        use_half_precision=bool(opts.get("use_half_precision", False)),
        projector_seed=inputs.seed,
        lambda_reg=lambda_reg,
        logging_level=logging.WARNING,
    )
    settings.update(
        projector=type(traker.projector).__name__,
        proj_type=str(getattr(traker.projector, "proj_type", proj_type)),
        proj_dim=traker.proj_dim,
        lambda_reg=lambda_reg,
        lambda_reg_applies_to="X^T X of projected margin gradients / sqrt(#params), summed over train",
        use_half_precision=bool(opts.get("use_half_precision", False)),
        n_params=n_params,
    )
    if lambda_reg == 0.0 and traker.proj_dim > min(len(inputs.x_train), n_params):
        settings["warning"] = "proj_dim exceeds min(n_train, #params): X^T X is singular without damping"
    return traker


def _restore_basic_projector(projector) -> None:
    """Work around a traker 0.3.2 bug in BasicProjector with a single block.

    ``finalize_features`` calls ``projector.free_memory()``, which deletes the JL block.
    When ``proj_dim <= block_size`` there is one block, and ``project`` only rebuilds it when
    the model id changes, so scoring the last-featurized model crashes with "no attribute
    proj_matrix". Rebuilding the block from the projector's current generator state gives
    exactly the matrix used to featurize that model id (no change to the method).
    """
    if getattr(projector, "proj_matrix_available", True) is False and getattr(projector, "num_blocks", 0) == 1:
        projector.generate_sketch_matrix(projector.generator_states[0])


def run(inputs: PeerInputs, method: str, rec: Recorder, opts: dict, settings: dict) -> np.ndarray:
    model = model_at(inputs, inputs.checkpoints[-1])
    bs = int(opts.get("batch_size", grad_batch_size(len(inputs.x_train), count_params(model))))
    settings.update(checkpoints_used=len(inputs.checkpoints), batch_size=bs)
    with tempfile.TemporaryDirectory(prefix="proponent_traker_") as tmp:
        traker = _make_traker(inputs, model, tmp, opts, settings)
        for model_id, ckpt in enumerate(inputs.checkpoints):
            traker.load_checkpoint(ckpt, model_id=model_id)
            for xb, yb in batches(inputs.x_train, inputs.y_train, bs, inputs.device):
                traker.featurize(batch=(xb, yb), num_samples=len(xb))
        traker.finalize_features()
        _restore_basic_projector(traker.projector)
        rec.fit_done()
        for model_id, ckpt in enumerate(inputs.checkpoints):
            traker.start_scoring_checkpoint(
                exp_name="peer", checkpoint=ckpt, model_id=model_id, num_targets=len(inputs.x_test)
            )
            for xb, yb in batches(inputs.x_test, inputs.y_test, bs, inputs.device):
                traker.score(batch=(xb, yb), num_samples=len(xb))
        scores = traker.finalize_scores(exp_name="peer")
        # traker returns [n_train, n_test]. Both sides are margin gradients and Q = 1 - p >= 0,
        # so a positive score already means "removing i lowers q's margin": no sign flip.
        out = np.array(scores, dtype=np.float64).T.copy()
    settings["orientation"] = "as returned (phi_q^T (Phi^T Phi)^-1 phi_i * (1-p_i)); transposed"
    return out


def featurize_throughput_traker(inputs: PeerInputs, n_examples: int | None = None) -> float:
    """Examples per second of traker's ``featurize`` on the training set (final checkpoint).

    Only the featurize calls are timed (per-example gradients, projection, out-to-loss term);
    building the TRAKer and loading the checkpoint are not.
    """
    n = len(inputs.x_train) if n_examples is None else min(int(n_examples), len(inputs.x_train))
    model = model_at(inputs, inputs.checkpoints[-1])
    bs = grad_batch_size(n, count_params(model))
    x, y = inputs.x_train[:n], inputs.y_train[:n]
    with tempfile.TemporaryDirectory(prefix="proponent_traker_tp_") as tmp:
        sub = PeerInputs(**{**inputs.__dict__, "x_train": x, "y_train": y})
        traker = _make_traker(sub, model, tmp, {}, {})
        traker.load_checkpoint(inputs.checkpoints[-1], model_id=0)
        t0 = time.perf_counter()
        for xb, yb in batches(x, y, bs, inputs.device):
            traker.featurize(batch=(xb, yb), num_samples=len(xb))
        if str(inputs.device).startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return n / max(dt, 1e-12)

