"""Hessian-vector products of the training objective, and the parameter layout they use.

The objective is the one the recipe optimises: mean cross-entropy over a set of examples plus
``(weight_decay/2)·‖θ‖²`` over every trainable parameter (engine.train.training_objective).
Its Hessian is never formed: ``H v`` is a forward-over-reverse product (``torch.func.jvp`` of
``torch.func.grad``), summed over data chunks, and ``vmap``-ed when several vectors are
multiplied at once (``V`` of shape ``[k, p]``).

Vectors are flat, with parameters concatenated in **module order**: the order of
``model.named_parameters()``, which :func:`parameter_layout` checks equals the order found by
walking ``model.named_modules()`` (the order GradientComputer uses as well).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..errors import ProponentError
from .per_example import resolve_device


@dataclass(frozen=True)
class ParamSlot:
    """One trainable parameter tensor in the flat vector."""

    name: str  # as in named_parameters()
    module_name: str
    module: nn.Module
    attr: str  # "weight", "bias", ...
    offset: int
    numel: int
    shape: tuple[int, ...]


def parameter_layout(model: nn.Module) -> list[ParamSlot]:
    """The trainable parameters in module order, with their offsets in the flat vector.

    Raises if the module walk and ``named_parameters()`` disagree (e.g. a parameter shared
    between modules), since every flat vector in the engine assumes that one order.
    """
    slots: list[ParamSlot] = []
    offset = 0
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mname}.{attr}" if mname else attr
            slots.append(ParamSlot(name, mname, module, attr, offset, p.numel(), tuple(p.shape)))
            offset += p.numel()
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    if [s.name for s in slots] != expected:
        raise ProponentError("the model's parameters are not in module order (a parameter shared between modules?); "
                             "flat parameter vectors would be misaligned")
    return slots


def flat_parameters(model: nn.Module, dtype=None) -> torch.Tensor:
    ps = [p.detach().reshape(-1) for _, p in model.named_parameters() if p.requires_grad]
    out = torch.cat(ps) if ps else torch.empty(0)
    return out if dtype is None else out.to(dtype)


def add_to_parameters(model: nn.Module, delta: torch.Tensor) -> None:
    """θ ← θ + delta, in place, with ``delta`` flat in module order."""
    slots = parameter_layout(model)
    if delta.numel() != sum(s.numel for s in slots):
        raise ValueError(f"update has {delta.numel()} entries, the model {sum(s.numel for s in slots)} parameters")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in slots:
            p = params[s.name]
            p.add_(delta[s.offset:s.offset + s.numel].reshape(s.shape).to(device=p.device, dtype=p.dtype))


class HessianOperator:
    """``v ↦ ∇²_θ [ (1/n) Σ_i w_i ℓ(x_i, y_i) + (wd/2)‖θ‖² ] v`` for flat ``v`` ([p] or [k, p]).

    A private copy of the model is held in ``dtype`` (float64 by default: the GIF normal
    equations square the condition number, and float32 round-off then dominates the residual).
    The model is in eval mode, so normalisation layers use their running statistics.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float = 0.0,
                 batch_size: int = 1024, dtype: torch.dtype = torch.float64, device: str = "cpu",
                 example_weights: torch.Tensor | None = None):
        if len(y) == 0:
            raise ProponentError("Hessian-vector products need at least one retained training example")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = copy.deepcopy(model).eval().to(device=self.device, dtype=dtype)
        self.layout = parameter_layout(self.model)
        self.names = [s.name for s in self.layout]
        self.n_params = sum(s.numel for s in self.layout)
        self.params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.x = x
        self.y = y.long()
        self.n = len(y)
        self.weights = None if example_weights is None else example_weights.to(dtype)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.calls = 0  # Hessian-vector products performed (a [k, p] block counts k)

        def batch_loss(params, xb, yb, wb):
            out = functional_call(self.model, ({**params, **self.frozen}, self.buffers), (xb,))
            ce = F.cross_entropy(out, yb, reduction="none")
            return (ce * wb).sum()

        self._batch_loss = batch_loss
        self._grad = grad(batch_loss)

    # -- flat <-> dict
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: flat[..., s.offset:s.offset + s.numel].reshape(*flat.shape[:-1], *s.shape) for s in self.layout}

    def flatten(self, d: dict[str, torch.Tensor], lead: tuple = ()) -> torch.Tensor:
        return torch.cat([d[s.name].reshape(*lead, -1) for s in self.layout], dim=-1)

    def theta(self) -> torch.Tensor:
        return self.flatten(self.params)

    def _chunks(self):
        for lo in range(0, self.n, self.batch_size):
            hi = min(self.n, lo + self.batch_size)
            xb = self.x[lo:hi].to(self.device, self.dtype)
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

    def loss_gradient(self, x: torch.Tensor, y: torch.Tensor, *, weights: torch.Tensor | None = None,
                      mean: bool = True) -> torch.Tensor:
        """Flat ∇θ of Σ_i w_i ℓ(x_i, y_i) (divided by the number of examples when ``mean``) at θ,
        without weight decay, in this operator's dtype."""
        total = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        bs = self.batch_size
        for lo in range(0, len(y), bs):
            xb = x[lo:lo + bs].to(self.device, self.dtype)
            yb = y[lo:lo + bs].to(self.device).long()
            wb = (torch.ones(len(yb), dtype=self.dtype, device=self.device) if weights is None
                  else weights[lo:lo + bs].to(self.device, self.dtype))
            total += self.flatten(self._grad(self.params, xb, yb, wb))
        return total / max(1, len(y)) if mean else total


__all__ = ["HessianOperator", "ParamSlot", "parameter_layout", "flat_parameters", "add_to_parameters"]
