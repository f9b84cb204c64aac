"""Per-layer, Kronecker-factored random projection of per-example gradients (as LoGra does).

For a Linear or Conv2d layer an example's weight gradient is G = Σ_t s_t a_tᵀ (s: the gradient of
the layer's output, a: its input with a column of ones for the bias, t: positions; one position
for a Linear layer on vectors). Projected with P = P_out ⊗ P_in,

    P_outᵀ G P_in = Σ_t (P_outᵀ s_t)(P_inᵀ a_t)ᵀ,

so each side is projected before the outer product: neither the [batch, p] gradient nor a p × k
matrix is ever formed, and the cost per example is T·(in·k_in + out·k_out + k_in·k_out) instead
of p·k. One batched forward and one ``torch.autograd.grad`` with respect to the layers' outputs
give every example's s_t (eval mode: examples do not interact).

The layers are those EK-FAC covers (:func:`engine.autodiff.curvature.curvature_layers`): tracked
Linear and Conv2d weights and biases. Other tracked parameters (normalisation, embeddings) are left
out, as kronfluence and LoGra leave them out; :attr:`FactorizedGradients.left_out` lists them.
Each factor is a dense Rademacher matrix of :mod:`engine.autodiff.projection`, so the features are
the same on every device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from engine.autodiff.compute import resolve_device
from engine.autodiff.curvature import Layer, _Capture, _grads_only_for, curvature_layers
from engine.autodiff.functional import FunctionalModel, Tracked, batch_rows, to_device
from engine.autodiff.measurement import correct_class_margin, example_loss
from engine.autodiff.per_example import KINDS, BatchBackOff
from engine.autodiff.projection import DenseProjector, Projector
from engine.core.errors import ProponentError


def factor_dims(layers: list[Layer], k: int) -> list[tuple[int, int]]:
    """(k_out, k_in) per layer, about k in all: smallest layers first, a layer whose whole
    gradient (out × in) fits its even share of what is left keeps every entry (its factors are
    square), and what it does not use goes to the larger layers; a larger layer gets a near-square
    k_out × k_in within its share, no side wider than the layer's own."""
    dims: dict[int, tuple[int, int]] = {}
    left_k, left = int(k), len(layers)
    for i in sorted(range(len(layers)), key=lambda j: layers[j].out_dim * layers[j].in_dim):
        L = layers[i]
        share = max(1, left_k // left)
        if L.out_dim * L.in_dim <= share:
            dims[i] = (L.out_dim, L.in_dim)
        else:
            k_out = max(1, min(L.out_dim, round(math.sqrt(share))))
            k_in = max(1, min(L.in_dim, share // k_out))
            k_out = max(1, min(L.out_dim, share // k_in))  # a narrow side gives its share to the other
            dims[i] = (k_out, k_in)
        left_k -= dims[i][0] * dims[i][1]
        left -= 1
    return [dims[i] for i in range(len(layers))]


# "auto" projects layer by layer when Linear/Conv2d layers hold at least this share of the tracked
# parameters (what the factorisation leaves out is then small)
FACTORIZED_MIN_COVERAGE = 0.9


def covered_fraction(fm: FunctionalModel) -> float:
    """The share of a model's tracked parameters that the factorised projection covers."""
    layers, _ = curvature_layers(fm.module, list(fm.layout.names))
    return sum(L.out_dim * L.in_dim for L in layers) / max(1, fm.layout.n)


def auto_projection(fm: FunctionalModel, dict_inputs: bool) -> str:
    """What TRAK's projection "auto" means for this model: "factorized" where Linear/Conv2d layers
    hold ≥ FACTORIZED_MIN_COVERAGE of the tracked parameters and the inputs are not token dicts
    (the text case is not measured), else "auto" (dense Rademacher, SJLT beyond 2^28 entries).
    Measured against dense at the same k (scripts/lds_variants.py, docs/bench/lds-projection-*.json;
    scripts/bench_gpu.py, docs/bench/cpu-cnn-2000.json): LDS equal within projection-seed noise on
    image CNNs, 2.3-2.9× faster, less than half the peak memory."""
    if dict_inputs or covered_fraction(fm) < FACTORIZED_MIN_COVERAGE:
        return "auto"
    return "factorized"


class FactorizedProjector(Projector):
    """The projection's description for stores and run metadata; the features come out of
    :class:`FactorizedGradients` already projected, so :meth:`project` passes them through."""

    kind = "factorized"

    def __init__(self, in_dim: int, out_dim: int, layers: list[dict], seed: int, model_id: int,
                 left_out: list[str] | None = None):
        super().__init__(in_dim, out_dim)
        self.layers, self.seed, self.model_id, self.left_out = layers, seed, model_id, list(left_out or [])

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def describe(self) -> dict:
        # the run's metadata names the tracked parameters the projection leaves out
        return {**super().describe(), "generator": "hash64", "layers": self.layers, "left_out": self.left_out}


class FactorizedGradients(BatchBackOff):
    """Projected per-example gradients (margin or loss) of one model, layer by layer; the same
    interface as :class:`engine.autodiff.per_example.GradientComputer` where the feature code uses
    it (``iter_batches``, ``outputs``, ``n_params``), with gradients that arrive projected."""

    def __init__(self, model: nn.Module, proj_dim: int, *, tracked: Tracked = None, device: str = "cpu",
                 seed: int = 0, model_id: int = 0, memory_budget_mb: float = 512.0):
        self.device = resolve_device(device)
        self.fm = FunctionalModel(model, tracked, device=self.device)
        self.model = self.fm.module.eval()
        self.n_params = self.fm.layout.n
        self.layers, self.left_out = curvature_layers(self.model, list(self.fm.layout.names))
        if not self.layers:
            raise ProponentError("projection 'factorized' needs tracked Linear or Conv2d layers; this model has none "
                                 "(use projection 'auto')")
        self.dims = factor_dims(self.layers, int(proj_dim))
        # independent factors: each layer and side its own model id under the member's seed
        self.p_out, self.p_in = [], []
        for i, (L, (k_out, k_in)) in enumerate(zip(self.layers, self.dims)):
            base = (int(model_id) + 1) * 100_003 + 2 * i
            self.p_out.append(DenseProjector(L.out_dim, k_out, seed=seed, model_id=base, device=self.device))
            self.p_in.append(DenseProjector(L.in_dim, k_in, seed=seed, model_id=base + 1, device=self.device))
        self.out_dim = sum(a * b for a, b in self.dims)
        self.covered = sum(L.out_dim * L.in_dim for L in self.layers)
        self.projector = FactorizedProjector(
            self.covered, self.out_dim, [{"layer": L.name, "k_out": a, "k_in": b} for L, (a, b) in zip(self.layers, self.dims)],
            seed, model_id, sorted(self.left_out))
        self.memory_budget_mb = memory_budget_mb
        self._protect = False

    def batch_size(self, per_example_positions: int) -> int:
        """Examples per batch within the memory budget: the layer inputs (unfolded for convolutions)
        and output gradients of every layer are held for a batch."""
        budget = self.memory_budget_mb * 2**20
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            budget = max(budget, free // 2)
        per_example = 4 * 3 * sum(max(1, per_example_positions) * (L.in_dim + L.out_dim) for L in self.layers)
        return int(max(1, min(self.max_batch or 4096, budget // max(per_example, 1))))

    @staticmethod
    def _positions(x: Any) -> int:
        """Positions per example a layer may see: pixels of an image batch, tokens of a dict
        (text) batch, one for a table."""
        shape = tuple(getattr(x, "shape", ()))
        if hasattr(x, "keys"):  # {input_ids, attention_mask}: [n, tokens]
            return int(shape[1]) if len(shape) > 1 else 1
        return int(math.prod(shape[2:])) if len(shape) > 2 else 1

    def features(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        """[b, out_dim] projected gradients of one batch."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        cap = _Capture(self.layers, protect=self._protect)
        try:
            with _grads_only_for(self.model, self.layers), torch.enable_grad():
                out = cap.run(self.model, to_device(x, self.device)).float()
                yb = y.to(self.device)
                total = (correct_class_margin(out, yb) if kind == "margin" else example_loss(out, yb)).sum()
                grads = cap.split(torch.autograd.grad(total, cap.output_list(), allow_unused=True))
                parts = []
                for L, po, pi in zip(self.layers, self.p_out, self.p_in):
                    a = cap.activations(L).float()  # [b, T, in], every call of the layer along T
                    s = cap.out_grads(L, grads[L.name]).float()  # [b, T, out]
                    pa = pi.project(a.reshape(-1, a.shape[-1])).reshape(a.shape[0], a.shape[1], -1)
                    ps = po.project(s.reshape(-1, s.shape[-1])).reshape(s.shape[0], s.shape[1], -1)
                    parts.append(torch.einsum("bto,bti->boi", ps, pa).reshape(len(a), -1))
                    del a, s, pa, ps
        finally:
            self._protect = cap.protect  # a model that changes a layer's output in place does so every batch
            cap.close()
        return torch.cat(parts, 1).detach()

    def iter_batches(self, x: Any, y: torch.Tensor, kind: str = "margin", batch_size: int | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, projected gradients) per batch; ``then`` is applied to them (the factorized
        projector's own ``project`` passes them through). A CUDA out-of-memory batch is retried at
        half the size, as the gradient computer does."""
        def compute(lo: int, hi: int) -> torch.Tensor:
            out = self.features(batch_rows(x, lo, hi), y[lo:hi], kind)
            return out if then is None else then(out)

        return self._batches(len(y), batch_size or self.batch_size(self._positions(x)), compute)

    def outputs(self, x: Any, batch: int = 4096) -> torch.Tensor:
        return self.fm.outputs(x, batch)


__all__ = ["FactorizedGradients", "FactorizedProjector", "factor_dims", "auto_projection", "covered_fraction",
           "FACTORIZED_MIN_COVERAGE"]
