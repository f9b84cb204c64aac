"""The gradient-similarity family shared by Grad-Dot, Grad-Cos and TracIn(CP).

S[q, i] = Σ_t w_t · ∇f(q; θ_t) · (−∇ℓ(z_i; θ_t)): a gradient step on z_i moves θ by −η∇ℓ_i,
which changes q's margin by about −η ∇f_q·∇ℓ_i, so this sign makes proponents positive.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.autodiff.features import checkpoint_features, project_gradients
from engine.autodiff.functional import FunctionalModel, TrackedParameters
from engine.methods.base import Attributor
from engine.methods.settings import ProjectionSettings
from engine.storage.arrays import stable_hash


@dataclasses.dataclass
class GradSimSettings(ProjectionSettings):
    """Grad-Dot and Grad-Cos: only the projection."""


class GradientSimilarity(Attributor):
    normalize: bool = False

    def checkpoints_and_weights(self, project) -> list[tuple]:
        return [(project.final_checkpoint(), 1.0)]

    def _fit(self, project) -> None:
        s = self.settings
        n = len(project.train_dataset)
        self._members = []
        self._self = np.zeros(n)
        self._norm2 = np.zeros(n)
        plan = self.checkpoints_and_weights(project)
        n_params = FunctionalModel(project.build_model(), TrackedParameters.of(project)).n_params
        projection, k = s.projection_plan(n_params, n)
        for j, (ck, w) in enumerate(plan):
            self._check_cancel("fit")
            tag = stable_hash({"ck": ck.key, "k": k, "proj": projection, "seed": s.seed})
            folder = self.workdir / f"ck_{j:03d}_{tag}"
            step = lambda st, d, t, j=j: self.progress(f"featurize {j + 1}/{len(plan)}", d, t)
            loss_f, computer, projector = checkpoint_features(
                project, ck, folder / "loss", kind="loss", projection=projection, proj_dim=k or None, seed=s.seed,
                model_id=0, device=self.device, progress=step, cancel=self.cancel)
            margin_f, _, _ = checkpoint_features(
                project, ck, folder / "margin", kind="margin", projection=projection, proj_dim=k or None, seed=s.seed,
                model_id=0, device=self.device, progress=step, cancel=self.cancel)
            train_side = -loss_f.astype(np.float64)
            norms = np.linalg.norm(train_side, axis=1)
            if self.normalize:
                train_side = train_side / np.maximum(norms, 1e-12)[:, None]
                mq = margin_f / np.maximum(np.linalg.norm(margin_f, axis=1), 1e-12)[:, None]
                self._self += w * np.einsum("ik,ik->i", mq, train_side)
            else:
                self._self += w * np.einsum("ik,ik->i", margin_f.astype(np.float64), train_side)
            self._norm2 += w * norms ** 2
            self._members.append((computer, projector, train_side.astype(np.float32), w))
        self.meta.update({"checkpoints": [ck.key for ck, _ in plan], "weights": [w for _, w in plan],
                          "projection": self._members[0][1].describe()})

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        total = np.zeros((len(q), len(self._p.train_dataset)))
        for computer, projector, train_side, w in self._members:
            self._check_cancel("scoring")
            g = project_gradients(computer, projector, q.x, q.y, "margin").numpy().astype(np.float64)
            if self.normalize:
                g = g / np.maximum(np.linalg.norm(g, axis=1), 1e-12)[:, None]
            total += w * (g @ train_side.T.astype(np.float64))
        return total

    def self_scores(self) -> np.ndarray:
        return self._self.copy()

    def suspicion(self) -> np.ndarray:
        # the (weighted) squared loss-gradient norm: large for examples the model fights against
        return self._norm2.copy()
