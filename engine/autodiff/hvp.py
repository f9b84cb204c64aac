"""Hessian-vector products of the training objective.

The objective is the one the recipe optimises: mean cross-entropy over a set of examples plus
``(weight_decay/2)·‖θ‖²`` (engine.core.train.training_objective), over the tracked parameters
(the others held fixed). Its Hessian is never formed: ``H v`` is a forward-over-reverse
product (``torch.func.jvp`` of ``torch.func.grad``), summed over data chunks, and
``vmap``-ed when several vectors are multiplied at once (``V`` of shape ``[k, p]``).

Vectors are flat in the model's :class:`~engine.autodiff.functional.ParamLayout`, the same
layout as per-example gradients.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from engine.autodiff.compute import resolve_device
from engine.autodiff.functional import FunctionalModel, Tracked, batch_rows, to_device
from engine.core.errors import ProponentError


class HessianOperator:
    """``v ↦ ∇²_θ [ (1/n) Σ_i w_i ℓ(x_i, y_i) + (wd/2)‖θ‖² ] v`` for flat ``v`` ([p] or [k, p]).

    A private copy of the model is held in ``dtype`` (float64 by default: the GIF normal
    equations square the condition number, and float32 round-off then dominates the residual).
    The model is in eval mode, so normalisation layers use their running statistics.
    """

    def __init__(self, model: nn.Module, x: Any, y: torch.Tensor, *, weight_decay: float = 0.0,
                 batch_size: int = 1024, dtype: torch.dtype = torch.float64, device: str = "cpu",
                 example_weights: torch.Tensor | None = None, tracked: Tracked = None):
        if len(y) == 0:
            raise ProponentError("Hessian-vector products need at least one retained training example")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.fm = FunctionalModel(model, tracked, device=self.device, dtype=dtype, copy_module=True)
        self.model = self.fm.module
        self.layout = self.fm.layout
        self.names = self.layout.names
        self.n_params = self.layout.n
        self.params = self.fm.params
        self.x = x
        self.y = y.long()
        self.n = len(y)
        self.weights = None if example_weights is None else example_weights.to(dtype)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.calls = 0  # Hessian-vector products performed (a [k, p] block counts k)

        def batch_loss(params, xb, yb, wb):
            ce = F.cross_entropy(self.fm(params, xb), yb, reduction="none")
            return (ce * wb).sum()

        self._grad = grad(batch_loss)

    # -- flat <-> dict
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(flat)

    def flatten(self, d: dict[str, torch.Tensor], lead: tuple = ()) -> torch.Tensor:
        return self.layout.flatten(d, lead)

    def theta(self) -> torch.Tensor:
        return self.fm.theta()

    def _chunks(self):
        for lo in range(0, self.n, self.batch_size):
            hi = min(self.n, lo + self.batch_size)
            xb = to_device(batch_rows(self.x, lo, hi), self.device, self.dtype)
            yb = self.y[lo:hi].to(self.device)
            wb = (torch.ones(hi - lo, dtype=self.dtype, device=self.device) if self.weights is None
                  else self.weights[lo:hi].to(self.device))
            yield xb, yb, wb

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.hvp(v)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        single = v.ndim == 1
        V = (v[None] if single else v).to(self.device, self.dtype)
        if V.shape[-1] != self.n_params:
            raise ValueError(f"vector has {V.shape[-1]} entries, the model {self.n_params} parameters")
        tangents = self.unflatten(V)  # each [k, *shape]
        out = torch.zeros_like(V)
        for xb, yb, wb in self._chunks():
            def one(t, xb=xb, yb=yb, wb=wb):
                return jvp(lambda p: self._grad(p, xb, yb, wb), (self.params,), (t,))[1]

            hv = vmap(one)(tangents)
            out += self.flatten(hv, (V.shape[0],))
        out /= self.n
        if self.weight_decay:
            out += self.weight_decay * V
        self.calls += V.shape[0]
        return out[0] if single else out

    def squared_diagonal(self, probes: int = 32, *, damping: float = 0.0, seed: int = 0) -> torch.Tensor:
        """Hutchinson estimate of diag((H + λI)²) = the squared column norms of H + λI:
        E[((H + λI) z)²] over Rademacher z (exact in expectation). A Jacobi preconditioner for
        the GIF normal equations, whose columns differ in scale by orders of magnitude."""
        gen = torch.Generator().manual_seed(int(seed))
        total = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        for lo in range(0, probes, 16):
            k = min(16, probes - lo)
            Z = (torch.randint(0, 2, (k, self.n_params), generator=gen) * 2 - 1).to(self.device, self.dtype)
            HZ = self.hvp(Z) + damping * Z
            total += (HZ * HZ).sum(0)
        return total / probes

    def loss_gradient(self, x: Any, y: torch.Tensor, *, weights: torch.Tensor | None = None,
                      mean: bool = True) -> torch.Tensor:
        """Flat ∇θ of Σ_i w_i ℓ(x_i, y_i) (divided by the number of examples when ``mean``) at θ,
        without weight decay, in this operator's dtype."""
        total = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        bs = self.batch_size
        for lo in range(0, len(y), bs):
            xb = to_device(batch_rows(x, lo, lo + bs), self.device, self.dtype)
            yb = y[lo:lo + bs].to(self.device).long()
            wb = (torch.ones(len(yb), dtype=self.dtype, device=self.device) if weights is None
                  else weights[lo:lo + bs].to(self.device, self.dtype))
            total += self.flatten(self._grad(self.params, xb, yb, wb))
        return total / max(1, len(y)) if mean else total


__all__ = ["HessianOperator"]
