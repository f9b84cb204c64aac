"""Forward-INF: the mirrored influence hypothesis (Ko, Kang, Shi, Jin, Yu, Jia, CVPR 2024).

Per query t: a copy θ′ of the model takes ``steps`` optimizer steps on t's own loss (descent:
"train on t"), with normalisation frozen (eval-mode BatchNorm; buffers are never written), and
every training example is scored with two forward passes:

    S[t, i] = ℓ(θ, z_i) − ℓ(θ′, z_i)          (descent)
    S[t, i] = ℓ(θ′, z_i) − ℓ(θ, z_i)          (ascent: "unlearn" a query known to be in train)

Positive: the example's loss falls when the model learns t, i.e. a proponent. To first order,
one plain gradient step of size η gives η ∇ℓ_iᵀ∇ℓ_t, which is η × (loss-gradient) Grad-Dot.

Many queries at once: one updated parameter set per query, stacked along a leading axis, all
stepped together with ``torch.func.vmap(grad(...))``; every training batch is then evaluated
under all Q parameter sets with one ``vmap(functional_call)``. A memory budget sets Q.

A memorised query (loss below ``memorised_loss``) has no gradient to follow; as in the
reference, its input is moved to a random point on an L2 sphere around it, the radius doubling
until its loss is non-trivial, and the step is taken on that point.

Steps and lr default to values chosen by ``engine.methods.forward_inf.calibration.calibrate_forward_inf`` on a
validation split of the TRAINING data (never the test queries): see that function for the rule.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from engine.core.errors import ProponentError
from engine.methods.base import Attributor, register, setting

REFERENCE_STEPS, REFERENCE_LR = 1, 5e-3  # the paper's notebook: one Adam step at 5e-3


@dataclasses.dataclass
class ForwardInfSettings:
    optimizer: str = setting("adam", "Optimizer of the per-query steps: adam (fresh state, as in the reference) or sgd "
                                     "(plain gradient steps).", choices=("adam", "sgd"))
    steps: int = setting(0, "Optimizer steps on each query's loss; 0: chosen by calibration (see 'calibration').")
    lr: float = setting(0.0, "Step size of those steps; 0: chosen by calibration.")
    direction: str = setting("descent", "descent: learn the query (any query); ascent: unlearn it (for queries known to "
                                        "be in the training set).", choices=("descent", "ascent"))
    normalize: str = setting("none", "none: the raw loss change; self: divide S[q, i] by sqrt(|S[q, q]| · |S[i, i]|), "
                                     "the query's and the example's own self-scores (the mirrored Grad-Cos: 1 for an "
                                     "exact copy to first order), so examples with large gradients do not top every "
                                     "ranking — best for duplicate search.",
                             choices=("none", "self"))
    absolute: bool = setting(False, "Score |Δℓ| instead of the signed change (unsigned: ranks duplicates, not proponents).")
    calibration: str = setting("retrain", "How steps/lr are chosen when left at 0: 'retrain' maximises LDS on held-out "
                                          "TRAINING points against a few small retrainings (cached per checkpoint); "
                                          "'reference' uses the paper's one Adam step at lr 5e-3.",
                               choices=("retrain", "reference"))
    memorised_loss: float = setting(1e-6, "A query whose loss is below this is memorised: its step is taken on a "
                                          "sphere-perturbed copy of its input.")
    precision: str = setting("auto", "Arithmetic of the steps and loss differences: auto (float64 on CPU, float32 on "
                                     "CUDA), float32 or float64.", choices=("auto", "float32", "float64"))
    memory_budget_mb: float = setting(512.0, "Memory for stacked parameter copies and activations; sets how many queries "
                                             "are scored together.")
    seed: int = setting(0, "Seed of the sphere perturbation and of the calibration split.")


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

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float64,
                 memory_budget_mb: float = 512.0):
        import copy

        self.device, self.dtype = device, dtype
        self.model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self.n_params = sum(p.numel() for p in self.params.values())
        self.memory_budget_mb = memory_budget_mb
        self._act = None

        def one_loss(p, x, y):
            out = functional_call(self.model, (p, self.buffers), (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        def batch_losses(p, x, y):
            out = functional_call(self.model, (p, self.buffers), (x,))
            return F.cross_entropy(out, y, reduction="none")

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
        import zlib

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


@register
class ForwardINF(Attributor):
    name = "forward-inf"
    label = "Forward-INF"
    description = ("Mirrored influence (Ko et al., 2024): each query takes a few optimizer steps on its own loss and "
                   "every training example is scored by how much its loss falls. Forward passes only over the training "
                   "set; good at surfacing duplicates. Steps/lr are calibrated on held-out training points.")
    Settings = ForwardInfSettings

    @classmethod
    def requirements(cls, settings=None):  # calibration by retraining needs the recipe
        s = settings
        retrains = s is not None and s.calibration == "retrain" and (s.steps == 0 or s.lr == 0)
        return cls.requires | ({"recipe"} if retrains else set())

    def _fit(self, project) -> None:
        s: ForwardInfSettings = self.settings
        if s.steps < 0 or s.lr < 0 or not math.isfinite(s.lr):
            raise ProponentError("forward-inf: steps and lr must be ≥ 0 (0 chooses them by calibration)")
        self.ck = project.final_checkpoint()
        model = project.load_model(self.ck)
        self.engine = MirrorEngine(model, device=self.device, dtype=resolve_dtype(s.precision, self.device),
                                   memory_budget_mb=s.memory_budget_mb)
        steps, lr, how = s.steps, s.lr, "settings"
        if steps == 0 or lr == 0:
            if s.calibration == "reference":
                cal = {"steps": REFERENCE_STEPS, "lr": REFERENCE_LR}
                how = "reference (1 Adam step, lr 5e-3)"
            else:
                from engine.methods.forward_inf.calibration import calibrate_forward_inf

                cal = calibrate_forward_inf(project, optimizer=s.optimizer, direction=s.direction,
                                            normalize=s.normalize, precision=s.precision, seed=s.seed, device=self.device,
                                            progress=self.progress)
                how = "calibrated: " + cal["rule"]
                self.meta["calibration"] = {k: cal[k] for k in ("table", "n_val", "n_subsets", "lds") if k in cal}
            steps = steps or int(cal["steps"])
            lr = lr or float(cal["lr"])
        self.steps, self.lr = int(steps), float(lr)
        ds = project.train_dataset
        self.base_train_loss = self.engine.losses(ds.x, ds.y)
        self.meta.update({"steps": self.steps, "lr": self.lr, "optimizer": s.optimizer, "direction": s.direction,
                          "chosen_by": how, "checkpoint": self.ck.key, "dtype": str(self.engine.dtype)})
        self._self_cache = None

    # ------------------------------------------------------------------ scoring
    def _prepare(self, x, y):
        s = self.settings
        xs, radius = self.engine.unmemorise(x, y, s.memorised_loss, seed=s.seed)
        self.meta["memorised_queries"] = int(self.meta.get("memorised_queries", 0)) + int((radius > 0).sum())
        return xs

    def _orient(self, base: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        d = base - moved if self.settings.direction == "descent" else moved - base
        return d.abs() if self.settings.absolute else d

    def scores(self, queries="test") -> np.ndarray:
        q = self._queries(queries)
        ds = self._p.train_dataset
        n = len(ds)
        out = np.empty((len(q), n))
        q_scale = np.ones(len(q))
        Qb, Bb = self.engine.plan(ds.x[:1])
        for lo in range(0, len(q), Qb):
            self._check_cancel("scoring")
            hi = min(len(q), lo + Qb)
            xq = self._prepare(q.x[lo:hi], q.y[lo:hi])
            P = self.engine.step(xq, q.y[lo:hi], steps=self.steps, lr=self.lr, optimizer=self.settings.optimizer,
                                 direction=self.settings.direction)
            for blo in range(0, n, Bb):
                bhi = min(n, blo + Bb)
                moved = self.engine.stacked_losses(P, ds.x[blo:bhi], ds.y[blo:bhi])
                out[lo:hi, blo:bhi] = self._orient(self.base_train_loss[blo:bhi].unsqueeze(0), moved).double().cpu().numpy()
            if self.settings.normalize == "self":
                own = self.engine.own_losses(P, q.x[lo:hi], q.y[lo:hi])
                base = self.engine.losses(q.x[lo:hi], q.y[lo:hi])
                q_scale[lo:hi] = np.abs(self._orient(base, own).double().cpu().numpy())
            self.progress("score", hi, len(q))
        if self.settings.normalize == "self":
            out /= self._train_scale()[None, :]
            out /= np.sqrt(np.maximum(q_scale, self._scale_floor()))[:, None]
        return out

    def _train_scale(self) -> np.ndarray:
        """sqrt(|self-score|) per training example (floored): the normaliser of normalize='self'."""
        return np.sqrt(np.maximum(np.abs(self._raw_self_scores()), self._scale_floor()))

    def _scale_floor(self) -> float:
        """Self-changes below 1e-6 × the median |self-score| of the training set count as that much."""
        return max(float(np.median(np.abs(self._raw_self_scores()))) * 1e-6, 1e-300)

    def self_scores(self) -> np.ndarray:
        """S[i, i]: the change of example i's own loss when the model takes the steps on i
        (with normalize='self': that divided by sqrt|S[i, i]|² = ±1, the sign of the raw change)."""
        raw = self._raw_self_scores()
        if self.settings.normalize == "self":
            return raw / self._train_scale() ** 2
        return raw

    def _raw_self_scores(self) -> np.ndarray:
        if self._self_cache is None:
            ds = self._p.train_dataset
            n = len(ds)
            out = np.empty(n)
            Qb, _ = self.engine.plan(ds.x[:1])
            for lo in range(0, n, Qb):
                self._check_cancel("self-scores")
                hi = min(n, lo + Qb)
                xq = self._prepare(ds.x[lo:hi], ds.y[lo:hi])
                P = self.engine.step(xq, ds.y[lo:hi], steps=self.steps, lr=self.lr,
                                     optimizer=self.settings.optimizer, direction=self.settings.direction)
                moved = self.engine.own_losses(P, ds.x[lo:hi], ds.y[lo:hi])
                out[lo:hi] = self._orient(self.base_train_loss[lo:hi], moved).double().cpu().numpy()
            self._self_cache = out
        return self._self_cache.copy()

    def suspicion(self) -> np.ndarray:
        """Self-influence: how far an example's own loss moves when the model steps on it. Mislabeled
        examples sit at high loss with large, un-shared gradients, so they move most."""
        return self._raw_self_scores()
