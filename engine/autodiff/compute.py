"""Where work runs: the device, the memory layout of image batches on it, and whether products
with bfloat16 stores run in bfloat16 there."""
from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from torch import nn

from engine.core.errors import ProponentError


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ProponentError("--device cuda was asked for but no CUDA device is available")
    return device


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. NaN and ±inf carry through a sum, so a finite sum
    settles it in one read (isfinite(t).all() first writes a boolean copy of t: on a gradient block many
    times slower); a non-finite sum (or one that overflowed) is checked entry by entry."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


# "0": products with bfloat16 stores widen them to float32 first; "1": run them in bfloat16 on any CPU
BF16_PRODUCTS_ENV = "PROPONENT_BF16_PRODUCTS"


def bfloat16_products() -> bool:
    """Whether this CPU multiplies bfloat16 matrices faster than float32 ones: AVX-512 BF16 or AMX
    (oneDNN's bfloat16 GEMM, with float32 accumulation). Measured on this project's Xeon (AMX):
    [500, 94k] × [94k, 2048] in 0.075 s against 0.47 s in float32, and a bfloat16 store then needs no
    float32 copy. Elsewhere bfloat16 GEMMs are emulated, so stores are widened as before."""
    forced = os.environ.get(BF16_PRODUCTS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch without the probes
        return False


# "0" keeps every batch in torch's default (contiguous NCHW) layout, e.g. to compare the two
CHANNELS_LAST_ENV = "PROPONENT_CHANNELS_LAST"
# per model: whether its image batches run channels_last (probed once, on its first batch)
_channels_last: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def fast_layout(model: nn.Module, x: Any) -> Any:
    """``x`` in the memory layout this model runs fastest in, for the layer passes (per-layer
    gradients, the factorized projection, the curvature passes) and plain forwards (predictions,
    ``FunctionalModel.outputs``): channels_last for a convolutional model's image batches on the
    CPU, where oneDNN's convolutions and, above all, max pooling are vectorised over channels
    (max_pool2d over a [43, 32, 32, 32] batch: 3.7 ms contiguous, 0.28 ms channels_last). The
    layout of the batch alone is changed, never the model's weights, and only after a probe: two
    rows run both ways must agree, so a model that calls ``.view`` on a channels_last activation
    (it raises) or depends on strides keeps the default. Measured on the BatchNorm CNN of
    scripts/bench_gpu.py (its 5,000-image project, final checkpoint, real images): per-layer
    gradients of 2,000 rows 1.25 → 1.16 s, factorized features 1.24 → 1.05 s, covariances
    1.80 → 1.67 s (medians of six alternations); predictions (train.predict_logits) of 5,000 rows
    1.89 → 1.16 s (medians of three).
    Not used for torch.func's vmap, which was slower with it (2.26 → 2.92 s on random inputs), nor
    on CUDA (not measured). ``PROPONENT_CHANNELS_LAST=0`` turns it off."""
    if (not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.device.type != "cpu"
            or len(x) < 1 or os.environ.get(CHANNELS_LAST_ENV, "").strip() == "0"):
        return x
    decided = _channels_last.get(model)
    if decided is None:
        decided = _channels_last[model] = _channels_last_agrees(model, x[:2])
    return x.contiguous(memory_format=torch.channels_last) if decided else x


def keep_default_layout(model: nn.Module) -> None:
    """From now on, ``model``'s batches keep torch's default layout."""
    _channels_last[model] = False


def _channels_last_agrees(model: nn.Module, probe: torch.Tensor) -> bool:
    """Whether ``model`` (in eval mode, with a convolution) gives the same output for ``probe`` in
    both layouts. Call it before any forward hook is registered: the probe runs the model."""
    if model.training or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    try:
        with torch.no_grad():
            ref = model(probe.contiguous())
            alt = model(probe.contiguous(memory_format=torch.channels_last))
    except Exception:  # e.g. .view on a channels_last activation: the default layout, which works
        return False
    if not isinstance(ref, torch.Tensor) or not isinstance(alt, torch.Tensor) or ref.shape != alt.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.isfinite(ref).all()) and float((alt - ref).abs().max()) <= 1e-4 * scale + 1e-12


__all__ = ["resolve_device", "all_finite", "fast_layout", "keep_default_layout", "bfloat16_products",
           "CHANNELS_LAST_ENV", "BF16_PRODUCTS_ENV"]
