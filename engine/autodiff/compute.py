"""Where work runs: the device, and the number of intra-op threads per workload."""
from __future__ import annotations

import torch

from engine.core.errors import ProponentError


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ProponentError("--device cuda was asked for but no CUDA device is available")
    return device


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. NaN and ±inf carry through a sum, so a finite sum
    settles it in one read (isfinite(t).all() first writes a boolean copy of t: on a gradient block many
    times slower); a non-finite sum (or one that overflowed) is checked entry by entry."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


__all__ = ["resolve_device", "all_finite"]
