"""Per-layer, Kronecker-factored random projection of per-example gradients (as LoGra does).

For a Linear or Conv2d layer an example's weight gradient is G = Σ_t s_t a_tᵀ (s: the gradient of
the layer's output, a: its input with a column of ones for the bias, t: positions; one position
for a Linear layer on vectors). Projected with P = P_out ⊗ P_in,

    P_outᵀ G P_in = Σ_t (P_outᵀ s_t)(P_inᵀ a_t)ᵀ,

so each side is projected before the outer product: neither the [batch, p] gradient nor a p × k
matrix is ever formed, and the cost per example is T·(in·k_in + out·k_out + k_in·k_out) instead
of p·k. One batched forward and one ``torch.autograd.grad`` with respect to the layers' outputs
give every example's s_t (eval mode: examples do not interact).

The layers (:func:`factorized_layers`) are those EK-FAC covers (tracked Linear and Conv2d weights
and biases) and tracked ``nn.Embedding`` tables. An embedding's gradient [V, d] has a nonzero row
only for the tokens an example holds: row id_t gets s_t. Its share of k is a sparse JL sketch
(each coordinate to c hashed buckets with hashed signs, :func:`engine.autodiff.projection.sketch_buckets`)
formed from those T·d coordinates alone, so a vocabulary-sized table (2.1M entries for
``proponent init``'s text template) costs T·d·c per example instead of a dense [batch, V·d]
gradient. (The Kronecker form, a gather of P_in's rows by token, costs as little but gave LDS
0.664-0.674 against SJLT's 0.699 on a 3,000-sentence bag-of-words project at each of five
k_out × k_in splits: every pair of different tokens adds noise ∝ 1/√k_in; the sketch gave 0.704,
docs/bench/lds-projection-text-*.json.) A table whose whole gradient fits its share is kept
exactly. Other tracked parameters (normalisation) are left out, as kronfluence
and LoGra leave them out; :attr:`FactorizedGradients.left_out` lists them. Each factor is a dense
Rademacher matrix of :mod:`engine.autodiff.projection`, and the sketch's buckets are hashed, so the
features are the same on every device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from engine.autodiff.compute import fast_layout, resolve_device
from engine.autodiff.curvature import (Layer, _Capture, _grads_only_for, conv_out_grads, curvature_layers,
                                       parameter_holders)
from engine.autodiff.functional import FunctionalModel, Tracked, batch_rows, to_device
from engine.autodiff.measurement import correct_class_margin, example_loss
from engine.autodiff.per_example import KINDS, BatchBackOff
from engine.autodiff.projection import DenseProjector, Projector, projection_seed, sketch_buckets
from engine.core.errors import ProponentError


def factor_dims(layers: list[Layer], k: int) -> list[tuple[int, int]]:
    """(k_out, k_in) per layer, about k in all: smallest layers first, a layer whose whole
    gradient (out × in) fits its even share of what is left keeps every entry (no projection on
    either side), and what it does not use goes to the
    larger layers; a larger layer gets a near-square k_out × k_in within its share, no side wider
    than the layer's own (a side at its full width is not projected), and a larger embedding
    (1, share): its sketch's width."""
    dims: dict[int, tuple[int, int]] = {}
    left_k, left = int(k), len(layers)
    for i in sorted(range(len(layers)), key=lambda j: layers[j].out_dim * layers[j].in_dim):
        L = layers[i]
        share = max(1, left_k // left)
        if L.out_dim * L.in_dim <= share:
            dims[i] = (L.out_dim, L.in_dim)
        elif L.kind == "embedding":
            dims[i] = (1, share)  # one sketch of width share, not two factors
        else:
            k_out = max(1, min(L.out_dim, round(math.sqrt(share))))
            k_in = max(1, min(L.in_dim, share // k_out))
            k_out = max(1, min(L.out_dim, share // k_in))  # a narrow side gives its share to the other
            dims[i] = (k_out, k_in)
        left_k -= dims[i][0] * dims[i][1]
        left -= 1
    return [dims[i] for i in range(len(layers))]


def factorized_layers(model: nn.Module, tracked: list[str] | None = None) -> tuple[list[Layer], dict[str, str]]:
    """:func:`curvature_layers`, plus every tracked ``nn.Embedding`` weight (kind "embedding",
    out_dim the embedding size, in_dim the vocabulary; no bias), and the tracked parameters left
    out with the reason."""
    layers, left_out = curvature_layers(model, tracked)
    pname = {id(p): n for n, p in model.named_parameters()}
    holders = parameter_holders(model)
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Embedding) or pname.get(id(m.weight)) not in left_out:
            continue
        w = pname[id(m.weight)]
        if m.scale_grad_by_freq:
            # the gradient divides by each token's count in the whole batch: examples interact
            left_out[w] = "Embedding with scale_grad_by_freq has no per-example gradient"
        elif len(holders[id(m.weight)]) > 1:
            left_out[w] = "the embedding's weight is shared with another module"
        else:
            del left_out[w]
            layers.append(Layer(mname, m, "embedding", w, None, int(m.embedding_dim), int(m.num_embeddings)))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(layers, key=lambda L: order[L.name]), left_out


# hashed buckets per coordinate of an embedding's sketch (SparseJLProjector's default)
SKETCH_C = 4


# "auto" projects layer by layer when Linear, Conv2d and Embedding layers hold at least this share of the tracked
# parameters (what the factorisation leaves out is then small)
FACTORIZED_MIN_COVERAGE = 0.9


def covered_fraction(fm: FunctionalModel) -> float:
    """The share of a model's tracked parameters that the factorised projection covers."""
    layers, _ = factorized_layers(fm.module, list(fm.layout.names))
    return sum(L.out_dim * L.in_dim for L in layers) / max(1, fm.layout.n)


def auto_projection(fm: FunctionalModel) -> str:
    """What TRAK's projection "auto" means for this model: "factorized" where Linear, Conv2d and
    Embedding layers hold ≥ FACTORIZED_MIN_COVERAGE of the tracked parameters, else "auto" (dense
    Rademacher, SJLT beyond 2^28 entries). Measured against dense at the same k
    (scripts/lds_variants.py, docs/bench/lds-projection-*.json; scripts/bench_gpu.py,
    docs/bench/cpu-cnn-2000.json): LDS equal within projection-seed noise on image CNNs, 2.3-2.9×
    faster, less than half the peak memory; on bag-of-words text models whose embedding table holds
    99.9% of the parameters, LDS as high as SJLT's, and the featurization that took SJLT minutes
    takes seconds."""
    if covered_fraction(fm) < FACTORIZED_MIN_COVERAGE:
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
        self.layers, self.left_out = factorized_layers(self.model, list(self.fm.layout.names))
        if not self.layers:
            raise ProponentError("projection 'factorized' needs tracked Linear, Conv2d or Embedding layers; this model "
                                 "has none (use projection 'auto')")
        self.dims = factor_dims(self.layers, int(proj_dim))
        # independent factors: each layer and side its own model id under the member's seed
        self.p_out, self.p_in, self.sketch_seed = [], [], []
        described = []
        for i, (L, (k_out, k_in)) in enumerate(zip(self.layers, self.dims)):
            base = (int(model_id) + 1) * 100_003 + 2 * i
            if L.kind == "embedding":  # a sketch of its sparse gradient (or its entries), no factors
                self.p_out.append(None)
                self.p_in.append(None)
                self.sketch_seed.append(projection_seed(seed, base))
                exact = (k_out, k_in) == (L.out_dim, L.in_dim)
                described.append({"layer": L.name, "sketch": "exact" if exact else "sjlt", "k": k_out * k_in,
                                  **({} if exact else {"c": SKETCH_C})})
                continue
            # a side kept at its full width is not projected: a square random factor is far from
            # orthogonal (its singular values spread from ~0 to ~2) and would distort the inner products
            # (the head of the bag-of-words model: LDS 0.682 with square factors, 0.704 without)
            self.p_out.append(None if k_out == L.out_dim else
                              DenseProjector(L.out_dim, k_out, seed=seed, model_id=base, device=self.device))
            self.p_in.append(None if k_in == L.in_dim else
                             DenseProjector(L.in_dim, k_in, seed=seed, model_id=base + 1, device=self.device))
            self.sketch_seed.append(None)
            described.append({"layer": L.name, "k_out": k_out, "k_in": k_in})
        self.out_dim = sum(a * b for a, b in self.dims)
        self.covered = sum(L.out_dim * L.in_dim for L in self.layers)
        self.projector = FactorizedProjector(self.covered, self.out_dim, described, seed, model_id, sorted(self.left_out))
        self.memory_budget_mb = memory_budget_mb
        self._protect = False
        # layer index -> (P_in's columns as convolution filters, its bias row or None)
        self._p_in_filters: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def batch_size(self, per_example_positions: int) -> int:
        """Examples per batch within the memory budget: the layer inputs and output gradients of every layer
        are held for a batch. Counted as a convolution's unfolded patches, which only a side kept at full width
        still cuts (a projected side convolves the input instead): conservative there, and 34 to 256 rows
        featurized the 5,000-image benchmark CNN equally fast."""
        budget = self.memory_budget_mb * 2**20
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            budget = max(budget, free // 2)
        # an embedding's input is one id per position; its sketch holds c buckets and signs per coordinate
        per_example = 4 * 3 * sum(max(1, per_example_positions) * (SKETCH_C * L.out_dim if L.kind == "embedding"
                                                                   else L.in_dim + L.out_dim)
                                  for L in self.layers)
        return int(max(1, min(self.max_batch or 4096, budget // max(per_example, 1))))

    @staticmethod
    def _positions(x: Any) -> int:
        """Positions per example a layer may see: pixels of an image batch, tokens of a dict
        (text) batch, one for a table."""
        shape = tuple(getattr(x, "shape", ()))
        if hasattr(x, "keys"):  # {input_ids, attention_mask}: [n, tokens]
            return int(shape[1]) if len(shape) > 1 else 1
        return int(math.prod(shape[2:])) if len(shape) > 2 else 1

    def features(self, x: Any, y: torch.Tensor, kind: str = "margin", values: bool = False):
        """[b, out_dim] projected gradients of one batch; ``values``: (them, the [b] values of ``kind`` whose
        gradients they are)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        x = fast_layout(self.model, to_device(x, self.device))  # probed before the capture's hooks exist
        cap = _Capture(self.layers, protect=self._protect)
        try:
            with _grads_only_for(self.model, self.layers), torch.enable_grad():
                out = cap.run(self.model, x).float()
                yb = y.to(self.device)
                measured = correct_class_margin(out, yb) if kind == "margin" else example_loss(out, yb)
                grads = cap.split(torch.autograd.grad(measured.sum(), cap.output_list(), allow_unused=True))
                parts = []
                for i, (L, po, pi, dims, seed) in enumerate(zip(self.layers, self.p_out, self.p_in, self.dims,
                                                                 self.sketch_seed)):
                    s = cap.out_grads(L, grads[L.name]).float()  # [b, T, out]
                    if L.kind == "embedding":
                        parts.append(self._embedding_features(L, cap.activations(L), s, dims[0] * dims[1], seed, len(yb)))
                        continue
                    if pi is None:
                        pa = cap.activations(L).float()  # [b, T, in], every call of the layer along T
                    elif L.kind == "conv2d":
                        pa = self._projected_patches(i, L, pi, cap.inputs[L.name])
                    else:
                        a = cap.activations(L).float()
                        pa = (a.reshape(-1, a.shape[-1]) @ pi.matrix).reshape(a.shape[0], a.shape[1], -1)
                        del a
                    ps = s if po is None else po.project(s.reshape(-1, s.shape[-1])).reshape(s.shape[0], s.shape[1], -1)
                    parts.append(torch.einsum("bto,bti->boi", ps, pa).reshape(len(pa), -1))
                    del s, pa, ps
        finally:
            self._protect = cap.protect  # a model that changes a layer's output in place does so every batch
            cap.close()
        feats = torch.cat(parts, 1).detach()
        return (feats, measured.detach()) if values else feats

    def _projected_patches(self, i: int, L: Layer, pi: DenseProjector, inputs: list[torch.Tensor]) -> torch.Tensor:
        """[b, T, k_in]: a convolution's input patches times P_in, every call of the layer along T, computed as
        the layer's own convolution (stride, padding, dilation) of its input with P_in's k_in columns as
        filters, so no patch is cut. On the 5,000-image benchmark CNN (batches of 34, 2-core AVX2 EPYC) 1.2,
        2.2 and 1.2 ms per layer against 2.8, 4.7 and 2.0 ms to cut the patches and multiply them."""
        if i not in self._p_in_filters:
            m = L.module
            c, kh, kw = m.in_channels, *m.kernel_size
            mat = pi.matrix
            filters = mat[:c * kh * kw].T.reshape(-1, c, kh, kw).contiguous()  # P_in's rows in the weight's order
            self._p_in_filters[i] = (filters, mat[-1] if L.bias else None)  # the bias column: a constant input 1
        filters, bias_row = self._p_in_filters[i]
        parts = []
        with torch.no_grad():
            for inp in inputs:
                y = L.module._conv_forward(inp.float(), filters, None)  # [b, k_in, H', W']
                parts.append(conv_out_grads(y))  # the same [b, T, channels] view a convolution's output gradient takes
        pa = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return pa if bias_row is None else pa + bias_row

    @staticmethod
    def _embedding_features(L: Layer, ids: torch.Tensor, s: torch.Tensor, k: int, seed: int | None,
                            batch: int) -> torch.Tensor:
        """[b, k]: the embedding's per-example weight gradient (row id_t of [V, d] gets s_t, none for
        the padding index), sketched from its T·d nonzero coordinates, or scattered whole when
        k = V·d."""
        if ids.shape[0] != batch or ids.shape != s.shape[:2]:
            raise ProponentError(f"embedding {L.name!r}: its {tuple(ids.shape)} ids do not line up with its "
                                 f"{tuple(s.shape[:2])} outputs for a batch of {batch} examples (the batch must come "
                                 f"first); use projection 'sjlt' (TRAK)")
        d = L.out_dim
        if L.module.padding_idx is not None:  # the embedding never updates the padding row
            s = s.masked_fill((ids == L.module.padding_idx).unsqueeze(-1), 0.0)
        rows = torch.arange(batch, device=ids.device).view(-1, 1, 1) * k
        out = torch.zeros(batch * k, dtype=s.dtype, device=s.device)
        if k == L.out_dim * L.in_dim:
            coords = ids.unsqueeze(-1) * d + torch.arange(d, device=ids.device)  # [b, T, d] in the [V, d] weight
            out.index_add_(0, (rows + coords).reshape(-1), s.reshape(-1))
        else:
            # hashed once per distinct token of the batch (the hash, not the scatter, is the cost)
            tokens, where = torch.unique(ids, return_inverse=True)
            buckets, signs = sketch_buckets(seed, tokens.unsqueeze(-1) * d + torch.arange(d, device=ids.device), k,
                                            SKETCH_C)  # [c, tokens, d]
            for j in range(SKETCH_C):
                out.index_add_(0, (rows + buckets[j][where]).reshape(-1), (s * signs[j][where]).reshape(-1))
        return out.view(batch, k)

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

    def iter_margins(self, x: Any, y: torch.Tensor, batch_size: int | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
        """(lo, hi, (projected margin gradients, ``then`` applied if given; s = 1 − p_y = σ(−f) from the same
        forward pass)) per batch, as :meth:`GradientComputer.iter_margins`."""
        def compute(lo: int, hi: int):
            out, f = self.features(batch_rows(x, lo, hi), y[lo:hi], "margin", values=True)
            return (out if then is None else then(out)), torch.sigmoid(-f.float())

        return self._batches(len(y), batch_size or self.batch_size(self._positions(x)), compute)

    def outputs(self, x: Any, batch: int = 4096) -> torch.Tensor:
        return self.fm.outputs(x, batch)


__all__ = ["FactorizedGradients", "FactorizedProjector", "factor_dims", "factorized_layers", "auto_projection",
           "covered_fraction", "FACTORIZED_MIN_COVERAGE"]
