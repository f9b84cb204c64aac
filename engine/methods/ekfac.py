"""Influence functions with EK-FAC (Koh & Liang 2017; George et al. 2018; Grosse et al. 2023).

S[q, i] = −(1/N) ∇f(q)ᵀ (Ĥ + λI)⁻¹ ∇ℓ(z_i) at the final checkpoint, Ĥ the EK-FAC
approximation of the Hessian of the training objective (Fisher of the mean cross-entropy with
labels sampled from the model, eigenvalues refit in the Kronecker eigenbasis, plus the
recipe's weight decay). The score approximates the drop of q's margin when z_i is removed.

This is a configuration of the Source engine (engine/methods/source.py): one segment holding
the final checkpoint, response h(σ) = 1/(σ + λ). Default damping λ = 0.1 × the mean
eigenvalue of each layer (the heuristic kronfluence uses when asked for one), so the damping
scales with the curvature rather than being an absolute number.
Only nn.Linear and nn.Conv2d are covered; other parameters are listed in ``meta['left_out']``.
"""
from __future__ import annotations

import dataclasses

from engine.methods.base import register, settings_dict
from engine.methods.settings import CurvatureSettings, DampingRatioSettings
from engine.methods.source import CurvatureInfluence, EngineConfig


@dataclasses.dataclass
class EKFACSettings(CurvatureSettings, DampingRatioSettings):
    """EK-FAC influence: the shared curvature settings and the damping ratio."""


@register
class EKFAC(CurvatureInfluence):
    name = "ekfac"
    label = "EK-FAC influence"
    description = ("Influence functions with an EK-FAC Hessian approximation at the final checkpoint (Grosse et al., "
                   "2023). Linear and Conv2d layers; other layers are reported as left out.")
    Settings = EKFACSettings
    version = "2"  # stored gradients unprojected while they fit (v1 projected to 2048 above 8,192 parameters)

    @classmethod
    def advisories(cls, project, settings) -> list[str]:
        # influence functions linearise around an optimum; a run still at its peak learning rate is not at one
        cks = project.run_checkpoints() if project.checkpoints else []
        lrs = [c.lr for c in cks if c.lr is not None]
        if len(lrs) >= 2 and lrs[-1] >= 0.5 * max(lrs) and not all(c.optimizer == "lbfgs" for c in cks):
            return [f"ekfac: the run ends at {lrs[-1]:g}, its peak learning rate (no decay), so the final checkpoint is "
                    f"not an optimum; source follows the recorded trajectory instead (higher LDS on such runs: "
                    f"docs/benchmarks.md, validation suite)"]
        return []

    def engine_config(self) -> EngineConfig:
        # one segment holding the final checkpoint, inverse response, one objective over every row
        return EngineConfig(**settings_dict(self.settings), segments=1, segment_by="count", last_checkpoints=1,
                            fast=False, response="inverse", adam_preconditioning=False, all_rows=True)
