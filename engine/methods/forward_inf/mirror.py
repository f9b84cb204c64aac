"""Stacked per-query parameter copies of one model for Forward-INF's mirrored steps.

One parameter set per query, stacked along a leading axis, stepped together with
``torch.func.vmap(grad(...))`` and evaluated on training batches with one vmapped functional
call (engine.autodiff.functional.FunctionalModel). A memory budget sets how many queries share
a pass.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from engine.autodiff.functional import FunctionalModel, Tracked


def _activation_numel(model: torch.nn.Module, x1: torch.Tensor) -> int:
    """Numbers of activation values one example produces in a forward pass (for the memory budget)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(total[0], 1)


class MirrorEngine:
    """Stacked per-query parameter copies of one model in eval mode, stepped and evaluated with vmap.

    The model is a private copy; its parameters and buffers are read, never written.
    """

    def __init__(self, model: torch.nn.Module, tracked: Tracked = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float64, memory_budget_mb: float = 512.0):
        self.device, self.dtype = device, dtype
        self.fm = FunctionalModel(model, tracked, device=device, dtype=dtype, copy_module=True)
        self.model = self.fm.module
        self.params = self.fm.params  # the tracked parameters: the ones the mirrored steps move
        self.n_params = self.fm.n_params
        self.memory_budget_mb = memory_budget_mb
        self._act = None
        fm = self.fm

        def one_loss(p, x, y):
            return F.cross_entropy(fm(p, x.unsqueeze(0)), y.unsqueeze(0))

        def batch_losses(p, x, y):
            return F.cross_entropy(fm(p, x), y, reduction="none")

        self._one_loss = one_loss
        self._grad = vmap(grad(one_loss), in_dims=(0, 0, 0))
        self._stacked_losses = vmap(batch_losses, in_dims=(0, None, None))
        self._own_losses = vmap(one_loss, in_dims=(0, 0, 0))

    # -- sizing
    def plan(self, example: torch.Tensor, train_batch: int = 256) -> tuple[int, int]:
        """(query batch Q, training batch B) so that Q stacked copies and Q×B activations fit the budget."""
        if self._act is None:
            self._act = _activation_numel(self.model, self._cast(example[:1]))
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        budget = self.memory_budget_mb * 2**20
        b = int(max(16, min(train_batch, budget // (4 * itemsize * self._act * 8))))
        per_query = itemsize * (6 * self.n_params + 3 * b * self._act)
        q = int(max(1, min(512, budget // per_query)))
        return q, b

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else x.dtype)

    # -- losses
    def losses(self, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for lo in range(0, len(y), batch):
                logits = self.model(self._cast(x[lo:lo + batch]))
                out.append(F.cross_entropy(logits, y[lo:lo + batch].to(self.device), reduction="none"))
        return torch.cat(out) if out else torch.empty(0, dtype=self.dtype)

    def stacked_losses(self, P: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[Q, B] losses of a batch under each of the Q stacked parameter sets."""
        with torch.no_grad():
            return self._stacked_losses(P, self._cast(x), y.to(self.device))

    def own_losses(self, P: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[Q] loss of example q under parameter set q."""
        with torch.no_grad():
            return self._own_losses(P, self._cast(x), y.to(self.device))

    # -- memorised queries
    def unmemorise(self, x: torch.Tensor, y: torch.Tensor, threshold: float, seed: int = 0,
                   max_doublings: int = 40, max_radius: float = 8.0) -> tuple[torch.Tensor, np.ndarray]:
        """Inputs to step on: memorised queries (loss < threshold) moved to a random point on an L2
        sphere around themselves, the radius doubling (from 0.001 to at most ``max_radius`` times the
        mean input norm) until the loss reaches the threshold; one that never does keeps the
        highest-loss point tried. Returns (inputs, radius per query; 0 where untouched)."""
        x = self._cast(x)
        radius = np.zeros(len(y))
        if threshold <= 0 or len(y) == 0:
            return x, radius
        loss = self.losses(x, y)
        todo = torch.nonzero(loss < threshold).flatten()
        if len(todo) == 0:
            return x, radius
        # each query's direction depends only on its own content and the seed, not on its batch
        u = torch.stack([torch.randn(tuple(x.shape[1:]), dtype=torch.float64, generator=torch.Generator().manual_seed(
            (seed * 1_000_003 + zlib.crc32(x[i].double().cpu().numpy().tobytes())) % 2**63)) for i in todo.tolist()]).to(x)
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        scale = x.flatten(1).norm(dim=1).mean().clamp_min(1e-6)
        r = torch.full((len(todo),), 1e-3, dtype=x.dtype, device=x.device) * scale
        out = x.clone()
        pending = torch.ones(len(todo), dtype=torch.bool, device=x.device)
        best_loss = torch.full((len(todo),), -1.0, dtype=x.dtype, device=x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(max_doublings):
            cand = x[todo] + r.view(view) * u
            lc = self.losses(cand, y[todo])
            # queries that never reach the threshold keep the highest-loss point tried
            better = pending & (lc > best_loss)
            out[todo[better]] = cand[better]
            radius[todo[better].cpu().numpy()] = r[better].cpu().numpy()
            best_loss = torch.where(better, lc, best_loss)
            pending &= ~(lc >= threshold)
            if not pending.any() or float(r.max()) > max_radius * float(scale):
                break
            r = torch.where(pending, r * 2, r)
        return out, radius

    # -- the mirrored step
    def step(self, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, optimizer: str = "adam",
             direction: str = "descent") -> dict[str, torch.Tensor]:
        """Q stacked parameter sets, set q having taken ``steps`` steps on example q's loss."""
        x, y = self._cast(x), y.to(self.device)
        Q = len(y)
        P = {n: v.unsqueeze(0).expand(Q, *v.shape).clone() for n, v in self.params.items()}
        sign = -1.0 if direction == "descent" else 1.0
        b1, b2, eps = 0.9, 0.999, 1e-8
        m = {n: torch.zeros_like(v) for n, v in P.items()} if optimizer == "adam" else None
        v2 = {n: torch.zeros_like(v) for n, v in P.items()} if optimizer == "adam" else None
        for t in range(1, steps + 1):
            g = self._grad(P, x, y)
            with torch.no_grad():
                for n in P:
                    if optimizer == "sgd":
                        P[n] = P[n] + sign * lr * g[n]
                    else:
                        m[n] = b1 * m[n] + (1 - b1) * g[n]
                        v2[n] = b2 * v2[n] + (1 - b2) * g[n] * g[n]
                        mh = m[n] / (1 - b1 ** t)
                        vh = v2[n] / (1 - b2 ** t)
                        P[n] = P[n] + sign * lr * mh / (vh.sqrt() + eps)
        return {n: v.detach() for n, v in P.items()}


def resolve_dtype(precision: str, device: str) -> torch.dtype:
    if precision == "float64" or (precision == "auto" and device == "cpu"):
        return torch.float64
    return torch.float32
