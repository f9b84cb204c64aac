"""K-FAC / EK-FAC curvature factors for Linear and Conv2d layers (shared by EK-FAC and Source).

For a layer with input ``a`` (a 1 appended when it has a bias) and output gradient ``s``,
the per-example gradient matrix is ``G = Σ_t s_t a_tᵀ`` (``t`` runs over positions: one for a
Linear layer on flat input, the unfolded patches of a Conv2d). The Fisher of the *mean*
training loss is approximated with pseudo-gradients: labels sampled from the model.

- ``A = E[Σ_t a_t a_tᵀ]`` and ``S = E[Σ_t s_t s_tᵀ]`` (expectations over examples and sampled
  labels), eigendecomposed as ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ``;
- EK-FAC refits the eigenvalues in that basis: ``Λ = E[(Q_Sᵀ G Q_A)²]`` ([out, in]);
- any elementwise function ``h`` of the eigenvalues applied to a layer gradient ``V``:
  ``Q_S [h(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ`` (:func:`apply_eigen_fn`).

Scale: Λ are eigenvalues of the Fisher of the mean cross-entropy (per-example pseudo-gradient
squared, averaged), i.e. the same scale as the Hessian of the training objective; Source uses
their absolute value (``η K σ``), not only their ranking.

Only the tracked parameters (``[model] attribute``) are covered. Tracked layers other than
Linear / Conv2d (norms, embeddings, grouped convolutions, ...) are not handled:
:func:`curvature_layers` returns their parameter names as ``left_out`` and the methods report
them in their metadata. Their gradients are not used.

Precision: the factors are float64. For a float32 model the per-batch products (covariances,
rotations into the eigenbasis, squared rotated pseudo-gradients) are formed in float32 and summed
in float64; they agree with float64 arithmetic to about 1e-7 of each factor's largest entry
(a float64 model is computed in float64 throughout).

Factors are stored per checkpoint as safetensors (:func:`save_tensors` / :func:`load_tensors`),
keyed by the checkpoint's weights, the rows, the Fisher sampling and (for Λ) the basis, so a
later run with the same request reuses them.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

import engine.autodiff.distributed as distributed
from engine.autodiff.compute import fast_layout
from engine.autodiff.functional import ParamLayout, forward_batches
from engine.core.errors import ProponentError
from engine.storage.arrays import atomic_write_bytes

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Layer:
    """One layer the curvature covers: its module path, parameter names and matrix shape."""

    name: str
    module: nn.Module
    kind: str  # linear | conv2d; embedding only in the factorised projection (engine.autodiff.factorized)
    weight: str  # parameter name in model.named_parameters()
    bias: str | None
    out_dim: int
    in_dim: int  # columns of the gradient matrix, bias column included

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_dim, self.in_dim)


def _conv_padding(m: nn.Conv2d):
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        # 'same' with stride 1: symmetric only for odd effective kernel sizes
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(m.padding)


def conv_padding_problem(m: nn.Conv2d) -> str | None:
    """Why a Conv2d's input patches cannot be formed here (None: they can)."""
    if m.padding_mode != "zeros":
        return f"Conv2d padding_mode {m.padding_mode!r} is not handled"
    if _conv_padding(m) is None:
        return "Conv2d 'same' padding with an even kernel is not handled"
    return None


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): names of the modules that hold it directly}: more than one for a shared
    (tied) parameter."""
    holders: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for q in m.parameters(recurse=False):
            holders.setdefault(id(q), []).append(mname)
    return holders


def curvature_layers(model: nn.Module, tracked: list[str] | None = None) -> tuple[list[Layer], dict[str, str]]:
    """The Linear / Conv2d layers EK-FAC covers, and every other tracked parameter with the
    reason it is left out (never silently dropped).

    ``tracked``: the parameter names to cover (default every parameter that requires grad). A
    layer whose weight is tracked but not its bias is covered without the bias column.
    """
    if tracked is None:
        tracked = [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = set(tracked)
    layers: list[Layer] = []
    covered: set[str] = set()
    left_out: dict[str, str] = {}
    pname = {id(p): n for n, p in model.named_parameters()}
    # nn.MultiheadAttention applies its out_proj's weight itself (F.multi_head_attention_forward):
    # the Linear's own forward, and so its capture, never runs
    attention_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    # a weight two modules hold (tied input and output embeddings) has the sum of both uses as its
    # gradient: one layer's inputs and output gradients would give part of it
    holders = parameter_holders(model)
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or m.weight is None:
            continue
        w = pname[id(m.weight)]
        b = pname[id(m.bias)] if (m.bias is not None and pname[id(m.bias)] in wanted) else None
        if w not in wanted:
            if b:
                left_out[b] = "its layer's weight is not tracked, so the layer has no Kronecker factorisation"
            continue
        if len(holders[id(m.weight)]) > 1:
            for n in [w] + ([b] if b else []):
                left_out[n] = f"the weight is shared by modules {', '.join(map(repr, holders[id(m.weight)]))}"
            continue
        if id(m) in attention_out:
            for n in [w] + ([b] if b else []):
                left_out[n] = "nn.MultiheadAttention's output projection runs inside the attention, not as a layer"
            continue
        if isinstance(m, nn.Conv2d):
            reason = "grouped Conv2d is not handled by K-FAC here" if m.groups != 1 else conv_padding_problem(m)
            if reason:
                left_out[w] = reason
                if b:
                    left_out[b] = reason
                continue
            in_dim = m.in_channels * int(np.prod(m.kernel_size))
            kind = "conv2d"
        else:
            in_dim = m.in_features
            kind = "linear"
        layers.append(Layer(mname, m, kind, w, b, int(m.weight.shape[0]), in_dim + (1 if b else 0)))
        covered.update([w] + ([b] if b else []))
    modules = dict(model.named_modules())
    for n in tracked:
        if n not in covered and n not in left_out:
            mod = modules.get(n.rpartition(".")[0])
            left_out[n] = f"{type(mod).__name__ if mod is not None else 'parameter'} has no Kronecker factorisation here"
    return layers, left_out


def normalized_layers(model: nn.Module, layers: list[Layer], x: torch.Tensor, *, factor: float = 2.0,
                      rtol: float = 1e-3) -> list[str]:
    """Names of the ``layers`` whose scale the model normalises away: multiplying the layer's
    parameters by ``factor`` leaves the outputs on ``x`` unchanged (within ``rtol`` of their norm)
    when BatchNorm uses batch statistics, as in training (LayerNorm and GroupNorm always do).

    Such a layer (a convolution feeding BatchNorm, possibly through a ReLU or pooling) is
    scale-invariant: the training loss depends on the direction of its weights only, so weight
    decay there does not regularise the function, it shrinks ‖w‖ and so raises the effective
    learning rate (van Laarhoven 2017; Zhang et al. 2019). Tested on the model itself, so any
    architecture gets the right answer without parsing its graph. The model is not changed: scaled
    parameters and copies of the buffers (BatchNorm's running statistics) go in through
    ``functional_call``, and every module's train/eval mode is restored.
    """
    if len(x) < 2 or not layers:  # batch statistics need two rows
        return []
    from torch.func import functional_call

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [(m, m.training) for m in model.modules()]
    params = dict(model.named_parameters())
    try:
        model.eval()
        for m in norms:
            m.train()
        with torch.no_grad():
            def run(extra: dict) -> torch.Tensor:
                buffers = {k: b.clone() for k, b in model.named_buffers()}  # BatchNorm updates its copies
                return functional_call(model, {**params, **buffers, **extra}, (x,)).double()

            try:
                base = run({})
            except (RuntimeError, TypeError, ValueError):
                # a model functional_call cannot run: no layer is called normalised (weight
                # decay on every layer, the rule before this probe)
                return []
            scale = float(base.norm())
            if not np.isfinite(scale) or scale == 0.0:
                return []
            out = []
            for L in layers:
                # all of the module's own parameters (a bias left untracked still scales with it), looked
                # up in this model: ``layers`` may come from another instance of the architecture
                prefix = f"{L.name}." if L.name else ""
                own = [prefix + n for n, _ in model.get_submodule(L.name).named_parameters(recurse=False)]
                y = run({n: params[n] * factor for n in own})
                if float((y - base).norm()) <= rtol * scale:
                    out.append(L.name)
            return out
    finally:
        for m, training in modes:
            m.training = training


def covered_param_names(layers: list[Layer]) -> list[str]:
    out = []
    for L in layers:
        out.append(L.weight)
        if L.bias:
            out.append(L.bias)
    return out


# ----------------------------------------------------------------------------- layer blocks
class LayerBlocks:
    """Flat vectors over the covered parameters (in their :class:`ParamLayout`) seen as
    per-layer gradient matrices [..., out, in] (bias as the last column), and back."""

    def __init__(self, layers: list[Layer], layout: ParamLayout):
        self.layers = layers
        self.layout = layout
        self.n = layout.n
        missing = [n for n in covered_param_names(layers) if n not in layout]
        if missing:
            raise ValueError(f"gradient layout lacks parameters {missing}")
        # whether the layers fill every entry of the flat layout (to_flat then writes every entry of ``out``)
        self.covers_all = sum(layout[n].numel for n in covered_param_names(layers)) == layout.n

    def to_layers(self, flat: torch.Tensor) -> list[torch.Tensor]:
        lead = flat.shape[:-1]
        out = []
        for L in self.layers:
            sw = self.layout[L.weight]
            w = flat[..., sw.offset:sw.offset + sw.numel].reshape(*lead, L.out_dim, -1)
            if L.bias:
                sb = self.layout[L.bias]
                w = torch.cat([w, flat[..., sb.offset:sb.offset + sb.numel].reshape(*lead, L.out_dim, 1)], dim=-1)
            out.append(w)
        return out

    def to_flat(self, mats: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """The per-layer matrices back in the flat layout (parameters the layers do not cover: 0); ``out``: written
        into that [..., n] tensor (converted to its dtype) instead of a new one in the matrices' dtype."""
        lead = mats[0].shape[:-2]
        if out is None:
            flat = torch.zeros(*lead, self.n, dtype=mats[0].dtype, device=mats[0].device)
        else:
            flat = out
            if not self.covers_all:
                flat.zero_()
        for L, M in zip(self.layers, mats):
            sw = self.layout[L.weight]
            wcols = L.in_dim - (1 if L.bias else 0)
            flat[..., sw.offset:sw.offset + sw.numel] = M[..., :wcols].reshape(*lead, sw.numel)
            if L.bias:
                sb = self.layout[L.bias]
                flat[..., sb.offset:sb.offset + sb.numel] = M[..., wcols]
        return flat


# ----------------------------------------------------------------------------- capture
def conv_patches(m: nn.Conv2d, x: torch.Tensor, kernel_major: bool = False, ones_column: bool = False) -> torch.Tensor:
    """[b, T, in_channels·kh·kw] input patches of a groups-1 Conv2d over its zero-padded input ``x``
    [b, C, H, W], T the output positions; contiguous. ``ones_column``: one more column of ones (a bias's),
    written in place rather than concatenated (a second copy of the patches).

    Columns in the weight's order (channel, then kernel position: ``F.unfold``'s), or with
    ``kernel_major`` kernel position first, then channel (:func:`kernel_major_order` maps back).
    Built from kh·kw strided slices of one zero-padded channels-last copy of ``x``: on the 5,000-image
    benchmark CNN's 32->64 layer (85 images of 32×16×16, channels_last as fast_layout runs them)
    ``F.unfold`` plus the transposing copy every caller made took 8.0 ms in float32 and 6.9 in bfloat16,
    these slices 4.9 / 2.4 ms, kernel-major 1.35 / 0.64 ms (medians of 7)."""
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    ph, pw = _conv_padding(m)
    b, c, h, w = x.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = x.permute(0, 2, 3, 1)  # [b, H, W, C]: a view of a channels_last batch
    if ph or pw:
        padded = x.new_zeros(b, h + 2 * ph, w + 2 * pw, c)
        padded[:, ph:ph + h, pw:pw + w] = xp
        xp = padded
    full = x.new_empty(b, ho * wo, c * kh * kw + int(ones_column))
    if ones_column:
        full[..., -1] = 1
    body = full[..., :c * kh * kw] if ones_column else full
    out = body.unflatten(2, (kh * kw, c) if kernel_major else (c, kh * kw)).unflatten(1, (ho, wo))
    for i in range(kh):
        for j in range(kw):
            src = xp[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            if kernel_major:
                out[:, :, :, i * kw + j] = src
            else:
                out[..., i * kw + j] = src
    return full


def kernel_major_order(channels: int, kernel: int, extra: int = 0) -> torch.Tensor:
    """Index ``o`` with ``weight_order[..., j] = kernel_major[..., o[j]]`` for patches of ``channels`` ×
    ``kernel`` columns (``extra`` trailing columns, e.g. a bias column, kept in place)."""
    j = torch.arange(channels * kernel)
    return torch.cat([(j % kernel) * channels + j // kernel, channels * kernel + torch.arange(extra)])


def patch_order(L: Layer) -> torch.Tensor | None:
    """For a convolution, :func:`kernel_major_order` of its kernel-major activations (bias column included);
    None for other layers (their activations have one order)."""
    if L.kind != "conv2d":
        return None
    k = int(np.prod(L.module.kernel_size))
    return kernel_major_order((L.in_dim - int(bool(L.bias))) // k, k, int(bool(L.bias)))


def kernel_major_rows(M: torch.Tensor, L: Layer, dim: int = 0) -> torch.Tensor:
    """``M`` with its entries along ``dim`` (indexed by layer L's weight-order input columns) moved to L's
    kernel-major activation order, so that a_kernel_major @ M' = a_weight_order @ M; ``M`` itself for a layer
    other than a convolution."""
    o = patch_order(L)
    return M if o is None else torch.empty_like(M).index_copy_(dim, o.to(M.device), M)


def conv_out_grads(g: torch.Tensor) -> torch.Tensor:
    """[b, T, out] of a convolution's [b, out, H, W] output gradient: a view either way. A channels_last one
    (fast_layout's batches) is already [b, H, W, out] in memory, where flatten(2) would copy it (and each
    consumer's reshape of the transposed copy copy again)."""
    if g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous():
        return g.permute(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1])
    return g.flatten(2).transpose(1, 2)


def _activations(L: Layer, inp: torch.Tensor, kernel_major: bool = False) -> torch.Tensor:
    """[b, T, in] layer inputs (bias column of ones appended when the layer has a bias); an
    embedding's are its [b, T] token ids (the one-hot rows are never formed)."""
    m = L.module
    if L.kind == "embedding":
        return inp.reshape(inp.shape[0], -1)
    if L.kind == "conv2d":
        return conv_patches(m, inp, kernel_major, ones_column=bool(L.bias))  # [b, T, cin*kh*kw (+1)]
    else:
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if L.bias:
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)], dim=-1)
    return a


def _out_grads(L: Layer, g: torch.Tensor) -> torch.Tensor:
    """[b, T, out] gradients of the layer output."""
    if L.kind == "conv2d":
        return conv_out_grads(g)
    return g.reshape(g.shape[0], -1, g.shape[-1])


class _Capture:
    """Forward hooks that keep each covered layer's inputs (``inputs``) and outputs (``outputs``, to
    take ``torch.autograd.grad`` with respect to: no parameter gradient is formed), one entry per
    call: a layer the forward pass calls several times (an unrolled recurrent cell, a shared
    encoder) has the gradient Σ over calls, so :meth:`activations` and :meth:`out_grads` put its
    calls side by side as more positions t. A layer that never runs its own forward (its weight
    used directly) is an error naming it, not a wrong answer.

    Run the model through :meth:`run`: a model that changes a captured tensor in place after the
    layer (``nn.ReLU(inplace=True)`` on a convolution's output, a residual ``out += x``) would
    otherwise give the gradient of the changed tensor and the changed input. :meth:`run` sees the
    version counters move and runs the batch again in ``protect`` mode, where each layer hands
    the rest of the model a copy of its output and keeps a copy of its input (kept for later
    batches: the same model does it again)."""

    def __init__(self, layers: list[Layer], protect: bool = False):
        self.layers = layers
        self.protect = protect
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self._versions: list[tuple[str, torch.Tensor, int]] = []
        self.handles = []
        for L in layers:
            self.handles.append(L.module.register_forward_hook(self._hook(L)))

    def _hook(self, L: Layer):
        def hook(mod, inp, out):
            self.calls[L.name] = self.calls.get(L.name, 0) + 1
            a = inp[0].detach()
            self.inputs.setdefault(L.name, []).append(a.clone() if self.protect else a)
            kept = out
            if self.protect:
                out = out.clone()  # the rest of the model may change its copy in place
            self._versions += [(L.name, inp[0], inp[0]._version), (L.name, kept, kept._version)]
            self.outputs.setdefault(L.name, []).append(kept)
            return out if self.protect else None
        return hook

    def clear(self) -> None:
        for d in (self.inputs, self.outputs, self.calls, self._versions):
            d.clear()

    def require_called(self) -> None:
        """An error naming the first layer whose forward did not run in the last pass."""
        for L in self.layers:
            if not self.calls.get(L.name):
                raise ProponentError(
                    f"layer {L.name!r} ({type(L.module).__name__}) holds tracked parameters but its forward never ran: "
                    f"the model uses its weight directly. Leave it out with [model] attribute, or use projection "
                    f"'sjlt' (TRAK)")

    def output_list(self) -> list[torch.Tensor]:
        """Every captured output, layer by layer and call by call (what autograd.grad takes)."""
        return [o for L in self.layers for o in self.outputs.get(L.name, ())]

    def split(self, grads) -> dict[str, list[torch.Tensor | None]]:
        """The gradients of :meth:`output_list`'s tensors, back to {layer: [one per call]}."""
        out, i = {}, 0
        for L in self.layers:
            k = len(self.outputs.get(L.name, ()))
            out[L.name] = list(grads[i:i + k])
            i += k
        return out

    def activations(self, L: Layer, dtype: torch.dtype | None = None, kernel_major: bool = False) -> torch.Tensor:
        """[b, T, in]: the layer's inputs over every call, calls side by side along T; ``dtype``: a float32
        input converted to it first (a float64 one is kept); ``kernel_major``: a convolution's columns in
        :func:`conv_patches`' kernel-major order (:func:`patch_order` maps them back)."""
        parts = [_activations(L, a if dtype is None or not a.is_floating_point() or a.dtype == torch.float64
                              else a.to(dtype), kernel_major) for a in self.inputs[L.name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def out_grads(self, L: Layer, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """[b, T, out]: the output gradients over every call (zeros for an output the measurement
        does not reach), in the order of :meth:`activations`."""
        parts = [_out_grads(L, torch.zeros_like(o) if g is None else g) for o, g in zip(self.outputs[L.name], grads)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def changed_in_place(self) -> list[str]:
        """Layers whose captured input or output the forward pass changed after capture."""
        if self.protect:
            return []  # the captured input is a private copy and the output is not handed on
        return sorted({name for name, t, v in self._versions if t._version != v})

    def run(self, model: nn.Module, x: Any, require_called: bool = True) -> torch.Tensor:
        """``model(x)`` with fresh captures, run again protected if it changed a captured tensor."""
        self.clear()
        out = model(x)
        if self.changed_in_place():
            self.protect = True
            del out
            self.clear()
            out = model(x)
        if require_called:
            self.require_called()
        return out

    def close(self):
        for h in self.handles:
            h.remove()
        self._versions.clear()


def sample_labels(model: nn.Module, x: torch.Tensor, samples: int = 1, seed: int = 0, batch_size: int = 512,
                  device: str = "cpu") -> torch.Tensor:
    """[n, samples] labels drawn from the model's own predictive distribution (true Fisher)."""
    return fisher_targets(model, x, samples, seed, batch_size, device)[0]


EXACT_FISHER_MAX_CLASSES = 16
# Above this many rows EK-FAC and Source sample one label per example (fisher_samples_for). Measured
# (scripts/lds_variants.py, docs/bench/lds-fisher-samples-*.json): on five projects of 1,200-2,000 rows
# (three CNNs, two MLPs) one label gave LDS within 0.008 of the exact expectation (two sampling seeds)
# with covariance and eigenvalue passes C times cheaper (EK-FAC 2.4-3.4x faster on the 10-class CNNs);
# on a 700-row tabular MLP it lost 0.02 at the final checkpoint, where the exact passes are cheap.
FISHER_EXACT_MAX_ROWS = 1024


def fisher_samples_for(setting: int, n_rows: int, n_classes: int) -> int:
    """Label samples a Fisher fit over ``n_rows`` uses for the ``fisher_samples`` setting: as given
    when ≥ 0; -1 (auto): 0 (every class, exact) for ≤ FISHER_EXACT_MAX_ROWS rows and
    ≤ EXACT_FISHER_MAX_CLASSES classes (sampling noise matters most on few rows, and there the exact
    passes are cheap), else 1."""
    if setting >= 0:
        return int(setting)
    return 0 if n_rows <= FISHER_EXACT_MAX_ROWS and n_classes <= EXACT_FISHER_MAX_CLASSES else 1


def fisher_uniforms(n: int, samples: int, seed: int) -> torch.Tensor:
    """[n, max(1, samples)] uniforms that fix the sampled Fisher labels of each row, drawn up front from
    ``seed``: a row's labels then depend on its own probabilities only, not on how rows are batched
    (the covariance pass labels its own batches, :func:`fit_covariances_sampled`) or split over ranks."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(n, max(1, samples), generator=gen, dtype=torch.float64)


def labels_from_probs(p: torch.Tensor, samples: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, weights) [b, k] for probabilities ``p`` [b, C] (float64) and the rows' uniforms ``u``:
    every class weighted by p when exact (``samples`` 0, or < 0 with at most EXACT_FISHER_MAX_CLASSES
    classes), else k = samples labels by inverse CDF (label = #{c : F_c ≤ u·F_C}), weight 1/k each.
    Non-finite probabilities (a diverged model) end in a ProponentError."""
    if not bool(torch.isfinite(p).all()):
        raise ProponentError("non-finite class probabilities while drawing the Fisher labels: the checkpoint may "
                             "have diverged")
    if samples == 0 or (samples < 0 and p.shape[1] <= EXACT_FISHER_MAX_CLASSES):
        return torch.arange(p.shape[1]).expand(len(p), -1).clone(), p
    cdf = torch.cumsum(p, 1)
    # u scaled by the row's total: a last class of probability 0 is never drawn when F_C rounds below 1
    lab = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True).clamp_max(p.shape[1] - 1)
    return lab, torch.full(u.shape, 1.0 / u.shape[1], dtype=torch.float64)


def fisher_targets(model: nn.Module, x: torch.Tensor, samples: int = 1, seed: int = 0, batch_size: int = 512,
                   device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and weights ([n, k] each) for the Fisher pseudo-gradients.

    ``samples ≥ 1``: k labels drawn from the model, weight 1/k each (a Monte-Carlo estimate).
    ``samples = 0``: every class, weighted by the model's probability: the exact expectation
    over sampled labels (no sampling noise; k = number of classes). ``samples < 0``: exact
    when there are at most 16 classes, else one sample. Draws: :func:`fisher_uniforms`.
    """
    u = fisher_uniforms(len(x), samples, seed)
    model = model.eval().to(device)
    labs, ws = [], []
    for lo, _, logits in forward_batches(model, x, device, batch_size):
        p = torch.softmax(logits.double().cpu(), -1)
        lab, w = labels_from_probs(p, samples, u[lo:lo + len(p)])
        labs.append(lab)
        ws.append(w)
    if not labs:
        return torch.empty(0, max(1, samples), dtype=torch.long), torch.empty(0, max(1, samples), dtype=torch.float64)
    return torch.cat(labs, 0), torch.cat(ws, 0)


@contextlib.contextmanager
def _grads_only_for(model: nn.Module, layers: list[Layer]):
    """Only the covered layers' parameters require grad while inside: a backward pass then stops at
    the earliest covered layer instead of running through an untracked (e.g. pretrained, frozen by
    ``[model] attribute``) backbone. Output gradients of the covered layers are unchanged."""
    covered = {id(p) for L in layers for p in L.module.parameters()}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in covered)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _pseudo_grad_batches(model: nn.Module, layers: list[Layer], x: torch.Tensor, labels, weights: torch.Tensor | None,
                         batch_size: int, device: str, products: torch.dtype | None = None):
    """Yields, per batch and label column j, (batch start, j, {layer: (a [b,T,in], s [b,T,out])}, w [b])
    with ``s`` the gradient of each example's own cross-entropy (summed loss, so per-example
    scale) for label ``labels[:, j]`` and ``w`` its Fisher weight (float64). ``a`` and ``s`` are in
    the model's dtype; ``a`` is the same tensor for every j of a batch. Under torchrun, only this
    rank's batches (round-robin): the callers sum their statistics over ranks.

    ``labels`` may instead be a callable (batch start, logits) → (labels, weights) that labels each
    batch from its own forward (:func:`fit_covariances_sampled`).

    A convolution's ``a`` comes kernel-major (:func:`conv_patches`: several times cheaper to form); callers
    map its columns back with :func:`patch_order`. ``products`` (bfloat16): on the layers
    :func:`layer_products` picks, a float32 model's ``a`` comes in that dtype, converted before the patches
    are cut (half the bytes copied; the factor products run in it anyway).

    One forward per batch, then per label ``torch.autograd.grad`` with respect to the covered
    layers' outputs: no parameter gradient is formed (a full ``backward`` also computed every
    weight gradient and took about twice as long)."""
    model = model.eval().to(device)
    if len(x):
        fast_layout(model, x[:2].to(device))  # its probe runs the model: before the capture's hooks
    cap = _Capture(layers)
    try:
        with _grads_only_for(model, layers):
            for lo in distributed.my_share(range(0, len(x), batch_size)):
                xb = fast_layout(model, x[lo:lo + batch_size].to(device))
                with torch.enable_grad():
                    logits = cap.run(model, xb)
                    if callable(labels):
                        lb, wb = labels(lo, logits.detach())
                    else:
                        lb, wb = labels[lo:lo + batch_size], weights[lo:lo + batch_size]
                    lb, wb = lb.to(device), wb.to(device).double()
                    acts = {L.name: cap.activations(L, layer_products(L, products), kernel_major=True) for L in layers}
                    outs = cap.output_list()
                    for j in range(lb.shape[1]):
                        loss = F.cross_entropy(logits, lb[:, j], reduction="sum")
                        gs = cap.split(torch.autograd.grad(loss, outs, retain_graph=j + 1 < lb.shape[1], allow_unused=True))
                        yield (lo, j, {L.name: (acts[L.name], cap.out_grads(L, gs[L.name])) for L in layers}, wb[:, j])
                    del logits, outs
    finally:
        cap.close()
        model.zero_grad(set_to_none=True)


# bytes of layer inputs and output gradients one curvature batch holds (each counted twice: the
# eigenvalue pass keeps a rotated copy). A conv layer's unfolded patches are large (about 1.2 MB per
# 32×32 image for a 3×3 conv over 32 channels), so the fixed 256-example batch held about 0.6 GB.
CURVATURE_BATCH_BYTES = 2**27


def curvature_batch_size(model: nn.Module, layers: list[Layer], x: torch.Tensor, batch_size: int = 256,
                         device: str = "cpu") -> int:
    """Examples per curvature batch: at most ``batch_size``, and within CURVATURE_BATCH_BYTES of
    the covered layers' inputs and output gradients (sized from one example's forward pass)."""
    if len(x) == 0:
        return batch_size
    model = model.eval().to(device)
    cap = _Capture(layers)
    try:
        with torch.no_grad():
            model(x[:1].to(device))
        cap.require_called()
        per = 0
        for L in layers:
            a = cap.activations(L)
            per += a.shape[1] * 2 * (L.in_dim + L.out_dim) * max(4, a.element_size())
    finally:
        cap.close()
    budget = CURVATURE_BATCH_BYTES
    if str(device).startswith("cuda"):  # device memory, not the host's, bounds a GPU batch
        budget = max(budget, torch.cuda.mem_get_info()[0] // 4)
    # one size on every rank (free GPU memory differs): the ranks split the same batches
    return distributed.min_int(max(1, min(batch_size, budget // max(1, per))))


# rows (examples × positions) per low-precision product before it is added to a float64 total: a
# float32 sum stays short, so the statistics agree with float64 arithmetic to about 1e-6
ACCUMULATE_ROWS = 8192
# the same for bfloat16 products, whose partial sums come back rounded to bfloat16 (2^-9 relative, as the CPU
# has no bfloat16 GEMM with a float32 result): shorter partials, so their roundings average out over more of them
BF16_ACCUMULATE_ROWS = 1024


# A Gram matrix is symmetric, so only its upper triangle is multiplied: row block i of Xᵀ times the columns from
# block i on (one product per row block), mirrored once at the end. Blocks of about this many rows of Xᵀ (at most
# GRAM_MAX_BLOCKS): on a 2-core AVX2 EPYC, the 5,000-image benchmark CNN's [576, 5,440] and [288, 8,192] partials
# took 35 and 15 ms against 51 and 19 ms for the full product (medians of 7); narrower ones gain little
GRAM_BLOCK = 96
GRAM_MAX_BLOCKS = 8


def _gram_edges(d: int) -> list[int]:
    blocks = max(1, min(GRAM_MAX_BLOCKS, d // GRAM_BLOCK))
    return [round(i * d / blocks) for i in range(blocks + 1)]


def _gram(XT: torch.Tensor) -> torch.Tensor:
    """Σ_rows x xᵀ for X given as Xᵀ [d, rows], in float64 on the host: float64 inputs are
    multiplied in float64; others in their own dtype, ACCUMULATE_ROWS (bfloat16: BF16_ACCUMULATE_ROWS)
    rows at a time, each partial product added to the float64 total. Wide ones by upper-triangle blocks
    (:data:`GRAM_BLOCK`), exactly symmetric."""
    if XT.dtype == torch.float64:
        return (XT @ XT.T).cpu()
    step = BF16_ACCUMULATE_ROWS if XT.dtype == torch.bfloat16 else ACCUMULATE_ROWS
    d = XT.shape[0]
    edges = _gram_edges(d)
    out = torch.zeros(d, d, dtype=torch.float64, device=XT.device)
    for lo in range(0, XT.shape[1], step):
        c = XT[:, lo:lo + step]
        for a, b in zip(edges[:-1], edges[1:]):  # the diagonal block in full, the blocks right of it
            out[a:b, a:] += (c[a:b] @ c[a:].T).double()
    if len(edges) > 2:  # below the diagonal blocks: nothing yet; the upper triangle mirrored there
        out = out.triu() + out.triu(1).T
    return out.cpu()


# least input width (columns of a layer's gradient matrix) whose factor products run in bfloat16 when asked: a
# narrower layer's products are cheap in float32 (on the benchmark CNN the 27-column first convolution's Gram in
# 1,024-row bfloat16 partials cost more than in float32), and a first layer's inputs are often quantised pixels,
# whose bfloat16 roundings repeat with the value instead of averaging out (3.4e-3 relative error in its A)
BF16_FACTOR_MIN_IN = 256


def layer_products(L: Layer, products: torch.dtype | None) -> torch.dtype | None:
    """The dtype layer ``L``'s factor products run in for the requested ``products`` (None: float32)."""
    return products if products is not None and L.in_dim >= BF16_FACTOR_MIN_IN else None


def _compute_dtype(t: torch.Tensor, products: torch.dtype | None = None) -> torch.dtype:
    """float64 stays float64 (tests, double models); everything else is multiplied in ``products``
    (default float32)."""
    return torch.float64 if t.dtype == torch.float64 else (products or torch.float32)


def _uniform(labels: torch.Tensor) -> torch.Tensor:
    return torch.full(labels.shape, 1.0 / labels.shape[1], dtype=torch.float64)


def fit_covariances(model: nn.Module, layers: list[Layer], x: torch.Tensor, labels: torch.Tensor,
                    weights: torch.Tensor | None = None, *, batch_size: int | None = None, device: str = "cpu",
                    products: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{name.A, name.S}``: K-FAC covariances E[Σ_t a aᵀ] and E[Σ_t s sᵀ] (float64; the products of a
    float32 model are formed in float32 and summed in float64, :func:`_gram`). ``batch_size``: default
    :func:`curvature_batch_size`. ``products`` bfloat16: a float32 model's input Gram matrices A (the pass's
    largest products) are formed from bfloat16 inputs; S stays float32."""
    return _covariances(model, layers, x, labels, _uniform(labels) if weights is None else weights,
                        batch_size=batch_size, device=device, products=products)


def fit_covariances_sampled(model: nn.Module, layers: list[Layer], x: torch.Tensor, samples: int, seed: int, *,
                            batch_size: int | None = None, device: str = "cpu", products: torch.dtype | None = None
                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(covariances, labels, weights): :func:`fit_covariances` with the Fisher targets of
    :func:`fisher_targets` (same ``samples``, ``seed``) drawn from this pass's own forward, so no
    separate labelling pass over the rows (a forward of every row: 0.65 s of a 9.4 s EK-FAC run on the
    2,000-image CNN). The labels equal fisher_targets' up to a probability that rounds across a CDF
    step; the eigenvalue pass reuses them. Under torchrun each rank labels its own batches and the
    labels are summed over ranks."""
    n = len(x)
    if n == 0:
        labels, weights = fisher_targets(model, x, samples, seed, device=device)
        return (fit_covariances(model, layers, x, labels, weights, batch_size=batch_size, device=device,
                                products=products), labels, weights)
    with torch.no_grad():  # the number of classes fixes k (exact: one column per class)
        classes = model.eval().to(device)(x[:1].to(device)).shape[-1]
    u = fisher_uniforms(n, samples, seed)
    k = labels_from_probs(torch.full((1, classes), 1.0 / classes, dtype=torch.float64), samples, u[:1])[0].shape[1]
    labels = torch.zeros(n, k, dtype=torch.float64)  # float64: summed over ranks (each fills its batches)
    weights = torch.zeros(n, k, dtype=torch.float64)

    def targets(lo: int, logits: torch.Tensor):
        lab, w = labels_from_probs(torch.softmax(logits.double().cpu(), -1), samples, u[lo:lo + len(logits)])
        labels[lo:lo + len(lab)] = lab.double()
        weights[lo:lo + len(lab)] = w
        return lab, w

    cov = _covariances(model, layers, x, targets, None, batch_size=batch_size, device=device, products=products)
    distributed.sum_tensors({"labels": labels, "weights": weights})
    return cov, labels.round().long(), weights


def _covariances(model: nn.Module, layers: list[Layer], x: torch.Tensor, labels, weights, *,
                 batch_size: int | None, device: str, products: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    n = len(x)
    batch_size = batch_size or curvature_batch_size(model, layers, x, device=device)
    out = {}
    for L in layers:
        out[f"{L.name}.A"] = torch.zeros(L.in_dim, L.in_dim, dtype=torch.float64)
        out[f"{L.name}.S"] = torch.zeros(L.out_dim, L.out_dim, dtype=torch.float64)
    for lo, j, batch, w in _pseudo_grad_batches(model, layers, x, labels, weights, batch_size, device, products):
        for L in layers:
            a, s = batch[L.name]
            dt = _compute_dtype(a, layer_products(L, products))
            if j == 0:
                # [in, b·T]: a transposed view of the contiguous [b·T, in] inputs (a convolution's patches come
                # contiguous from conv_patches), no copy
                out[f"{L.name}.A"] += _gram(a.to(dt).reshape(-1, a.shape[-1]).T)
            # per example Σ_t w s sᵀ from the [b, out, T] layout (a conv's gradient as it comes: no copy),
            # summed over the batch in the compute dtype, then in float64
            ds = _compute_dtype(s)  # small products (out² per position): float32 whatever ``products``
            sc = s.to(ds).transpose(1, 2)
            out[f"{L.name}.S"] += torch.bmm(sc * w.to(ds)[:, None, None], s.to(ds)).sum(0).double().cpu()
    distributed.sum_tensors(out)
    for L in layers:
        o = patch_order(L)
        if o is not None:  # kernel-major Gram matrix → the weight's column order
            out[f"{L.name}.A"] = out[f"{L.name}.A"][o][:, o].contiguous()
        out[f"{L.name}.A"] /= n
        out[f"{L.name}.S"] /= n
    return out


def eigenbasis(cov: dict[str, torch.Tensor], layers: list[Layer]) -> dict[str, torch.Tensor]:
    """``{name.QA, name.QS}`` (and the K-FAC eigenvalues ``name.lA``, ``name.lS``)."""
    out = {}
    for L in layers:
        for f in ("A", "S"):
            M = cov[f"{L.name}.{f}"].double()
            M = 0.5 * (M + M.T)
            evals, evecs = torch.linalg.eigh(M)
            out[f"{L.name}.Q{f}"] = evecs.contiguous()
            out[f"{L.name}.l{f}"] = evals.clamp_min(0).contiguous()
    return out


def rotate_positions_first(positions: int, d_in: int, d_out: int, labels: int = 1) -> bool:
    """Whether the eigenvalue pass rotates each position's input and output gradient before summing
    over positions (T·in² + out²·T + out·T·in multiply-adds per example and label, Q_Aᵀ a shared by
    the labels) rather than forming G = Σ_t s_t a_tᵀ and rotating it (out·T·in + out²·in + out·in²).
    A Linear (T = 1) rotates first; a convolution with more positions than output channels forms G:
    on the 32×32 benchmark CNN its 64-channel 16×16 layer took 2.4x fewer products that way."""
    per_position = positions * (d_in * d_in / max(1, labels) + d_out * d_out + d_out * d_in)
    formed = d_out * positions * d_in + d_out * d_out * d_in + d_out * d_in * d_in
    return per_position <= formed


def fit_eigenvalues(model: nn.Module, layers: list[Layer], x: torch.Tensor, labels: torch.Tensor,
                    basis: dict[str, torch.Tensor], weights: torch.Tensor | None = None, *,
                    scale: dict[str, torch.Tensor] | None = None, batch_size: int | None = None, device: str = "cpu",
                    products: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{name.lambda}``: EK-FAC eigenvalues E[(Q_Sᵀ G Q_A)²] [out, in] in the given basis.

    ``scale`` (optional, per layer [out, in]) multiplies each pseudo-gradient elementwise
    first: the Adam-preconditioned variant uses √P ⊙ G. A float32 model's rotations and squares
    are formed in float32 (per batch, ≤ ``batch_size`` examples, default :func:`curvature_batch_size`)
    and summed in float64. ``products`` bfloat16: the rotations of a float32 model run in bfloat16 (each
    rotated entry then off by a few 2^-9; its square summed in float32 as before).
    """
    n = len(x)
    batch_size = batch_size or curvature_batch_size(model, layers, x, device=device)
    weights = _uniform(labels) if weights is None else weights
    out = {f"{L.name}.lambda": torch.zeros(L.out_dim, L.in_dim, dtype=torch.float64) for L in layers}
    Q: dict = {}  # (layer, dtype, device) → (QA, QS, scale) in the dtype the products are formed in
    rotated: dict = {}  # layer → (batch start, Q_Aᵀ a): the activations are the same for every label
    squares: dict = {}  # layer → float32 buffer the rotated entries are squared in
    for lo, _, batch, w in _pseudo_grad_batches(model, layers, x, labels, weights, batch_size, device, products):
        for L in layers:
            a, s = batch[L.name]
            dt = _compute_dtype(a, layer_products(L, products))
            key = (L.name, dt, a.device)
            if key not in Q:
                # a convolution's activations come kernel-major: QA's rows (and the scale's columns, G's) to match
                QA = kernel_major_rows(basis[f"{L.name}.QA"], L)
                sc = None if scale is None else kernel_major_rows(scale[L.name], L, dim=1)
                Q[key] = (QA.to(a.device, dt), basis[f"{L.name}.QS"].to(a.device, dt),
                          None if sc is None else sc.to(a.device, dt))
            QA, QS, sc = Q[key]
            s = s.to(dt)
            if sc is None and rotate_positions_first(a.shape[1], L.in_dim, L.out_dim, labels.shape[1]):
                # (Q_Sᵀ s)(Q_Aᵀ a)ᵀ summed over positions, without materialising G; Q_Aᵀ a once per batch. Each
                # rotation is one [b·T, d] × [d, d] product: ``a @ QA`` on F.unfold's patches (a transposed view)
                # broadcast QA to a [b, in, in] copy and a batched product; on the 5,000-image benchmark CNN's
                # 64->128 layer (12 batches of 85 images) that took 288 ms in bfloat16 against 15 ms, and as long
                # as the one product in float32 (98 against 102 ms; torch profiler)
                if L.name not in rotated or rotated[L.name][0] != lo:
                    rotated[L.name] = (lo, (a.to(dt).reshape(-1, a.shape[-1]) @ QA).view(*a.shape[:2], -1))
                rs = (s.reshape(-1, s.shape[-1]) @ QS).view(*s.shape[:2], -1)  # [b, T, out]: Q_Sᵀ s_t by position
                r = torch.bmm(rs.transpose(1, 2), rotated[L.name][1])  # [b, out, T] @ [b, T, in]
            else:
                G = torch.bmm(s.transpose(1, 2), a.to(dt))
                r = QS.T @ (G if sc is None else G * sc) @ QA
            # Σ_b w_b r_b², the squares summed over ≤ batch_size examples in float32 (float64 models: float64), then
            # in float64; squared in place in a buffer kept per layer (a fresh [b, out, in] tensor per batch is
            # page-faulted in anew)
            sq_dt = _compute_dtype(r)
            buf = squares.get(L.name)
            if buf is None or buf.dtype != sq_dt or buf.device != r.device or buf.numel() < r.numel():
                buf = squares[L.name] = torch.empty(r.numel(), dtype=sq_dt, device=r.device)
            r2 = buf[:r.numel()].view(len(r), -1)
            r2.copy_(r.reshape(len(r), -1)).square_()
            out[f"{L.name}.lambda"] += (w.to(sq_dt) @ r2).double().reshape(r.shape[1:]).cpu()
    distributed.sum_tensors(out)
    for L in layers:
        out[f"{L.name}.lambda"] /= n
    return out


def brute_force_pseudo_grads(model: nn.Module, layers: list[Layer], x: torch.Tensor, labels: torch.Tensor
                             ) -> dict[str, torch.Tensor]:
    """Per-example pseudo-gradient matrices [n·samples, out, in] by plain autograd, one example
    at a time (for tests: the reference the factorised code must match)."""
    params = dict(model.named_parameters())
    out = {L.name: [] for L in layers}
    for i in range(len(x)):
        for j in range(labels.shape[1]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i:i + 1]), labels[i:i + 1, j]).backward()
            for L in layers:
                g = params[L.weight].grad.detach().reshape(L.out_dim, -1).double()
                if L.bias:
                    g = torch.cat([g, params[L.bias].grad.detach().reshape(L.out_dim, 1).double()], 1)
                out[L.name].append(g)
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- applying h(Λ)
def rotate(V: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
    """Q_Sᵀ V Q_A for V [..., out, in]."""
    return QS.T @ V @ QA


def unrotate(R: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
    return QS @ R @ QA.T


def apply_eigen_fn(V: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor, h_values: torch.Tensor) -> torch.Tensor:
    """Q_S [h(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ, with ``h_values = h(Λ)`` precomputed [out, in]."""
    return unrotate(h_values * rotate(V, QS, QA), QS, QA)


def response(sigma: torch.Tensor, c: float) -> torch.Tensor:
    """F(σ) = (1 − exp(−cσ)) / σ, computed with expm1; its limit c for tiny or non-positive σ.

    ``c = η̄ K``: the effect, after K steps at learning rate η̄ on a quadratic with curvature
    σ, of a constant gradient perturbation (Source's response function).
    """
    sigma = sigma.double()
    x = c * sigma
    small = x.abs() < 1e-6
    safe_x = torch.where(small | (sigma <= 0), torch.ones_like(x), x)
    full = c * (-torch.expm1(-safe_x) / safe_x)
    series = c * (1 - x / 2 + x * x / 6)
    out = torch.where(small, series, full)
    return torch.where(sigma <= 0, torch.full_like(out, c), out)


def propagation(sigma: torch.Tensor, c: float) -> torch.Tensor:
    """S(σ) = exp(−cσ) (σ clipped at 0: a direction with no curvature is carried unchanged)."""
    return torch.exp(-c * sigma.double().clamp_min(0))


def damped_inverse(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """h(σ) = 1/(σ + λ): EK-FAC influence."""
    return 1.0 / (sigma.double() + damping)


class EigenCurvature:
    """EK-FAC of one model, as an operator on flat vectors in ``layout``: ``h(σ)`` applied
    layer by layer in the Kronecker eigenbasis (σ = refit eigenvalues + ``weight_decay``).

    Used where one checkpoint's curvature is enough: GIF's preconditioner and damping scale.
    (Source fits the same factors per segment, with caching, in engine.methods.source.)
    Entries of ``layout`` outside the covered layers get ``h`` of the mean eigenvalue.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, x: torch.Tensor, *, fisher_samples: int = -1,
                 weight_decay: float = 0.0, seed: int = 0, device: str = "cpu"):
        self.layers, self.left_out = curvature_layers(model, layout.names)
        if not self.layers:
            raise ValueError("no Linear/Conv2d layer to fit EK-FAC on")
        self.blocks = LayerBlocks(self.layers, layout)
        cov, labels, weights = fit_covariances_sampled(model, self.layers, x, fisher_samples, seed, device=device)
        basis = eigenbasis(cov, self.layers)
        lam = fit_eigenvalues(model, self.layers, x, labels, basis, weights, device=device)
        self.QS = [basis[f"{L.name}.QS"] for L in self.layers]
        self.QA = [basis[f"{L.name}.QA"] for L in self.layers]
        self.sigma = [lam[f"{L.name}.lambda"].clamp_min(0) + float(weight_decay) for L in self.layers]
        covered = torch.zeros(layout.n, dtype=torch.bool)
        covered[self.blocks.to_flat([torch.ones(L.out_dim, L.in_dim, dtype=torch.float64)
                                     for L in self.layers]) > 0] = True
        self.covered = covered

    @property
    def mean_eigenvalue(self) -> float:
        """Mean of σ over every covered direction (the spectrum's scale)."""
        total = sum(float(s.sum()) for s in self.sigma)
        return total / sum(s.numel() for s in self.sigma)

    @property
    def max_eigenvalue(self) -> float:
        return max(float(s.max()) for s in self.sigma)

    def apply(self, flat: torch.Tensor, h: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``h(K) v`` for flat ``v`` ([p] or [k, p]), in ``flat``'s dtype and device."""
        dev, dt = flat.device, flat.dtype
        v = flat.detach().double().cpu()
        mats = [apply_eigen_fn(V, QS, QA, h(s)) for V, QS, QA, s in
                zip(self.blocks.to_layers(v), self.QS, self.QA, self.sigma)]
        out = self.blocks.to_flat(mats)
        rest = ~self.covered
        if rest.any():
            out[..., rest] = v[..., rest] * h(torch.tensor(self.mean_eigenvalue, dtype=torch.float64))
        return out.to(device=dev, dtype=dt)


# ----------------------------------------------------------------------------- storage
def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (a reader never sees a half-written factor file)."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return load_file(str(p))
    except Exception:  # a corrupt cache file is recomputed
        return None


def tensor_digest(tensors: dict[str, torch.Tensor] | None) -> str:
    h = hashlib.sha1()
    for k in sorted(tensors or {}):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rows_digest(rows: np.ndarray | None) -> str:
    if rows is None:
        return "all"
    return hashlib.sha1(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]


__all__ = ["Layer", "LayerBlocks", "curvature_layers", "parameter_holders", "covered_param_names", "sample_labels", "fit_covariances", "fit_covariances_sampled",
           "fisher_uniforms", "labels_from_probs",
           "eigenbasis", "fit_eigenvalues", "rotate_positions_first", "fisher_targets", "fisher_samples_for", "curvature_batch_size", "brute_force_pseudo_grads", "rotate", "unrotate", "apply_eigen_fn",
           "response", "propagation", "damped_inverse", "EigenCurvature", "save_tensors", "load_tensors", "tensor_digest",
           "rows_digest"]
