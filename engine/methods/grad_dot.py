"""Grad-Dot and Grad-Cos baselines: gradient dot product or cosine at the final checkpoint."""
from __future__ import annotations

from engine.methods.base import register
from engine.methods.gradsim import GradientSimilarity, GradSimSettings


@register
class GradDot(GradientSimilarity):
    name = "grad-dot"
    label = "Grad-Dot"
    description = "Baseline: query margin gradient · (−training loss gradient) at the final checkpoint."
    Settings = GradSimSettings


@register
class GradCos(GradientSimilarity):
    name = "grad-cos"
    label = "Grad-Cos"
    description = ("Baseline: cosine of the query's margin gradient and the negative training loss gradient at the "
                   "final checkpoint. Suspicion is the loss-gradient norm.")
    Settings = GradSimSettings
    normalize = True
