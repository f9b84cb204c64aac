"""Influence functions with EK-FAC (Koh & Liang 2017; George et al. 2018; Grosse et al. 2023).

S[q, i] = −(1/N) ∇f(q)ᵀ (Ĥ + λI)⁻¹ ḡ(z_i), Ĥ the EK-FAC approximation of the Hessian of the
training objective (Fisher of the mean cross-entropy with labels sampled from the model,
eigenvalues refit in the Kronecker eigenbasis, plus the recipe's weight decay), ∇f(q) at the final
checkpoint. The score approximates the drop of q's margin when z_i is removed.

Where the run is: ``trajectory_points`` (default 5) evenly spaced checkpoints of the recorded run,
the final one included. Ĥ is fitted over them (covariances averaged, eigenvalues refit at each and
averaged) and ḡ(z_i) is z_i's training-loss gradient averaged over them; 1 is classic influence at
the final checkpoint. Why: a model retrained without some rows differs from the original
along its whole path, not only at the optimum, and a one-point influence function cannot see the
early part. On the validation suite's four LDS projects (constant-LR runs) LDS went from 0.384 /
0.318 / 0.248 / 0.336 at the final checkpoint to 0.465 / 0.391 / 0.338 / 0.367 with 5 points
(Source 0.476 / 0.375 / 0.338 / 0.373), and on a converged run (cosine decay to 0) from 0.432 to
0.499 (Source 0.488); scripts/lds_variants.py, 40 half-subsets × 2 seeds, 32 queries. Cost: one
gradient pass per point; the curvature is fitted on shares of the rows (each point at least 1,024,
``point_rows``), so above 1,024 × points rows its cost is one pass whatever the number of points. A
project with only its final weights gets classic influence whatever the setting.

This is a configuration of the Source engine (engine/methods/source.py): one segment, response
h(σ) = 1/(σ + λ). Default damping per layer: λ = 0.1 × the layer's mean eigenvalue (the heuristic
kronfluence uses when asked for one, so the damping scales with the curvature), raised to at least
0.3/τ with τ the run's training time (engine.methods.schedule.training_time) on layers the model
does not normalise (v9, ``damping_rule='auto'``): a run trained for a time τ has fitted only
curvature above about 1/τ. On sixteen validation projects mean LDS 0.568 → 0.596 (+0.23 / +0.17 on
3-epoch runs, no loss above 0.006; docs/bench/lds-damping-ekfac.json). On normalised layers the ratio
falls as (2,000 / n)² above 2,000 training rows (v11, ``normalized_damping_rows``): on BatchNorm CNNs
of up to 1,500 rows a tenth of the ratio there lost up to 0.03 LDS, from 5,000 rows on less damping
won steadily (kronfluence uses almost none), so larger sets get less (docs/bench/lds-damping-normalized.json).
Where τ is unknown (final weights only, L-BFGS) there is no floor, but that shrink still applies (v12):
weights-only LDS 0.088 → 0.092 at 5,000 images and 0.108 → 0.116 at 8,000 (docs/bench/lds-damping-weights-only.json).

Weight decay: σ = Λ + the recipe's weight decay (the Hessian of the objective), except on layers
whose output the model normalises (a convolution before BatchNorm, a Linear before LayerNorm:
found by rescaling each layer, curvature.normalized_layers). The loss cannot see such a layer's
scale, so weight decay there is no restoring force against removing a training row; counted as one
it cost 0.02 to 0.055 LDS on four BatchNorm CNNs (four generator seeds; SGD or Adam; cosine or
constant learning rate) and dropping it everywhere cost up to 0.09 on MLPs, where it is a real regulariser
(docs/bench/lds-weight-decay.json; ``weight_decay_on_normalized=True`` restores the old rule).
Only nn.Linear and nn.Conv2d are covered; other parameters are listed in ``meta['left_out']``.
"""
from __future__ import annotations

import dataclasses

from engine.methods.base import register, settings_dict
from engine.methods.settings import CurvatureSettings, DampingRatioSettings, setting
from engine.methods.source import CurvatureInfluence, EngineConfig


@dataclasses.dataclass
class EKFACSettings(CurvatureSettings, DampingRatioSettings):
    """EK-FAC influence: the shared curvature settings and the damping ratio."""

    trajectory_points: int = setting(5, "Checkpoints of the run, evenly spaced and the final one included, at which the "
                                        "factors and training gradients are fitted and averaged (1: the final "
                                        "checkpoint only, classic influence).", ge=1)


@register
class EKFAC(CurvatureInfluence):
    name = "ekfac"
    label = "EK-FAC influence"
    description = ("Influence functions with an EK-FAC Hessian approximation (Grosse et al., 2023), fitted and "
                   "averaged over 5 checkpoints of the recorded run (trajectory_points=1: the final one only, classic "
                   "influence). Linear and Conv2d layers; other layers are reported as left out.")
    Settings = EKFACSettings
    # v14: where the CPU multiplies bfloat16 natively, the covariance and eigenvalue passes form the Gram matrices and
    # rotations of layers with at least 256 inputs in bfloat16 (factor_products; summed in float32/float64 as before):
    # covariance and eigenvalue passes 1.3x and 1.4x faster on the 5,000-image CNN, covariances within 2.1e-4 and eigenvalues within 1.4e-3 of
    # float32 (relative); LDS in docs/bench/lds-factor-products.json;
    # v13: where the CPU multiplies bfloat16 natively (compute.bfloat16_products), the fit's self-influence walk
    # runs in bfloat16 (2.4x faster rotations; self-scores within 4e-4 of the largest on the 5,000-image CNN);
    # scores unchanged;
    # v12: the normalised-layer shrink of v11 also where τ is unknown (final weights only, L-BFGS; there the ratio
    # alone, with no floor, applies on the other layers): weights-only LDS +0.004 at 5,000 images, +0.008 at 8,000
    # (docs/bench/lds-damping-weights-only.json);
    # v11: on layers the model normalises, the damping ratio falls as (2,000 / n)² above 2,000 fitted rows
    # (normalized_damping_rows): LDS +0.014 on a new 8,000-image BatchNorm CNN, +0.015 / +0.013 at 20,000 images
    # (1 / 5 points), +0.0015 at 5,000, +0.002 on a held-out 5,000-image Adam run; sets of up to 2,000 rows
    # unchanged (docs/bench/lds-damping-normalized.json);
    # v10: training gradients stored in bfloat16 (gradient_dtype; half the disk and reads, float32's range): LDS
    # within ±0.001 of float32 on sixteen validation projects, EK-FAC and Source (docs/bench/lds-gradient-dtype.json);
    # v9: the training-time damping floor (damping_rule 'auto', damping_scale / τ on layers the model does not
    # normalise): +0.18 to +0.26 LDS on a 3-epoch run, within -0.006..+0.006 elsewhere (docs/bench/lds-damping-ekfac.json);
    # its sampled Fisher labels are inverse-CDF draws made inside the covariance pass (curvature.fit_covariances_sampled);
    # v8: above 1,024 training rows each trajectory point fits its factors on its share of the rows (point_rows=-1;
    # at least 1,024 rows per point): the factor passes cost about one pass instead of one per point, LDS within
    # -0.002..+0.005 on ten projects (docs/bench/lds-point-rows.json);
    # v7: no weight decay in the σ of normalised layers (scale-invariant, e.g. a convolution before BatchNorm):
    # +0.02 to +0.055 LDS on four BatchNorm CNNs, nothing else changed (docs/bench/lds-weight-decay.json);
    # v6: one sampled Fisher label above 1,024 training rows (fisher_samples=-1, as kronfluence; exact below);
    # v5: curvature products and the walk in float32, summed in float64 (2.2-2.9x faster on the CPU, scores
    # within 1e-6 of the largest); v4: stored gradients unprojected up to 2^31 entries (streamed from disk); v3: averaged over trajectory
    # points by default; v2: stored gradients unprojected while they fit
    version = "14"
    # v9 changed the damping only: v8's training-gradient stores stay valid (v10's bfloat16 stores are keyed by
    # their dtype, float32 ones are v8's)
    gradients_version = "8"

    @classmethod
    def advisories(cls, project, settings) -> list[str]:
        # influence functions linearise around an optimum; a run still at its peak learning rate is not at one
        cks = project.run_checkpoints() if project.checkpoints else []
        if int(getattr(settings, "trajectory_points", 1)) > 1 and len(cks) > 1:
            return []  # it follows the run, not only its end point
        lrs = [c.lr for c in cks if c.lr is not None]
        if len(lrs) >= 2 and lrs[-1] >= 0.5 * max(lrs) and not all(c.optimizer == "lbfgs" for c in cks):
            return [f"ekfac: the run ends at {lrs[-1]:g}, its peak learning rate (no decay), so the final checkpoint is "
                    f"not an optimum; trajectory_points > 1 (the default) or source follow the recorded run instead "
                    f"(higher LDS on such runs: docs/benchmarks.md, validation suite)"]
        return []

    def engine_config(self) -> EngineConfig:
        # one segment holding the final checkpoint, inverse response, one objective over every row
        d = settings_dict(self.settings)
        points = int(d.pop("trajectory_points", 1))
        return EngineConfig(**d, segments=1, segment_by="count", last_checkpoints=1 if points == 1 else 0,
                            max_checkpoints_per_segment=0 if points == 1 else points,
                            fast=False, response="inverse", adam_preconditioning=False, all_rows=True)
