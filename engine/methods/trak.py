"""TRAK: Tracing with the Randomly-projected After Kernel (Park et al., 2023).

Per model m: φ_i = Pᵀ∇f(z_i) (margin gradients, projected), Ψ_m = Φ_m (Φ_mᵀΦ_m + λI)⁻¹,
S_m[q, i] = φ_q · Ψ_m[i]; then S = mean_m S_m ⊙ mean_m Q with Q_i = 1 − p(y_i | x_i).

Ψ is computed in whichever of the k×k or n×n forms is smaller (push-through identity:
Φ(ΦᵀΦ + λI)⁻¹ = (ΦΦᵀ + λI)⁻¹Φ), so k ≥ n is handled, and λ is chosen from the spectrum
rather than left at 0, where ΦᵀΦ is singular whenever k > n.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engine.autodiff.features import checkpoint_features, project_gradients
from engine.autodiff.functional import FunctionalModel, TrackedParameters
from engine.autodiff.measurement import correct_class_probability
from engine.methods.base import Attributor, register, setting
from engine.methods.settings import ProjectionSettings
from engine.storage.arrays import atomic_save_npy, load_npy, stable_hash


@dataclasses.dataclass
class TrakSettings(ProjectionSettings):
    ensemble: str = setting("auto", "Which checkpoints form the ensemble: 'auto' (final checkpoint of every independently "
                                     "trained model, or the last checkpoints of a single run), 'models', 'checkpoints', 'final'.",
                            choices=("auto", "models", "checkpoints", "final"))
    max_models: int = setting(0, "Use at most this many ensemble members (0: all).", ge=0)
    damping: float = setting(-1.0, "Ridge λ added to ΦᵀΦ; -1 chooses λ = damping_ratio × mean non-zero eigenvalue.", ge=-1)
    # measured on validation projects (scripts/tune_trak_damping.py, docs/bench/trak-damping.json): LDS rises
    # from 0.08–0.21 at 1e-3 to 0.65–0.67 at 10 on small MLPs, where the undamped kernel regression overfits
    damping_ratio: float = setting(10.0, "With damping = -1: λ as a multiple of the mean non-zero eigenvalue of ΦᵀΦ "
                                         "(10 was best on held-out validation projects).", gt=0)


def solve_kernel(phi: np.ndarray, damping: float, damping_ratio: float) -> tuple[np.ndarray, float]:
    """Ψ = Φ(ΦᵀΦ + λI)⁻¹ in float64 through the smaller Gram matrix; returns (Ψ, λ)."""
    phi64 = phi.astype(np.float64)
    n, k = phi64.shape
    gram = phi64.T @ phi64 if k <= n else phi64 @ phi64.T
    if damping < 0:
        # mean non-zero eigenvalue = trace / rank; rank ≤ min(n, k)
        lam = damping_ratio * float(np.trace(gram)) / max(1, min(n, k))
    else:
        lam = float(damping)
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


@register
class TRAK(Attributor):
    name = "trak"
    label = "TRAK"
    description = ("Projected after-kernel regression on margin gradients, ensembled over models or checkpoints "
                   "(Park et al., 2023). Fast and accurate with an ensemble; self-influence ranks mislabels.")
    Settings = TrakSettings

    @classmethod
    def requirements(cls, settings=None):  # the model ensemble needs several trained models
        return cls.requires | ({"models"} if getattr(settings, "ensemble", None) == "models" else set())

    def _fit(self, project) -> None:
        s: TrakSettings = self.settings
        self.members = ensemble_checkpoints(project, s.ensemble, s.max_models)
        n = len(project.train_dataset)
        self._proj = []
        q_sum = np.zeros(n)
        self_sum = np.zeros(n)
        lambdas = []
        n_params = FunctionalModel(project.build_model(), TrackedParameters.of(project)).n_params
        projection, k = s.projection_plan(n_params, n)
        for m, ck in enumerate(self.members):
            self._check_cancel("fit")
            tag = stable_hash({"ck": ck.key, "k": k, "proj": projection, "seed": s.seed, "m": m})
            folder = self.workdir / f"member_{m:03d}_{tag}"
            phi, computer, projector = checkpoint_features(
                project, ck, folder / "features", kind="margin", projection=projection, proj_dim=k or None,
                seed=s.seed, model_id=m, device=self.device,
                progress=lambda st, d, t, m=m: self.progress(f"featurize {m + 1}/{len(self.members)}", d, t),
                cancel=self.cancel)
            psi_path = folder / f"psi_{stable_hash({'d': s.damping, 'r': s.damping_ratio})}.npy"
            if psi_path.is_file():
                psi = load_npy(psi_path, mmap=False)
                lam = float(np.load(psi_path.with_suffix(".lambda.npy")))
            else:
                psi, lam = solve_kernel(phi, s.damping, s.damping_ratio)
                atomic_save_npy(psi_path.with_suffix(".lambda.npy"), np.array(lam))
                atomic_save_npy(psi_path, psi.astype(np.float32))
            lambdas.append(lam)
            with torch.no_grad():
                logits = computer.outputs(project.train_dataset.x)
                q_sum += (1 - correct_class_probability(logits, project.train_dataset.y.to(logits.device))).cpu().double().numpy()
            self_sum += np.einsum("ik,ik->i", phi.astype(np.float64), psi.astype(np.float64))
            self._proj.append((computer, projector, psi.astype(np.float32)))
        self.q = q_sum / len(self.members)
        self._self = self_sum / len(self.members) * self.q
        self.meta.update({"members": [c.key for c in self.members], "lambda": lambdas,
                          "projection": self._proj[0][1].describe()})

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        total = np.zeros((len(q), len(self._p.train_dataset)))
        for computer, projector, psi in self._proj:
            self._check_cancel("scoring")
            phi_q = project_gradients(computer, projector, q.x, q.y, "margin").numpy()
            total += phi_q.astype(np.float64) @ psi.T.astype(np.float64)
        return total / len(self._proj) * self.q[None, :]

    def self_scores(self) -> np.ndarray:
        return self._self.copy()
