"""TracIn(CP): Σ_t η_t · ∇f(q; θ_t) · (−∇ℓ(z; θ_t)) over the recorded checkpoints of one run."""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.methods.base import register, setting
from engine.methods.gradsim import GradientSimilarity, GradSimSettings


@dataclasses.dataclass
class TracInSettings(GradSimSettings):
    max_checkpoints: int = setting(0, "Use at most this many checkpoints, evenly spaced (0: all).", ge=0)


@register
class TracIn(GradientSimilarity):
    name = "tracin"
    requires = frozenset({"trajectory"})
    label = "TracIn(CP)"
    description = "Baseline: learning-rate-weighted gradient dot products summed over the training checkpoints."
    Settings = TracInSettings

    @classmethod
    def advisories(cls, project, settings) -> list[str]:
        n = len(project.run_checkpoints()) if project.checkpoints else 0
        used = min(n, settings.max_checkpoints) if settings.max_checkpoints > 0 else n
        if 0 < used < 3:
            return [f"tracin: only {used} checkpoint(s) in the sum, so TracIn is close to Grad-Dot at the final model; "
                    f"record more (checkpoints_per_epoch in [training]) or use trak"]
        return []

    def checkpoints_and_weights(self, project):
        cks = project.run_checkpoints()
        m = self.settings.max_checkpoints
        if m > 0 and len(cks) > m:
            cks = [cks[int(i)] for i in np.linspace(0, len(cks) - 1, m).round()]
        return [(c, c.lr) for c in cks]
