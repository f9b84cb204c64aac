"""Per-example gradients of the measurement (margin) or of the training loss.

One gradient computer for every method, with two backends: ``torch.func`` (vmap over grad
through the :class:`~engine.autodiff.functional.FunctionalModel`), which differentiates any
model, and the per-layer pass of :mod:`engine.autodiff.per_layer` (one batched backward and a
closed form per Linear / Conv2d / normalisation layer), taken where it applies and was measured
faster (:func:`auto_layers_rule`) and checked against plain autograd (a backward per row) on the first
rows of its first batch. Batched by
a memory budget that counts the activations autograd saves (measured on the first batch), on the
CPU or CUDA. Gradients come out flattened as [batch, p] over the
tracked parameters, in the model's :class:`~engine.autodiff.functional.ParamLayout`. Inputs may
be tensors or dicts (pytrees) of tensors, e.g. a text model's ``{input_ids, attention_mask}``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.func import grad, grad_and_value, vmap

from engine.autodiff.compute import bfloat16_products, keep_default_layout, fast_layout, resolve_device
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
from engine.autodiff.per_layer import LayerGradients, NotPerLayer, layer_plan
from engine.core.errors import ProponentError

KINDS = ("margin", "loss")
BACKENDS = ("auto", "vmap", "layers")
BACKEND_ENV = "PROPONENT_GRADIENTS"  # overrides backend="auto" for every gradient computer of the process
# rows of the first batch of each kind that the per-layer pass is checked on against autograd (a forward of
# the rows together, a backward per row: :func:`_autograd_rows`), and
# the agreement it must reach (float32 rounding is about 1e-7 of the largest entry)
CHECK_ROWS = 2
CHECK_RTOL = 1e-4
# a row measured alone must give the value it has in the batch to this relative precision (float32 rounding
# of another batch size is about 1e-6; a batch-statistics layer changes it by order one)
INTERACTION_RTOL = 1e-3
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a low-precision pass computes, for the keys of stores written from one: 2 since the per-layer closed forms run
# on the low-precision copy (torch.func's vmap before; another summation order, the same precision)
LOW_PRECISION_PASS = 2
# a batch holds up to this many times the activations autograd saves for it (those, the gradients flowing
# back through them, the per-layer pass's copies). Without them in the formula a "512 MB" batch of the
# 95k-parameter BatchNorm CNN of scripts/bench_gpu.py (0.58 MB saved per 32x32 image) was 434 rows and
# peaked at 878-899 MB; with a factor 3 it is 175 rows and peaked at 423-462 MB, at the same or lower
# time per row (scripts/bench_gradient_batches.py, docs/bench/gradient-batches.json)
ACTIVATION_FACTOR = 3.0


def auto_layers_rule(parts) -> str | None:
    """Why ``backend="auto"`` keeps torch.func for a model the per-layer pass could take (None: take it).

    Measured at the engine's own batch sizes (scripts/bench_per_example.py,
    docs/bench/per-example-grads.json, 2-core CPU, 1 and 2 threads, five runs): the per-layer pass took
    0.69-0.75 of torch.func's time on the BatchNorm CNN of scripts/bench_gpu.py (BatchNorm's γ and β
    in closed form, each convolution in the faster of two forms, image batches channels_last) and
    0.74-0.77 on a 3-conv CNN; on small CNNs and Linear stacks both run the same batched products
    (0.74-1.16, noise). Linear stacks keep torch.func's one code path."""
    if not any(p.kind != "linear" for p in parts):
        return "Linear layers only: torch.func (the same batched products, measured equal within noise)"
    return None


AUTO_LAYERS_REASON = "convolution or normalisation layers: measured 0.69-0.77 of torch.func's time on 32x32 CNNs"


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA allocation failure (the typed error, or the older RuntimeError message)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "CUDA out of memory" in str(e))


def _measure_rows(fm: FunctionalModel, params, x, y, kind: str) -> torch.Tensor:
    """[rows] margins or losses of a batch (a low-precision model is measured in float32)."""
    out = fm(params, x)
    out = out if out.dtype == torch.float64 else out.float()
    return correct_class_margin(out, y) if kind == "margin" else example_loss(out, y)


def _measure(fm: FunctionalModel, params, x, y, kind: str) -> torch.Tensor:
    """One example's margin or loss (what torch.func differentiates, the example without its batch dimension)."""
    return _measure_rows(fm, params, add_batch_dim(x), y.unsqueeze(0), kind).sum()


def _autograd_rows(fm: FunctionalModel, params: dict, x: Any, y: torch.Tensor, kind: str) -> dict | None:
    """{name: [k, *shape]} per-example gradients of the ``k`` rows of ``x`` by plain autograd (the per-layer
    pass's first-batch reference): one forward of the rows together, then one backward per row. None where the
    rows interact (a row's value changes when it is measured alone, as in a batch-statistics layer), so no
    per-example gradient exists for the closed forms to match.
    Not torch.func, whose first gradient call in a process imports torch._dynamo (1.1 s of a fresh process,
    4% of a 5,000-image EK-FAC run that otherwise never calls it). Not a batch of one per row either: a
    convolution over one row rounds differently, enough to flip a max-pool window whose two largest values
    nearly tie (one checkpoint of the 5,000-image benchmark CNN), and the check would then reject a right pass."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    with torch.enable_grad():
        values = _measure_rows(fm, leaves, x, y, kind)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in leaves}
        for i in range(len(y)):
            grads = torch.autograd.grad(values[i], list(leaves.values()), retain_graph=i + 1 < len(y), allow_unused=True)
            for (n, t), g in zip(leaves.items(), grads):
                rows[n].append(torch.zeros_like(t) if g is None else g)
    with torch.no_grad():
        alone = torch.cat([_measure_rows(fm, params, batch_rows(x, i, i + 1), y[i:i + 1], kind) for i in range(len(y))])
    if float((alone - values.detach()).abs().max()) > INTERACTION_RTOL * float(values.detach().abs().max()) + 1e-6:
        return None
    return {n: torch.stack(v) for n, v in rows.items()}


def _vmapped_grads(fm: FunctionalModel) -> dict:
    """{kind: torch.func per-example gradients of ``fm``}."""
    return {k: vmap(grad(lambda p, x, y, k=k: _measure(fm, p, x, y, k)), in_dims=(None, 0, 0)) for k in KINDS}


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
            del out  # not held while the next batch is computed (two batches' [b, p] gradients at once)
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
                 memory_budget_mb: float = 512.0, precision: str = "float32", backend: str = "auto"):
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

        self._grad_fns = _vmapped_grads(self._grad_fm)
        self._margin_value_fn = vmap(grad_and_value(lambda p, x, y: _measure(self._grad_fm, p, x, y, "margin")),
                                     in_dims=(None, 0, 0))
        self._layers: LayerGradients | None = None
        self._low_layers: LayerGradients | None = None  # the per-layer pass of a low-precision copy
        self._checked: set[str] = set()
        self._saved_bytes: float | None = None  # per example, measured on the first batch (saved_bytes_per_example)
        self.backend = "vmap"
        self.backend_reason = self._choose_backend(backend)

    def _choose_backend(self, backend: str) -> str:
        """Why the gradients take the path they take (``self._layers`` set for the per-layer one)."""
        if backend not in BACKENDS:
            raise ProponentError(f"gradient backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        forced = os.environ.get(BACKEND_ENV, "").strip()
        if backend == "auto" and forced:
            if forced not in BACKENDS:
                raise ProponentError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, not {forced!r}")
            backend = forced
        if backend == "vmap":
            return "asked for torch.func"
        parts, why = layer_plan(self.model, self.layout)
        if why is None and backend == "auto":
            why = auto_layers_rule(parts)
        if why is None:
            self._layers = LayerGradients(self.model, self.layout, parts)
            if self._input_dtype is not None:
                # a low-precision pass: the closed forms run on the low-precision copy, and self._layers (float32)
                # only checks them on a few rows of the first batch of each kind (see _layer_pass)
                low_parts, _ = layer_plan(self._grad_fm.module, self._grad_fm.layout)
                self._low_layers = LayerGradients(self._grad_fm.module, self._grad_fm.layout, low_parts)
            self.backend = "layers"
            why = "per-layer closed forms" + (f" in {self.precision}" if self._input_dtype is not None else "")
            return why if backend == "layers" else f"{why} (auto: {AUTO_LAYERS_REASON})"
        if backend == "layers":
            raise ProponentError(f"gradient backend 'layers' cannot differentiate this model: {why}")
        return why

    def _fall_back(self, why: str) -> None:
        self._layers, self._low_layers, self.backend, self.backend_reason = None, None, "vmap", why

    def _layer_pass(self, x: Any, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gradients, values) from the per-layer pass, or None where it does not apply; the first
        batch of each kind is checked against plain autograd (:func:`_autograd_rows`), and a mismatch falls
        back for good to torch.func.

        A low-precision pass runs the closed forms on its low-precision copy (gradients and values
        returned float32), checked in float32 on the first rows of the first batch of each kind: whether a
        model's parameters are used only inside their modules does not depend on the dtype, and a check
        between two low-precision computations would have to allow their rounding (several per cent per
        row in bfloat16), loose enough to miss a small wrong layer. The layout is the float32 model's choice."""
        if self._layers is None or any(t.requires_grad for t in pytree.tree_leaves(x)):
            return None  # inputs that require grad (a synset being distilled) need torch.func's graph
        xd, yd = to_device(x, self.device), y.to(self.device)
        xl = fast_layout(self.model, xd)
        low = self._low_layers is not None
        k = min(CHECK_ROWS, len(yd))

        def float32_pass(xb):  # the batch itself, or (low precision) only the rows the check reads
            return self._layers.per_example(batch_rows(xb, 0, k), yd[:k], kind) if low else \
                self._layers.per_example(xb, yd, kind)

        try:
            res, disagrees = None, False
            if not low or kind not in self._checked:
                res = float32_pass(xl)
            if kind not in self._checked:
                disagrees = self._disagrees(res[0], xd, yd, kind)
                if disagrees and xl is not xd:
                    # The other layout's rounding can flip a max-pool window whose two largest values nearly
                    # tie, and that example's gradient then takes the other (equally valid) path: 2 of 200
                    # random-noise images on the BatchNorm CNN, none of 1,000 real ones. Check in the default
                    # layout before judging the per-layer pass, and keep that layout for this model.
                    keep_default_layout(self.model)
                    xl, res = xd, float32_pass(xd)
                    disagrees = self._disagrees(res[0], xd, yd, kind)
            if low and not disagrees:
                res = self._low_layers.per_example(to_device(xl, self.device, self._input_dtype), yd, kind)
        except NotPerLayer as e:
            self._fall_back(str(e))
            return None
        except Exception as e:  # a user module the closed forms did not foresee: torch.func still answers
            if is_out_of_memory(e):
                raise
            self._fall_back(f"the per-layer pass failed ({type(e).__name__}: {str(e)[:200]})")
            return None
        if disagrees:
            self._fall_back("per-layer gradients disagreed with autograd on the first batch (a parameter "
                            "used outside its module, or examples that interact)")
            return None
        self._checked.add(kind)
        g, v = res
        return (g.float(), v.float()) if low else (g, v)

    def _disagrees(self, g: torch.Tensor, x: Any, y: torch.Tensor, kind: str) -> bool:
        """Whether per-layer gradients ``g`` of batch ``x`` differ from autograd's float32 ones on its first rows."""
        k = min(CHECK_ROWS, len(y))
        ref = _autograd_rows(self.fm, self.params, batch_rows(x, 0, k), y[:k], kind)
        if ref is None:  # the rows interact: no per-example gradient for the closed forms to match
            return True
        ref = self.flatten(ref).to(g.dtype)
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        return bool(ref.numel()) and float((g[:k] - ref).abs().max()) > CHECK_RTOL * scale + 1e-30

    def saved_bytes_per_example(self, x: Any) -> float:
        """Bytes autograd saves for one example's gradient: a forward of two rows of ``x`` minus one
        of one row, so what the batch shares (weights saved for the input gradient) is not counted
        per example. Measured once per computer; 0 where it cannot be (fewer than two rows)."""
        if self._saved_bytes is None:
            if batch_len(x) < 2:
                return 0.0
            params = {n: t.detach().requires_grad_(True) for n, t in self._grad_params.items()}

            def saved(k: int) -> int:
                storages: dict[int, int] = {}  # a tensor saved by two operations (a ReLU's output, the next layer's input) once

                def pack(t: torch.Tensor) -> torch.Tensor:
                    st = t.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
                    return t

                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    self._grad_fm(params, to_device(batch_rows(x, 0, k), self.device, self._input_dtype))
                return sum(storages.values())

            try:
                self._saved_bytes = float(max(0, saved(2) - saved(1)))
            except Exception:  # the gradient pass itself will say what is wrong; size as before meanwhile
                self._saved_bytes = 0.0
        return self._saved_bytes

    def batch_size(self, example_numel: int = 0, saved_bytes: float = 0.0) -> int:
        """Examples per batch within the memory budget (on CUDA: at most half the free memory):
        a few [b, p] copies (the gradients, their flattening, their projection), the inputs, and
        ACTIVATION_FACTOR × ``saved_bytes`` per example (:meth:`saved_bytes_per_example`)."""
        budget = self.memory_budget_mb * 2**20
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            budget = max(budget, free // 2)
        per_example = 4 * (3 * self.n_params + 8 * max(example_numel, 1)) + ACTIVATION_FACTOR * saved_bytes
        return int(max(1, min(self.max_batch or 8192, budget // per_example)))

    def auto_batch_size(self, x: Any) -> int:
        """The batch :meth:`iter_batches` takes for ``x`` when given none."""
        return self.batch_size(example_numel(x), self.saved_bytes_per_example(x))

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.flatten(grads)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(flat)

    def per_example(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        """[b, p] gradients of ``kind`` ("margin" or "loss") for one batch."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        done = self._layer_pass(x, y, kind)
        if done is not None:
            return done[0]
        g = self._grad_fns[kind](self._grad_params, to_device(x, self.device, self._input_dtype), y.to(self.device))
        return self.flatten({n: t.float() for n, t in g.items()}) if self._input_dtype else self.flatten(g)

    def margin_and_loss_scale(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, p] margin gradients ∇f, [b] s = 1 − p_y) for one batch.

        Cross-entropy's gradient is exactly −s·∇f: its logit gradient p − e_y equals
        −(1 − p_y)(e_y − q), q the softmax over the other classes, and e_y − q is the margin's. s comes
        from the margin itself (s = σ(−f), f = log(p_y / (1 − p_y))), so −s·∇f keeps its relative
        precision where p_y rounds to 1 in float32 (there p − e_y loses its y entry), and a caller
        gets the loss gradient and the margin gradient from one pass."""
        done = self._layer_pass(x, y, "margin")
        if done is not None:
            return done[0], torch.sigmoid(-done[1].float())
        g, f = self._margin_value_fn(self._grad_params, to_device(x, self.device, self._input_dtype), y.to(self.device))
        flat = self.flatten({n: t.float() for n, t in g.items()}) if self._input_dtype else self.flatten(g)
        return flat, torch.sigmoid(-f.float())

    def iter_margin_and_loss_scale(self, x: Any, y: torch.Tensor, batch_size: int | None = None,
                                   then: Callable[[torch.Tensor], torch.Tensor] | None = None, loss: bool = True,
                                   ) -> Iterator[tuple[int, int, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]]:
        """(lo, hi, (loss gradients −s·∇f, then applied if given; ∇f; s)) per batch (see
        :meth:`margin_and_loss_scale`); the gradients, the scaling and ``then`` (e.g. a projection) run
        inside the out-of-memory guard, so a batch that does not fit is retried smaller. ``loss=False``:
        no loss gradients are formed (None in their place), for a caller that scales ∇f itself."""
        def compute(lo: int, hi: int):
            m, s = self.margin_and_loss_scale(batch_rows(x, lo, hi), y[lo:hi])
            if not loss:
                return None, m, s
            g = m * (-s[:, None])
            return (g if then is None else then(g)), m, s

        return self._batches(len(y), batch_size or self.auto_batch_size(x), compute)

    def iter_margins(self, x: Any, y: torch.Tensor, batch_size: int | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
        """(lo, hi, (margin gradients ∇f, ``then`` applied if given; s = 1 − p_y)) per batch: the margin
        gradients and, from the same pass, each row's loss scale (:meth:`margin_and_loss_scale`)."""
        def compute(lo: int, hi: int):
            m, s = self.margin_and_loss_scale(batch_rows(x, lo, hi), y[lo:hi])
            return (m if then is None else then(m)), s

        return self._batches(len(y), batch_size or self.auto_batch_size(x), compute)

    def iter_batches(self, x: Any, y: torch.Tensor, kind: str = "margin", batch_size: int | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, gradients) per batch; ``then`` (e.g. a projection) is applied inside the
        out-of-memory guard, so a batch whose projection does not fit is retried smaller too."""
        def compute(lo: int, hi: int) -> torch.Tensor:
            out = self.per_example(batch_rows(x, lo, hi), y[lo:hi], kind)
            return out if then is None else then(out)  # the [b, p] gradients are not kept beside their projection

        return self._batches(len(y), batch_size or self.auto_batch_size(x), compute)

    def accumulate(self, x: Any, y: torch.Tensor, kind: str, into: torch.Tensor, alpha: float = 1.0) -> None:
        """``into`` [n, p] += ``alpha`` × the per-example gradients of ``kind``, batch by batch (EK-FAC's and
        Source's training gradients averaged over trajectory points). On the CPU, once the per-layer pass has
        been checked for ``kind`` (its first batch), each layer's closed form is added straight into
        ``into``: no [b, p] gradient tensor is assembled and then added. Elsewhere (torch.func, CUDA, where
        a batch retried after running out of memory must not add twice) batches are computed and added."""
        if into.shape != (len(y), self.n_params):
            raise ValueError(f"into has shape {tuple(into.shape)}, not ({len(y)}, {self.n_params})")
        batch = self.auto_batch_size(x)
        for lo in range(0, len(y), batch):
            hi = min(len(y), lo + batch)
            xb, yb = batch_rows(x, lo, hi), y[lo:hi]
            if (self.device == "cpu" and self._layers is not None and self._low_layers is None and kind in self._checked
                    and not any(t.requires_grad for t in pytree.tree_leaves(xb))):
                self._layers.per_example(fast_layout(self.model, to_device(xb, self.device)), yb.to(self.device), kind,
                                         into=into[lo:hi], alpha=alpha)
                continue
            # the first batch (checked against autograd), or no direct pass: computed, then added (on CUDA in
            # smaller batches after running out of memory)
            for blo, bhi, g in self.iter_batches(xb, yb, kind, batch_size=batch):
                into[lo + blo:lo + bhi].add_(g.to(into.device, into.dtype), alpha=alpha)

    def full(self, x: Any, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
        return torch.cat([g for _, _, g in self.iter_batches(x, y, kind)], 0) if len(y) else torch.empty(0, self.n_params)

    def outputs(self, x: Any, batch: int = 4096) -> torch.Tensor:
        return self.fm.outputs(x, batch)


def gradient_backend(model: nn.Module, tracked: Tracked = None, x: Any = None) -> dict:
    """{"backend", "reason", "bf16_products"}: how per-example gradients of ``model`` are computed by
    default, and whether products with bfloat16 stores run in bfloat16 on this CPU; with example
    inputs ``x`` (two rows or more) also "batch" (rows per batch at the default budget, "budget_mb"),
    "saved_mb_per_example" (what autograd saves for one example) and "layout" (of image batches in
    the layer passes: "channels_last" or "default")."""
    comp = GradientComputer(model, tracked=tracked)
    out = {"backend": comp.backend, "reason": comp.backend_reason, "bf16_products": bfloat16_products()}
    if x is not None and batch_len(x) >= 2:
        xd = to_device(x, comp.device)
        out.update(batch=comp.auto_batch_size(x), budget_mb=comp.memory_budget_mb,
                   saved_mb_per_example=round(comp.saved_bytes_per_example(x) / 2**20, 4),
                   layout="default" if fast_layout(comp.model, xd) is xd else "channels_last")
    return out


__all__ = ["GradientComputer", "BatchBackOff", "KINDS", "BACKENDS", "gradient_backend", "PRECISIONS", "is_out_of_memory", "resolve_device", "batch_len"]
