"""Per-example gradients from one batched backward and a closed form per layer.

In eval mode examples do not interact, so one forward pass over a batch and one
``torch.autograd.grad`` with respect to each layer's *output* give every example's output
gradient g at once. Each parameter's per-example gradient then follows from g and the layer's
input a (the trick Opacus and BackPACK use):

- Linear: W: Σ_t g_t a_tᵀ, b: Σ_t g_t (t: positions, one for a vector input);
- Conv2d: W: the convolution of the input with the output gradient, one group per example
  (``torch.nn.grad.conv2d_weight`` with groups = batch × groups); b: g summed over space;
- BatchNorm in eval mode (running statistics), LayerNorm, GroupNorm: γ: Σ g·x̂ and β: Σ g over
  the positions, x̂ the normalised input.

:class:`LayerGradients` answers only for models whose every tracked parameter is the weight or
bias of such a module (:func:`layer_plan` gives the reason otherwise), each run through its own
forward (several calls are summed). :class:`engine.autodiff.per_example.GradientComputer` uses
it where measured faster than ``torch.func`` and checks it against ``torch.func`` on its first
batch, so a model that uses a parameter outside its module (or mixes examples) falls back
instead of being wrong.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.autodiff.curvature import (Layer, _Capture, _conv_padding, _grads_only_for, conv_out_grads,
                                       conv_padding_problem, conv_patches, parameter_holders)
from engine.autodiff.functional import ParamLayout, ParamSlot
from engine.autodiff.measurement import correct_class_margin, example_loss

class NotPerLayer(Exception):
    """The model cannot be differentiated layer by layer (the message says why)."""


@dataclass(frozen=True)
class _Part:
    """One module holding tracked parameters, and their slots in the flat layout."""

    layer: Layer  # name and module, as the capture wants them
    kind: str  # linear | conv2d | batchnorm | layernorm | groupnorm
    slots: tuple[tuple[str, ParamSlot], ...]  # (attribute, slot): "weight" and/or "bias"


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    return None


def _unsupported(m: nn.Module, kind: str | None) -> str | None:
    if kind is None:
        return f"{type(m).__name__} has no per-layer gradient rule here"
    if kind == "conv2d" and (problem := conv_padding_problem(m)):
        return problem
    if kind == "batchnorm" and m.running_mean is None:
        return "BatchNorm without running statistics normalises by the batch (examples interact)"
    return None


def layer_plan(model: nn.Module, layout: ParamLayout) -> tuple[list[_Part], str | None]:
    """The modules that hold the tracked parameters, or ([], why not) when one of them has no
    per-layer rule or a tracked parameter is shared between modules."""
    modules = dict(model.named_modules())
    holders = parameter_holders(model)
    named = dict(model.named_parameters())
    grouped: dict[str, list[tuple[str, ParamSlot]]] = {}
    for s in layout:
        m = modules.get(s.module_name)
        if m is None or s.attr not in ("weight", "bias"):
            return [], f"{s.name} is not the weight or bias of a module"
        if len(holders.get(id(named[s.name]), ())) > 1:
            return [], f"{s.name} is shared between modules"
        reason = _unsupported(m, _kind(m))
        if reason:
            return [], f"{s.name}: {reason}"
        grouped.setdefault(s.module_name, []).append((s.attr, s))
    parts = [_Part(Layer(name, modules[name], _kind(modules[name]), "", None, 0, 0), _kind(modules[name]), tuple(slots))
             for name, slots in grouped.items()]
    return parts, None


def _sum_over(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return t.sum(dims) if dims else t


def _conv_weight_grouped(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[b, *weight shape]: the input convolved with the output gradient, one group per example."""
    b, ci, h, w = a.shape
    co = g.shape[1]
    wg = torch.nn.grad.conv2d_weight(a.reshape(1, b * ci, h, w), (b * co, ci // m.groups, *m.kernel_size),
                                     g.reshape(1, b * co, *g.shape[2:]), stride=m.stride, padding=_conv_padding(m),
                                     dilation=m.dilation, groups=b * m.groups)
    return wg.reshape(b, co, ci // m.groups, *m.kernel_size)


def _conv_weight_unfolded(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[b, *weight shape]: Σ_t g_t patch_tᵀ over the unfolded input patches (groups = 1 only), possibly as a
    strided view (callers write it into their rows with copy_/add_, which reorder as they go).

    The patches come kernel-major (conv_patches: several times cheaper to form than F.unfold's order), so
    either they or the product are put back in the weight's (channel, kernel position) order: whichever
    is smaller. With fewer positions than output channels the patches are reordered (64→128 channels at
    8×8, 43 rows: 2.67 → 2.25 ms with the write into the rows); otherwise the product is returned as a
    permuted view and reordered by the caller's write instead of by a copy of its own."""
    patches = conv_patches(m, a, kernel_major=True)  # [b, T, kh·kw·C]
    b, co, ci = len(a), m.weight.shape[0], m.weight.shape[1]
    kk, positions = patches.shape[2] // ci, patches.shape[1]
    g3 = conv_out_grads(g).transpose(1, 2)  # [b, out, T], a view either way (bmm reads a transposed one as it is)
    if positions < co:
        weight_order = patches.view(b, positions, kk, ci).transpose(2, 3).reshape(b, positions, ci * kk)
        return torch.bmm(g3, weight_order).view(b, *m.weight.shape)
    per = torch.bmm(g3, patches)  # [b, out, kh·kw·C]
    return per.view(b, co, *m.kernel_size, ci).permute(0, 1, 4, 2, 3)


# two ways to one convolution weight gradient; which is faster depends on the layer's shape (on this
# 2-core CPU: the unfolded product 1.5x faster for 64->128 channels at 8x8, the grouped convolution
# 3-5x faster for 32->64 at 16x16 and 32x32), so LayerGradients times both once per layer
CONV_WEIGHT_GRADS = {"grouped": _conv_weight_grouped, "unfolded": _conv_weight_unfolded}
TIME_CONV_FROM_ROWS = 32
# the choice per convolution and input (shape, dtype, device, layout), shared by every LayerGradients of the
# process: an EK-FAC run builds one per trajectory point, each of which timed the same layers again
_CONV_METHOD_BY_SHAPE: dict[tuple, str] = {}


def _conv_key(m: nn.Conv2d, a: torch.Tensor) -> tuple:
    return (m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), str(m.padding), tuple(m.dilation),
            tuple(a.shape[1:]), a.dtype, str(a.device), a.is_contiguous(memory_format=torch.channels_last))


def _part_grads(part: _Part, a: torch.Tensor, g: torch.Tensor, conv_method: str = "grouped") -> dict[str, torch.Tensor]:
    """{attribute: [b, *shape]} per-example gradients of one module from its input and output gradient."""
    m, b = part.layer.module, len(g)
    attrs = {attr for attr, _ in part.slots}
    out: dict[str, torch.Tensor] = {}
    if part.kind == "linear":
        g3 = g.reshape(b, -1, g.shape[-1])
        if "weight" in attrs:
            a3 = a.reshape(b, -1, a.shape[-1]).to(g3.dtype)
            out["weight"] = torch.bmm(g3.transpose(1, 2), a3)
        if "bias" in attrs:
            out["bias"] = g3.sum(1)
    elif part.kind == "conv2d":
        if "weight" in attrs:
            out["weight"] = CONV_WEIGHT_GRADS[conv_method](m, a.to(g.dtype), g)
        if "bias" in attrs:
            out["bias"] = g.sum((2, 3))
    else:
        if part.kind == "batchnorm":
            xhat = F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
            dims = tuple(range(2, a.dim()))
        elif part.kind == "layernorm":
            xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
            dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
        else:
            xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
            dims = tuple(range(2, a.dim()))
        if "weight" in attrs:
            out["weight"] = _sum_over(g * xhat.to(g.dtype), dims)
        if "bias" in attrs:
            out["bias"] = _sum_over(g, dims)
    return out


class LayerGradients:
    """[b, p] per-example gradients of the margin or the loss of an eval-mode model, by layer.

    ``parts`` from :func:`layer_plan`. A module the forward pass calls several times gets the sum
    over its calls; :meth:`per_example` raises :class:`NotPerLayer` when one is not called at all
    (its parameters are used elsewhere)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, parts: list[_Part]):
        self.model, self.layout, self.parts = model, layout, parts
        self.layers = [p.layer for p in parts]
        self._protect = False
        self.conv_methods: dict[str, str] = {}  # layer -> "grouped" | "unfolded", timed on first use

    def _conv_method(self, part: _Part, a: torch.Tensor, g: torch.Tensor) -> str:
        """The faster way to this convolution's weight gradient, timed on its first batch (best of two)."""
        if part.kind != "conv2d" or part.layer.module.groups != 1 or all(attr != "weight" for attr, _ in part.slots):
            return "grouped"
        name = part.layer.name
        if name not in self.conv_methods and len(a) < TIME_CONV_FROM_ROWS:
            return "grouped"  # too small a batch to time (a warm-up, a last partial batch)
        if name not in self.conv_methods and _conv_key(part.layer.module, a) in _CONV_METHOD_BY_SHAPE:
            self.conv_methods[name] = _CONV_METHOD_BY_SHAPE[_conv_key(part.layer.module, a)]
        if name not in self.conv_methods:
            seconds = {}
            # each timed with its write into rows, as per_example makes it (the unfolded one may return a view)
            rows = torch.empty(len(a), *part.layer.module.weight.shape, dtype=g.dtype, device=g.device)
            for method, fn in CONV_WEIGHT_GRADS.items():
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    rows.copy_(fn(part.layer.module, a, g))
                    if a.is_cuda:
                        torch.cuda.synchronize(a.device)
                    times.append(time.perf_counter() - t0)
                seconds[method] = min(times)
            self.conv_methods[name] = _CONV_METHOD_BY_SHAPE[_conv_key(part.layer.module, a)] = min(seconds, key=seconds.get)
        return self.conv_methods[name]

    def per_example(self, x: Any, y: torch.Tensor, kind: str, into: torch.Tensor | None = None,
                    alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, p] gradients of ``kind`` per example, [b] the values of ``kind``).

        ``into`` (a [b, p] tensor, e.g. rows of a caller's float32 block): ``alpha`` × the gradients are
        added into it slot by slot and it is returned, with no [b, p] gradient tensor assembled (on the
        5,000-image benchmark CNN that assembly copy was 9% of a training-gradient pass, and adding the
        assembled rows to a block another 4%)."""
        cap = _Capture(self.layers, protect=self._protect)
        try:
            with _grads_only_for(self.model, self.layers), torch.enable_grad():
                logits = cap.run(self.model, x, require_called=False)
                logits = logits if logits.dtype == torch.float64 else logits.float()
                missing = [L.name for L in self.layers if not cap.calls.get(L.name)]
                if missing:
                    raise NotPerLayer(f"module {missing[0]!r} did not run its own forward (its weight is used directly)")
                values = correct_class_margin(logits, y) if kind == "margin" else example_loss(logits, y)
                outs = cap.output_list()
                grads = cap.split(torch.autograd.grad(values.sum(), outs, allow_unused=True))
            b = len(values)
            flat = torch.empty(b, self.layout.n, dtype=outs[0].dtype, device=values.device) if into is None else into
            for part in self.parts:
                name = part.layer.name
                per: dict[str, torch.Tensor] = {}
                # a module called several times (a recurrent cell, a shared encoder): the sum over its calls
                for a, o, g in zip(cap.inputs[name], cap.outputs[name], grads[name]):
                    g = torch.zeros_like(o) if g is None else g.detach()
                    for attr, t in _part_grads(part, a, g, self._conv_method(part, a, g)).items():
                        per[attr] = per[attr] + t if attr in per else t
                for attr, s in part.slots:
                    # the slot's columns seen in the parameter's shape: a strided result is reordered as it is written
                    cols, t = flat[:, s.offset:s.offset + s.numel], per[attr]
                    rows, t = (cols.view(t.shape), t) if cols.stride(-1) == 1 else (cols, t.reshape(b, s.numel))
                    if into is None:
                        rows.copy_(t)
                    else:
                        rows.add_(t, alpha=alpha)
                del per
        finally:
            self._protect = cap.protect  # a model that changes a layer's output in place does so every batch
            cap.close()
        return flat, values.detach()


__all__ = ["LayerGradients", "NotPerLayer", "layer_plan"]
