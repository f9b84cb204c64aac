"""Interactive top-k over a large training set: TRAK's scores as inner products in one index.

For TRAK with members m = 1…M, S[q, i] = (1/M) Σ_m (φ_q^m M_m) · φ_i^m × Q_i. Stacking the members,
S[q, i] = u_q · v_i with u_q = [φ_q^1 M_1, …, φ_q^M M_M] and v_i = (Q_i / M) [φ_i^1, …, φ_i^M],
so a new query's top proponents are a maximum-inner-product search over the v_i, and its top
opponents the same search with -u_q.

Two backends:
- ``exact``: a blocked matmul over the on-disk features with a running top-k; memory is one
  chunk. On CUDA the stacked training vectors are copied once onto the GPU when they fit in half
  its free memory (1M × 2048 float32 is 8 GiB), so a query is one matmul and a top-k there.
- ``faiss``: faiss-cpu's inner-product indexes, flat (exact) up to ``FLAT_MAX`` rows, else IVF-PQ
  (``nlist`` ≈ √n, trained on a sample, filled chunk by chunk; a few bytes per row in memory).
  IVF-PQ's candidates (``RERANK`` × k) are re-scored exactly from the on-disk features, so the
  scores returned are exact and only membership is approximate. Its recall@k against exact is
  measured by :func:`recall_at_k` and reported by scripts/bench_index.py.
  The rows of largest norm (``HEAD_FRACTION`` of them, at most ``HEAD_MAX_BYTES``) are kept out of
  IVF-PQ and scanned exactly from memory: a query's top proponents and opponents are mostly such
  rows (a score grows with the training row's gradient), and product quantisation, trained on
  typical rows, estimates their inner products worst. On the 1,000,000-row benchmark 96% of the
  exact top-10 proponents were among the 5% largest rows; IVF-PQ over every row found 55% of them
  (77% when re-scoring 20,000 candidates), with that 5% scanned exactly 99.6% (held out: 66% →
  99.6% on another 400,000-row project, 51% → 98% on CNN features; docs/bench/index-tabular.json).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.autodiff.features import project_gradients
from engine.core.errors import ProponentError
from engine.storage.blocks import RunningTopK

FLAT_MAX = 200_000  # a flat index is exact and holds n × d float32 in memory
RERANK = 50  # IVF-PQ candidates per wanted neighbour, re-scored exactly from disk
HEAD_FRACTION = 0.05  # rows of largest norm scanned exactly beside IVF-PQ (see the module docstring)
HEAD_MAX_BYTES = 256 << 20  # ... held as float32: at most this many bytes (fewer rows when the features are wide)


def head_rows(n: int, d: int) -> int:
    """How many of ``n`` rows of dimension ``d`` an IVF-PQ index scans exactly (largest norms first)."""
    return int(min(n, math.ceil(HEAD_FRACTION * n), HEAD_MAX_BYTES // (4 * max(1, d))))


@dataclass
class IndexPlan:
    kind: str  # "flat" or "ivfpq"
    nlist: int = 0
    m: int = 0  # PQ sub-quantizers
    nprobe: int = 0
    dim: int = 0  # the indexed dimension (IVF-PQ: d + 1 for the sphere coordinate, padded to a multiple of m)


def plan_index(n: int, d: int, kind: str = "auto") -> IndexPlan:
    if kind == "flat" or (kind == "auto" and n <= FLAT_MAX):
        return IndexPlan("flat")
    if kind not in ("auto", "ivfpq"):
        raise ProponentError(f"index kind must be auto, flat or ivfpq, not {kind!r}")
    nlist = int(min(65536, max(16, math.sqrt(n))))  # √n lists: k-means training stays seconds at 1M
    m = min(64, d + 1)
    dim = -(-(d + 1) // m) * m  # zero-padded so the m sub-vectors divide it
    return IndexPlan("ivfpq", nlist=nlist, m=m, nprobe=max(16, nlist // 4), dim=dim)


class InfluenceIndex:
    """Top-k proponents and opponents of new queries for a fitted TRAK attributor."""

    def __init__(self, att, backend: str = "faiss", kind: str = "auto", device: str = "cpu", seed: int = 0):
        if getattr(att, "name", None) != "trak" or any(m.dual for m in att.feature_members):
            raise ProponentError("the influence index needs a fitted TRAK run in its streamed (k ≤ n) form")
        self.att, self.backend, self.device = att, backend, device
        self.members = att.feature_members
        self.n = len(att.project.train_dataset)
        self.d = sum(m.projector.out_dim for m in self.members)
        self.scale = att.q / len(self.members)  # Q_i / M, folded into the training side
        self.build_seconds = 0.0
        self.plan = None
        self._head_ids = np.zeros(0, np.int64)  # rows scanned exactly beside IVF-PQ, ascending
        self._head = np.zeros((0, self.d), np.float32)  # their stacked, Q-scaled vectors
        self._resident = None
        if backend == "faiss":
            self._build_faiss(kind, seed)
        elif backend == "exact":
            if str(device).startswith("cuda"):
                self._resident = self._load_resident()
        else:
            raise ProponentError(f"index backend must be faiss or exact, not {backend!r}")

    # ---------------------------------------------------------------- training side, by chunk
    def _train_chunks(self):
        """(lo, hi, v[lo:hi]) float32: the stacked, Q-scaled training vectors, one chunk at a time."""
        for parts in zip(*(m.store.iter_chunks() for m in self.members)):
            lo, hi = parts[0][0], parts[0][1]
            v = np.concatenate([np.asarray(c, dtype=np.float32) for _, _, c in parts], axis=1)
            yield lo, hi, v * self.scale[lo:hi, None].astype(np.float32)

    def _build_faiss(self, kind: str, seed: int) -> None:
        import faiss  # only this backend needs it

        t0 = time.perf_counter()
        self.plan = plan_index(self.n, self.d, kind)
        if self.plan.kind == "flat":
            index = faiss.IndexFlatIP(self.d)
            prep = np.ascontiguousarray
        else:
            # the largest-norm rows are scanned exactly (module docstring); the rest go into IVF-PQ
            norms = np.concatenate([np.linalg.norm(v, axis=1).astype(np.float32) for _, _, v in self._train_chunks()])
            h = head_rows(self.n, self.d)
            in_head = np.zeros(self.n, bool)
            in_head[np.argpartition(-norms, h - 1)[:h] if h else np.zeros(0, np.int64)] = True
            self._head_ids = np.flatnonzero(in_head)
            tail = np.flatnonzero(~in_head)
            # maximum inner product → nearest neighbour on a sphere (Bachrach et al., 2014): every
            # vector gets the coordinate sqrt(R² − |v|²), so all have norm R and the IVF lists, built
            # by k-means, are not dominated by the largest-norm rows; queries get 0 there, so
            # inner products are unchanged
            self._radius = float(norms[tail].max()) if len(tail) else 0.0
            prep = self._on_sphere
            quantizer = faiss.IndexFlatIP(self.plan.dim)
            index = faiss.IndexIVFPQ(quantizer, self.plan.dim, self.plan.nlist, self.plan.m, 8,
                                     faiss.METRIC_INNER_PRODUCT)
            # train on a seeded sample of the IVF-PQ rows, 40 per list (faiss asks for at least 39)
            want = min(len(tail), max(40 * self.plan.nlist, 256 * 40))
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(tail, want, replace=False)) if want else tail
            sample = []
            self._head = np.empty((len(self._head_ids), self.d), np.float32)
            for lo, hi, v in self._train_chunks():
                sel = pick[(pick >= lo) & (pick < hi)] - lo
                if len(sel):
                    sample.append(v[sel])
                a, b = np.searchsorted(self._head_ids, [lo, hi])
                self._head[a:b] = v[self._head_ids[a:b] - lo]
            index.train(prep(np.concatenate(sample) if sample else np.zeros((0, self.d), np.float32)))
            index.nprobe = self.plan.nprobe
        for lo, hi, v in self._train_chunks():
            if self.plan.kind == "flat":
                index.add(prep(v))
                continue
            keep = np.flatnonzero(~in_head[lo:hi])
            index.add_with_ids(prep(v[keep]), (keep + lo).astype(np.int64))
        self.index = index
        self.build_seconds = time.perf_counter() - t0

    def _load_resident(self) -> torch.Tensor | None:
        """The [n, d] training vectors on the GPU, or None where they would take over half its free memory."""
        t0 = time.perf_counter()
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        if self.n * self.d * 4 > free // 2:
            return None
        v_all = torch.empty((self.n, self.d), dtype=torch.float32, device=self.device)
        for lo, hi, v in self._train_chunks():
            v_all[lo:hi] = torch.as_tensor(v).to(self.device, non_blocking=False)
        self.build_seconds = time.perf_counter() - t0
        return v_all

    def _on_sphere(self, v: np.ndarray) -> np.ndarray:
        out = np.zeros((len(v), self.plan.dim), np.float32)
        out[:, :self.d] = v
        out[:, self.d] = np.sqrt(np.maximum(self._radius ** 2 - (v.astype(np.float64) ** 2).sum(1), 0.0))
        return out

    def _query_pad(self, u: np.ndarray) -> np.ndarray:
        out = np.zeros((len(u), self.plan.dim), np.float32)
        out[:, :self.d] = u
        return out

    # ---------------------------------------------------------------- queries
    def query_vectors(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        parts = [m.query_vectors(project_gradients(m.computer, m.projector, x, y, "margin").numpy())
                 for m in self.members]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def search(self, u: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
        """Top-k proponents (largest u·v) and opponents (smallest) of query vectors ``u`` [n_q, d]."""
        k = min(k, self.n)
        if self.backend == "exact":
            return self._exact(u, k)
        if self.plan.kind == "flat":
            s_top, i_top = self.index.search(np.ascontiguousarray(u), k)
            s_bot, i_bot = self.index.search(np.ascontiguousarray(-u), k)
            return {"proponents": i_top, "proponent_scores": s_top, "opponents": i_bot, "opponent_scores": -s_bot}
        kc = min(self.n, RERANK * k)
        i_top, s_top = self._rerank(u, self.index.search(self._query_pad(u), kc)[1], k)
        i_bot, s_bot = self._rerank(-u, self.index.search(self._query_pad(-u), kc)[1], k)
        return {"proponents": i_top, "proponent_scores": s_top, "opponents": i_bot, "opponent_scores": -s_bot}

    @property
    def memory_bytes(self) -> int:
        """What the index holds in memory: IVF-PQ's codes and the exactly scanned rows (flat: every vector)."""
        if self.plan is None:
            return 0
        if self.plan.kind == "flat":
            return self.n * self.d * 4
        return int(self.index.sa_code_size() * self.index.ntotal + self._head.nbytes)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """The stacked, Q-scaled training vectors of rows ``ids``, read from the on-disk features."""
        v = np.concatenate([m.store.read_rows(ids).astype(np.float32) for m in self.members], axis=1)
        return v * self.scale[ids, None].astype(np.float32)

    def _rerank(self, u: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among IVF-PQ's candidates ``cand`` (re-scored from disk) and the exactly scanned rows."""
        ids_out = np.empty((len(u), k), np.int64)
        s_out = np.empty((len(u), k))
        for r, (uq, ids) in enumerate(zip(u, cand)):
            ids = ids[ids >= 0]  # faiss pads with -1 when a probe finds fewer candidates
            s = self._rows(ids).astype(np.float64) @ uq.astype(np.float64)
            if len(self._head_ids):
                col = self._head @ uq  # the best 4k by their float32 scores (a margin for near-ties), re-scored
                best = np.argpartition(-col, 4 * k - 1)[:4 * k] if len(col) > 4 * k else np.arange(len(col))
                ids = np.concatenate([ids, self._head_ids[best]])
                s = np.concatenate([s, self._head[best].astype(np.float64) @ uq.astype(np.float64)])
            order = np.lexsort((ids, -s))[:k]
            got = len(order)
            ids_out[r, :got], s_out[r, :got] = ids[order], s[order]
            ids_out[r, got:], s_out[r, got:] = -1, -np.inf
        return ids_out, s_out

    def _exact(self, u: np.ndarray, k: int) -> dict[str, np.ndarray]:
        if self._resident is not None:
            return self._exact_resident(u, k)
        acc = RunningTopK(len(u), k)
        ut = torch.as_tensor(u, dtype=torch.float32, device=self.device)
        for lo, _, v in self._train_chunks():
            block = (ut @ torch.as_tensor(v, device=self.device).T).double().cpu().numpy()
            acc.update(lo, block)
        return acc.result()


    def _exact_resident(self, u: np.ndarray, k: int) -> dict[str, np.ndarray]:
        if len(u) == 0:
            return RunningTopK(0, k).result()
        out = {key: [] for key in ("proponents", "proponent_scores", "opponents", "opponent_scores")}
        rows = max(1, 2**28 // self.n)  # queries per matmul: their [rows, n] scores stay under 1 GiB
        ut = torch.as_tensor(u, dtype=torch.float32)
        for lo in range(0, len(u), rows):
            s = ut[lo:lo + rows].to(self.device) @ self._resident.T
            top = torch.topk(s, k, dim=1)
            bot = torch.topk(s, k, dim=1, largest=False)
            out["proponents"].append(top.indices.cpu().numpy())
            out["proponent_scores"].append(top.values.double().cpu().numpy())
            out["opponents"].append(bot.indices.cpu().numpy())
            out["opponent_scores"].append(bot.values.double().cpu().numpy())
        return {key: np.concatenate(v) for key, v in out.items()}


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by the approximate top-k."""
    k = exact.shape[1]
    return float(np.mean([len(set(a[:k]) & set(e)) / k for a, e in zip(approx, exact)]))


__all__ = ["InfluenceIndex", "IndexPlan", "plan_index", "recall_at_k", "FLAT_MAX"]
