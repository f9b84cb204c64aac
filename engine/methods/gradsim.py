"""The gradient-similarity family shared by Grad-Dot, Grad-Cos and TracIn(CP).

S[q, i] = Σ_t w_t · ∇f(q; θ_t) · (−∇ℓ(z_i; θ_t)): a gradient step on z_i moves θ by −η∇ℓ_i,
which changes q's margin by about −η ∇f_q·∇ℓ_i, so this sign makes proponents positive.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn

from engine.autodiff.factorized import auto_projection
from engine.autodiff.features import checkpoint_feature_store, project_gradients
from engine.autodiff.functional import FunctionalModel, TrackedParameters
from engine.autodiff.projection import projector_kind
from engine.methods.base import Attributor, setting
from engine.methods.settings import PROJECTIONS, ProjectionSettings
from engine.storage.arrays import stable_hash


@dataclasses.dataclass
class GradSimSettings(ProjectionSettings):
    """Grad-Dot and Grad-Cos: only the projection."""

    projection: str = setting("auto", "Random projection: auto (factorized per layer where the model has a convolution, "
                                      "or where a dense one would be sparse JL over more than 2^28 entries, when "
                                      "Linear, Conv2d and Embedding layers hold ≥ 90% of the tracked parameters; "
                                      "otherwise dense Rademacher), rademacher, gaussian, "
                                      "sjlt (sparse JL), factorized (per layer, P_out ⊗ P_in applied before the outer "
                                      "product, as LoGra does; an embedding sketched from its nonzero rows; other "
                                      "parameters left out) or none.", choices=PROJECTIONS)

    def resolved_projection(self, fm: FunctionalModel, n_train: int) -> tuple[str, int]:
        """(projection, k) the fit uses. "auto" becomes "factorized" (where it covers ≥ 90% of the
        parameters) on a model with a convolution, and where the dense rule would give SJLT (a dense
        [batch, p] gradient and O(p) work per example). Measured:
        - three image CNNs of 94,762 parameters, below 2^28 projected entries
          (docs/bench/lds-projection-cnn-gradsim.json): factorized − dense LDS −0.009 to +0.008
          (Grad-Cos), −0.005 to +0.011 (Grad-Dot), +0.002 to +0.009 (TracIn), within projection-seed
          noise, at 3.7-4.1× less time;
        - a bag-of-words project with a 2.1M-entry embedding (docs/bench/lds-projection-text-gradsim.json):
          Grad-Cos LDS 0.392 in 1.0 s against SJLT's 0.385 in 94 s, Grad-Dot 0.373 in 0.8 s against
          0.364 in 93 s.
        Other models below 2^28 entries (MLPs) keep the dense projection: not compared there."""
        projection, k = self.projection_plan(fm.n_params, n_train)
        has_conv = any(isinstance(m, nn.Conv2d) for m in fm.module.modules())
        if projection == "auto" and k and (has_conv or projector_kind("auto", fm.n_params, k) == "sjlt"):
            projection = auto_projection(fm)
        return projection, k


class _Side:
    """One checkpoint's training side, on disk: loss-gradient features, read chunk by chunk."""

    def __init__(self, computer, projector, loss_store, weight: float, inv_norm: np.ndarray | None):
        self.computer, self.projector, self.loss_store, self.weight, self.inv_norm = (
            computer, projector, loss_store, weight, inv_norm)

    def chunks(self):
        """(lo, hi, −∇ℓ features [lo:hi], normalised for Grad-Cos) in float64."""
        for lo, hi, c in self.loss_store.iter_chunks():
            side = -np.asarray(c, dtype=np.float64)
            if self.inv_norm is not None:
                side *= self.inv_norm[lo:hi, None]
            yield lo, hi, side


class GradientSimilarity(Attributor):
    normalize: bool = False
    shards_over_ranks = True
    # v5: projection "auto" is also factorized on models with a convolution (equal LDS on three CNNs, ~4x faster);
    # v4: projection "auto" is factorized where the dense rule would be SJLT (huge models, e.g. embedding tables);
    # v3: dense Rademacher projections hashed on the device; v2: training side streamed from disk (same
    # formula; v1 kept a float32 copy in memory)
    version = "5"

    def checkpoints_and_weights(self, project) -> list[tuple]:
        return [(project.final_checkpoint(), 1.0)]

    def _fit(self, project) -> None:
        s = self.settings
        n = len(project.train_dataset)
        self._members = []
        self._self = np.zeros(n)
        self._norm2 = np.zeros(n)
        plan = self.checkpoints_and_weights(project)
        fm = FunctionalModel(project.build_model(), TrackedParameters.of(project))
        projection, k = s.resolved_projection(fm, n)
        for j, (ck, w) in enumerate(plan):
            self._check_cancel("fit")
            tag = stable_hash({"ck": ck.key, "k": k, "proj": projection, "seed": s.seed, "gen": 3})
            folder = self.workdir / f"ck_{j:03d}_{tag}"
            step = lambda st, d, t, j=j: self.progress(f"featurize {j + 1}/{len(plan)}", d, t)
            loss_store, computer, projector = checkpoint_feature_store(
                project, ck, folder / "loss", kind="loss", projection=projection, proj_dim=k or None, seed=s.seed,
                model_id=0, device=self.device, progress=step, cancel=self.cancel)
            margin_store, _, _ = checkpoint_feature_store(
                project, ck, folder / "margin", kind="margin", projection=projection, proj_dim=k or None, seed=s.seed,
                model_id=0, device=self.device, progress=step, cancel=self.cancel)
            norms = np.empty(n)
            for (lo, hi, lc), (_, _, mc) in zip(loss_store.iter_chunks(), margin_store.iter_chunks()):
                side = -np.asarray(lc, dtype=np.float64)
                mq = np.asarray(mc, dtype=np.float64)
                norms[lo:hi] = np.linalg.norm(side, axis=1)
                if self.normalize:
                    side /= np.maximum(norms[lo:hi], 1e-12)[:, None]
                    mq /= np.maximum(np.linalg.norm(mq, axis=1), 1e-12)[:, None]
                self._self[lo:hi] += w * np.einsum("ik,ik->i", mq, side)
            self._norm2 += w * norms ** 2
            inv = 1.0 / np.maximum(norms, 1e-12) if self.normalize else None
            self._members.append(_Side(computer, projector, loss_store, w, inv))
        self.meta.update({"checkpoints": [ck.key for ck, _ in plan], "weights": [w for _, w in plan],
                          "projection": self._members[0].projector.describe()})

    def _query_side(self, member: _Side, q) -> np.ndarray:
        g = project_gradients(member.computer, member.projector, q.x, q.y, "margin").numpy().astype(np.float64)
        if self.normalize:
            g /= np.maximum(np.linalg.norm(g, axis=1), 1e-12)[:, None]
        return member.weight * g

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        total = np.zeros((len(q), len(self._p.train_dataset)))
        for member in self._members:
            self._check_cancel("scoring")
            g = self._query_side(member, q)
            for lo, hi, side in member.chunks():
                total[:, lo:hi] += g @ side.T
        return total

    def score_columns(self, queries="test"):
        """One pass over each checkpoint's on-disk training side for all queries at once."""
        q = self._queries(queries)
        gs = [self._query_side(m, q) for m in self._members]

        def columns():
            for parts in zip(*(m.chunks() for m in self._members)):
                self._check_cancel("scoring")
                lo, hi = parts[0][0], parts[0][1]
                for a, b in self._column_slices(lo, hi, len(q)):
                    yield a, b, sum(g @ side[a - lo:b - lo].T for g, (_, _, side) in zip(gs, parts))

        return columns()

    def self_scores(self) -> np.ndarray:
        return self._self.copy()

    def suspicion(self) -> np.ndarray:
        # the (weighted) squared loss-gradient norm: large for examples the model fights against
        return self._norm2.copy()
