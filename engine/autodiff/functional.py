"""A model as a function of its parameters: one layout, one functional call, one selection.

Every gradient, Hessian, curvature, mirrored-step and what-if computation sees the model
through :class:`FunctionalModel`:

- the *tracked* parameters: those matched by the project's ``[model] attribute`` globs
  (fnmatch over ``named_parameters()`` names; default every parameter that requires grad);
  the others are held fixed;
- one :class:`ParamLayout`: the tracked parameters in module order (the order of
  ``model.named_parameters()``), with their shapes and offsets in the flat vector;
- the functional call (``torch.func.functional_call``), so a parameter set can be swapped in,
  differentiated or vmapped over without writing to the module.

Inputs are tensors or pytrees of tensors sharing the example dimension (a text model takes a
dict such as ``{input_ids, attention_mask}``); :func:`batch_len`, :func:`batch_rows`,
:func:`to_device` and :func:`example_numel` treat both alike.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import (
    _pytree as pytree,  # the pytree registry torch.func maps over (no public alias in torch 2.13)
)

from engine.autodiff.compute import fast_layout
from engine.core.errors import ValidationError

ATTRIBUTE_KEY = "[model] attribute"


# ----------------------------------------------------------------------------- inputs (tensor or pytree)
def batch_len(x: Any) -> int:
    """Number of examples in ``x`` (a tensor, or a dict / pytree of tensors sharing dim 0)."""
    leaves = pytree.tree_leaves(x)
    return len(leaves[0]) if leaves else 0


def batch_rows(x: Any, lo: int, hi: int) -> Any:
    """Examples ``lo:hi`` of ``x``."""
    return pytree.tree_map(lambda t: t[lo:hi], x)


def add_batch_dim(x: Any) -> Any:
    """One example as a batch of one (inside ``vmap`` the example dimension is stripped)."""
    return pytree.tree_map(lambda t: t.unsqueeze(0), x)


PIN_FROM_BYTES = 1 << 20  # smaller batches: pinning costs more than the faster copy saves


def to_device(x: Any, device, dtype: torch.dtype | None = None) -> Any:
    """``x`` on ``device``; floating leaves also cast to ``dtype`` (token ids stay integers)."""
    target = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if target.type == "cuda" and t.device.type == "cpu" and t.numel() * t.element_size() >= PIN_FROM_BYTES:
            # page-locked host memory: the copy to the GPU is a DMA that need not wait for the host
            t = t.pin_memory().to(device, non_blocking=True)
        if dtype is not None and t.is_floating_point():
            return t.to(device, dtype)
        return t.to(device)
    return pytree.tree_map(move, x)


# Plain forwards (predictions, accuracy, test margins, penultimate features, Fisher labels, FunctionalModel.outputs)
# on the CPU take as many rows at a time as keep the largest activation of one batch within this many bytes. Why:
# glibc hands a freed block of more than 32 MiB back to the kernel, so every batch whose activations are that large
# page-faults them in anew, and smaller batches stay in cache. On the 5,000-image BatchNorm CNN of
# scripts/bench_gpu.py (2,048 rows, one thread, medians of five alternations): 0.38-0.39 s per 1,024 rows at 32-64
# rows a batch (a 4-8 MiB first activation), 0.46 s at 128, 0.83 s at 256, 1.12 s at the old 4,096 (about 210k minor
# faults per 1,024 rows). Predictions of its 5,000 rows (medians of five, old and new alternated, 2-core EPYC):
# 3.19 -> 1.10 s on two threads, 6.07 -> 2.39 s on one; the text sample's 428 rows (a MiniLM encoder, whose
# feed-forward activation was 1 GB at 4,096 rows) 5.49 -> 4.15 s. Small activations (an MLP) still get 4,096 rows.
FORWARD_ACTIVATION_BYTES = 8 << 20
FORWARD_PROBE_ROWS = 4  # the first batch, whose activation sizes set the rest


def _largest_output_bytes(module: nn.Module, x: Any) -> tuple[Any, int]:
    """(module(x), bytes of the largest tensor any submodule returned on the way)."""
    largest = [0]

    def hook(_m, _inp, out):
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        return module(x), largest[0]
    finally:
        for h in handles:
            h.remove()


def forward_batches(module: nn.Module, x: Any, device=None, batch: int = 4096) -> Iterable[tuple[int, int, Any]]:
    """(lo, hi, module(rows lo:hi)) over every example of ``x`` (moved to ``device``; None: where it is), in no-grad
    batches of at most ``batch`` rows; on the CPU fewer, so that one batch's largest activation stays within
    FORWARD_ACTIVATION_BYTES (measured on the first FORWARD_PROBE_ROWS rows). The module's mode is left as it is."""
    n = batch_len(x)

    def rows(lo: int, hi: int) -> Any:
        part = batch_rows(x, lo, hi)
        return fast_layout(module, part if device is None else to_device(part, device))

    lo = 0
    with torch.no_grad():
        if n > FORWARD_PROBE_ROWS:
            probe = rows(0, FORWARD_PROBE_ROWS)  # the layout is decided first: its probe runs the model without hooks
            if all(t.device.type == "cpu" for t in pytree.tree_leaves(probe) if isinstance(t, torch.Tensor)):
                out, largest = _largest_output_bytes(module, probe)
                yield 0, FORWARD_PROBE_ROWS, out
                batch = max(1, min(batch, FORWARD_ACTIVATION_BYTES * FORWARD_PROBE_ROWS // max(1, largest)))
                lo = FORWARD_PROBE_ROWS
        for lo in range(lo, n, batch):
            hi = min(n, lo + batch)
            yield lo, hi, module(rows(lo, hi))


def forward_outputs(module: nn.Module, x: Any, device=None, batch: int = 4096) -> torch.Tensor:
    """module(x) for every example of ``x``, concatenated (see :func:`forward_batches`); no examples: an empty
    tensor."""
    outs = [out for _, _, out in forward_batches(module, x, device, batch)]
    return torch.cat(outs, 0) if outs else torch.empty(0)


def example_numel(x: Any) -> int:
    """Input values of one example (for memory budgets)."""
    if batch_len(x) == 0:
        return 0
    return int(sum(t[0].numel() for t in pytree.tree_leaves(x)))


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ParamSlot:
    """One tracked parameter tensor in the flat vector."""

    name: str  # as in named_parameters()
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.name.rpartition(".")[2]


class ParamLayout:
    """Names, shapes and offsets of the tracked parameters; flat ↔ per-parameter tensors.

    Flat vectors may carry leading dimensions (``[..., p]``): a batch of per-example gradients,
    a block of Hessian-vector products, a stack of parameter sets.
    """

    def __init__(self, named_shapes: Iterable[tuple[str, Sequence[int]]]):
        slots, offset = [], 0
        for name, shape in named_shapes:
            numel = math.prod(shape)
            slots.append(ParamSlot(name, tuple(int(s) for s in shape), offset, numel))
            offset += numel
        self.slots: tuple[ParamSlot, ...] = tuple(slots)
        self.n = offset
        self._by_name = {s.name: s for s in self.slots}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s.shape for s in self.slots]

    @property
    def sizes(self) -> list[int]:
        return [s.numel for s in self.slots]

    def __iter__(self):
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> ParamSlot:
        return self._by_name[name]

    def positions(self, names: Iterable[str]) -> torch.Tensor:
        """Flat positions of the given parameters (in the order given)."""
        parts = [torch.arange(self[n].offset, self[n].offset + self[n].numel) for n in names]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def flatten(self, tensors: dict[str, torch.Tensor], lead: tuple[int, ...] | None = None) -> torch.Tensor:
        """``[*lead, p]`` from per-parameter tensors ``[*lead, *shape]`` (``lead`` read from the first)."""
        if lead is None:
            first = self.slots[0]
            t = tensors[first.name]
            lead = tuple(t.shape[:t.dim() - len(first.shape)])
        return torch.cat([tensors[s.name].reshape(*lead, s.numel) for s in self.slots], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.offset:s.offset + s.numel].reshape(*lead, *s.shape) for s in self.slots}


# ----------------------------------------------------------------------------- selection
def select_parameter_names(model: nn.Module, globs: str | Sequence[str] | None = None, *,
                           file: str | None = None) -> list[str]:
    """Names of the tracked parameters, in module order.

    ``globs`` (fnmatch patterns over ``named_parameters()`` names, e.g. ``["head.*",
    "blocks.11.*"]``): every parameter matching any of them. None: every parameter that
    requires grad. A glob that matches nothing is a :class:`ValidationError` naming the key.
    """
    named = list(model.named_parameters())
    if globs is None:
        names = [n for n, p in named if p.requires_grad]
        if not names:
            raise ValidationError(f"the model has no trainable parameters; set {ATTRIBUTE_KEY}", file=file)
        return names
    if isinstance(globs, str):
        globs = [globs]
    all_names = [n for n, _ in named]
    for g in globs:
        if not isinstance(g, str) or not fnmatch.filter(all_names, g):
            shown = ", ".join(all_names[:6]) + (", …" if len(all_names) > 6 else "")
            raise ValidationError(f"{ATTRIBUTE_KEY}: {g!r} matches no parameter of the model (parameters: {shown})",
                                  file=file)
    return [n for n in all_names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


@dataclass(frozen=True)
class TrackedParameters:
    """The tracked-parameter globs of a project (None: every parameter that requires grad)."""

    globs: tuple[str, ...] | None = None
    file: str | None = None  # project.toml, named in the error when a glob matches nothing

    @classmethod
    def of(cls, project) -> "TrackedParameters":
        globs = project.tracked_parameter_globs
        return cls(tuple(globs) if globs else None, str(project.toml_path))

    def names(self, model: nn.Module) -> list[str]:
        return select_parameter_names(model, self.globs, file=self.file)


Tracked = TrackedParameters | Sequence[str] | str | None


def _tracked_names(model: nn.Module, tracked: Tracked) -> list[str]:
    if isinstance(tracked, TrackedParameters):
        return tracked.names(model)
    return select_parameter_names(model, tracked)


# ----------------------------------------------------------------------------- the functional model
class FunctionalModel:
    """A module seen as ``f(θ, x)`` over its tracked parameters θ, in eval mode.

    ``params`` (tracked) and ``frozen`` (the other parameters) are detached views of the
    module's parameters; ``buffers`` its buffers. Normalisation layers use their running
    statistics and buffers are never written. With ``copy=True`` a private deep copy is
    held (and cast to ``device``/``dtype``); otherwise the module itself is moved.
    """

    def __init__(self, model: nn.Module, tracked: Tracked = None, *, device=None,
                 dtype: torch.dtype | None = None, copy_module: bool = False):
        module = copy.deepcopy(model) if copy_module else model
        module = module.eval()
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        self.module = module
        names = _tracked_names(module, tracked)
        named = dict(module.named_parameters())
        tracked = set(names)
        self.params = {n: named[n].detach() for n in names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in tracked}
        self.buffers = {n: b.detach() for n, b in module.named_buffers()}
        self.layout = ParamLayout((n, self.params[n].shape) for n in names)

    @property
    def names(self) -> list[str]:
        return self.layout.names

    @property
    def n_params(self) -> int:
        return self.layout.n

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def __call__(self, params: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        """The module's output with the tracked parameters replaced by ``params``."""
        return functional_call(self.module, ({**params, **self.frozen}, self.buffers), (x,))

    def call_flat(self, theta: torch.Tensor, x: Any) -> torch.Tensor:
        """The output at the flat parameter vector ``theta`` [p]."""
        return self(self.layout.unflatten(theta), x)

    def call_stacked(self, thetas: torch.Tensor, x: Any) -> torch.Tensor:
        """[P, b, ...] outputs of one batch under each of P flat parameter vectors [P, p]."""
        return vmap(self.call_flat, in_dims=(0, None))(thetas, x)

    def theta(self) -> torch.Tensor:
        """The current tracked parameters as one flat vector [p]."""
        return self.layout.flatten(self.params, ())

    def flatten(self, tensors: dict[str, torch.Tensor], lead: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.layout.flatten(tensors, lead)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(flat)

    def add_(self, delta: torch.Tensor) -> None:
        """θ ← θ + delta in the module itself, ``delta`` flat over the tracked parameters."""
        if delta.numel() != self.n_params:
            raise ValueError(f"update has {delta.numel()} entries, the model {self.n_params} tracked parameters")
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for s in self.layout:
                p = named[s.name]
                p.add_(delta[s.offset:s.offset + s.numel].reshape(s.shape).to(device=p.device, dtype=p.dtype))

    def outputs(self, x: Any, batch: int = 4096) -> torch.Tensor:
        """Model outputs for every example of ``x`` (no grad), batched."""
        return forward_outputs(self.module, x, self.device, batch)


__all__ = ["FunctionalModel", "ParamLayout", "ParamSlot", "TrackedParameters", "select_parameter_names", "ATTRIBUTE_KEY",
           "batch_len", "batch_rows", "add_batch_dim", "to_device", "example_numel", "forward_batches",
           "forward_outputs", "FORWARD_ACTIVATION_BYTES", "FORWARD_PROBE_ROWS"]
