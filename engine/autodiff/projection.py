"""Random projections of gradients: identity, dense JL (generated once), sparse JL (SJLT).

The dense matrix is generated once per (seed, model id) and reused for every batch; the
reference library regenerates it block by block for each batch, which dominates CPU time.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

DENSE_MAX_ENTRIES = 2**28  # 1 GiB of float32: above this the dense matrix is not worth holding


def projection_seed(seed: int, model_id: int) -> int:
    return (int(seed) * 1_000_003 + int(model_id) * 7919 + 17) % (2**63 - 1)


class Projector(ABC):
    """Maps [b, in_dim] gradients to [b, out_dim] features."""

    kind: str = "abstract"

    def __init__(self, in_dim: int, out_dim: int):
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    @abstractmethod
    def project(self, g: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim}


class IdentityProjector(Projector):
    kind = "none"

    def __init__(self, in_dim: int):
        super().__init__(in_dim, in_dim)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return g


class DenseProjector(Projector):
    """P ∈ R^{p×k} with Rademacher (±1) or Gaussian entries scaled by 1/√k."""

    def __init__(self, in_dim: int, out_dim: int, *, seed: int = 0, model_id: int = 0,
                 distribution: str = "rademacher", device: str = "cpu"):
        super().__init__(in_dim, out_dim)
        if in_dim * out_dim > DENSE_MAX_ENTRIES:
            raise ValueError(f"dense projection {in_dim}×{out_dim} is too large to hold; use projection='sjlt'")
        self.kind = f"dense-{distribution}"
        gen = torch.Generator(device="cpu").manual_seed(projection_seed(seed, model_id))
        if distribution == "rademacher":
            m = torch.randint(0, 2, (in_dim, out_dim), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        elif distribution == "gaussian":
            m = torch.randn(in_dim, out_dim, generator=gen)
        else:
            raise ValueError(f"unknown distribution {distribution!r}")
        self.matrix = (m / math.sqrt(out_dim)).to(device)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return g.to(self.matrix.dtype) @ self.matrix


class SparseJLProjector(Projector):
    """Sparse JL transform: each gradient coordinate goes to ``c`` buckets with random signs.

    Costs O(c · nnz) per example instead of O(p · k), and stores only 2·c·p small integers.
    """

    def __init__(self, in_dim: int, out_dim: int, *, seed: int = 0, model_id: int = 0, c: int = 4, device: str = "cpu"):
        super().__init__(in_dim, out_dim)
        self.kind = "sjlt"
        self.c = int(c)
        gen = torch.Generator(device="cpu").manual_seed(projection_seed(seed, model_id))
        self.buckets = torch.randint(0, out_dim, (self.c, in_dim), generator=gen).to(device)
        self.signs = (torch.randint(0, 2, (self.c, in_dim), generator=gen).float() * 2 - 1).div_(math.sqrt(self.c)).to(device)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.out_dim, dtype=g.dtype, device=g.device)
        for j in range(self.c):
            out.index_add_(1, self.buckets[j], g * self.signs[j])
        return out

    def describe(self) -> dict:
        return {**super().describe(), "c": self.c}


def default_projection_dim(n_params: int, n_train: int) -> int | None:
    """The projection size rule: None (no projection) when the full gradient is small.

    A kernel of size min(p, n) is solved either way (the dual form when p > n), so projecting
    a small gradient only adds noise. Large gradients get k = 2048, the reference default.
    """
    if n_params <= 8192:
        return None
    return 2048


def make_projector(kind: str, in_dim: int, out_dim: int | None, *, seed: int = 0, model_id: int = 0,
                   device: str = "cpu") -> Projector:
    """``kind``: auto | none | rademacher | gaussian | sjlt."""
    if kind == "none" or out_dim is None or out_dim <= 0 or (kind == "auto" and out_dim >= in_dim):
        return IdentityProjector(in_dim)
    if kind == "auto":
        kind = "rademacher" if in_dim * out_dim <= DENSE_MAX_ENTRIES else "sjlt"
    if kind in ("rademacher", "gaussian"):
        return DenseProjector(in_dim, out_dim, seed=seed, model_id=model_id, distribution=kind, device=device)
    if kind == "sjlt":
        return SparseJLProjector(in_dim, out_dim, seed=seed, model_id=model_id, device=device)
    raise ValueError(f"unknown projection {kind!r} (auto, none, rademacher, gaussian, sjlt)")
