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


__all__ = ["resolve_device"]
