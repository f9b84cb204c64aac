"""Source: approximate unrolled differentiation (Bae, Lin, Lorraine, Grosse, NeurIPS 2024).

One engine serves Source and EK-FAC influence (engine/methods/ekfac.py is a configuration of
it). The recorded trajectory of one run is cut into segments ℓ = 1…L (one per training stage
for multi-stage recipes, else L contiguous groups of checkpoints). Per segment:

- EK-FAC factors (engine.autodiff.curvature): covariances A, S averaged over the segment's
  checkpoints, eigendecomposed once; eigenvalues Λ refit at each checkpoint in that shared
  basis and averaged. Each checkpoint fits them on its own share of the rows (point_shares:
  at least 1,024 rows, an even split beyond), so the factor passes cost about one pass. The
  curvature eigenvalues are σ = Λ + weight_decay (the training objective is mean cross-entropy
  + (wd/2)‖θ‖²), except on layers the model normalises (curvature.normalized_layers:
  scale-invariant, so weight decay there is no restoring force);
- η̄_ℓ: the step-weighted mean learning rate, divided by (1 − β) for SGD with momentum β;
  K_ℓ: the optimizer steps the segment covers; c_ℓ = η̄_ℓ K_ℓ;
- response F_ℓ(σ) = (1 − exp(−c_ℓ σ))/σ (expm1; limit c_ℓ for tiny or non-positive σ) and
  propagation S_ℓ(σ) = exp(−c_ℓ σ);
- ḡ_ℓ(z_i): the training-loss gradient of z_i averaged over the segment's checkpoints (zero
  when the segment's stage did not train on z_i), optionally projected with TRAK's projection.

The query walks backwards from v = ∇f(q; θ_final): u_ℓ = F_ℓ(v), v ← S_ℓ(v), and

    S[q, i] = − Σ_ℓ (1/N_ℓ) u_ℓᵀ ḡ_ℓ(z_i),

N_ℓ being the number of rows the segment's stage trained on (N for a single stage). The minus
sign is the sign convention: removing z_i lowers every step's gradient by (1/N_ℓ)∇ℓ_i, which
moves θ by +(1/N_ℓ)F(H)∇ℓ_i and q's margin by +(1/N_ℓ)∇f_qᵀF(H)∇ℓ_i; a proponent has that
change negative, so its score is positive. Checked against leave-one-out retraining in tests.

Self-influence S[i, i] (triage) needs z_i's margin gradient at the final checkpoint walked through the
curvature. With one segment whose points include the final checkpoint (EK-FAC, one-segment Source),
the fit's training-gradient pass yields it: at that point the loss gradient is computed as
−(1 − p_y)·∇f (exact for cross-entropy), so S[i, i] = ((1 − p_y)/N) Σ F ⊙ (Q_Sᵀ (√P ⊙ ∇f) Q_A)² with
one point and no projection (√P = 1 without Adam preconditioning), else −(1/N) walk(∇f)ᵀ ḡ(z_i); rows
the fit did not compute (a store another run wrote) are walked afterwards. A separate pass was about a
third of a one-point EK-FAC run on the 2,000-image CNN (docs/bench/cpu-cnn-2000.json: 14.0 s → 9.7 s).

With L = 1 and F(σ) = 1/(σ + λ) (``response="inverse"``) this is EK-FAC influence exactly.
Fast-Source averages the weights within each segment and computes everything once there.
Adam: when optimizer states were saved, gradients are preconditioned with the segment's mean
P = 1/(√v̂ + ε): the EK-FAC eigenvalues are refit on √P ⊙ G in the (unpreconditioned) K-FAC
basis, and the query is walked through √P F(√P H √P) √P.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from engine.autodiff import curvature as cv
from engine.autodiff import distributed
from engine.autodiff.functional import FunctionalModel, TrackedParameters
from engine.autodiff.compute import all_finite, bfloat16_products
from engine.autodiff.per_example import LOW_PRECISION_PASS, GradientComputer
from engine.autodiff.projection import IdentityProjector, make_projector
from engine.core.errors import ProponentError
from engine.core.project import Checkpoint, Project
from engine.methods.base import Attributor, register, settings_dict
from engine.methods.schedule import adam_denominator, lr_sum, stage_rows, training_time
from engine.methods.settings import (
    CurvatureSettings,
    DampingRatioSettings,
    TrajectorySettings,
)
from engine.storage.arrays import ChunkedArray, stable_hash
from engine.storage.background import BackgroundWriter

# training rows per block of stored training gradients: bounds memory, and is the unit torchrun ranks share out
GRADIENT_BLOCK_ROWS = 1024
# training gradients are computed and written in parts of a chunk of at most this many float32 bytes
GRADIENT_PART_BYTES = 2**26
GRADIENT_PART_MIN_ROWS = 16  # very wide rows: still a batch worth computing on a GPU
# host memory of one per-example gradient batch (GradientComputer's budget; on CUDA half the free device
# memory): the walk and the scoring buffers sit beside it, so smaller than the 512 MB default
GRADIENT_BATCH_MB = 128.0
# The walk (rotations into the Kronecker eigenbasis and back) and the products with the stored
# training gradients run in float32, the dtype of the gradients themselves (the fitted factors stay
# float64); scores are summed in float64. On the 32×32 RGB CNN of scripts/bench_gpu.py (500 and 800
# training images) the float64 walk was most of the scoring and self-influence time; float32 changed
# scores by at most 7e-7 of the largest score (self-scores 1.5e-7), top-10s unchanged
# (tests/test_source.py checks the two walks agree).
# The products of the walked queries with a bfloat16 store (gradient_dtype, the default) run in bfloat16
# where this CPU multiplies bfloat16 fast (compute.bfloat16_products: AVX-512 BF16 or AMX; bf16_products):
# the stored bits as they are, no float32 copy of the store, float32 accumulation inside the product and
# each score rounded to bfloat16. On the 20,000-image CNN (94k parameters) a pass that read, widened and
# multiplied 8,000 stored rows by 353 queries took 3.5 s in float32 against 1.4 s, and the half-width
# queries of a 500-query run fit one pass over the store, not two. Largest score error against a float32
# store, over the largest score, on the GD logistic regression of tests/test_source.py: the bfloat16
# store alone 1.8e-3 (EK-FAC, 3 points) and 1.2e-3 (Source), with bfloat16 products 2.6e-3 and 2.3e-3.
# The query walk itself stays float32: in bfloat16 its chained roundings gave 4.7e-3 and 1.3e-2. The fit's
# self-influence walk of the training rows (one segment) does run in bfloat16 there, on models of at least
# BF16_SELF_WALK_MIN_PARAMS (see _fit_segment; meta "self_influence_walk").
# PROPONENT_BF16_PRODUCTS=0 keeps float32 products and walks.
# least rows a trajectory point's factors are fitted on when the rows are split over the points
# (point_rows=-1). Measured on 10 validation projects (docs/bench/lds-point-rows.json): an even split
# with no floor moved EK-FAC's LDS by -0.022 to +0.014 where a point got 140-290 rows; with this
# floor by -0.002 to +0.005 (every row at every point below 1,024 rows: the old rule)
POINT_ROWS_FLOOR = 1024
NORMALIZED_PROBE_ROWS = 16  # training rows the scale-invariance probe runs the model on (one forward per layer)
WALK_DTYPE = torch.float32
# covered parameters from which the fit's self-influence walk runs in bfloat16 on a CPU that multiplies it
# natively: on a 60-row logistic regression a one-point self-score was off by 7.8e-3 of the largest. Also the floor
# of factor_products='auto' (below it the factor passes are cheap in float32)
BF16_SELF_WALK_MIN_PARAMS = 2**14
WALK_BLOCK_BYTES = 2**26  # one [rows, p] copy (WALK_DTYPE) of query gradients walked through the curvature (64 MiB)
# walked query vectors gathered before one pass over the stored training gradients (each pass reads the
# whole store from disk, so fewer and wider passes; at most this many bytes of [queries, width])
SCORE_PASS_BYTES = 2**27
# training gradients read from the store per product when scoring (a part of a chunk)
SCORE_READ_BYTES = 2**26
# rows per product of walked and stored gradients in the fit's self-scores (a [rows, p] temporary stays small)
SELF_DOT_ROWS = 16
# training rows whose inputs are gathered at a time when self-influence walks a subset of them
SELF_ROWS_PER_READ = 4096


@dataclass
class Segment:
    index: int
    checkpoints: list[Checkpoint]
    stages: list[str]
    rows: np.ndarray  # training rows the segment's stage(s) trained on
    steps: int  # K
    lr: float  # step-weighted mean learning rate
    momentum: float
    optimizer: str

    @property
    def eta(self) -> float:
        """η̄ scaled for momentum: η̄/(1 − β) for SGD."""
        if self.optimizer == "sgd" and self.momentum > 0:
            return self.lr / (1.0 - self.momentum)
        return self.lr

    @property
    def c(self) -> float:
        return self.eta * self.steps

    def describe(self) -> dict:
        return {"index": self.index, "checkpoints": [c.key for c in self.checkpoints], "stages": self.stages,
                "n_rows": int(len(self.rows)), "steps": int(self.steps), "mean_lr": self.lr,
                "momentum": self.momentum, "eta_eff": self.eta, "eta_K": self.c}


@dataclass
class EngineConfig(CurvatureSettings, DampingRatioSettings, TrajectorySettings):
    """Everything the shared curvature-influence engine needs: Source's settings, EK-FAC's damping
    ratio, and whether one objective covers every training row whatever the stages (EK-FAC)."""

    all_rows: bool = False


def plan_segments(project: Project, cfg: EngineConfig) -> list[Segment]:
    """Cut the run of model 0 (the first recorded model) into segments."""
    finals = project.final_checkpoints()
    if not finals:
        raise ProponentError("no checkpoints recorded; run `proponent train PROJECT` first", file=str(project.checkpoint_dir))
    cks = project.run_checkpoints()
    prev = {c.key: (cks[i - 1].step if i else 0) for i, c in enumerate(cks)}
    if cfg.last_checkpoints > 0:
        cks = cks[-cfg.last_checkpoints:]
    n = len(project.train_dataset)
    rows_of_stage = stage_rows(project)
    stages_in_order = list(dict.fromkeys(c.stage for c in cks))
    if cfg.segment_by == "auto" and len(stages_in_order) > 1:
        groups = [[c for c in cks if c.stage == s] for s in stages_in_order]
    else:
        L = max(1, min(int(cfg.segments), len(cks)))
        groups = [list(g) for g in np.array_split(np.array(cks, dtype=object), L)]
    segs = []
    for j, g in enumerate(groups):
        names = list(dict.fromkeys(c.stage for c in g))
        parts = [rows_of_stage[s] for s in names if s in rows_of_stage]
        if cfg.all_rows or not parts or len(parts) < len(names):
            rows = np.arange(n)
        else:
            rows = np.unique(np.concatenate(parts))
        deltas = np.array([max(1, c.step - prev[c.key]) for c in g], dtype=np.float64)
        rate_sum = sum(lr_sum(project, c, int(d), rows_of_stage) for c, d in zip(g, deltas))
        segs.append(Segment(j, g, names, rows, int(deltas.sum()), float(rate_sum / deltas.sum()),
                            float(g[-1].momentum), g[-1].optimizer))
    return segs


def point_shares(rows: np.ndarray, n_points: int, point_rows: int, seed: int) -> list[np.ndarray]:
    """The rows each of ``n_points`` trajectory points fits its covariances and eigenvalues on.

    The factors are means over (point, row) pairs averaged over the points, so a point need not see
    every row. ``point_rows`` = -1: an even share of a seeded permutation, but at least
    POINT_ROWS_FLOOR rows (beyond n_points × the floor every row is used once: one pass's cost
    whatever the number of points); N > 0: N rows, at least an even share; 0: every row at every
    point. Shares are consecutive windows of the permutation (overlapping only when they must, and
    covering every row); a share of every row is ``rows`` itself."""
    n = len(rows)
    if n_points <= 1 or point_rows == 0 or n == 0:
        return [rows] * max(1, n_points)
    even = math.ceil(n / n_points)
    size = max(even, POINT_ROWS_FLOOR if point_rows < 0 else point_rows)
    if size >= n:
        return [rows] * n_points
    perm = np.random.default_rng(seed).permutation(n)
    if size == even:  # disjoint, sizes within one
        return [np.sort(rows[part]) for part in np.array_split(perm, n_points)]
    return [np.sort(rows[perm[(j * size + np.arange(size)) % n]]) for j in range(n_points)]


class CurvatureInfluence(Attributor):
    """The shared engine: segments of the trajectory, EK-FAC per segment, backward walk."""
    shards_over_ranks = True
    # what the shared training-gradient stores are keyed by (None: the version); kept when only the
    # curvature side changes, so such a version reuses the stores an earlier one wrote. It MUST change
    # whenever the training-gradient pass (what is stored) changes, or stale stores are read.
    gradients_version: str | None = None

    def engine_config(self) -> EngineConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ fitting
    def _fit(self, project: Project) -> None:
        cfg = self.engine_config()
        self.cfg = cfg
        if cfg.response not in ("unrolled", "inverse"):
            raise ProponentError(f"{self.name}: response must be 'unrolled' or 'inverse', not {cfg.response!r}")
        segs = plan_segments(project, cfg)
        if cfg.response == "unrolled" and any(s.optimizer == "lbfgs" for s in segs):
            raise ProponentError(f"{self.name}: the project was trained with L-BFGS, which records no step-wise "
                                 f"trajectory; use method 'ekfac' (or response='inverse')")
        self.segments = segs
        model0 = project.build_model()
        self.tracked = FunctionalModel(model0, TrackedParameters.of(project)).names
        self.layers_template, self.left_out = cv.curvature_layers(model0, self.tracked)
        if not self.layers_template:
            raise ProponentError(f"{self.name}: the tracked parameters include no nn.Linear or nn.Conv2d layer to fit "
                                 f"curvature on")
        # the covered parameters, in the one flat layout gradients, curvature and projections share
        layout = FunctionalModel(model0, cv.covered_param_names(self.layers_template)).layout
        self.param_names = layout.names
        self.blocks = cv.LayerBlocks(self.layers_template, layout)
        n = len(project.train_dataset)
        p = layout.n
        kind, k = cfg.projection_plan(p, n)
        self.projector = make_projector(kind, p, k or None, seed=cfg.seed, model_id=0, device="cpu")
        # the same matrix on the gradients' device: training gradients are projected where they are
        # computed, and only [batch, k] crosses to the host (not [batch, p])
        self.train_projector = (self.projector if str(self.device) == "cpu" else
                                make_projector(kind, p, k or None, seed=cfg.seed, model_id=0, device=self.device))
        self.factor_dir = project.state_dir / "factors"
        self.factor_dir.mkdir(exist_ok=True)
        self.wd = float(project.recipe.weight_decay) if cfg.weight_decay_in_curvature else 0.0
        final = project.final_checkpoint(segs[-1].checkpoints[-1].model_id)
        # layers whose output scale the model normalises away (found on the final weights and a few training
        # rows: a structural property of the model): no weight decay in their σ, no training-time damping floor
        skip_wd = self.wd > 0 and not cfg.weight_decay_on_normalized
        # (probed wherever rule 'auto' sets the inverse response's damping: _layer_damping reads them with or
        # without a known τ)
        auto_rule = cfg.response == "inverse" and cfg.damping < 0 and cfg.damping_rule == "auto"
        scale_invariant = []
        if skip_wd or auto_rule:
            rows = torch.arange(min(NORMALIZED_PROBE_ROWS, n))
            scale_invariant = cv.normalized_layers(project.load_model(final).to(self.device), self.layers_template,
                                                   project.train_dataset.x[rows].to(self.device))
        self.scale_invariant = frozenset(scale_invariant)
        self.normalized = list(scale_invariant) if skip_wd else []
        self.wd_per_layer = [0.0 if L.name in self.normalized else self.wd for L in self.layers_template]
        self.damping_rules: list[dict] = []
        # the query checkpoint's weights: a segment point with these weights computes self-influence in its pass
        self._final_digest = cv.tensor_digest(project.load_state(final))
        # (values, known, rows the fit's pass computed) by training row: self-influence from the fit's pass
        self._fused_self: tuple[np.ndarray, np.ndarray, int] | None = None
        self.seg_state = []
        self._gradient_rows = 0  # training gradients this process computed (its share under torchrun)
        # bfloat16 score products, and the fit's self-influence walk in bfloat16 (see _fit_segment)
        self.bf16_products = cfg.gradient_dtype == "bfloat16" and bfloat16_products()
        self._self_walk_dtype = "float32"
        self.factor_products = self._factor_products(cfg, p)
        for seg in segs:
            self._check_cancel("fit")
            self.seg_state.append(self._fit_segment(project, seg))
        self.final_checkpoint = final
        self.query_model = project.load_model(final)
        self.query_computer = GradientComputer(self.query_model, tracked=self.param_names, device=self.device,
                                               memory_budget_mb=GRADIENT_BATCH_MB, precision=cfg.grad_precision)
        self._self = None
        self.meta.update({
            "segments": [s.describe() for s in segs], "response": cfg.response, "fast": cfg.fast,
            "score_products": "bfloat16" if self.bf16_products else "float32",
            "factor_products": "float32" if self.factor_products is None else "bfloat16",
            "self_influence_walk": self._self_walk_dtype,
            "layers": [L.name for L in self.layers_template], "left_out": self.left_out,
            "covered_parameters": p, "projection": self.projector.describe(), "weight_decay": self.wd,
            "weight_decay_skipped": self.normalized,  # normalised layers: no weight decay in their σ
            "fisher_samples": cfg.fisher_samples, "query_checkpoint": final.key,
            "fisher_samples_used": [st["fisher_samples"] for st in self.seg_state],  # 0: exact over classes
            "factor_rows_per_point": [st["point_rows"] for st in self.seg_state],
            "grad_precision": cfg.grad_precision,
            "damping": [st["damping"] for st in self.seg_state],
            **({"damping_rule": self.damping_rules} if self.damping_rules else {}),
            "adam_preconditioned": [st["sqrtP"] is not None for st in self.seg_state],
            "sigma_mean": [st["sigma_mean"] for st in self.seg_state],
        })
        if distributed.active():  # which rank computed how many training gradients (resumed runs: new ones)
            self.meta["distributed"] = {**distributed.describe(),
                                        "gradient_rows": distributed.per_rank(self._gradient_rows)}

    def _factor_products(self, cfg: EngineConfig, n_params: int) -> torch.dtype | None:
        """bfloat16 where the factor passes multiply in it (setting factor_products), else None (float32)."""
        if cfg.factor_products == "bfloat16":
            return torch.bfloat16
        if (cfg.factor_products == "auto" and str(self.device) == "cpu" and bfloat16_products()
                and n_params >= BF16_SELF_WALK_MIN_PARAMS):
            return torch.bfloat16
        return None

    def _segment_models(self, project: Project, seg: Segment) -> list[tuple[str, torch.nn.Module, dict | None]]:
        """(digest, model, optimizer state) for each point where the segment's factors are fitted."""
        cks = seg.checkpoints
        m = self.cfg.max_checkpoints_per_segment
        if m > 0 and len(cks) > m:
            cks = [cks[int(i)] for i in np.linspace(0, len(cks) - 1, m).round()]
        if self.cfg.fast:
            states = [project.load_state(c) for c in cks]
            avg = {}
            for key in states[0]:
                t = states[0][key]
                avg[key] = torch.stack([s[key].double() for s in states]).mean(0).to(t.dtype) if t.is_floating_point() else states[-1][key]
            model = project.build_model()
            model.load_state_dict(avg)
            opt = self._mean_optimizer_state(project, cks)
            return [(cv.tensor_digest(avg), model.eval(), opt)]
        out = []
        for c in cks:
            state = project.load_state(c)
            model = project.build_model()
            model.load_state_dict(state)
            out.append((cv.tensor_digest(state), model.eval(), self._mean_optimizer_state(project, [c])))
        return out

    def _mean_optimizer_state(self, project: Project, cks: list[Checkpoint]) -> dict | None:
        """Mean Adam preconditioner P = 1/(√v̂ + ε) per parameter, or None (not Adam / not saved)."""
        if not self.cfg.adam_preconditioning or any(c.optimizer != "adam" for c in cks):
            return None
        acc: dict[str, torch.Tensor] = {}
        for c in cks:
            if c.optimizer_state is None or not c.optimizer_state.is_file():
                return None
            st = load_file(str(c.optimizer_state))
            for name in self.param_names:
                v = st.get(f"{name}.exp_avg_sq")
                step = st.get(f"{name}.step")
                if v is None:
                    return None
                t = float(step.reshape(-1)[0]) if step is not None else float(c.step)
                P = 1.0 / adam_denominator(v, t)
                acc[name] = acc.get(name, 0) + P / len(cks)
        return acc

    def _fit_segment(self, project: Project, seg: Segment) -> dict:
        cfg = self.cfg
        ds = project.train_dataset
        rows = seg.rows
        fit_rows = rows
        if cfg.fit_rows > 0 and len(rows) > cfg.fit_rows:
            rng = np.random.default_rng(cfg.seed + 7919 * seg.index)
            fit_rows = np.sort(rng.choice(rows, cfg.fit_rows, replace=False))
        points = self._segment_models(project, seg)
        shares = point_shares(fit_rows, len(points), cfg.point_rows, cfg.seed + 7919 * seg.index)
        tag = f"segment {seg.index + 1}/{len(self.segments)}"
        # chosen on the segment's rows, not a point's share: splitting must not switch on the exact (per-class) fit
        samples = cv.fisher_samples_for(cfg.fisher_samples, len(fit_rows), project.num_classes)
        base_key = {"samples": samples, "seed": cfg.seed, "layers": [L.name for L in self.layers_template],
                    # sampled labels are inverse-CDF draws fixed per row (cv.fisher_uniforms) since EK-FAC v9;
                    # the exact expectation (samples 0) has no draws and keeps its caches
                    **({"labels": "icdf"} if samples != 0 else {}),
                    **({"products": "bfloat16"} if self.factor_products is not None else {})}
        # 1. covariances per point (cached per checkpoint and rows), averaged over the segment
        covs, labels = [], []
        for j, (digest, model, _) in enumerate(points):
            self.progress(f"{tag}: covariances", j, len(points))
            self._check_cancel("fit")
            layers, _ = cv.curvature_layers(model, self.tracked)
            # the label seed follows the weights, so the same checkpoint gets the same factors in every run
            lab_seed = int(stable_hash({"seed": cfg.seed, "w": digest}, 12), 16)
            path = self.factor_dir / f"cov-{stable_hash({**base_key, 'rows': cv.rows_digest(shares[j]), 'w': digest})}.safetensors"
            cov = cv.load_tensors(path)
            lab = None  # (labels, weights); None: labelled later, and only if the eigenvalues need them
            if not distributed.agree(cov is not None):  # under torchrun: fitted over every rank's share
                xf = ds.x[torch.as_tensor(shares[j])]  # one point's rows at a time (shares may each be every row)
                cov, *lab = cv.fit_covariances_sampled(model, layers, xf, samples, lab_seed, device=self.device,
                                                       products=self.factor_products)
                del xf
                if distributed.is_main():
                    cv.save_tensors(path, cov, {"checkpoint_digest": digest})
            labels.append(lab or lab_seed)  # a seed, not the rows: no copy of the rows held across the points
            covs.append(cov)
        mean_cov = {k: sum(c[k] for c in covs) / len(covs) for k in covs[0]}
        basis = cv.eigenbasis(mean_cov, self.layers_template)
        bdig = cv.tensor_digest(basis)
        # Adam preconditioner (mean over the segment)
        sqrtP = None
        opt_states = [o for _, _, o in points]
        if all(o is not None for o in opt_states) and opt_states:
            P = {n: sum(o[n] for o in opt_states) / len(opt_states) for n in self.param_names}
            sqrtP_flat = self.blocks.to_layers(self.blocks.layout.flatten(P, ()))
            sqrtP = [t.sqrt() for t in sqrtP_flat]
        # 2. eigenvalues refit at each point in the shared basis, averaged
        lam_sum = None
        for j, (digest, model, _) in enumerate(points):
            self.progress(f"{tag}: eigenvalues", j, len(points))
            self._check_cancel("fit")
            layers, _ = cv.curvature_layers(model, self.tracked)
            scale = None if sqrtP is None else {L.name: s for L, s in zip(layers, sqrtP)}
            pkey = {**base_key, "rows": cv.rows_digest(shares[j]), "w": digest, "basis": bdig,
                    "adam": None if scale is None else cv.tensor_digest(scale)}
            path = self.factor_dir / f"lambda-{stable_hash(pkey)}.safetensors"
            lam = cv.load_tensors(path)
            if not distributed.agree(lam is not None):
                xf = ds.x[torch.as_tensor(shares[j])]
                if isinstance(labels[j], int):  # the covariances came from the cache: label this point's rows now
                    labels[j] = cv.fisher_targets(model, xf, samples, seed=labels[j], device=self.device)
                lam = cv.fit_eigenvalues(model, layers, xf, labels[j][0], basis, labels[j][1], scale=scale,
                                         device=self.device, products=self.factor_products)
                del xf
                if distributed.is_main():
                    cv.save_tensors(path, lam, {"checkpoint_digest": digest, "basis_digest": bdig})
            lam_sum = lam if lam_sum is None else {k: lam_sum[k] + lam[k] for k in lam}
        lam_mean = [lam_sum[f"{L.name}.lambda"] / len(points) for L in self.layers_template]
        sigma = [l + wd for l, wd in zip(lam_mean, self.wd_per_layer)]
        # 3. curvature functions
        damping = None
        if cfg.response == "inverse":
            damping = self._layer_damping(project, seg, sigma, len(fit_rows))
            Fv = [cv.damped_inverse(s, d) for s, d in zip(sigma, damping)]
            Sv = [torch.ones_like(s) for s in sigma]
        else:
            Fv = [cv.response(s, seg.c) for s in sigma]
            Sv = [cv.propagation(s, seg.c) for s in sigma]
        # 4. training-loss gradients of the segment's rows, averaged over its points, projected, into
        # an on-disk store written block by block (a stopped fit resumes; under torchrun each rank
        # writes its own blocks) and read back block by block when scoring
        # in the shared store folder: runs that differ only in the damping or the response reuse it
        # (keyed by the method and its gradients_version too, so a version whose gradients changed never reads
        # an older store)
        gkey = stable_hash({"points": [d for d, _, _ in points], "rows": cv.rows_digest(rows), "data": project.data_hash(),
                            "method": self.name, "v": self.gradients_version or self.version,
                            "proj": self.projector.describe(), "seed": cfg.seed, "params": self.param_names,
                            **({"precision": cfg.grad_precision, "pass": LOW_PRECISION_PASS}
                               if cfg.grad_precision != "float32" else {}),
                            **({"dtype": cfg.gradient_dtype} if cfg.gradient_dtype != "float32" else {})})

        def open_store() -> ChunkedArray:
            return ChunkedArray(self.store_dir / f"grads_{gkey}", len(rows), GRADIENT_BLOCK_ROWS,
                                meta={"gradients": gkey}, width=self.projector.out_dim, dtype=cfg.gradient_dtype)

        gbar = open_store() if distributed.is_main() else None
        distributed.barrier()
        gbar = gbar or open_store()
        mine = distributed.my_share(distributed.agree(gbar.missing_chunks()))
        computers = [GradientComputer(model, tracked=self.param_names, device=self.device,
                                      memory_budget_mb=GRADIENT_BATCH_MB, precision=cfg.grad_precision)
                     for _, model, _ in points]
        factors = {"QS": [basis[f"{L.name}.QS"] for L in self.layers_template],
                   "QA": [basis[f"{L.name}.QA"] for L in self.layers_template], "F": Fv, "S": Sv, "sqrtP": sqrtP}
        walk = self._walk_factors(dict(factors))
        # Self-influence in this pass: with one segment the query's walk is one step, and when a point is the
        # query checkpoint its loss gradients come as −(1 − p_y)·∇f (GradientComputer.margin_and_loss_scale),
        # so the margin gradients the self-scores need cost no second gradient pass over the training set
        # (a separate pass was a third of a one-point EK-FAC fit-and-score). Rows this fit does not compute
        # (a store another run wrote) are left to self_scores().
        digests = [d for d, _, _ in points]
        fused = len(self.segments) == 1 and self._final_digest in digests
        final_j = digests.index(self._final_digest) if fused else -1
        self_vals, self_known = np.zeros(len(ds)), np.zeros(len(ds), bool)
        unprojected = isinstance(self.train_projector, IdentityProjector)
        one_point = len(points) == 1 and unprojected
        # The self-influence walk of the training rows in bfloat16 where the CPU multiplies it natively (AMX,
        # AVX-512 BF16; as the scores' products): its rotations are the fit's largest GEMMs after the gradients
        # themselves, 2.4x faster so (1,024 rows of the 5,000-image benchmark CNN: 1.25 -> 0.51 s). The
        # rotated entries are off by ~0.4%, but each self-score sums ~10^5 of them: at most 4e-4 of the largest
        # self-score there, Spearman 0.9999995, the same 50 most negative rows. The query walk stays float32
        # (its vector is multiplied into every score, and a chained walk compounds the rounding).
        # Only for models of at least BF16_SELF_WALK_MIN_PARAMS covered parameters: below that the walk is cheap
        # and a self-score sums too few entries for their roundings to average out.
        self._self_walk_dtype = ("bfloat16" if fused and self.bf16_products and self.blocks.layout.n >= BF16_SELF_WALK_MIN_PARAMS
                                 else "float32")  # the walk runs on the host CPU whatever the device
        walk_self = walk if self._self_walk_dtype == "float32" else self._walk_factors(dict(factors), torch.bfloat16)
        walk_rows = self._walk_rows(self.blocks.layout.n)  # host copies of ∇f walked at a time (bytes-bounded)
        total = sum(gbar.chunk_bounds(c)[1] - gbar.chunk_bounds(c)[0] for c in mine)
        done = 0
        # rows per part of a chunk held in memory (a whole [1,024, p] float32 chunk was the fit's peak)
        part = max(GRADIENT_PART_MIN_ROWS, GRADIENT_PART_BYTES // (4 * max(1, self.projector.out_dim)))
        # One float32 block (and walked block) for every part: a fresh 64 MiB tensor is mapped anew by the
        # allocator and page-faulted in, 14 ms against 1.3 ms to zero a used one (1.1 s of a 27 s 5-point fit
        # at 5,000 images). Only where the writer is handed a bfloat16 copy: a float32 store writes the block
        # itself while the next part is computed.
        reuse = cfg.gradient_dtype == "bfloat16"
        block_buf = torch.empty(min(part, len(rows)), self.projector.out_dim) if reuse else None
        walked_buf = torch.empty(min(part, len(rows)), self.projector.out_dim) if fused and not one_point else None
        with BackgroundWriter() as writer:  # in order, so a chunk is marked done after its rows are on disk
            for c in mine:
                self._check_cancel("fit")
                lo, hi = gbar.chunk_bounds(c)
                for a in range(lo, hi, part):
                    self.progress(f"{tag}: training gradients", done, total)
                    b = min(hi, a + part)
                    sel = torch.as_tensor(rows[a:b])
                    xs, ys = ds.x[sel], ds.y[sel]
                    # float32, like the store
                    block = block_buf[:b - a].zero_() if reuse else torch.zeros(b - a, self.projector.out_dim)
                    walked = walked_buf[:b - a] if walked_buf is not None else None  # every row is set below
                    part_self = torch.zeros(b - a, dtype=torch.float64) if fused else None
                    for j, comp in enumerate(computers):
                        if j != final_j:
                            if unprojected:  # added into the block layer by layer (on the CPU)
                                comp.accumulate(xs, ys, "loss", into=block, alpha=1.0 / len(points))
                                continue
                            for blo, bhi, g in comp.iter_batches(xs, ys, "loss", then=self.train_projector.project):
                                block[blo:bhi].add_(g.float().cpu(), alpha=1.0 / len(points))
                            continue
                        # unprojected: −(1 − p)·∇f/points added straight into the block (no [b, p] loss-gradient temporary)
                        for blo, bhi, (g, m, one_minus_p) in comp.iter_margin_and_loss_scale(
                                xs, ys, then=self.train_projector.project, loss=not unprojected):
                            if g is None:
                                block[blo:bhi].addcmul_(m.float().cpu(), one_minus_p.float().cpu()[:, None],
                                                        value=-1.0 / len(points))
                            else:
                                block[blo:bhi].add_(g.float().cpu(), alpha=1.0 / len(points))
                            one_minus_p = one_minus_p.detach().cpu().double()
                            for w0 in range(0, bhi - blo, walk_rows):
                                w1 = min(bhi - blo, w0 + walk_rows)
                                V = self.blocks.to_layers(m[w0:w1].detach().to("cpu", walk_self["dtype"]))
                                if one_point:
                                    # ḡ = −(1 − p)∇f: −(1/N) walk(∇f)ᵀ ḡ = ((1 − p)/N) Σ F ⊙ r², r the rotated ∇f
                                    quad = sum((w_F * r.float() * r.float()).sum((1, 2)).double() for w_F, r in
                                               zip(walk["F"], (self._rotated(walk_self, l, v) for l, v in enumerate(V))))
                                    part_self[blo + w0:blo + w1] = quad * one_minus_p[w0:w1] / len(rows)
                                else:
                                    self._respond_one(walk_self, V, out=walked[blo + w0:blo + w1]).mul_(-1.0 / len(rows))
                            del m
                    if cfg.gradient_dtype == "bfloat16":
                        # rounded as the store keeps them: the walked self-scores below then equal the scores'
                        # diagonal, and a float32 value beyond bfloat16's largest (3.39e38) shows as inf here
                        block = block.bfloat16()
                    if not all_finite(block):
                        raise ProponentError(f"{self.name}: non-finite training gradients in {tag}; the checkpoints may "
                                             f"have diverged")
                    if walked is not None:  # a bfloat16 block is widened exactly
                        for r0 in range(0, b - a, SELF_DOT_ROWS):  # a few rows at a time: no [part, p] temporary
                            r1 = min(b - a, r0 + SELF_DOT_ROWS)
                            part_self[r0:r1] += (walked[r0:r1] * block[r0:r1]).sum(1).double()
                    # written while the next part is computed (the block is not touched again here)
                    if block.dtype == torch.bfloat16:
                        writer.submit(gbar.write_bfloat16_rows, c, a - lo, block.view(torch.int16).numpy())
                    else:
                        writer.submit(gbar.write_rows, c, a - lo, block.numpy())
                    if fused:
                        self_vals[rows[a:b]] = part_self.numpy()
                        self_known[rows[a:b]] = True
                    done += b - a
                writer.submit(gbar.mark_done, c)  # after its rows: a run stopped inside the chunk rewrites all of it
        self._gradient_rows += done
        if fused:  # each rank computed its own chunks' self-scores
            if distributed.active():
                self_vals = distributed.sum_array(self_vals)
                self_known = distributed.sum_array(self_known.astype(np.float64)) > 0
            in_fit = int(self_known.sum())
            self_known[np.setdiff1d(np.arange(len(ds)), rows)] = True  # rows outside the segment: no term
            self._fused_self = (self_vals, self_known, in_fit)
        distributed.barrier()  # every rank's blocks are on disk before anyone reads the store
        self.progress(f"{tag}: done", len(points), len(points))
        pos = np.full(len(ds), -1, np.int64)
        pos[rows] = np.arange(len(rows))
        return {"walk": walk, "fisher_samples": samples, "point_rows": [len(r) for r in shares], "QA": [basis[f"{L.name}.QA"] for L in self.layers_template],
                "QS": [basis[f"{L.name}.QS"] for L in self.layers_template],
                "F": Fv, "S": Sv, "sigma": sigma, "damping": damping, "sqrtP": sqrtP,
                "gbar": gbar, "rows": rows, "pos": pos, "n_rows": len(rows),
                "sigma_mean": float(np.mean([float(s.mean()) for s in sigma]))}

    def _layer_damping(self, project: Project, seg: Segment, sigma: list[torch.Tensor], n_fit: int = 0) -> list[float]:
        """λ per layer of the inverse response 1/(σ + λ): ``damping`` when given; else damping_ratio × the
        layer's mean σ, raised to damping_scale / τ (τ: the training time of the segment's last checkpoint,
        engine.methods.schedule.training_time) on layers whose scale the loss sees (rule 'auto').

        Why the floor: gradient descent run for a time τ has fitted only the directions whose curvature
        exceeds about 1/τ, so a removed row cannot move the model further than that along flatter ones
        (the ridge TRAK's training-time rule uses, engine/methods/trak.py). The ratio alone left a
        3-epoch run 0.26 LDS below the floor's; on BatchNorm-normalised convolutions the floor cost 0.03 to
        0.09, so those keep the ratio (docs/bench/lds-damping-ekfac.json), times min(1, (normalized_damping_rows
        / n)²) for n fitted rows: large sets want less damping there (docs/bench/lds-damping-normalized.json).
        Where τ is unknown (final weights only, L-BFGS) there is no floor: the ratio, with the normalised
        layers' shrink (docs/bench/lds-damping-weights-only.json)."""
        cfg = self.cfg
        if cfg.damping >= 0:
            self.damping_rules.append({"rule": "given"})
            return [float(cfg.damping)] * len(sigma)
        ratio = [cfg.damping_ratio * float(s.mean()) for s in sigma]
        if cfg.damping_rule != "auto":
            self.damping_rules.append({"rule": "ratio"})
            return ratio
        # normalised layers: the ratio, falling as (normalized_damping_rows / n)² above that many fitted rows
        # (measured on BatchNorm CNNs of 1,000-20,000 images: docs/bench/lds-damping-normalized.json)
        shrink = min(1.0, (cfg.normalized_damping_rows / n_fit) ** 2) if cfg.normalized_damping_rows > 0 and n_fit else 1.0
        shrunk = {"normalized_shrink": shrink} if shrink != 1.0 and self.scale_invariant else {}
        tau = training_time(project, seg.checkpoints[-1], self.param_names)
        floor = cfg.damping_scale / tau if tau else 0.0  # no floor without a training time; the shrink stays
        out = [r * shrink if L.name in self.scale_invariant else max(r, floor)
               for L, r in zip(self.layers_template, ratio)]
        if not tau:
            self.damping_rules.append({"rule": "ratio", **shrunk})
            return out
        self.damping_rules.append({"rule": "training time", "tau": tau, "floor": floor,
                                   "floored": [L.name for L, r, d in zip(self.layers_template, ratio, out) if d > r],
                                   **shrunk})
        return out

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def _walk_factors(st: dict, dtype: torch.dtype | None = None) -> dict:
        """The segment's basis and curvature functions in ``dtype`` (default WALK_DTYPE; converted once, not per
        block)."""
        dtype = dtype or WALK_DTYPE
        w = st.get("walk")
        if w is None or w["dtype"] != dtype:
            dt = dtype
            sqrtP = st["sqrtP"]
            w = st["walk"] = {
                "dtype": dt, "QS": [q.to(dt) for q in st["QS"]], "QA": [q.to(dt) for q in st["QA"]],
                "F": [h.to(dt) for h in st["F"]], "S": [h.to(dt) for h in st["S"]],
                "sqrtP": None if sqrtP is None else [t.to(dt) for t in sqrtP],
                # S ≡ 1 (EK-FAC's inverse response): the walk carries v on unchanged
                "S_one": all(bool((h == 1).all()) for h in st["S"])}
        return w

    @staticmethod
    def _rotated(w: dict, l: int, v: torch.Tensor) -> torch.Tensor:
        """Layer l of a gradient in the segment's eigenbasis: Q_Sᵀ (√P ⊙ v) Q_A."""
        sp = w["sqrtP"][l] if w["sqrtP"] is not None else None
        return cv.rotate(v if sp is None else v * sp, w["QS"][l], w["QA"][l])

    @staticmethod
    def _unrotated(w: dict, l: int, r: torch.Tensor) -> torch.Tensor:
        """Back from the eigenbasis: √P ⊙ Q_S r Q_Aᵀ."""
        u = cv.unrotate(r, w["QS"][l], w["QA"][l])
        return u if w["sqrtP"] is None else u * w["sqrtP"][l]

    def _respond_one(self, w: dict, V: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """One segment's response to per-layer gradients V, flat and projected (√P F(√P H √P) √P v), float32;
        ``out``: written into it (unprojected: straight from the layers, no flat copy in the walk's dtype)."""
        U = [self._unrotated(w, l, w["F"][l] * self._rotated(w, l, v)) for l, v in enumerate(V)]
        if out is not None and isinstance(self.projector, IdentityProjector):
            return self.blocks.to_flat(U, out=out)
        flat = self.projector.project(self.blocks.to_flat(U).float()).float()
        return flat if out is None else out.copy_(flat)

    def _walk(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """u_ℓ (flat, projected, already scaled by −1/N_ℓ, float32) for each segment, walking back from the query."""
        V = self.blocks.to_layers(flat.detach().to("cpu", WALK_DTYPE))
        us: list[torch.Tensor | None] = [None] * len(self.seg_state)
        for li in range(len(self.seg_state) - 1, -1, -1):
            st = self.seg_state[li]
            w = self._walk_factors(st)
            if li == 0:  # the earliest segment's v is not needed afterwards
                us[li] = self._respond_one(w, V) * (-1.0 / st["n_rows"])
                break
            U, Vn = [], []
            for l, v in enumerate(V):
                r = self._rotated(w, l, v)
                U.append(self._unrotated(w, l, w["F"][l] * r))
                if w["S_one"]:
                    Vn.append(v)  # Q_S (1 ⊙ Q_Sᵀ v' Q_A) Q_Aᵀ = v', and v'/√P = v
                else:
                    vn = cv.unrotate(w["S"][l] * r, w["QS"][l], w["QA"][l])
                    Vn.append(vn if w["sqrtP"] is None else vn / w["sqrtP"][l])
            us[li] = self.projector.project(self.blocks.to_flat(U).float()).float() * (-1.0 / st["n_rows"])
            V = Vn
        return us

    def _walk_rows(self, n_params: int | None = None) -> int:
        item = torch.empty((), dtype=WALK_DTYPE).element_size()
        p = self.query_computer.n_params if n_params is None else n_params
        return max(1, min(1024, WALK_BLOCK_BYTES // (item * max(1, p))))

    def _query_grads(self, x: torch.Tensor, y: torch.Tensor):
        """(lo, hi, gradients) in blocks that _walk can take: it holds a few WALK_DTYPE copies of [rows, p]
        on the host, so rows are bounded by bytes (on a GPU one batch was all 5,000 training rows: 21 GB
        of RSS), while the device still computes gradients in its own, larger batches."""
        rows = self._walk_rows()
        for lo, hi, g in self.query_computer.iter_batches(x, y, "margin"):
            for a in range(lo, hi, rows):
                yield a, min(hi, a + rows), g[a - lo:min(hi, a + rows) - lo]

    def _walked_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16_products else torch.float32  # the walked queries, as multiplied

    def _store_parts(self, st: dict):
        """(lo, hi, rows) of a segment's stored training gradients, a part of a chunk at a time, in the dtype
        the walked queries are multiplied in. A part of a bfloat16 store is valid until the next is asked for (one
        read buffer per store, and one float32 buffer where it is widened)."""
        if self.bf16_products:
            return st["gbar"].iter_bfloat16(max_bytes=SCORE_READ_BYTES, reuse=True)
        # float32 product (torch's GEMM, on the threads torch was given)
        if st["gbar"].dtype_name == "bfloat16":
            return self._widened_parts(st["gbar"])
        return ((lo, hi, torch.from_numpy(c)) for lo, hi, c in st["gbar"].iter_chunks(max_bytes=SCORE_READ_BYTES))

    @staticmethod
    def _widened_parts(gbar):
        """A bfloat16 store's parts widened into one reused float32 buffer, for a CPU without bfloat16 GEMMs:
        numpy's shift into a fresh array per part took 17 ms a 64 MiB part on the 5,000-image benchmark
        (1.0 s of its scoring with AVX-512 and AMX turned off), torch's copy into a used buffer 4 ms."""
        buf = None
        for lo, hi, part in gbar.iter_bfloat16(max_bytes=SCORE_READ_BYTES // 2, reuse=True):  # as many rows as before
            if buf is None:  # the first part is the largest
                buf = torch.empty(part.shape, dtype=torch.float32)
            yield lo, hi, buf[:hi - lo].copy_(part)

    def score_columns(self, queries="test"):
        """Every query walked first, then one pass over the stored training gradients: column blocks
        S[:, part] = Σ_segments U_ℓ G_ℓ[part]ᵀ. Query blocks (score_blocks) read the whole store once per
        block, and a block holds at most SCORE_BLOCK_BYTES of float64 scores: 5 reads of the 3.6 GB store
        for 500 queries at 20,000 training images. None (query blocks) where the walked queries would pass
        SCORE_PASS_BYTES, or where a segment does not store every training row in order (a multi-stage
        run's segments: their columns differ)."""
        q = self._queries(queries)
        n = len(self._p.train_dataset)
        width = max(1, self.projector.out_dim)
        dtype = self._walked_dtype()
        if len(q) * dtype.itemsize * width * len(self.seg_state) > SCORE_PASS_BYTES:
            return None
        if not all(st["n_rows"] == n and np.array_equal(st["rows"], np.arange(n)) for st in self.seg_state):
            return None
        U = [torch.empty(len(q), width, dtype=dtype) for _ in self.seg_state]
        stage = "score: test queries walked"  # its own stage: their gradients and walk, before the store is read
        for lo, hi, g in self._query_grads(q.x, q.y):
            self._check_cancel("scoring")
            self.progress(stage, lo, len(q))
            for s_i, u in enumerate(self._walk(g)):
                U[s_i][lo:hi] = u
        self.progress(stage, len(q), len(q))

        def columns():
            # every segment's store has the same rows and width, so the same parts
            for parts in zip(*(self._store_parts(st) for st in self.seg_state)):
                self._check_cancel("scoring")
                lo, hi = parts[0][0], parts[0][1]
                if any((glo, ghi) != (lo, hi) for glo, ghi, _ in parts):
                    raise RuntimeError(f"{self.name}: segment stores split rows differently")
                for a, b in self._column_slices(lo, hi, len(q)):
                    block = np.zeros((len(q), b - a))
                    for u, (_, _, chunk) in zip(U, parts):
                        block += (u @ chunk[a - lo:b - lo].T).float().numpy()  # summed in float64, as scores() does
                    yield a, b, block

        return columns()

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        n = len(self._p.train_dataset)
        out = np.zeros((len(q), n))
        # walked blocks are written into one buffer per segment (up to SCORE_PASS_BYTES in all) and
        # scored in one pass over the store
        width = max(1, self.projector.out_dim)
        walk_rows = self._walk_rows()
        dtype = self._walked_dtype()
        cap = max(walk_rows, SCORE_PASS_BYTES // (dtype.itemsize * width * len(self.seg_state)))
        cap = max(1, min(cap, len(q)))
        U = [torch.empty(cap, width, dtype=dtype) for _ in self.seg_state]
        # where a segment's store rows are a range, its first row: its columns are then a slice (no gather and scatter)
        first = [int(r[0]) if len(r) and np.array_equal(r, np.arange(r[0], r[0] + len(r))) else None
                 for r in (st["rows"] for st in self.seg_state)]
        start, filled = 0, 0

        def flush():
            if not filled:
                return
            for s_i, st in enumerate(self.seg_state):
                # the training side streamed from disk, a part of a chunk at a time
                for glo, ghi, chunk in self._store_parts(st):
                    prod = (U[s_i][:filled] @ chunk.T).float().numpy()  # summed in float64
                    cols = st["rows"][glo:ghi] if first[s_i] is None else slice(first[s_i] + glo, first[s_i] + ghi)
                    out[start:start + filled, cols] += prod

        for lo, hi, g in self._query_grads(q.x, q.y):
            self._check_cancel("scoring")
            if filled and filled + (hi - lo) > cap:
                flush()
                start, filled = lo, 0
            for s_i, u in enumerate(self._walk(g)):
                U[s_i][filled:filled + hi - lo] = u
            filled += hi - lo
        flush()
        return out

    def self_scores(self) -> np.ndarray:
        if self._self is None:
            n = len(self._p.train_dataset)
            out = np.zeros(n)
            todo = np.arange(n)
            in_fit = 0
            if self._fused_self is not None:  # computed in the fit's training-gradient pass
                vals, known, in_fit = self._fused_self
                out[known] = vals[known]
                todo = np.flatnonzero(~known)
            if len(todo):
                self._self_scores_by_walk(todo, out)
            self.meta["self_influence_rows_in_fit"] = in_fit  # the rest were walked here (or have no term)
            self._self = out
        return self._self.copy()

    def _self_scores_by_walk(self, idx_all: np.ndarray, out: np.ndarray) -> None:
        """Self-scores of training rows ``idx_all`` from a pass of their margin gradients at the query
        checkpoint, walked and dotted with the stored training gradients (into ``out``)."""
        ds = self._p.train_dataset
        every = len(idx_all) == len(ds)  # then the dataset itself, read batch by batch as it streams
        for c0 in range(0, len(idx_all), len(ds) if every else SELF_ROWS_PER_READ):
            part = idx_all[c0:c0 + SELF_ROWS_PER_READ] if not every else idx_all
            sel = torch.as_tensor(part)
            xs, ys = (ds.x, ds.y) if every else (ds.x[sel], ds.y[sel])  # a subset: a bounded number of rows at a time
            for lo, hi, g in self._query_grads(xs, ys):
                self._check_cancel("self-influence")
                idx = part[lo:hi]
                for st, u in zip(self.seg_state, self._walk(g)):
                    pos = st["pos"][idx]
                    ok = pos >= 0
                    if ok.any():
                        # row-wise products in float32 (torch's pairwise sum), added in float64
                        rows = torch.from_numpy(st["gbar"].read_rows(pos[ok]))
                        out[idx[ok]] += (u[torch.from_numpy(ok)] * rows).sum(1).double().numpy()


@dataclasses.dataclass
class SourceSettings(DampingRatioSettings, CurvatureSettings, TrajectorySettings):  # damping fields listed last
    """Source: the shared curvature settings, how the trajectory is cut and walked, and (with
    response='inverse') EK-FAC's damping rule."""


@register
class Source(CurvatureInfluence):
    name = "source"
    requires = frozenset({"trajectory"})
    label = "Source"
    description = ("Approximate unrolled differentiation over the recorded trajectory (Bae et al., 2024): EK-FAC per "
                   "segment with training-derived response functions. Suited to non-converged and multi-stage training.")
    Settings = SourceSettings
    # v12: bfloat16 factor products where the CPU multiplies bfloat16 natively (factor_products, as EK-FAC v14);
    # v11: with response='inverse', the normalised-layer shrink also where τ is unknown (as EK-FAC v12);
    # v10: with response='inverse', EK-FAC v11's normalised-layer damping (normalized_damping_rows)
    # v9: training gradients stored in bfloat16 (gradient_dtype, as EK-FAC v10), keyed by their dtype; the damping
    # rule's settings exposed (damping_ratio, damping_rule, damping_scale: response='inverse' only)
    # v8: with response='inverse', EK-FAC's training-time damping floor (damping_rule 'auto'); stores as v7's
    # v7: a segment's checkpoints fit its factors on shares of the rows (point_rows=-1, at least 1,024 per point);
    # v6: no weight decay in the σ of normalised layers (weight_decay_on_normalized=False);
    # v5: one sampled Fisher label above 1,024 training rows (fisher_samples=-1); v4: curvature products and
    # the walk in float32, summed in float64; v3: unprojected up to 2^31 stored
    # entries (streamed); v2: unprojected while they fit in memory (v1
    # projected to 2048 above 8,192 parameters)
    version = "12"
    gradients_version = "7"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**settings_dict(self.settings))

    @classmethod
    def supports(cls, project):
        if unmet := super().supports(project):
            return unmet
        cks = project.checkpoints
        if cks and all(c.optimizer == "lbfgs" for c in cks):
            return "trained with L-BFGS (no step-wise trajectory); use ekfac"
        return None
