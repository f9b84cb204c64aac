"""Embedding kNN: cosine similarity of penultimate features (what non-attribution tools use)."""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.autodiff.embeddings import penultimate_features
from engine.methods.base import Attributor, register, setting


@dataclasses.dataclass
class KnnSettings:
    neighbours: int = setting(10, "Neighbours used for the label-disagreement suspicion score.", ge=1)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@register
class EmbeddingKNN(Attributor):
    name = "knn"
    label = "Embedding kNN"
    description = ("Baseline: cosine similarity of penultimate-layer features at the final checkpoint. Not an "
                   "attribution: similar is not influential. Suspicion is the share of nearest neighbours with "
                   "another label.")
    Settings = KnnSettings

    def _fit(self, project) -> None:
        self.model = project.load_model(project.final_checkpoint())
        self.train_emb = _unit(penultimate_features(self.model, project.train_dataset.x, device=self.device).double().numpy())
        self.meta["dim"] = int(self.train_emb.shape[1])

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        emb = _unit(penultimate_features(self.model, q.x, device=self.device).double().numpy())
        return emb @ self.train_emb.T

    def self_scores(self) -> np.ndarray:
        return np.einsum("ik,ik->i", self.train_emb, self.train_emb)

    def suspicion(self) -> np.ndarray:
        y = self._p.train_dataset.y.numpy()
        k = min(self.settings.neighbours, len(y) - 1)
        out = np.empty(len(y))
        for lo in range(0, len(y), 512):
            sim = self.train_emb[lo:lo + 512] @ self.train_emb.T
            sim[np.arange(sim.shape[0]), np.arange(lo, lo + sim.shape[0])] = -np.inf  # not its own neighbour
            nn_idx = np.argpartition(-sim, k, axis=1)[:, :k]
            out[lo:lo + 512] = (y[nn_idx] != y[lo:lo + 512, None]).mean(1)
        return out
