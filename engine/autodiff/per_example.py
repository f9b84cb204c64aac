"""Per-example gradients of the measurement (margin) or of the training loss.

One implementation for every method: ``torch.func`` (vmap over grad through the
:class:`~engine.autodiff.functional.FunctionalModel`), batched by a memory budget, on the CPU
or CUDA. Gradients come out flattened as [batch, p] over the tracked parameters, in the
model's :class:`~engine.autodiff.functional.ParamLayout`. Inputs may be tensors or dicts
(pytrees) of tensors, e.g. a text model's ``{input_ids, attention_mask}``.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn
from torch.func import grad, vmap

from engine.autodiff.compute import resolve_device
from engine.autodiff.functional import (
    FunctionalModel,
    Tracked,
    add_batch_dim,
    batch_len,
    batch_rows,
    example_numel,
    to_device,
)
from engine.autodiff.measurement import correct_class_margin, example_loss

KINDS = ("margin", "loss")


class GradientComputer:
    """Per-example gradients of one model (in eval mode: normalisation uses running statistics).

    ``tracked``: the tracked parameters (a :class:`TrackedParameters`, globs or exact names;
    default every parameter that requires grad). The model is moved to ``device`` in place.
    """

    def __init__(self, model: nn.Module, *, tracked: Tracked = None, device: str = "cpu",
                 memory_budget_mb: float = 512.0):
        self.device = resolve_device(device)
        self.fm = FunctionalModel(model, tracked, device=self.device)
        self.model = self.fm.module
        self.layout = self.fm.layout
        self.names = self.layout.names
        self.shapes = self.layout.shapes
        self.sizes = self.layout.sizes
        self.n_params = self.layout.n
        self.params, self.frozen, self.buffers = self.fm.params, self.fm.frozen, self.fm.buffers
        self.memory_budget_mb = memory_budget_mb

        def measure(params, x, y, kind):
            out = self.fm(params, add_batch_dim(x))
            if kind == "margin":
                return correct_class_margin(out, y.unsqueeze(0)).sum()
            return example_loss(out, y.unsqueeze(0)).sum()

        self._grad_fns = {k: vmap(grad(lambda p, x, y, k=k: measure(p, x, y, k)), in_dims=(None, 0, 0)) for k in KINDS}

    def batch_size(self, example_numel: int = 0) -> int:
        """Examples per vmap batch within the memory budget (on CUDA: at most half the free memory)."""
        budget = self.memory_budget_mb * 2**20
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            budget = max(budget, free // 2)
        # vmap materialises a few copies of [b, p] (the grads, their flattening, and activations)
        per_example = 4 * (3 * self.n_params + 8 * max(example_numel, 1))
        return int(max(1, min(8192, budget // per_example)))

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.flatten(grads)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(flat)

    def per_example(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        """[b, p] gradients of ``kind`` ("margin" or "loss") for one batch."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        g = self._grad_fns[kind](self.params, to_device(x, self.device), y.to(self.device))
        return self.flatten(g)

    def iter_batches(self, x: Any, y: torch.Tensor, kind: str = "margin",
                     batch_size: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        bs = batch_size or self.batch_size(example_numel(x))
        for lo in range(0, len(y), bs):
            hi = min(len(y), lo + bs)
            yield lo, hi, self.per_example(batch_rows(x, lo, hi), y[lo:hi], kind)

    def full(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        return torch.cat([g for _, _, g in self.iter_batches(x, y, kind)], 0) if len(y) else torch.empty(0, self.n_params)

    def outputs(self, x: Any, batch: int = 4096) -> torch.Tensor:
        return self.fm.outputs(x, batch)


__all__ = ["GradientComputer", "KINDS", "resolve_device", "batch_len"]
