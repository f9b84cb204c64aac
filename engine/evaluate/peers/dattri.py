"""dattri: TRAK, TracIn, Grad-Dot/Grad-Cos and influence functions (CG, LiSSA)."""
from __future__ import annotations

import numpy as np
import torch
from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorLiSSA
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.task import AttributionTask

from engine.evaluate.peers.base import (
    PeerInputs,
    Recorder,
    count_params,
    functional_fns,
    grad_batch_size,
    loader,
)


def run(inputs: PeerInputs, method: str, rec: Recorder, opts: dict, settings: dict) -> np.ndarray:
    model = inputs.build_model().to(inputs.device)  # graph only; dattri loads the checkpoints
    loss_ce, margin_fn, correct_prob = functional_fns(model, inputs.x_train.ndim)
    n_train, n_params = len(inputs.x_train), count_params(model)
    bs = int(opts.get("batch_size", grad_batch_size(n_train, n_params)))
    train_loader = loader(inputs.x_train, inputs.y_train, bs)
    test_loader = loader(inputs.x_test, inputs.y_test, int(opts.get("test_batch_size", bs)))
    # the projector kwargs are passed in full every time: dattri updates its module-level
    # DEFAULT_PROJECTOR_KWARGS dict in place, so a partial dict would leak between runs
    proj_kwargs = {
        "proj_dim": inputs.proj_dim,
        "proj_max_batch_size": 32,
        "proj_seed": inputs.seed,
        "device": str(inputs.device),
        "proj_type": opts.get("proj_type", "normal"),
    }
    final_only = [inputs.checkpoints[-1]]
    settings.update(batch_size=bs, measurement="margin", train_loss="mean cross-entropy")

    if method == "trak":
        # dattri's own TRAK recipe: the margin on both sides, Q from the correct-class probability
        task = AttributionTask(loss_func=margin_fn, model=model, checkpoints=list(inputs.checkpoints))
        reg = 0.0 if inputs.damping is None else float(inputs.damping)
        att = TRAKAttributor(
            task=task,
            correct_probability_func=correct_prob,
            projector_kwargs=proj_kwargs,
            device=inputs.device,
            regularization=reg,
        )
        if reg == 0.0 and inputs.proj_dim > min(n_train, n_params):
            settings["warning"] = "proj_dim exceeds min(n_train, #params): X^T X is singular without damping"
        att.cache(train_loader)
        rec.fit_done()
        raw = att.attribute(test_loader)  # [n_train, n_test]
        settings.update(
            checkpoints_used=len(inputs.checkpoints),
            projector=proj_kwargs,
            regularization=reg,
            regularization_applies_to="X^T X of projected margin gradients / sqrt(#params)",
            orientation="as returned (margin gradients on both sides, Q = 1 - p >= 0); transposed",
        )
        return raw.detach().to(torch.float64).cpu().numpy().T

    if method in ("tracin", "grad-dot", "grad-cos"):
        if method == "tracin":
            ckpts, weights = list(inputs.checkpoints), [float(w) for w in inputs.checkpoint_lrs]
            if len(weights) != len(ckpts):
                raise ValueError(f"{len(ckpts)} checkpoints but {len(weights)} learning rates")
        else:  # Grad-Dot / Grad-Cos: TracIn at the final checkpoint with weight 1 (dattri's docs)
            ckpts, weights = final_only, [1.0]
        task = AttributionTask(loss_func=loss_ce, model=model, checkpoints=ckpts, target_func=margin_fn)
        att = TracInAttributor(
            task=task,
            weight_list=torch.tensor(weights),
            normalized_grad=(method == "grad-cos"),
            projector_kwargs=proj_kwargs,
            device=inputs.device,
        )
        att.cache()  # nothing to precompute in dattri's TracIn
        rec.fit_done()
        raw = att.attribute(train_loader, test_loader)  # [n_train, n_test]
        settings.update(
            checkpoints_used=len(ckpts),
            weights=weights,
            projector=proj_kwargs,
            # dattri computes sum_t w_t <grad loss(z_i), grad f(q)>: a proponent's loss gradient
            # points against q's margin gradient, so the raw score is negative. Flip it.
            orientation="sign flipped (train side is the loss gradient, query side the margin gradient); transposed",
        )
        return -raw.detach().to(torch.float64).cpu().numpy().T

    if method in ("if-cg", "if-lissa"):
        task = AttributionTask(loss_func=loss_ce, model=model, checkpoints=final_only, target_func=margin_fn)
        # dattri sums the inverse-HVP over the batches of the cached loader, so the Hessian is
        # only the training-loss Hessian when that loader is a single batch of the whole set.
        full_loader = loader(inputs.x_train, inputs.y_train, n_train)
        if method == "if-cg":
            kw = {"max_iter": 10, "tol": 1e-7, "mode": "rev-rev"}
            kw.update({k: opts[k] for k in ("max_iter", "tol", "mode") if k in opts})
            kw["regularization"] = 0.0 if inputs.damping is None else float(inputs.damping)
            att = IFAttributorCG(task=task, device=inputs.device, **kw)
            settings.update(regularization_applies_to="Hessian of the mean training loss (+ reg * I)")
        else:
            kw = {"batch_size": 1, "num_repeat": 1, "recursion_depth": 5000, "scaling": 50.0, "mode": "rev-rev"}
            kw.update({k: opts[k] for k in ("batch_size", "num_repeat", "recursion_depth", "scaling", "mode") if k in opts})
            kw["damping"] = 0.0 if inputs.damping is None else float(inputs.damping)
            att = IFAttributorLiSSA(task=task, device=inputs.device, **kw)
            settings.update(
                damping_applies_to="LiSSA recursion; effective Hessian damping = damping * scaling",
                effective_lambda=kw["damping"] * kw["scaling"],
            )
        att.cache(full_loader)
        rec.fit_done()  # dattri does the inverse-HVP work inside attribute(), per train batch
        raw = att.attribute(train_loader, test_loader)  # [n_train, n_test]
        settings.update(
            checkpoints_used=1,
            solver_kwargs=kw,
            note="dattri runs the iHVP inside attribute(), so fit_seconds is ~0",
            # dattri returns grad loss(z_i)^T H^-1 grad f(q) = -(d f_q / d upweight_i): positive
            # for opponents when f is the margin. Flip it.
            orientation="sign flipped (grad loss_i^T H^-1 grad margin_q = -d margin_q/d upweight_i); transposed",
        )
        return -raw.detach().to(torch.float64).cpu().numpy().T

    raise ValueError(f"dattri method {method!r} not handled")

