"""Settings shared by several methods, each declared once.

A method's ``Settings`` dataclass inherits the pieces it has; dataclass inheritance keeps every
field's default and one-line help, so the CLI, the UI and ``coerce_settings`` see one flat list.
"""
from __future__ import annotations

import dataclasses

from engine.autodiff.projection import default_projection_dim
from engine.core.errors import ProponentError
from engine.methods.base import setting

PROJECTIONS = ("auto", "rademacher", "gaussian", "sjlt", "factorized", "none")


@dataclasses.dataclass
class ProjectionSettings:
    """The random projection of per-example gradients (TRAK's), and its seed."""

    proj_dim: int = setting(-1, "Projection size k; -1 chooses from the number of tracked parameters (no projection "
                                "for ≤ 8192), 0 disables projection.", ge=-1)
    projection: str = setting("auto", "Random projection: auto, rademacher, gaussian, sjlt (sparse JL), factorized "
                                      "(per Linear/Conv2d layer, P_out ⊗ P_in applied before the outer product, as LoGra "
                                      "does: no [batch, p] gradient or p × k matrix; other parameters left out) or none.",
                              choices=PROJECTIONS)
    seed: int = setting(0, "Seed of the projection matrices (and of any sampling the method does).", ge=0)

    def projection_plan(self, n_params: int, n_train: int) -> tuple[str, int]:
        """(projection kind, k) for gradients of ``n_params`` entries; k = 0 means no projection.

        The rule: ``proj_dim`` when given (≥ 0), else :func:`default_projection_dim`.
        """
        k = self.proj_dim if self.proj_dim >= 0 else (default_projection_dim(n_params, n_train) or 0)
        kind = "none" if (k == 0 or self.projection == "none") else self.projection
        return kind, k


GRAD_PRECISIONS = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class GradientPrecisionSettings:
    """The dtype the per-example gradient passes run in (TRAK, EK-FAC, Source)."""

    grad_precision: str = setting("float32", "Precision of the per-example gradient passes: float32, or bfloat16/float16 "
                                             "(a low-precision copy of the model, through the per-layer closed forms where "
                                             "the model allows; gradients come back float32, curvature and kernels stay "
                                             "float32/64). LDS unchanged for TRAK and EK-FAC; on an H200 TRAK no faster; on "
                                             "a CPU with AMX EK-FAC 12-29% faster on four CNN projects (97% of top-10 "
                                             "proponents the same) and TRAK slower (it needs the dense projection instead "
                                             "of the factorized one: 4x on a 2,000-image CNN). "
                                             "docs/bench/lds-grad-precision*.json, docs/benchmarks.md.",
                                  choices=GRAD_PRECISIONS)


# n_train × k training gradients a curvature method keeps per segment: 4 GiB on disk in bfloat16 (8 in float32), read
# block by block (memory: one block). Was 2^28 while the store was held in memory; on a 5,000-image
# 94,762-parameter CNN the projection that bound forced (SJLT to k = 16384) gave LDS 0.069 against
# kronfluence's unprojected 0.118 (scripts/bench_gpu.py, docs/bench/gpu-cnn-5000.json).
CURVATURE_STORE_ENTRIES = 2**31
CURVATURE_MAX_K = 16384  # beyond this a projection costs more than its error saves (sparse JL above 2^28 entries)


@dataclasses.dataclass
class CurvatureSettings(ProjectionSettings, GradientPrecisionSettings):
    """EK-FAC curvature (Fisher with labels sampled from the model), shared by EK-FAC and Source."""

    proj_dim: int = setting(-1, "Projection size k of the stored training gradients; -1: none while n_train × "
                                "parameters fits 2^31 entries (4 GiB on disk in bfloat16, 8 in float32; streamed), else "
                                "as large as fits (2048 to 16384); 0: none.",
                            ge=-1)

    def projection_plan(self, n_params: int, n_train: int) -> tuple[str, int]:
        """Unlike TRAK, whose kernel lives in the projected space, a curvature method dots the
        preconditioned query (H⁻¹ amplifies low-curvature directions, where a random projection's
        error is largest) with each gradient: on the digits CNN k = 2048 of 9,930 gave LDS 0.35 and
        no projection 0.50. So project only when the store would not fit."""
        if self.projection == "factorized":  # the curvature walk needs the gradients themselves
            raise ProponentError("projection 'factorized' is for TRAK, Grad-Dot/Cos and TracIn; curvature methods store "
                                 "whole gradients (use auto, rademacher, gaussian or sjlt)")
        if self.proj_dim >= 0:
            return super().projection_plan(n_params, n_train)
        if n_params * max(1, n_train) <= CURVATURE_STORE_ENTRIES:
            return "none", 0
        k = min(n_params, CURVATURE_MAX_K, max(2048, CURVATURE_STORE_ENTRIES // max(1, n_train)))
        kind = "none" if (k >= n_params or self.projection == "none") else self.projection
        return kind, (0 if kind == "none" else k)

    # measured on sixteen validation projects (docs/bench/lds-gradient-dtype.json): LDS within ±0.001 of float32 for
    # EK-FAC and Source; float16 would flush the small entries of well-fitted rows to zero (smallest normal 6e-5)
    gradient_dtype: str = setting("bfloat16", "How the stored training gradients are kept on disk: bfloat16 (half the "
                                              "disk and reads of float32, float32's range, 8 significant bits; LDS "
                                              "unchanged) or float32. At one trajectory point, self-influence "
                                              "computed in the fit's gradient pass uses the unrounded gradients (one "
                                              "rotation per row instead of two), so it can differ from the scores' "
                                              "diagonal by bfloat16's rounding (~1e-3 relative).",
                                  choices=("bfloat16", "float32"))

    damping: float = setting(-1.0, "λ added to the curvature eigenvalues (Source: only with response='inverse'); "
                                   "-1 = damping_ratio × each layer's mean eigenvalue, with damping_rule's "
                                   "training-time floor.", ge=-1)
    # -1 (auto) is exact over classes for small sets, one label above (engine.autodiff.curvature.fisher_samples_for):
    # measured on 7 validation projects (docs/bench/lds-fisher-samples-*.json)
    fisher_samples: int = setting(-1, "Labels sampled from the model per example for the Fisher pseudo-gradients; 0: the "
                                      "exact expectation over all classes (one backward pass per class); -1: exact for "
                                      "≤ 1,024 training rows and ≤ 16 classes, else 1 sample (as kronfluence).", ge=-1)
    # measured (docs/bench/lds-factor-products.json): on the 5,000-image benchmark CNN covariances within 2.1e-4 and
    # eigenvalues within 1.4e-3 of float32 (relative Frobenius; 1.8e-2 to 9.5e-2 between two samples of 1,024 rows);
    # LDS within 0.001 on four held-out projects (three CNNs, a wide tabular MLP); covariance and eigenvalue passes
    # 1.3x and 1.4x faster on the 5,000-image CNN (1,024 rows, /tmp/s46/tcov.py: 0.58 -> 0.44 s and 0.54 -> 0.38-0.42 s)
    factor_products: str = setting("auto", "Dtype the covariance pass's input Gram matrices and the eigenvalue pass's "
                                           "rotations are multiplied in, on layers of at least 256 inputs (the passes "
                                           "themselves run in float32, the factors are summed in float64): auto = "
                                           "bfloat16 on a CPU that multiplies it natively (AMX or AVX-512 BF16) for "
                                           "models of at least 2^14 covered parameters, else float32.",
                                   choices=("auto", "float32", "bfloat16"))
    fit_rows: int = setting(0, "Fit the curvature on at most this many training rows (per segment; 0: all).", ge=0)
    point_rows: int = setting(-1, "Training rows each trajectory point's covariances and eigenvalues are fitted on, "
                                  "when a segment has several points: -1 splits the rows evenly over the points, at least "
                                  "1,024 per point (above 1,024 × points each row is used once: one pass's cost "
                                  "whatever the number of points); N: N rows per point, at least an even share; 0: "
                                  "every row at every point.", ge=-1)
    weight_decay_in_curvature: bool = setting(True, "Add the recipe's weight decay to the curvature eigenvalues "
                                                    "(the training objective's Hessian includes it; kronfluence does "
                                                    "not), except on normalised layers (see weight_decay_on_normalized).")
    # measured on 10 validation projects (docs/bench/lds-weight-decay.json): on four BatchNorm CNNs
    # adding it to the normalised convolutions cost 0.02-0.055 LDS; elsewhere it changes nothing
    weight_decay_on_normalized: bool = setting(False, "Also add it on layers whose output scale the model normalises "
                                                      "away (e.g. a convolution before BatchNorm: found by rescaling "
                                                      "each layer's weights), where weight decay does not regularise "
                                                      "the function.")


@dataclasses.dataclass
class DampingRatioSettings:
    """λ of the inverse response 1/(σ + λ) (EK-FAC influence) when ``damping`` is -1."""

    damping_ratio: float = setting(0.1, "With damping = -1 (Source: and response='inverse'): λ as a fraction of each "
                                        "layer's mean eigenvalue.", gt=0)
    damping_rule: str = setting("auto", "With damping = -1: 'auto' raises each layer's ratio damping to at least "
                                        "damping_scale / τ, τ the run's training time (SGD: Σ learning rates / (1 − "
                                        "momentum); Adam: Σ learning rates / mean(√v̂ + ε) of the saved states), on "
                                        "layers whose output scale the model does not normalise away (BatchNorm after a "
                                        "convolution keeps the ratio, shrunk on large sets: normalized_damping_rows); "
                                        "where τ is unknown (final weights only) no floor, the shrink still applies; "
                                        "with 'ratio', the ratio alone.", choices=("auto", "ratio"))
    damping_scale: float = setting(0.3, "With damping_rule 'auto': the floor's multiple of 1/τ.", gt=0)
    normalized_damping_rows: int = setting(2000, "With damping_rule 'auto' (τ known or not), on layers the model "
                                                 "normalises: the ratio "
                                                 "times min(1, (this / n)²), n the training rows the curvature is fitted "
                                                 "on, so a set of 8,000 rows gets 1/16 of it (0: the ratio whatever n).",
                                           ge=0)


@dataclasses.dataclass
class TrajectorySettings:
    """How Source cuts the recorded trajectory into segments and walks it."""

    segments: int = setting(3, "Number of segments L of a single-stage run (the paper uses 3). A multi-stage run gets "
                               "one segment per stage unless segment_by='count'.", ge=1)
    segment_by: str = setting("auto", "'auto': one segment per training stage when there are several, else `segments` "
                                      "equal groups of checkpoints; 'count': always `segments` groups.",
                              choices=("auto", "count"))
    fast: bool = setting(False, "Fast-Source: average the weights within each segment and fit everything once there "
                                "(cheaper, slightly less accurate).")
    response: str = setting("unrolled", "'unrolled': Source's F(σ) = (1 − exp(−η̄Kσ))/σ with propagation exp(−η̄Kσ); "
                                        "'inverse': 1/(σ + λ) (with segments=1 this is EK-FAC influence).",
                            choices=("unrolled", "inverse"))
    last_checkpoints: int = setting(0, "Use only the last N recorded checkpoints of the run (0: all).", ge=0)
    max_checkpoints_per_segment: int = setting(0, "Fit factors and gradients at most at this many checkpoints per "
                                                  "segment, evenly spaced (0: all). η̄ and K still count every step.", ge=0)
    adam_preconditioning: bool = setting(True, "For Adam runs with saved optimizer states: precondition with the "
                                               "segment's mean 1/(√v̂ + ε).")


__all__ = ["CURVATURE_STORE_ENTRIES", "GRAD_PRECISIONS", "GradientPrecisionSettings", "ProjectionSettings", "CurvatureSettings", "DampingRatioSettings", "TrajectorySettings", "PROJECTIONS"]
