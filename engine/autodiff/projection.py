"""Random projections of gradients: identity, dense JL, sparse JL (SJLT).

A dense Rademacher matrix is a pure function of (seed, model id, row, column): each entry's sign
is one bit of a 64-bit hash (splitmix64's finaliser), computed with integer tensor ops on the
device itself. So the GPU generates it in milliseconds without host memory or transfers, and the
CPU and the GPU produce the same matrix bit for bit (a store featurized on one resumes on the
other). It is held between batches within a memory budget and regenerated beyond it.
"""
from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod

import torch

DENSE_MAX_ENTRIES = 2**28  # 1 GiB of float32: above this the dense matrix is not worth holding


def projection_seed(seed: int, model_id: int) -> int:
    return (int(seed) * 1_000_003 + int(model_id) * 7919 + 17) % (2**63 - 1)


def _signed(c: int) -> int:
    """A 64-bit constant as torch's (two's-complement) int64."""
    return c - 2**64 if c >= 2**63 else c


_MIX1, _MIX2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)
HASH_BLOCK_ENTRIES = 2**23  # int64 temporaries per block: 64 MiB


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _sign_table(device) -> torch.Tensor:
    """[256, 8] float32: the ±1 signs of each byte's bits, least significant first."""
    b = torch.arange(256, dtype=torch.int64)[:, None]
    return (((b >> torch.arange(8)) & 1).float() * 2 - 1).to(device)


def _splitmix64(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """splitmix64 of int64 counters under ``seed``: the counter times the golden gamma, then the
    finaliser (int64 wraps alike on every device)."""
    z = counter * _GOLDEN + _signed((int(seed) * 0xD1B54A32D192ED03) % 2**64)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def sketch_buckets(seed: int, coords: torch.Tensor, k: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse JL for coordinates given by index: (buckets [c, *coords.shape] in [0, k), signs ±1/√c
    float32), each coordinate's c (bucket, sign) pairs hashed from (seed, coordinate, j), so a
    projection of a huge, sparse vector (an embedding table's gradient) is formed from its nonzero
    coordinates alone, the same on every device."""
    z = _splitmix64(coords.to(torch.int64)[None] * c + torch.arange(c, device=coords.device).view(-1, *[1] * coords.ndim),
                    seed)
    buckets = _shr(z, 1) % int(k)
    signs = ((z & 1).float() * 2 - 1) / math.sqrt(c)
    return buckets, signs


def rademacher_rows(seed: int, lo: int, hi: int, k: int, device) -> torch.Tensor:
    """Rows lo..hi of the [p, k] ±1 matrix of ``seed`` (float32), identical on every device.

    Row i is the bits of hash words (i, 0), (i, 1), …: one 64-bit hash per 64 entries, its bytes in
    little-endian order, each byte's bits least significant first."""
    out = torch.empty((hi - lo, k), dtype=torch.float32, device=device)
    words = -(-k // 64)
    step = max(1, HASH_BLOCK_ENTRIES // (64 * words))
    word = torch.arange(words, dtype=torch.int64, device=device)
    table = _sign_table(device)
    for r0 in range(lo, hi, step):
        r1 = min(hi, r0 + step)
        z = _splitmix64(torch.arange(r0, r1, dtype=torch.int64, device=device)[:, None] * words + word, seed)
        # little-endian bytes on every platform torch runs on (x86, ARM, NVIDIA): a byte → 8 signs lookup
        byte = z.contiguous().view(torch.uint8).long()  # [rows, words × 8]
        out[r0 - lo:r1 - lo] = table[byte].reshape(r1 - r0, 64 * words)[:, :k]
    return out


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
    """P ∈ R^{p×k} with Rademacher (±1) or Gaussian entries scaled by 1/√k.

    The matrix is generated from its seed when first used: Rademacher entries by hashing on the
    device (the same matrix on every device, see the module's docstring), Gaussian ones on the
    CPU and moved. The matrices held together stay within
    ``HELD_MATRIX_BYTES`` (at least the one in use): an ensemble of M members with a 95k × 2048
    matrix each holds one, not M (traker's BasicProjector does the same), while small models keep
    every member's. A member whose matrix was dropped regenerates it, bit for bit, when it projects.
    """

    def __init__(self, in_dim: int, out_dim: int, *, seed: int = 0, model_id: int = 0,
                 distribution: str = "rademacher", device: str = "cpu"):
        super().__init__(in_dim, out_dim)
        if in_dim * out_dim > DENSE_MAX_ENTRIES:
            raise ValueError(f"dense projection {in_dim}×{out_dim} is too large to hold; use projection='sjlt'")
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown distribution {distribution!r}")
        self.kind = f"dense-{distribution}"
        self.distribution, self.device = distribution, str(device)
        self._key = (in_dim, out_dim, projection_seed(seed, model_id), distribution, str(torch.device(device)))

    @property
    def matrix(self) -> torch.Tensor:
        with _HELD_LOCK:  # the app projects from several session threads
            held = _HELD_MATRIX.pop(self._key, None)
            if held is None:
                need = 4 * self.in_dim * self.out_dim
                while _HELD_MATRIX and sum(4 * m.numel() for m in _HELD_MATRIX.values()) + need > HELD_MATRIX_BYTES:
                    _HELD_MATRIX.pop(next(iter(_HELD_MATRIX)))  # least recently used first, before generating
                held = self._generate()
            _HELD_MATRIX[self._key] = held  # (re)inserted last: most recently used
            return held

    def _generate(self) -> torch.Tensor:
        if self.distribution == "rademacher":
            m = rademacher_rows(self._key[2], 0, self.in_dim, self.out_dim, self.device)
            return m.div_(math.sqrt(self.out_dim))
        gen = torch.Generator(device="cpu").manual_seed(self._key[2])
        m = torch.randn(self.in_dim, self.out_dim, generator=gen)
        return m.div_(math.sqrt(self.out_dim)).to(self.device)

    def describe(self) -> dict:
        # "generator" names how the entries are made: a store written with other entries is not reused
        return {**super().describe(), **({"generator": "hash64"} if self.distribution == "rademacher" else {})}

    def project(self, g: torch.Tensor) -> torch.Tensor:
        m = self.matrix
        return g.to(m.dtype) @ m


# dense projection matrices held, least recently used first (see DenseProjector)
HELD_MATRIX_BYTES = 2**30
_HELD_MATRIX: dict[tuple, torch.Tensor] = {}
_HELD_LOCK = threading.Lock()


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


def projector_kind(kind: str, in_dim: int, out_dim: int | None) -> str:
    """What ``kind`` means for gradients of ``in_dim`` entries projected to ``out_dim``: "none"
    without a projection (or "auto" with out_dim ≥ in_dim), "auto" is "rademacher" up to
    DENSE_MAX_ENTRIES entries and "sjlt" beyond; other kinds as given."""
    if kind == "none" or out_dim is None or out_dim <= 0 or (kind == "auto" and out_dim >= in_dim):
        return "none"
    if kind == "auto":
        return "rademacher" if in_dim * out_dim <= DENSE_MAX_ENTRIES else "sjlt"
    return kind


def make_projector(kind: str, in_dim: int, out_dim: int | None, *, seed: int = 0, model_id: int = 0,
                   device: str = "cpu") -> Projector:
    """``kind``: auto | none | rademacher | gaussian | sjlt."""
    kind = projector_kind(kind, in_dim, out_dim)
    if kind == "none":
        return IdentityProjector(in_dim)
    if kind in ("rademacher", "gaussian"):
        return DenseProjector(in_dim, out_dim, seed=seed, model_id=model_id, distribution=kind, device=device)
    if kind == "sjlt":
        return SparseJLProjector(in_dim, out_dim, seed=seed, model_id=model_id, device=device)
    raise ValueError(f"unknown projection {kind!r} (auto, none, rademacher, gaussian, sjlt)")
