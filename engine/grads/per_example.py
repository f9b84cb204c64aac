"""Per-example gradients of the measurement (margin) or of the training loss.

One implementation for every method: ``torch.func`` (vmap over grad with functional_call),
batched by a memory budget, on the CPU or CUDA. Gradients come out flattened as [batch, p]
with parameters concatenated in module order.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .measurement import correct_class_margin, example_loss

KINDS = ("margin", "loss")


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import ProponentError
        raise ProponentError("--device cuda was asked for but no CUDA device is available")
    return device


class GradientComputer:
    """Per-example gradients of one model (in eval mode: normalisation uses running statistics)."""

    def __init__(self, model: nn.Module, *, param_names: list[str] | None = None, device: str = "cpu",
                 memory_budget_mb: float = 512.0):
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if param_names is not None:
            wanted = set(param_names)
            named = [(n, p) for n, p in named if n in wanted]
        self.names = [n for n, _ in named]
        self.params = {n: p.detach() for n, p in named}
        self.frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in self.params}
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n_params = sum(self.sizes)
        self.memory_budget_mb = memory_budget_mb

        def measure(params, x, y, kind):
            out = functional_call(self.model, ({**params, **self.frozen}, self.buffers), (x.unsqueeze(0),))
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
        b = next(iter(grads.values())).shape[0]
        return torch.cat([grads[n].reshape(b, -1) for n in self.names], dim=1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, o = {}, 0
        for n, shape, size in zip(self.names, self.shapes, self.sizes):
            out[n] = flat[..., o:o + size].reshape(*flat.shape[:-1], *shape)
            o += size
        return out

    def per_example(self, x: torch.Tensor, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        """[b, p] gradients of ``kind`` ("margin" or "loss") for one batch."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        g = self._grad_fns[kind](self.params, x.to(self.device), y.to(self.device))
        return self.flatten(g)

    def iter_batches(self, x: torch.Tensor, y: torch.Tensor, kind: str = "margin",
                     batch_size: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        bs = batch_size or self.batch_size(int(x[0].numel()) if len(x) else 0)
        for lo in range(0, len(y), bs):
            hi = min(len(y), lo + bs)
            yield lo, hi, self.per_example(x[lo:hi], y[lo:hi], kind)

    def full(self, x: torch.Tensor, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        return torch.cat([g for _, _, g in self.iter_batches(x, y, kind)], 0) if len(y) else torch.empty(0, self.n_params)

    def outputs(self, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.model(x[i:i + batch].to(self.device)) for i in range(0, len(x), batch)], 0)
