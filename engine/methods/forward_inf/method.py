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

from engine.autodiff.functional import TrackedParameters
from engine.core.errors import ProponentError
from engine.methods.base import Attributor, register, setting
from engine.methods.forward_inf.calibration import calibrate_forward_inf
from engine.methods.forward_inf.mirror import MirrorEngine, resolve_dtype

REFERENCE_STEPS, REFERENCE_LR = 1, 5e-3  # the paper's notebook: one Adam step at 5e-3


@dataclasses.dataclass
class ForwardInfSettings:
    optimizer: str = setting("adam", "Optimizer of the per-query steps: adam (fresh state, as in the reference) or sgd "
                                     "(plain gradient steps).", choices=("adam", "sgd"))
    steps: int = setting(0, "Optimizer steps on each query's loss; 0: chosen by calibration (see 'calibration').", ge=0)
    lr: float = setting(0.0, "Step size of those steps; 0: chosen by calibration.", ge=0)
    direction: str = setting("descent", "descent: learn the query (any query); ascent: unlearn it (for queries known to "
                                        "be in the training set).", choices=("descent", "ascent"))
    normalize: str = setting("none", "none: the raw loss change; self: divide S[q, i] by sqrt(|S[q, q]| · |S[i, i]|), "
                                     "the query's and the example's own self-scores (the mirrored Grad-Cos: 1 for an "
                                     "exact copy to first order), so examples with large gradients do not top every "
                                     "ranking — best for duplicate search.",
                             choices=("none", "self"))
    absolute: bool = setting(False, "Score |Δℓ| instead of the signed change (unsigned: ranks duplicates, not proponents).")
    calibration: str = setting("auto", "How steps/lr are chosen when left at 0: 'retrain' maximises LDS on held-out "
                                       "TRAINING points against a few small retrainings (cached per checkpoint; needs "
                                       "[training]); 'reference' uses the paper's one Adam step at lr 5e-3; 'auto': "
                                       "retrain when the project has a training recipe, else reference.",
                               choices=("auto", "retrain", "reference"))
    memorised_loss: float = setting(1e-6, "A query whose loss is below this is memorised: its step is taken on a "
                                          "sphere-perturbed copy of its input.", ge=0)
    precision: str = setting("auto", "Arithmetic of the steps and loss differences: auto (float64 on CPU, float32 on "
                                     "CUDA), float32 or float64.", choices=("auto", "float32", "float64"))
    memory_budget_mb: float = setting(512.0, "Memory for stacked parameter copies and activations; sets how many queries "
                                             "are scored together.", gt=0)
    seed: int = setting(0, "Seed of the sphere perturbation and of the calibration split.", ge=0)


@register
class ForwardINF(Attributor):
    name = "forward-inf"
    label = "Forward-INF"
    description = ("Mirrored influence (Ko et al., 2024): each query takes a few optimizer steps on its own loss and "
                   "every training example is scored by how much its loss falls. Forward passes only over the training "
                   "set; good at surfacing duplicates. Steps/lr are calibrated on held-out training points.")
    Settings = ForwardInfSettings

    @classmethod
    def supports(cls, project):
        if unmet := super().supports(project):
            return unmet
        if project.data_format == "text":
            return ("Forward-INF steps a private copy of every parameter per query and perturbs memorised queries' "
                    "inputs, which needs tensor inputs, not text tokens; use grad-cos, trak or ekfac")
        return None

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
        self.engine = MirrorEngine(model, TrackedParameters.of(project), device=self.device, dtype=resolve_dtype(s.precision, self.device),
                                   memory_budget_mb=s.memory_budget_mb)
        steps, lr, how = s.steps, s.lr, "settings"
        calibration = s.calibration
        if calibration == "auto":  # a model trained elsewhere has no recipe to retrain with
            calibration = "retrain" if project.has_recipe else "reference"
        if steps == 0 or lr == 0:
            if calibration == "reference":
                cal = {"steps": REFERENCE_STEPS, "lr": REFERENCE_LR}
                how = "reference (1 Adam step, lr 5e-3)"
            else:
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
