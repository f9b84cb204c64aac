"""Per-example gradients of the measurement (margin) or of the training loss.

One implementation for every method: ``torch.func`` (vmap over grad through the
:class:`~engine.autodiff.functional.FunctionalModel`), batched by a memory budget, on the CPU
or CUDA. Gradients come out flattened as [batch, p] over the tracked parameters, in the
model's :class:`~engine.autodiff.functional.ParamLayout`. Inputs may be tensors or dicts
(pytrees) of tensors, e.g. a text model's ``{input_ids, attention_mask}``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import grad, grad_and_value, vmap

from engine.autodiff.compute import resolve_device
from engine.autodiff.functional import (
    FunctionalModel,
    Tracked,
    add_batch_dim,
    batch_len,
    batch_rows,
    example_numel,
    to_device,
)
from engine.autodiff.measurement import correct_class_margin, example_loss
from engine.core.errors import ProponentError

KINDS = ("margin", "loss")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA allocation failure (the typed error, or the older RuntimeError message)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "CUDA out of memory" in str(e))


class BatchBackOff:
    """Batches of a CUDA computation whose size halves after an out-of-memory error and stays
    there for later batches (shared by the gradient computer and the factorized projection)."""

    device: str
    max_batch: int | None = None  # lowered after a CUDA out-of-memory error
    oom_retries: int = 0
    oom_detail = ""  # what one example holds, for the error at one example per batch

    def _batches(self, n: int, batch: int, compute: Callable[[int, int], torch.Tensor],
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, compute(lo, hi)) over ``n`` rows; an explicit size too stays under what fitted
        after an out-of-memory error."""
        batch = min(batch, self.max_batch) if self.max_batch else batch
        lo = 0
        while lo < n:
            hi = min(n, lo + batch)
            try:
                out = compute(lo, hi)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                del e
                batch = self._back_off(hi - lo)
                continue
            yield lo, hi, out
            lo = hi

    def _back_off(self, failed: int) -> int:
        """Halve the batch (never raised again by a later, larger request)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if failed <= 1:
            raise ProponentError(f"CUDA out of memory at one example per batch{self.oom_detail} on {self.device}; "
                                 f"free GPU memory or use --device cpu")
        self.oom_retries += 1
        self.max_batch = max(1, min(failed, self.max_batch or failed) // 2)
        return self.max_batch


class GradientComputer(BatchBackOff):
    """Per-example gradients of one model (in eval mode: normalisation uses running statistics).

    ``tracked``: the tracked parameters (a :class:`TrackedParameters`, globs or exact names;
    default every parameter that requires grad). The model is moved to ``device`` in place.

    ``precision``: "bfloat16"/"float16" run the gradient pass on a low-precision copy of the
    model (inputs cast too; the measurement itself in float32); gradients come back float32.
    On CUDA, a batch that runs out of memory is retried at half the size, and later batches
    stay at the size that fitted.
    """

    def __init__(self, model: nn.Module, *, tracked: Tracked = None, device: str = "cpu",
                 memory_budget_mb: float = 512.0, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ProponentError(f"gradient precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.device = resolve_device(device)
        self.precision = precision
        self.fm = FunctionalModel(model, tracked, device=self.device)
        self.model = self.fm.module
        self.layout = self.fm.layout
        self.names = self.layout.names
        self.shapes = self.layout.shapes
        self.sizes = self.layout.sizes
        self.n_params = self.layout.n
        self.params, self.frozen, self.buffers = self.fm.params, self.fm.frozen, self.fm.buffers
        self.memory_budget_mb = memory_budget_mb
        self.oom_detail = f" (its gradient and projection, {self.n_params:,} tracked parameters)"
        low = PRECISIONS[precision] if precision != "float32" else None
        # the low-precision pass runs on a private copy, so outputs() and the caller's model stay float32
        self._grad_fm = FunctionalModel(model, tracked, device=self.device, dtype=low, copy_module=True) if low else self.fm
        self._grad_params = self._grad_fm.params
        self._input_dtype = low

        def measure(params, x, y, kind):
            out = self._grad_fm(params, add_batch_dim(x)).float()
            if kind == "margin":
                return correct_class_margin(out, y.unsqueeze(0)).sum()
            return example_loss(out, y.unsqueeze(0)).sum()

        self._grad_fns = {k: vmap(grad(lambda p, x, y, k=k: measure(p, x, y, k)), in_dims=(None, 0, 0)) for k in KINDS}
        self._margin_value_fn = vmap(grad_and_value(lambda p, x, y: measure(p, x, y, "margin")), in_dims=(None, 0, 0))

    def batch_size(self, example_numel: int = 0) -> int:
        """Examples per vmap batch within the memory budget (on CUDA: at most half the free memory)."""
        budget = self.memory_budget_mb * 2**20
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            budget = max(budget, free // 2)
        # vmap materialises a few copies of [b, p] (the grads, their flattening, and activations)
        per_example = 4 * (3 * self.n_params + 8 * max(example_numel, 1))
        return int(max(1, min(self.max_batch or 8192, budget // per_example)))

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.flatten(grads)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(flat)

    def per_example(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        """[b, p] gradients of ``kind`` ("margin" or "loss") for one batch."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        g = self._grad_fns[kind](self._grad_params, to_device(x, self.device, self._input_dtype), y.to(self.device))
        return self.flatten({n: t.float() for n, t in g.items()}) if self._input_dtype else self.flatten(g)

    def margin_and_loss_scale(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, p] margin gradients ∇f, [b] s = 1 − p_y) for one batch.

        Cross-entropy's gradient is exactly −s·∇f: its logit gradient p − e_y equals
        −(1 − p_y)(e_y − q), q the softmax over the other classes, and e_y − q is the margin's. s comes
        from the margin itself (s = σ(−f), f = log(p_y / (1 − p_y))), so −s·∇f keeps its relative
        precision where p_y rounds to 1 in float32 (there p − e_y loses its y entry), and a caller
        gets the loss gradient and the margin gradient from one pass."""
        g, f = self._margin_value_fn(self._grad_params, to_device(x, self.device, self._input_dtype), y.to(self.device))
        flat = self.flatten({n: t.float() for n, t in g.items()}) if self._input_dtype else self.flatten(g)
        return flat, torch.sigmoid(-f.float())

    def iter_margin_and_loss_scale(self, x: Any, y: torch.Tensor, batch_size: int | None = None,
                                   then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                   ) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """(lo, hi, (loss gradients −s·∇f, then applied if given; ∇f; s)) per batch (see
        :meth:`margin_and_loss_scale`); the gradients, the scaling and ``then`` (e.g. a projection) run
        inside the out-of-memory guard, so a batch that does not fit is retried smaller."""
        def compute(lo: int, hi: int):
            m, s = self.margin_and_loss_scale(batch_rows(x, lo, hi), y[lo:hi])
            g = m * (-s[:, None])
            return (g if then is None else then(g)), m, s

        return self._batches(len(y), batch_size or self.batch_size(example_numel(x)), compute)

    def iter_batches(self, x: Any, y: torch.Tensor, kind: str = "margin", batch_size: int | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, gradients) per batch; ``then`` (e.g. a projection) is applied inside the
        out-of-memory guard, so a batch whose projection does not fit is retried smaller too."""
        def compute(lo: int, hi: int) -> torch.Tensor:
            out = self.per_example(batch_rows(x, lo, hi), y[lo:hi], kind)
            return out if then is None else then(out)  # the [b, p] gradients are not kept beside their projection

        return self._batches(len(y), batch_size or self.batch_size(example_numel(x)), compute)

    def full(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        return torch.cat([g for _, _, g in self.iter_batches(x, y, kind)], 0) if len(y) else torch.empty(0, self.n_params)

    def outputs(self, x: Any, batch: int = 4096) -> torch.Tensor:
        return self.fm.outputs(x, batch)


__all__ = ["GradientComputer", "BatchBackOff", "KINDS", "PRECISIONS", "is_out_of_memory", "resolve_device", "batch_len"]
