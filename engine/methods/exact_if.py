"""Exact influence: an explicit Hessian inverse, for models small enough (logistic regression).

score(q, i) = −(1/n) ∇f(q)ᵀ (H + λI)⁻¹ ∇ℓ(z_i): the predicted drop in q's margin when z_i is
removed (first order), with H the Hessian of the training objective (mean cross-entropy plus
the recipe's weight decay) at the final checkpoint. It is the ground truth for unit tests.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import hessian

from engine.autodiff.functional import (
    FunctionalModel,
    Tracked,
    TrackedParameters,
    batch_rows,
    to_device,
)
from engine.autodiff.per_example import GradientComputer
from engine.core.errors import Cancelled, ProponentError
from engine.methods.base import Attributor, register, setting


@dataclasses.dataclass
class ExactIFSettings:
    damping: float = setting(-1.0, "λ added to H; -1: 0 if H is positive definite, else shift to 1e-3 × the largest eigenvalue.", ge=-1)
    max_params: int = setting(6000, "Refuse models with more tracked parameters (the Hessian is p×p).", ge=1)
    batch_size: int = setting(128, "Examples per Hessian block.", ge=1)


def objective_hessian(model, x, y, weight_decay: float, batch_size: int, device: str,
                      tracked: Tracked = None, progress=None, cancel=None) -> torch.Tensor:
    """Hessian of mean CE + (wd/2)‖θ‖² over the tracked parameters, in their flat layout (float64).
    Reports progress in examples and checks ``cancel`` between blocks of ``batch_size`` examples."""
    fm = FunctionalModel(model, tracked, device=device, dtype=torch.float64, copy_module=True)
    flat0 = fm.theta()
    n = len(y)

    def batch_objective(flat, xb, yb):
        return F.cross_entropy(fm.call_flat(flat, xb), yb, reduction="sum") / n

    H = torch.zeros(len(flat0), len(flat0), dtype=torch.float64, device=flat0.device)
    for lo in range(0, n, batch_size):
        if cancel is not None and cancel():
            raise Cancelled(f"exact-if: Hessian cancelled after {lo} of {n} examples")
        xb = to_device(batch_rows(x, lo, lo + batch_size), flat0.device, torch.float64)
        yb = y[lo:lo + batch_size].to(flat0.device)
        H += hessian(batch_objective)(flat0, xb, yb)
        if progress is not None:
            progress("hessian", min(n, lo + batch_size), n)
    H += weight_decay * torch.eye(len(flat0), dtype=torch.float64, device=flat0.device)
    return H


@register
class ExactInfluence(Attributor):
    name = "exact-if"
    label = "Exact influence"
    description = ("Ground truth for small models: explicit Hessian inverse at the final checkpoint. "
                   "Scores approximate the margin drop on removing each example.")
    Settings = ExactIFSettings

    @classmethod
    def supports(cls, project):
        if unmet := super().supports(project):
            return unmet
        p = FunctionalModel(project.build_model(), TrackedParameters.of(project)).n_params
        limit = ExactIFSettings().max_params
        return None if p <= limit else f"the model has {p} parameters; exact influence needs ≤ {limit} (max_params)"

    def _fit(self, project) -> None:
        s: ExactIFSettings = self.settings
        model = project.load_model(project.final_checkpoint())
        tracked = TrackedParameters.of(project)
        p = FunctionalModel(model, tracked).n_params
        if p > s.max_params:
            raise ProponentError(f"exact-if: the model has {p} parameters, more than max_params={s.max_params}; "
                                 f"use ekfac, trak or source")
        ds = project.train_dataset
        self.progress("hessian", 0, len(ds))
        H = objective_hessian(model, ds.x, ds.y, project.recipe.weight_decay, s.batch_size, self.device, tracked,
                              progress=self.progress, cancel=self.cancel)
        evals = torch.linalg.eigvalsh(H)
        lo_eig, hi_eig = float(evals[0]), float(evals[-1])
        if s.damping >= 0:
            lam = s.damping
        else:
            lam = 0.0 if lo_eig > 1e-8 * hi_eig else (-lo_eig + 1e-3 * hi_eig)
        self.computer = GradientComputer(model, tracked=tracked, device=self.device)
        g_loss = self.computer.full(ds.x, ds.y, "loss").double()
        A = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        # V[:, i] = −(1/n) (H+λI)⁻¹ ∇ℓ_i
        self.V = (-torch.linalg.solve(A, g_loss.T.to(A.device)) / len(ds)).cpu()
        g_margin = self.computer.full(ds.x, ds.y, "margin").double().cpu()
        self._self = (g_margin * self.V.T).sum(1).numpy()
        self.meta.update({"parameters": p, "damping": lam, "min_eigenvalue": lo_eig, "max_eigenvalue": hi_eig})

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        g = self.computer.full(q.x, q.y, "margin").double().cpu()
        return (g @ self.V).numpy()

    def self_scores(self) -> np.ndarray:
        return self._self.copy()
