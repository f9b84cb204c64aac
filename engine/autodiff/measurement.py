"""What a query's score explains (the correct-class margin) and the training loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def correct_class_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f(x, y) = z_y − logsumexp_{j≠y} z_j, per row. The same as TRAK's model output."""
    z_y = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    # arange comparison rather than one_hot: one_hot is not vmap-able
    is_y = torch.arange(logits.shape[-1], device=logits.device) == y.unsqueeze(-1)
    others = logits.masked_fill(is_y, float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (the training loss is its mean)."""
    return F.cross_entropy(logits, y, reduction="none")


def correct_class_probability(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
