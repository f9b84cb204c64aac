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

from engine.methods.base import register, setting
from engine.methods.source import CurvatureInfluence, EngineConfig


@dataclasses.dataclass
class EKFACSettings:
    damping: float = setting(-1.0, "λ added to the EK-FAC eigenvalues; -1 = damping_ratio × mean eigenvalue per layer.")
    damping_ratio: float = setting(0.1, "With damping = -1: λ as a fraction of each layer's mean eigenvalue.")
    fisher_samples: int = setting(-1, "Labels sampled from the model per example for the Fisher pseudo-gradients; 0: the "
                                      "exact expectation over all classes; -1: exact for ≤ 16 classes, else 1 sample.")
    fit_rows: int = setting(0, "Fit the curvature on at most this many training rows (0: all).")
    proj_dim: int = setting(-1, "Projection of the stored training gradients (TRAK's): -1 chooses from the model size "
                                "(none for ≤ 8192 covered parameters), 0 disables.")
    projection: str = setting("auto", "Random projection: auto, rademacher, gaussian, sjlt or none.",
                              choices=("auto", "rademacher", "gaussian", "sjlt", "none"))
    weight_decay_in_curvature: bool = setting(True, "Add the recipe's weight decay to the curvature eigenvalues "
                                                    "(the training objective's Hessian includes it; kronfluence does not).")
    seed: int = setting(0, "Seed of the Fisher label sampling and of the projection.")


@register
class EKFAC(CurvatureInfluence):
    name = "ekfac"
    label = "EK-FAC influence"
    description = ("Influence functions with an EK-FAC Hessian approximation at the final checkpoint (Grosse et al., "
                   "2023). Linear and Conv2d layers; other layers are reported as left out.")
    Settings = EKFACSettings

    def engine_config(self) -> EngineConfig:
        s: EKFACSettings = self.settings
        return EngineConfig(segments=1, segment_by="count", last_checkpoints=1, fast=False, response="inverse",
                            damping=s.damping, damping_ratio=s.damping_ratio, fisher_samples=s.fisher_samples,
                            fit_rows=s.fit_rows, proj_dim=s.proj_dim, projection=s.projection,
                            adam_preconditioning=False, seed=s.seed, all_rows=True,
                            weight_decay_in_curvature=s.weight_decay_in_curvature)
