"""TRAK: Tracing with the Randomly-projected After Kernel (Park et al., 2023).

Per model m: φ_i = Pᵀ∇f(z_i) (margin gradients, projected), Ψ_m = Φ_m (Φ_mᵀΦ_m + λI)⁻¹,
S_m[q, i] = φ_q · Ψ_m[i]; then S = mean_m S_m ⊙ mean_m Q with Q_i = 1 − p(y_i | x_i).

Memory is bounded by the chunk size, not by n: when k ≤ n, ΦᵀΦ (k×k) is accumulated chunk by
chunk from the on-disk feature store and M = (ΦᵀΦ + λI)⁻¹ is solved once; Ψ is never formed,
since S[q, i] = (φ_q M) · φ_i streams over training chunks. When k > n (small n), the n×n form
(push-through identity Φ(ΦᵀΦ + λI)⁻¹ = (ΦΦᵀ + λI)⁻¹Φ) is used with Ψ in memory.

λ is never left at 0 (ΦᵀΦ is singular whenever k > n). By default (damping_rule "auto") it is the
ridge that the training run itself implies: gradient descent on the mean loss for a time
τ = Σ_t η_t/(1 − β) fits the directions of the linearised model whose curvature (1/n)·w̄·σ(ΦᵀΦ)
exceeds about 1/τ, as a ridge of n/(w̄ τ) would (w̄ = mean p(1 − p), the margin's loss curvature).
λ = damping_scale × n/(w̄ τ), per ensemble member from its own checkpoint's τ. Measured on ten
validation projects (docs/bench/lds-damping.json): the old fixed ratio's best value ran from 0.1
(BatchNorm CNNs) to ≥ 100 (digits trained 3 epochs at lr 0.01, noisy labels); the training-time rule
with one scale (3) came within 0.03 of each project's best ratio and above the old default on all
nine SGD projects (+0.022 to +0.170), and on the held-out 20,000-image benchmark.
Adam (v7): preconditioned gradient descent, so τ = Σ_t η_t / s̄_t with s̄ the mean of √v̂ + ε in the
saved optimizer state (engine.methods.schedule.training_time), and its own scale
(damping_scale_adam = 10, docs/bench/lds-damping-adam.json). Where τ is unknown (weights only,
L-BFGS, Adam without saved states), λ = damping_ratio × the mean non-zero eigenvalue.
Self-influence (triage) keeps the ratio rule's kernel, which ranked flipped labels better.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg
import torch

from engine.autodiff import distributed
from engine.autodiff.factorized import FactorizedGradients, auto_projection
from engine.autodiff.features import checkpoint_feature_store, margin_scale_store, project_gradients
from engine.autodiff.functional import FunctionalModel, TrackedParameters
from engine.autodiff.per_example import LOW_PRECISION_PASS
from engine.autodiff.projection import projector_kind
from engine.autodiff.measurement import correct_class_margin
from engine.methods.base import Attributor, register, setting
from engine.methods.schedule import training_time
from engine.methods.settings import PROJECTIONS, GradientPrecisionSettings, ProjectionSettings
from engine.storage.arrays import atomic_save_npy, read_cached_npy, stable_hash


@dataclasses.dataclass
class TrakSettings(ProjectionSettings, GradientPrecisionSettings):
    ensemble: str = setting("auto", "Which checkpoints form the ensemble: 'auto' (final checkpoint of every independently "
                                     "trained model, or the last checkpoints of a single run), 'models', 'checkpoints', 'final'.",
                            choices=("auto", "models", "checkpoints", "final"))
    max_models: int = setting(0, "Use at most this many ensemble members (0: all).", ge=0)
    projection: str = setting("auto", "Random projection: auto (factorized where Linear, Conv2d and Embedding layers "
                                      "hold ≥ 90% of the tracked parameters; else rademacher, sjlt beyond 2^28 "
                                      "entries), rademacher, gaussian, sjlt, factorized (per layer, P_out ⊗ P_in before "
                                      "the outer product, as LoGra does; an embedding sketched from its nonzero rows; "
                                      "other parameters left out) or none.", choices=PROJECTIONS)
    damping: float = setting(-1.0, "Ridge λ added to ΦᵀΦ; -1 chooses it by damping_rule.", ge=-1)
    damping_rule: str = setting("auto", "With damping = -1: 'auto' sets λ = damping_scale × n / (w̄ τ), the ridge that "
                                        "the training time implies (SGD: τ = Σ learning rates / (1 − momentum) up to the "
                                        "member's checkpoint; Adam: Σ learning rates / mean(√v̂ + ε) of the saved "
                                        "optimizer states, with damping_scale_adam; w̄ = mean p(1 − p) of the correct "
                                        "class), where τ is known (a recorded trajectory), else damping_ratio × mean "
                                        "eigenvalue; 'ratio' always uses the ratio.", choices=("auto", "ratio"))
    # 3: best mean LDS over the nine SGD validation projects of docs/bench/lds-damping.json, and every
    # leave-one-project-out choice among 0.3–30 (the 20,000-image benchmark was held out)
    damping_scale: float = setting(3.0, "With damping_rule 'auto', SGD: the multiple of n / (w̄ τ).", gt=0)
    # 10: best mean LDS over five Adam validation projects (every leave-one-out choice among 1, 3, 10, 30), then
    # checked on two held out (docs/bench/lds-damping-adam.json)
    damping_scale_adam: float = setting(10.0, "With damping_rule 'auto', Adam: the multiple of n / (w̄ τ).", gt=0)
    # the fallback rule (scripts/tune_trak_damping.py, docs/bench/trak-damping.json): LDS rises from 0.08–0.21
    # at 1e-3 to 0.65–0.67 at 10 on small MLPs, where the undamped kernel regression overfits
    damping_ratio: float = setting(10.0, "With damping = -1 and no training time (or damping_rule 'ratio'): λ as a "
                                         "multiple of the mean non-zero eigenvalue of ΦᵀΦ.", gt=0)
    # float16 left LDS unchanged to 3 decimals on 4 projects (scripts/lds_variants.py: generated tabular ×2,
    # shapes, digits CNN: 0.472, 0.368, 0.352, 0.531 either way) and halves the store and its reads
    feature_dtype: str = setting("float16", "How the training features are stored on disk: float16 (half the disk "
                                            "and reads; a chunk beyond float16's range is stored scaled by a power of two) or float32 (use it "
                                            "with a near-zero damping, where the kernel amplifies rounding).",
                                 choices=("float32", "float16"))

    def resolved_projection(self, fm: FunctionalModel, n_train: int) -> tuple[str, int]:
        """(projection, k) the fit uses for this model: :meth:`projection_plan`, with "auto" made
        "factorized" where :func:`auto_projection` says so (float32 passes only: low-precision
        passes are vmap's)."""
        projection, k = self.projection_plan(fm.n_params, n_train)
        if projection == "auto" and k and self.grad_precision == "float32":
            projection = auto_projection(fm)
        return projection, k


def projection_summary(project, settings: TrakSettings | None = None) -> dict:
    """TRAK's projection for ``project`` at ``settings`` (default: the defaults), without computing
    anything: {"kind", "k"} (k 0: none), and for "factorized" each layer's share ("layers") and the
    tracked parameters it leaves out ("left_out"). What `proponent info` shows."""
    s = settings or TrakSettings()
    fm = FunctionalModel(project.build_model(), TrackedParameters.of(project))
    projection, k = s.resolved_projection(fm, len(project.train_dataset))
    if projection == "factorized":
        d = FactorizedGradients(fm.module, k, tracked=TrackedParameters.of(project)).projector.describe()
        return {"kind": "factorized", "k": d["out_dim"], "layers": d["layers"], "left_out": d["left_out"]}
    kind = projector_kind(projection, fm.n_params, k or None)
    return {"kind": kind, "k": 0 if kind == "none" else int(k)}


def kernel_damping(gram: np.ndarray, n: int, k: int, damping: float, damping_ratio: float) -> float:
    """λ: ``damping`` when given (≥ 0), else damping_ratio × the mean non-zero eigenvalue of the Gram
    matrix (trace / rank, rank ≤ min(n, k); the trace is the same in the k×k and n×n forms)."""
    return float(damping) if damping >= 0 else damping_ratio * float(np.trace(gram)) / max(1, min(n, k))


def solve_kernel(phi: np.ndarray, damping: float, damping_ratio: float) -> tuple[np.ndarray, float]:
    """Ψ = Φ(ΦᵀΦ + λI)⁻¹ in float64 through the smaller Gram matrix; returns (Ψ, λ). The definition
    with every array in memory, for checks: the fit never forms Ψ."""
    phi64 = phi.astype(np.float64)
    n, k = phi64.shape
    gram = phi64.T @ phi64 if k <= n else phi64 @ phi64.T
    lam = kernel_damping(gram, n, k, damping, damping_ratio)
    gram[np.diag_indices_from(gram)] += lam
    try:
        if k <= n:
            psi = np.linalg.solve(gram, phi64.T).T  # Φ (ΦᵀΦ+λI)⁻¹ (gram symmetric)
        else:
            psi = np.linalg.solve(gram, phi64)  # (ΦΦᵀ+λI)⁻¹ Φ
    except np.linalg.LinAlgError:
        psi = (np.linalg.pinv(gram) @ (phi64.T if k <= n else phi64))
        psi = psi.T if k <= n else psi
    return psi, lam


def ensemble_checkpoints(project, mode: str, max_models: int) -> list:
    finals = project.final_checkpoints()
    if mode == "auto":
        mode = "models" if len(finals) > 1 else "checkpoints"
    if mode == "models":
        cks = finals
    elif mode == "final":
        cks = finals[:1]
    else:  # checkpoints of model 0, latest first: early checkpoints carry little signal
        cks = project.run_checkpoints()[::-1]
        if max_models <= 0:
            cks = cks[: max(1, len(cks) // 2)]
    if max_models > 0:
        cks = cks[:max_models]
    return cks


def accumulate_gram(store) -> tuple[np.ndarray, int]:
    """ΦᵀΦ in float64, accumulated over the store's chunks (k×k memory, whatever n). Under
    torchrun each rank sums its share of the chunks and the partial Gram matrices are all-reduced.

    Over a float16 store each chunk's ΦᵀΦ is a float32 product (numpy's symmetric rank-k update), summed
    in float64: its rounding, 2e-7 of the largest entry, is 2,000× below the stored features' own (5e-4),
    and at k = 2,028 over 5,000 rows of the benchmark CNN it took 0.44 s against 0.83 in float64 (2-core
    AVX2 EPYC). A float32 store (the precision a user asks for with a near-zero damping) keeps float64."""
    dtype = np.float32 if store.dtype == np.float16 else np.float64
    gram = np.zeros((store.width,) * 2)
    n = 0
    for _, _, chunk in store.iter_chunks(distributed.my_share(range(store.n_chunks))):
        c = np.asarray(chunk, dtype=dtype)
        gram += c.T @ c  # one buffer, transposed: numpy multiplies it as a syrk (half the flops)
        n += len(c)
    return distributed.sum_array(gram), int(distributed.sum_array(np.array([n]))[0])


def well_conditioned(gram: np.ndarray, lam: float) -> bool:
    """Whether ``gram`` + λI may be factored in float32: its condition number is at most 1 + trace/λ, and at
    ≤ 1e3 the inverse's relative error stays ~1e-4 or below, under a float16 store's own rounding (5e-4)."""
    return lam > 0 and 1 + float(np.trace(gram)) / lam <= 1e3


def primal_kernel_inverse(gram: np.ndarray, n: int, damping: float, damping_ratio: float, *,
                          single: bool = False) -> tuple[np.ndarray, float]:
    """M = (ΦᵀΦ + λI)⁻¹ (symmetric k×k, :func:`spd_inverse`) and λ (:func:`kernel_damping`). ``single``:
    factored in float32 (and returned so) where :func:`well_conditioned` allows, as the dual form does; used
    over float16 stores (at k = 2,028: 0.26 s against 0.53)."""
    k = gram.shape[0]
    lam = kernel_damping(gram, n, k, damping, damping_ratio)
    g = gram.copy()
    g[np.diag_indices_from(g)] += lam
    return spd_inverse(g, single and well_conditioned(gram, lam)), lam


def spd_inverse(g: np.ndarray, single: bool = False) -> np.ndarray:
    """The inverse of a symmetric matrix that damping made positive definite, exactly symmetric: through its
    Cholesky factor (LAPACK potrf + potri, k³ flops against 2.7k³ for an LU solve against the identity: at
    k = 2,048 on a 2-core AVX2 EPYC 0.55-0.72 s against 1.05 s, equal to 1e-15 relative); the pseudo-inverse
    where the factor fails (λ = 0 on a rank-deficient Gram matrix). ``single``: factored and inverted in float32
    (and returned so)."""
    try:
        factor, _ = scipy.linalg.cho_factor(g.astype(np.float32) if single else g, lower=False, check_finite=False)
        inv, info = (scipy.linalg.lapack.spotri if single else scipy.linalg.lapack.dpotri)(factor, lower=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"potri info {info}")
        out = np.triu(inv)
        out += np.triu(out, 1).T
        return out
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        out = np.linalg.pinv(g)
        return (out + out.T) / 2


def dual_kernel_inverse(gram: np.ndarray, k: int, damping: float, damping_ratio: float, *,
                        single: bool = False) -> tuple[np.ndarray, float]:
    """A = (ΦΦᵀ + λI)⁻¹ (symmetric n×n) from the n×n Gram matrix, and λ. Through a Cholesky
    factor (the matrix is positive definite once damped): on 1,445 rows 0.15 s against 1.0 s for
    solving for Ψ = AΦ with k = 4,810 columns. ``single``: factor in float32 (half the time) when
    the damped matrix is well conditioned (condition number ≤ 1 + trace/λ ≤ 1e3, so A's relative
    error stays ~1e-4 or below); used over float16 stores, whose own rounding is 5e-4. A comes back
    in the precision it was computed in (float32 when single: widening it would add nothing but
    twice the bytes to save, read and multiply)."""
    n = gram.shape[0]
    lam = kernel_damping(gram, n, k, damping, damping_ratio)
    g = gram.copy()
    g[np.diag_indices_from(g)] += lam
    return spd_inverse(g, single and well_conditioned(gram, lam)), lam


class _Member:
    """One ensemble member: its gradient computer and projector, its on-disk feature store, and
    either the primal inverse M = (ΦᵀΦ + λI)⁻¹ (k ≤ n) or the dual A = (ΦΦᵀ + λI)⁻¹ (k > n, small n)."""

    def __init__(self, computer, projector, store, M=None, A=None, lam: float = 0.0):
        self.computer, self.projector, self.store, self.M, self.A, self.lam = computer, projector, store, M, A, lam
        # products over a float16 store run in float32: float32's rounding (~1e-6 relative over k terms) is far
        # below float16's (5e-4), and the products take half the time
        self.product_dtype = np.float32 if store.dtype == np.float16 else np.float64
        if A is not None:  # once here, not an n×n copy per scores call (a kernel cached in float64 by v4's first runs)
            self.A = A.astype(self.product_dtype, copy=False)
        # the primal M stays as solved (float64 where ill conditioned: query vectors φ_q M are formed with it);
        # its copy in the product precision serves the per-row quadratic forms (self-influence, leverage)
        self._M_products = None if M is None else M.astype(self.product_dtype, copy=False)

    @property
    def dual(self) -> bool:
        return self.A is not None

    def query_vectors(self, phi_q: np.ndarray) -> np.ndarray:
        """u = φ_q M (primal form), float64: what every training feature row is multiplied with."""
        return np.asarray(phi_q, np.float64) @ self.M

    def scores(self, phi_q: np.ndarray, n: int) -> np.ndarray:
        """S_q = (φ_q M) Φᵀ (primal) or (φ_q Φᵀ) A (dual), every product in product_dtype."""
        u = (phi_q if self.dual else self.query_vectors(phi_q)).astype(self.product_dtype)
        out = np.empty((len(phi_q), n), dtype=self.product_dtype)
        for lo, hi, chunk in self.store.iter_chunks():
            out[:, lo:hi] = u @ np.asarray(chunk, dtype=self.product_dtype).T
        return out @ self.A if self.dual else out

    def _quadratic(self, rows: np.ndarray) -> np.ndarray:
        """φ_iᵀ M φ_i for a block of stored feature rows (primal form): products in product_dtype, returned in
        float64."""
        c = np.asarray(rows, dtype=self.product_dtype)
        return np.einsum("ik,ik->i", c, c @ self._M_products).astype(np.float64)

    def leverage(self, rows: np.ndarray) -> np.ndarray:
        """h_i = φ_iᵀ (ΦᵀΦ + λI)⁻¹ φ_i of training rows ``rows`` (dual: 1 − λ A_ii; primal: read from the store
        one chunk's worth of rows at a time)."""
        rows = np.asarray(rows, np.int64)
        if self.dual:
            return 1.0 - self.lam * np.diag(self.A).astype(np.float64)[rows]
        step = self.store.chunk_rows
        return np.concatenate([self._quadratic(self.store.read_rows(rows[lo:lo + step]))
                               for lo in range(0, len(rows), step)] or [np.zeros(0)])

    def self_scores(self) -> np.ndarray:
        """φ_i · Ψ_i for every training row (each rank its share of the chunks, summed over ranks).
        Dual form: diag(ΦΦᵀA) = diag((G + λI − λI)A) = 1 − λ·diag(A), no pass over the store."""
        if self.dual:
            return 1.0 - self.lam * np.diag(self.A).astype(np.float64)
        out = np.zeros(self.store.n_rows)
        for lo, hi, chunk in self.store.iter_chunks(distributed.my_share(range(self.store.n_chunks))):
            out[lo:hi] = self._quadratic(chunk)
        return distributed.sum_array(out)


@register
class TRAK(Attributor):
    name = "trak"
    label = "TRAK"
    description = ("Projected after-kernel regression on margin gradients, ensembled over models or checkpoints "
                   "(Park et al., 2023). Fast and accurate with an ensemble; self-influence ranks mislabels.")
    Settings = TrakSettings
    shards_over_ranks = True

    @classmethod
    def requirements(cls, settings=None):  # the model ensemble needs several trained models
        return cls.requires | ({"models"} if getattr(settings, "ensemble", None) == "models" else set())

    # v9: float32 products over float16 stores in the primal form too (Gram chunks, a well-conditioned kernel's
    # factor, self-influence, scores), as v4's dual form; rounding ~1e-6 relative, below the stored features' 5e-4;
    # v8: projection "auto" is factorized for token (dict) inputs too, and the factorized projection covers
    # nn.Embedding tables (a sparse JL sketch of their nonzero rows), and a side at full width is not projected;
    # v7: the training-time rule covers Adam (τ from the saved second moments, damping_scale_adam);
    # v6: damping_rule "auto": λ from SGD's training time (damping_scale × n / (w̄ τ)) where it is known;
    # v5: projection "auto" is factorized per layer (LoGra-style) for Linear/Conv2d models with image or
    # table inputs (other features, same formula);
    # v4: the dual (k > n) form keeps A = (ΦΦᵀ+λI)⁻¹ instead of Ψ, with products in float32 over float16 stores
    # (same formula, other rounding; the digits default run about 2× faster);
    # v3: dense Rademacher projections hashed on the device (same law, other draws; the same on CPU and GPU);
    # v2: streamed primal form (same formula; rounding differs from v1's stored float32 Ψ)
    version = "9"
    # what the shared feature stores are keyed by: bumped only when the features change (v7 changed a damping;
    # v8's factorized features include the embeddings)
    features_version = "7"

    @property
    def feature_members(self) -> list[_Member]:
        """Per ensemble member: its projector, its training-feature store and its kernel (public
        for readers of the training side, such as the influence index)."""
        return self._proj

    def _fit(self, project) -> None:
        s: TrakSettings = self.settings
        self.members = ensemble_checkpoints(project, s.ensemble, s.max_models)
        ds = project.train_dataset
        n = len(ds)
        self._proj = []
        q_sum = np.zeros(n)
        self_sum = np.zeros(n)
        lambdas, rows_written, rules = [], [], []
        fm = FunctionalModel(project.build_model(), TrackedParameters.of(project))
        weights, data = project.checkpoint_hash(), project.data_hash()
        projection, k = s.resolved_projection(fm, n)
        for m, ck in enumerate(self.members):
            self._check_cancel("fit")
            # "gen": dense Rademacher entries are hashed on the device since v3 (the kernel beside the store follows it)
            tag = stable_hash({"ck": ck.key, "k": k, "proj": projection, "seed": s.seed, "m": m, "gen": 3,
                               **({"dtype": s.feature_dtype} if s.feature_dtype != "float32" else {}),
                               **({"precision": s.grad_precision, "pass": LOW_PRECISION_PASS}
                                  if s.grad_precision != "float32" else {})})
            # shared by every run whose features are the same (the damping only changes the kernel beside
            # them), so trying another damping costs a kernel solve, not a featurization
            # (the method's version too: a later version that computes features otherwise never reads these)
            shared = stable_hash({"tag": tag, "weights": weights, "data": data, "v": self.features_version})
            folder = self.store_dir / f"trak_{shared}"
            store, computer, projector = checkpoint_feature_store(
                project, ck, folder / "features", kind="margin", projection=projection, proj_dim=k or None,
                seed=s.seed, model_id=m, device=self.device,
                progress=lambda st, d, t, m=m: self.progress(f"featurize {m + 1}/{len(self.members)}", d, t),
                cancel=self.cancel, dtype=s.feature_dtype, precision=s.grad_precision,
                margin_scale=s.grad_precision == "float32")
            k_out = projector.out_dim
            primal = k_out <= n
            # the scores' weights, and w̄ for the damping rule
            q_m = self._loss_scale(computer, ds, store)
            q_sum += q_m
            damping, rule = s.damping, "given" if s.damping >= 0 else "ratio"
            tau = training_time(project, ck, fm.names) if s.damping < 0 and s.damping_rule == "auto" else None
            if tau:
                w_bar = max(float(np.mean(q_m * (1 - q_m))), 1e-12)
                scale = s.damping_scale_adam if ck.optimizer == "adam" else s.damping_scale
                damping, rule = scale * n / (w_bar * tau), "training time"
            rules.append({"rule": rule, **({"tau": tau, "w_bar": w_bar, "optimizer": ck.optimizer} if tau else {})})
            grams: dict = {}  # this member's Gram matrix, computed at most once (dropped after the member)
            kernel, lam = self._kernel(folder, store, damping, primal, k_out, f"kernel {m + 1}/{len(self.members)}", grams)
            rows_written.append(store.rows_written)
            lambdas.append(lam)
            member = _Member(computer, projector, store, M=kernel if primal else None, A=None if primal else kernel, lam=lam)
            if rule == "training time":
                # self-influence (triage) keeps the ratio rule's kernel: with the heavy ridge a short run
                # implies, self-influence tends to the gradient norm, and mislabel AUROC fell from 0.825 to
                # 0.565 on noisy-label digits (docs/bench/lds-damping.json) while the test scores gained
                k_r, lam_r = self._kernel(folder, store, -1.0, primal, k_out, f"kernel {m + 1}/{len(self.members)}",
                                          grams)
                self_sum += _Member(computer, projector, store, M=k_r if primal else None, A=None if primal else k_r,
                                    lam=lam_r).self_scores()
                rules[-1]["self_influence_lambda"] = lam_r
            else:
                self_sum += member.self_scores()
            self._proj.append(member)
        self.q = q_sum / len(self.members)
        self._self = self_sum / len(self.members) * self.q
        self.meta.update({"members": [c.key for c in self.members], "lambda": lambdas, "damping_rule": rules,
                          "projection": self._proj[0].projector.describe(),
                          "kernel_form": "dual (n×n)" if self._proj[0].dual else "primal (k×k, streamed)"})
        if distributed.active():  # which rank featurized how many rows (a resumed run counts only new ones)
            self.meta["distributed"] = {**distributed.describe(),
                                        "rows_featurized": distributed.per_rank(int(sum(rows_written)))}

    @staticmethod
    def _loss_scale(computer, ds, store) -> np.ndarray:
        """1 − p(y|x) of every training row under a member's model, from the feature store's companion
        (:func:`margin_scale_store`): the featurization writes it from its margin gradients' own forward pass (a
        separate pass over 5,000 images of the benchmark CNN cost 2.9 s of a member's 12), and a run that finds
        it missing (a store from before it existed, a low-precision featurization, whose margins carry its
        rounding) makes those chunks with a float32 forward pass, each rank its share. Stored, so a rerun with
        another damping reads the very values the first run used."""
        scales = margin_scale_store(store) if distributed.is_main() else None
        distributed.barrier()
        scales = scales or margin_scale_store(store)
        for c in distributed.my_share(distributed.agree(scales.missing_chunks())):
            lo, hi = scales.chunk_bounds(c)
            rows = torch.arange(lo, hi)
            with torch.no_grad():
                f = correct_class_margin(computer.outputs(ds.x[rows]), ds.y[rows].to(computer.device))
            # σ(−f), as the featurization gives it: 1 − p_y in float32 loses the digits of rows with p_y ≈ 1
            scales.write_chunk(c, torch.sigmoid(-f.float()).cpu().numpy()[:, None])
        distributed.barrier()
        return scales.to_array()[:, 0].astype(np.float64)

    def _kernel(self, folder, store, damping: float, primal: bool, k_out: int, stage: str,
                grams: dict) -> tuple[np.ndarray, float]:
        """The member's kernel for ``damping`` (≥ 0: λ itself; -1: the ratio rule), cached beside its store.
        ``grams`` keeps the member's Gram matrix once computed: the test-score and self-influence kernels
        differ only in λ, so the store is read for it once."""
        s: TrakSettings = self.settings
        form = {} if primal else {"form": "dual-inverse"}  # the n×n A, not the n×k Ψ of TRAK v3
        solved = folder / f"kernel_{stable_hash({'d': damping, 'r': s.damping_ratio, **form})}"
        # a damaged kernel or λ file is a miss: solved again and replaced
        kernel = read_cached_npy(solved / "kernel.npy", ndim=2, mmap=False)
        lam = read_cached_npy(solved / "lambda.npy", (), mmap=False)
        if distributed.agree(kernel is not None and lam is not None and kernel.shape[0] == kernel.shape[1]):
            return kernel, float(lam)
        self.progress(stage, 0, 1)
        if "gram" not in grams:
            if primal:
                grams["gram"] = accumulate_gram(store)  # (ΦᵀΦ, n), streamed over the chunks
            else:  # k > n: the n×n form; n < k, so Φ (read once for ΦΦᵀ) and A are small
                # ΦΦᵀ in float32 over a float16 store (see _Member.product_dtype), else float64
                phi = store.to_array().astype(np.float32 if store.dtype == np.float16 else np.float64, copy=False)
                grams["gram"] = (phi @ phi.T).astype(np.float64)
                del phi
        if primal:
            kernel, lam = primal_kernel_inverse(*grams["gram"], damping, s.damping_ratio,
                                                single=store.dtype == np.float16)
        else:
            kernel, lam = dual_kernel_inverse(grams["gram"], k_out, damping, s.damping_ratio,
                                              single=store.dtype == np.float16)
        if distributed.is_main():
            atomic_save_npy(solved / "lambda.npy", np.array(lam))
            atomic_save_npy(solved / "kernel.npy", kernel)
        return kernel, lam

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        n = len(self._p.train_dataset)
        total = np.zeros((len(q), n))
        for member in self._proj:
            self._check_cancel("scoring")
            phi_q = project_gradients(member.computer, member.projector, q.x, q.y, "margin").numpy().astype(np.float64)
            total += member.scores(phi_q, n)
        total *= self.q[None, :] / len(self._proj)  # in place: no second [n_q, n] temporary
        return total

    def score_blocks(self, queries="test", block: int | None = None):
        # the dual form scores a query block with one read of each store: blocks as large as the
        # score budget allows (no 256-query cap), so digits' 360 test queries read each store once
        if block is None and self._proj and self._proj[0].dual:
            n_train = len(self._p.train_dataset)
            block = max(1, self.SCORE_BLOCK_BYTES // (8 * 4 * max(1, n_train)))
        return super().score_blocks(queries, block)

    def score_columns(self, queries="test"):
        """One pass over each member's on-disk features for all queries at once: U_m = φ_q M_m
        (n_q × k), then S[:, chunk] = mean_m U_m Φ_m[chunk]ᵀ ⊙ Q[chunk]."""
        if any(m.dual for m in self._proj):
            return None  # the dual form needs a query's whole row before A; query blocks are as cheap
        q = self._queries(queries)
        us = [m.query_vectors(project_gradients(m.computer, m.projector, q.x, q.y, "margin").numpy()
                              ).astype(m.product_dtype) for m in self._proj]

        def columns():
            readers = [m.store.iter_chunks() for m in self._proj]
            for parts in zip(*readers):
                self._check_cancel("scoring")
                lo, hi = parts[0][0], parts[0][1]
                for a, b in self._column_slices(lo, hi, len(q)):
                    block = sum(u @ np.asarray(c[a - lo:b - lo], dtype=u.dtype).T for u, (_, _, c) in zip(us, parts))
                    yield a, b, block * (self.q[None, a:b] / len(self._proj))

        return columns()

    def self_scores(self) -> np.ndarray:
        return self._self.copy()

    def copy_scores(self) -> np.ndarray:
        """The test scores' own diagonal: under the training-time rule the scoring kernel's λ differs from
        self-influence's (the ratio rule), and an exact copy of row i scores φ_i M φ_i q_i with the scoring
        kernel M. One more pass over each member's store, made only when leak search asks."""
        if not self.copy_scores_differ(self.meta):
            return self.self_scores()
        total = sum(member.self_scores() for member in self._proj)
        return total / len(self._proj) * self.q

    def training_query_scale(self, rows: np.ndarray) -> np.ndarray:
        """1 / (1 − h̄_i): a training row is in its own kernel, and removing it (Sherman-Morrison) scales
        its every score by exactly 1 / (1 − h_i), h_i its leverage φ_iᵀ(ΦᵀΦ + λI)⁻¹φ_i; h̄ is the mean
        over the members. Without it a null of training queries undershoots a clean test query's top
        score: on the generated suite projects under the training-time ridge (median h̄ 0.15 to 0.43)
        the flag fired on 3.7-10.2% of clean queries at fpr 0.01, with it on 0.7-1.3%
        (docs/bench/leak-copy-scores.json, scripts/bench_leak_reference.py)."""
        h = sum(member.leverage(rows) for member in self._proj) / len(self._proj)
        return 1.0 / (1.0 - np.clip(h, 0.0, 0.99))

    @classmethod
    def copy_scores_differ(cls, meta: dict) -> bool:
        return any(isinstance(r, dict) and "self_influence_lambda" in r for r in meta.get("damping_rule") or ())
