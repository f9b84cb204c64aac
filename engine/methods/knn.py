"""Embedding kNN: cosine similarity of penultimate features (what non-attribution tools use)."""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.autodiff.embeddings import penultimate_features
from engine.autodiff.functional import batch_rows
from engine.methods.base import Attributor, register, setting
from engine.storage.arrays import ChunkedArray


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

    version = "2"  # training embeddings streamed from an on-disk store (float32; v1 held them in float64)
    EMBED_ROWS = 4096  # training rows embedded, stored and read back at a time

    def _fit(self, project) -> None:
        self.model = project.load_model(project.final_checkpoint())
        ds = project.train_dataset
        # unit-norm penultimate features of the training set, on disk and read chunk by chunk; the
        # width comes from the first chunk (the last Linear's input, flattened, may be wider than
        # its in_features when it acts on a sequence)
        self.store = ChunkedArray(self.workdir / "embeddings", len(ds), self.EMBED_ROWS,
                                  meta={"checkpoint": project.final_checkpoint().key})
        missing = self.store.missing_chunks()
        for j, c in enumerate(missing):
            self._check_cancel("fit")
            self.progress("embed training set", j, len(missing))
            lo, hi = self.store.chunk_bounds(c)
            self.store.write_chunk(c, _unit(penultimate_features(self.model, batch_rows(ds.x, lo, hi),
                                                                 device=self.device).double().numpy()))
        self.meta["dim"] = self.store.width

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        emb = _unit(penultimate_features(self.model, q.x, device=self.device).double().numpy())
        out = np.empty((len(emb), self.store.n_rows))
        for lo, hi, chunk in self.store.iter_chunks():
            out[:, lo:hi] = emb @ chunk.T.astype(np.float64)
        return out

    def self_scores(self) -> np.ndarray:
        out = np.empty(self.store.n_rows)
        for lo, hi, chunk in self.store.iter_chunks():
            c = chunk.astype(np.float64)
            out[lo:hi] = np.einsum("ik,ik->i", c, c)
        return out

    def suspicion(self) -> np.ndarray:
        """Share of each row's nearest neighbours (cosine, itself excluded) with another label:
        exact, over row blocks against training chunks with a running top-k, so memory is bounded
        by block × chunk, not n × n."""
        y = self._p.train_dataset.y.numpy()
        n = len(y)
        k = min(self.settings.neighbours, n - 1)
        out = np.empty(n)
        if k < 1:
            out[:] = 0.0
            return out
        for blo, bhi, block in self.store.iter_chunks():
            self._check_cancel("suspicion")
            block = block.astype(np.float64)
            best_s = np.empty((bhi - blo, 0))
            best_i = np.empty((bhi - blo, 0), np.int64)
            for lo, hi, chunk in self.store.iter_chunks():
                sim = block @ chunk.T.astype(np.float64)
                own = np.arange(max(lo, blo), min(hi, bhi))
                sim[own - blo, own - lo] = -np.inf  # not its own neighbour
                cand_s = np.concatenate([best_s, sim], 1)
                cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, hi), sim.shape)], 1)
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k] if cand_s.shape[1] > k else \
                    np.broadcast_to(np.arange(cand_s.shape[1]), cand_s.shape)
                best_s = np.take_along_axis(cand_s, keep, 1)
                best_i = np.take_along_axis(cand_i, keep, 1)
            out[blo:bhi] = (y[best_i] != y[blo:bhi, None]).mean(1)
        return out
