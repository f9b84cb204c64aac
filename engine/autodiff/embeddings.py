"""Penultimate-layer features: the input of the model's last Linear layer."""
from __future__ import annotations

import torch
from torch import nn

from engine.autodiff.functional import forward_batches
from engine.core.errors import ProponentError


def last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ProponentError("the model has no nn.Linear layer, so it has no penultimate features")
    return last


def penultimate_features(model: nn.Module, x: torch.Tensor, batch: int = 2048, device: str = "cpu") -> torch.Tensor:
    """[n, d] inputs of the final Linear layer, in eval mode."""
    model = model.eval().to(device)
    captured: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach().flatten(1).cpu()))
    try:
        for _ in forward_batches(model, x, device, batch):  # the hook keeps what is wanted
            pass
    finally:
        hook.remove()
    return torch.cat(captured, 0) if captured else torch.empty(0)
