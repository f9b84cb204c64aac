"""Per-query attribution with generalized influence functions (our extension of GIF).

GIF (Lyu et al., 2023) predicts the effect of removing a *set* of training data by updating
only a selected fraction of the parameters (engine.methods.gif.solvers, engine.workflows.whatif). This method turns it
into per-query scores, which the paper does not do: for a query ``q`` the selection ``P`` is
chosen from ``q`` (its activations, or its margin gradient), and by the adjoint form

    (P H Hᵀ Pᵀ) w = P ∇f(q),   v = H Pᵀ w,   S[q, i] = −vᵀ (∇ℓ(z_i) + wd·θ) / (N − 1)

where removing ``z_i`` alone gives the GIF update ``x_i = argmin ‖H Pᵀ x − g_i‖`` with
``g_i = (∇ℓ(z_i) + wd·θ)/(N−1)``, and ``Δf(q) ≈ ∇f(q)ᵀ Pᵀ x_i = vᵀ g_i``. A proponent's
removal lowers the margin, so the score is ``−Δf`` (orientation checked against leave-one-out
retraining on a convex model in tests/test_gif.py).

Defaults that hold on an unseen model: λ = damping_ratio × the mean EK-FAC eigenvalue of the final
model (the curvature's own scale, so no absolute number to tune), and plain conjugate gradients on
the normal equations. A Jacobi or EK-FAC preconditioner and an EK-FAC warm start are available;
on the generated projects they did not save iterations (the measurements are in the settings' help).

Cost: one iterative solve per query (batched ``queries_per_solve`` at a time, block by block for
any number of queries; each iteration is two Hessian-vector products per query over
``hvp_examples`` rows) plus one dot product per training example with gradients computed once.
It is far slower than TRAK or EK-FAC.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engine.autodiff.curvature import EigenCurvature
from engine.autodiff.functional import FunctionalModel, TrackedParameters, batch_rows
from engine.autodiff.hvp import HessianOperator
from engine.autodiff.per_example import GradientComputer
from engine.core.errors import ProponentError
from engine.methods.base import Attributor, SelfScoresUnavailable, register, setting
from engine.methods.gif.solvers import (
    SOLVERS,
    SolveResult,
    adjoint_solve,
    retained_sample,
    select_parameters,
)

MAX_GRADIENT_ENTRIES = 250_000_000  # n_train × p float32 training gradients held in memory (1 GB)
# self-influence needs one solve per training example: on the digits sample (1,445 rows, 2 cores;
# scripts/measure_cost_ratios.py) the app's GIF job with self-influence was still running after about
# 10 minutes, its progress at 0.05 solves/s, while without it all 360 test queries took 156 s.
# Above this size triage uses the recommended ranking or TRAK.
SELF_SCORE_MAX_EXAMPLES = 256


@dataclasses.dataclass
class GIFSettings:
    ratio: float = setting(0.05, "Fraction of each Linear/Conv2d layer's output rows (with bias) updated per query.", gt=0, le=1)
    selection: str = setting("output", "How the rows are chosen from the query: mean |activation| (output), "
                                       "|margin gradient| at the layer output (gradient), or random (ablation).",
                             choices=("output", "gradient", "random"))
    variant: str = setting("gif", "gif: the generalized solve; if: plain influence (P = I) from the same solver.",
                           choices=("gif", "if"))
    solver: str = setting("cg", "Iterative solver: conjugate gradients on the normal equations, or Richardson/LiSSA.",
                          choices=SOLVERS)
    tol: float = setting(1e-3, "Stop when every query's relative residual is below this (LDS on a generated tabular "
                               "project was the same at 1e-2 and 1e-4).", gt=0)
    max_iter: int = setting(1000, "Iterations per solve (each costs 2 Hessian-vector products per query).", ge=1)
    hvp_examples: int = setting(16384, "At most this many training rows estimate the Hessian (≤ 0: all); measured on digits: subsamples moved the solution by 50-130%.")
    damping: float = setting(-1.0, "λ added to H; -1: damping_ratio × the mean EK-FAC eigenvalue of the final model "
                                   "(the spectrum's scale, so it suits any model).", ge=-1)
    damping_ratio: float = setting(1.0, "With damping = -1: λ as a multiple of the mean curvature eigenvalue (ratios "
                                        "0.1 to 3 gave LDS 0.264-0.269 on a generated tabular project; 1 needs 3× fewer "
                                        "iterations than 0.1: scripts/lds_variants.py).", gt=0)
    preconditioner: str = setting("none", "CG preconditioner: none, diagonal (Jacobi: Hutchinson estimate of "
                                          "diag((H + λ)²)) or ekfac (EK-FAC's (K + λ)⁻²). On a generated tabular project "
                                          "(λ = 0.1 × mean) both took more CG iterations than none (321 and 394 vs "
                                          "264; scripts/lds_variants.py).",
                                  choices=("none", "diagonal", "ekfac"))
    warm_start: str = setting("zero", "Starting point of each solve: zero, or ekfac (EK-FAC's answer; on a generated "
                                      "tabular project it took 301 iterations vs 264 from zero).", choices=("zero", "ekfac"))
    diagonal_probes: int = setting(64, "Random probes for the diagonal preconditioner (each one Hessian-vector product, "
                                       "once per fit).", ge=1)
    queries_per_solve: int = setting(16, "Queries solved together (one batched solve); larger query sets are "
                                         "scored block by block.", ge=1)
    max_queries: int = setting(0, "Refuse to score more queries than this in one call (0: no limit; each query "
                                  "needs its own solve).", ge=0)
    on_unconverged: str = setting("error", "error: raise when a query's solve does not converge; report: keep the "
                                            "scores and record the unconverged queries and residuals in the run's meta.",
                                  choices=("error", "report"))
    seed: int = setting(0, "Seed of the Hessian subsample and of random selection.", ge=0)


@register
class GIFAttribution(Attributor):
    name = "gif"
    label = "GIF (per-query)"
    extension = True
    description = ("Our extension of generalized influence functions (Lyu et al., 2023) to per-query scores: one "
                   "least-squares solve per query on ~5% of the parameters chosen from that query. Slow (an "
                   "iterative Hessian solve per query); its main use is the what-if prediction of removing or "
                   "relabelling a set of rows (Triage).")
    Settings = GIFSettings
    # v3: its EK-FAC preconditioner's sampled Fisher labels are inverse-CDF draws made in the covariance pass;
    # v2: automatic damping and tolerance 1e-3 (v1: no damping, 1e-5); queries chunked, not refused
    version = "3"

    @classmethod
    def supports(cls, project):
        if unmet := super().supports(project):
            return unmet
        model = project.build_model()
        if not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules()):
            return "GIF selects rows of Linear/Conv2d layers and the model has none"
        p = FunctionalModel(model, TrackedParameters.of(project)).n_params
        n = len(project.train_dataset)
        if n * p > MAX_GRADIENT_ENTRIES:
            return (f"per-query GIF holds all {n}×{p} training gradients in memory (limit {MAX_GRADIENT_ENTRIES:,} "
                    f"entries); use the what-if prediction instead")
        return None

    @classmethod
    def advisories(cls, project, settings) -> list[str]:
        n = len(project.train_dataset)
        if 0 < settings.hvp_examples < n:
            return [f"gif: the Hessian is estimated on {settings.hvp_examples:,} of {n:,} training rows "
                    f"(hvp_examples); subsamples moved the solution by 50-130% on digits"]
        return []

    def _fit(self, project) -> None:
        s: GIFSettings = self.settings
        if not 0 < s.ratio <= 1:
            raise ProponentError(f"gif: ratio must be in (0, 1], not {s.ratio}")
        model = project.load_model(project.final_checkpoint())
        self.tracked = TrackedParameters.of(project)
        ds = project.train_dataset
        self.n = len(ds)
        rows = retained_sample(self.n, np.array([], np.int64), s.hvp_examples, s.seed)
        self.op = HessianOperator(model, ds.x[rows], ds.y[rows], weight_decay=project.recipe.weight_decay,
                                  device=self.device, tracked=self.tracked)
        self.computer = GradientComputer(model, tracked=self.tracked, device=self.device)
        self.model = model
        self.progress("train gradients", 0, self.n)
        grads = []
        for lo, hi, g in self.computer.iter_batches(ds.x, ds.y, "loss"):
            self._check_cancel("train gradients")
            grads.append(g.float().cpu())
            self.progress("train gradients", hi, self.n)
        self.train_grads = torch.cat(grads, 0)  # [n, p]
        wd = project.recipe.weight_decay
        self.theta = self.op.theta().float().cpu()
        self.wd_term = wd * self.theta if wd else None
        # the curvature's scale (and the preconditioner): EK-FAC of the final model on the same rows
        self.curvature = None
        if s.damping < 0 or "ekfac" in (s.preconditioner, s.warm_start):
            self.progress("curvature", 0, 1)
            self.curvature = EigenCurvature(model, self.op.layout, ds.x[rows], weight_decay=wd, seed=s.seed,
                                            device=self.device)
        self.damping = float(s.damping) if s.damping >= 0 else s.damping_ratio * self.curvature.mean_eigenvalue
        self.diag_sq = None
        if s.preconditioner == "diagonal":
            self.progress("preconditioner", 0, 1)
            self.diag_sq = self.op.squared_diagonal(s.diagonal_probes, damping=self.damping, seed=s.seed)
            # a floor keeps untouched directions (dead units) from dividing by ~0
            self.diag_sq = self.diag_sq.clamp_min(max(self.damping ** 2, 1e-12 * float(self.diag_sq.max())))
        self.meta.update({"parameters": int(self.op.n_params), "hvp_examples": int(len(rows)), "extension": True,
                          "damping_used": self.damping, "preconditioner": s.preconditioner,
                          "unconverged_queries": [], "worst_residual": 0.0, "solves": 0, "iterations": []})

    # -- the per-query solve
    def _solve(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, SolveResult]:
        """v = H Pᵀ w for each query (rows), with (P H Hᵀ Pᵀ) w = P ∇f(q)."""
        s: GIFSettings = self.settings
        gq = self.computer.per_example(x, y, "margin").to(self.op.dtype)
        if s.variant == "if":
            masks = None
        else:
            masks = torch.stack([select_parameters(self.model, batch_rows(x, j, j + 1), y[j:j + 1], ratio=s.ratio,
                                                   mode=s.selection, objective="margin", seed=s.seed + j,
                                                   device=self.device, tracked=self.tracked)
                                 for j in range(len(y))]).to(gq.device)
        lam = self.damping
        ekfac = None if self.curvature is None else (
            lambda r: self.curvature.apply(r, lambda sig: 1.0 / (sig + lam) ** 2))
        pc = {"ekfac": ekfac, "none": None,
              "diagonal": None if self.diag_sq is None else (lambda r: r / self.diag_sq)}[s.preconditioner]
        v, res = adjoint_solve(self.op, gq, masks, method=s.solver, tol=s.tol, max_iter=s.max_iter,
                               damping=lam, precondition=pc, start=ekfac if s.warm_start == "ekfac" else None)
        return v, res

    def score_blocks(self, queries="test", block: int | None = None):
        s: GIFSettings = self.settings
        q = self._queries(queries)
        self._refuse_beyond_cap(len(q))
        # one batched solve per block: memory is queries_per_solve × n_train, whatever the query count
        yield from super().score_blocks(q, block or s.queries_per_solve)

    def _refuse_beyond_cap(self, n_queries: int) -> None:
        s: GIFSettings = self.settings
        if s.max_queries and n_queries > s.max_queries:
            raise ProponentError(
                f"gif: {n_queries} queries need {n_queries} iterative solves; max_queries is {s.max_queries}. "
                f"Score fewer queries or raise max_queries (0: no limit).")

    def scores(self, queries="test") -> np.ndarray:
        s: GIFSettings = self.settings
        q = self._queries(queries)
        self._refuse_beyond_cap(len(q))
        out = np.zeros((len(q), self.n))
        bs = max(1, s.queries_per_solve)
        for lo in range(0, len(q), bs):
            self._check_cancel("scoring")
            hi = min(len(q), lo + bs)
            v, res = self._solve(q.x[lo:hi], q.y[lo:hi])
            self.meta["solves"] += 1
            self.meta["iterations"].append(res.iterations)
            self.meta["worst_residual"] = max(self.meta["worst_residual"], res.residual)
            bad = [lo + j for j, r in enumerate(res.residuals) if not (r <= s.tol * 1.5)]
            if bad:
                if s.on_unconverged == "error":
                    raise ProponentError(
                        f"gif: the solve for query {bad[0]} did not converge (relative residual {res.residuals[bad[0] - lo]:.3g} "
                        f"after {res.iterations} iterations); raise max_iter or tol, add damping, or set "
                        f"on_unconverged='report'")
                self.meta["unconverged_queries"] += [int(b) for b in bad]
            vf = v.float().cpu()
            dots = vf @ self.train_grads.T  # [b, n]
            if self.wd_term is not None:
                dots = dots + (vf @ self.wd_term)[:, None]
            out[lo:hi] = (-dots / (self.n - 1)).double().numpy()
            self.progress("gif queries", hi, len(q))
        return out

    def self_scores(self) -> np.ndarray:
        s: GIFSettings = self.settings
        cap = s.max_queries or SELF_SCORE_MAX_EXAMPLES
        if self.n > cap:
            raise SelfScoresUnavailable(
                f"gif: self-influence needs one solve per training example ({self.n} > {cap}); use the recommended "
                f"ranking or trak self-influence for triage")
        return super().self_scores()
