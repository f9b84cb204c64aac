"""Synthetic stand-in sets for the Distilled Datamodel (DDM; Ye et al., CVPR 2024).

No official code exists; this is the reconstruction summarised in docs/design.md, section 4:

1. ``cluster_per_class``: k-means within each class on penultimate features; each cluster's
   synthetic example starts from its medoid (the real member nearest the cluster centre).
2. ``distill``: reverse gradient matching along the recorded trajectory. The synthetic inputs
   are optimised so each one's loss gradient matches its cluster's mean real loss gradient,
   with a layer-wise cosine distance (per output row, as in dataset condensation), summed over
   checkpoints. Resumable: synset + optimiser state are saved atomically every few steps.
   The per-cluster matching residual is the method's own quality signal.
3. ``simulate_removals``: online leave-one-cluster-out from the final checkpoint, either by
   gradient ascent on ``s_k`` weighted by |D_k|/N, or by a short re-fit on the synset with and
   without ``s_k``. Returns one parameter vector per removed cluster plus the reference one;
   a query's effect is margin(reference) − margin(without k) (positive: removal lowers it).

Also here: the data-quality helpers the app calls (``cluster_quality``, ``cluster_table``,
``synset_images``), which take a fitted ``ddm`` Attributor.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.func import grad, vmap

from engine.autodiff import (
    FunctionalModel,
    GradientComputer,
    correct_class_margin,
    example_loss,
)
from engine.core.errors import Cancelled, ProponentError
from engine.storage.arrays import atomic_write_bytes

ProgressFn = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- clustering
@dataclass
class Clustering:
    """Cluster k holds the training rows ``np.flatnonzero(assign == k)``; all of class ``classes[k]``."""

    assign: np.ndarray  # [n] cluster of each training row
    classes: np.ndarray  # [K] class of each cluster
    medoids: np.ndarray  # [K] training row of each cluster's medoid

    @property
    def n_clusters(self) -> int:
        return len(self.classes)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.assign, minlength=self.n_clusters)

    def members(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.assign == k)


def cluster_per_class(features: np.ndarray, labels: np.ndarray, clusters_per_class: int, seed: int = 0) -> Clustering:
    """k-means (fixed seed) within each class; a class with fewer distinct points gets fewer clusters."""
    # sklearn.cluster takes ~1 s to import; only DDM clustering needs it
    from sklearn.cluster import KMeans

    if clusters_per_class < 1:
        raise ProponentError(f"ddm: clusters_per_class must be at least 1, not {clusters_per_class}")
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    assign = np.full(n, -1, dtype=np.int64)
    classes, medoids = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        f = features[rows]
        distinct = len(np.unique(f, axis=0))
        k = int(min(clusters_per_class, distinct))
        if k <= 1:
            lab = np.zeros(len(rows), dtype=np.int64)
        else:
            lab = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(f).labels_.astype(np.int64)
        for j in np.unique(lab):  # only non-empty clusters, numbered consecutively
            sel = np.flatnonzero(lab == j)
            # the centre is the mean of the cluster's final members (k-means' own centre up to its tolerance)
            d = ((f[sel] - f[sel].mean(0)) ** 2).sum(1)
            assign[rows[sel]] = len(classes)
            classes.append(int(c))
            medoids.append(int(rows[sel[int(np.argmin(d))]]))
    return Clustering(assign=assign, classes=np.asarray(classes, np.int64), medoids=np.asarray(medoids, np.int64))


# ----------------------------------------------------------------------------- gradient matching
def cluster_mean_gradients(computer: GradientComputer, x: torch.Tensor, y: torch.Tensor, clustering: Clustering) -> torch.Tensor:
    """[K, p] mean per-example loss gradient of each cluster's real members."""
    K = clustering.n_clusters
    sums = torch.zeros(K, computer.n_params, dtype=torch.float64)
    assign = torch.as_tensor(clustering.assign)
    for lo, hi, g in computer.iter_batches(x, y, "loss"):
        sums.index_add_(0, assign[lo:hi], g.detach().double().cpu())
    return (sums / torch.as_tensor(clustering.sizes, dtype=torch.float64)[:, None]).float()


class LayerwiseCosine:
    """Σ over layers and output rows of (1 − cos) between per-example gradients, as in dataset
    condensation. Rows whose target gradient is zero (e.g. dead units) are left out."""

    def __init__(self, shapes: list[torch.Size], sizes: list[int]):
        self.shapes, self.sizes = shapes, sizes

    def _rows(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, o = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            seg = flat[..., o:o + size]
            rows = shape[0] if len(shape) >= 2 else 1
            out.append(seg.reshape(*flat.shape[:-1], rows, size // rows))
            o += size
        return out

    def __call__(self, gs: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance [K], number of active rows [K]) between [K, p] synthetic and target gradients."""
        dist = gs.new_zeros(gs.shape[:-1])
        active = gs.new_zeros(gs.shape[:-1])
        for a, b in zip(self._rows(gs), self._rows(gt)):
            nb = b.norm(dim=-1)
            mask = (nb > 0).to(a.dtype)
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * nb + 1e-12)
            dist = dist + ((1 - cos) * mask).sum(-1)
            active = active + mask.sum(-1)
        return dist, active


def select_checkpoints(project, max_checkpoints: int) -> list:
    """The trajectory of model 0, evenly thinned to ``max_checkpoints`` (0: all), final one kept."""
    cks = project.run_checkpoints()
    if max_checkpoints > 0 and len(cks) > max_checkpoints:
        pick = np.unique(np.round(np.linspace(len(cks) - 1, 0, max_checkpoints)).astype(int))
        cks = [cks[i] for i in sorted(pick)]
    return cks


@dataclass
class DistillResult:
    x: torch.Tensor  # [K, *input_shape] synthetic inputs
    residual_init: np.ndarray  # [K] matching residual at the medoid initialisation
    residual: np.ndarray  # [K] after distillation (mean over checkpoints of distance / active rows)
    history: list[float]  # total objective per step
    steps: int
    resumed_from: int


def _state_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def distill(computers: list[GradientComputer], targets: torch.Tensor, x_init: torch.Tensor, y_syn: torch.Tensor, *,
            steps: int, lr: float, state_path: str | Path | None = None, state_key: str = "", save_every: int = 10,
            progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None) -> DistillResult:
    """Reverse gradient matching: Adam on the synthetic inputs, minimising Σ_t Σ_k D(∇ℓ(s_k; θ_t), ḡ_k(θ_t)).

    ``computers[t]`` holds the weights of checkpoint t; ``targets`` is [T, K, p]. With a
    ``state_path``, the synset, Adam state and step are written atomically every ``save_every``
    steps and a later call with the same ``state_key`` resumes from there (bit-for-bit the same
    result as an uninterrupted run: the objective is full-batch and deterministic).
    """
    if steps < 0:
        raise ProponentError(f"ddm: distill_steps must be ≥ 0, not {steps}")
    c0 = computers[0]
    metric = LayerwiseCosine(c0.shapes, c0.sizes)
    targets = targets.to(c0.device)  # the per-example gradients come out on the computers' device

    def residuals(x: torch.Tensor) -> np.ndarray:
        tot = torch.zeros(len(y_syn), dtype=torch.float64, device=c0.device)
        with torch.no_grad():
            for comp, tgt in zip(computers, targets):
                d, a = metric(comp.per_example(x, y_syn, "loss"), tgt)
                tot += (d / a.clamp_min(1)).double()
        return (tot / len(computers)).cpu().numpy()

    x = x_init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    start, history = 0, []
    residual_init = residuals(x)
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.is_file():
        try:
            st = torch.load(io.BytesIO(state_path.read_bytes()), weights_only=True)
        except Exception:
            st = None
        if st is not None and st.get("key") == state_key and int(st["step"]) <= steps:
            with torch.no_grad():
                x.copy_(st["x"])
            opt.load_state_dict(st["opt"])
            start, history = int(st["step"]), list(st["history"])
            residual_init = np.asarray(st["residual_init"], dtype=np.float64)

    def save(step: int) -> None:
        if state_path is not None:
            atomic_write_bytes(state_path, _state_bytes({"key": state_key, "step": step, "x": x.detach().clone(),
                                                         "opt": opt.state_dict(), "history": history,
                                                         "residual_init": torch.as_tensor(residual_init)}))

    if progress:
        progress("distill synset", start, steps)
    for step in range(start, steps):
        if cancel is not None and cancel():
            raise Cancelled(f"ddm: distillation cancelled at step {step} of {steps}; rerun to resume")
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for comp, tgt in zip(computers, targets):
            d, _ = metric(comp.per_example(x, y_syn, "loss"), tgt)
            loss = d.sum()
            loss.backward()  # accumulate over checkpoints: memory of one checkpoint's graph at a time
            total += float(loss.detach())
        if not math.isfinite(total):
            raise ProponentError("ddm: gradient matching diverged (non-finite objective); lower distill_lr")
        opt.step()
        history.append(total)
        if save_every > 0 and (step + 1) % save_every == 0:
            save(step + 1)
        if progress:
            progress("distill synset", step + 1, steps)
    if steps > start and (save_every <= 0 or steps % save_every):
        save(steps)
    x = x.detach()
    return DistillResult(x=x, residual_init=residual_init, residual=residuals(x), history=history, steps=steps,
                         resumed_from=start)


# ----------------------------------------------------------------------------- online stage
def stacked_margins(fm: FunctionalModel, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    batch: int = 2048) -> torch.Tensor:
    """[P, n] correct-class margins under each of P flat parameter vectors (float64)."""
    y = y.long()
    f = vmap(lambda th, xb, yb: correct_class_margin(fm.call_flat(th, xb), yb), in_dims=(0, None, None))
    with torch.no_grad():  # x is read a batch at a time (it may be image rows on disk)
        out = [f(thetas, x[lo:lo + batch].double(), y[lo:lo + batch]) for lo in range(0, len(y), batch)]
    return torch.cat(out, 1) if out else torch.zeros(len(thetas), 0, dtype=torch.float64)


def stacked_losses(fm: FunctionalModel, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[P, n] per-example losses under each of P flat parameter vectors (float64)."""
    x, y = x.double(), y.long()
    with torch.no_grad():
        return vmap(lambda th: example_loss(fm.call_flat(th, x), y))(thetas)


def simulate_removals(fm: FunctionalModel, x_syn: torch.Tensor, y_syn: torch.Tensor, weights: torch.Tensor, *,
                      variant: str, steps: int, lr: float, weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference [p], removed [K, p]) parameter vectors after simulating each cluster's removal.

    ``ascent``: θ_k ← θ_k + lr · w_k ∇ℓ(s_k; θ_k), ``steps`` times; the reference is θ_T.
    ``refit``: ``steps`` gradient-descent steps on Σ_j w_j ℓ(s_j; θ) + (wd/2)‖θ‖² from θ_T, once
    without s_k (for each k) and once with all; the reference is the latter.
    """
    xs, ys, w = x_syn.double(), y_syn.long(), weights.double()
    K = len(ys)
    theta = fm.theta().double()
    if variant == "ascent":
        def one(th, xk, yk):
            return example_loss(fm.call_flat(th, xk[None]), yk[None]).sum()
        g1 = vmap(grad(one))
        thetas = theta.expand(K, -1).clone()
        for _ in range(steps):
            thetas = thetas + lr * w[:, None] * g1(thetas, xs, ys)
        return theta.clone(), thetas.detach()
    if variant == "refit":
        W = w[None, :].repeat(K + 1, 1)
        W[torch.arange(K), torch.arange(K)] = 0.0

        def obj(th, wr):
            val = (wr * example_loss(fm.call_flat(th, xs), ys)).sum()
            return val + 0.5 * weight_decay * (th * th).sum()
        gr = vmap(grad(obj))
        thetas = theta.expand(K + 1, -1).clone()
        for _ in range(steps):
            thetas = thetas - lr * gr(thetas, W)
        return thetas[K].detach(), thetas[:K].detach()
    raise ProponentError(f"ddm: variant must be 'ascent' or 'refit', not {variant!r}")


# ----------------------------------------------------------------------------- data quality / app helpers
def cluster_quality(attributor) -> np.ndarray:
    """[K] predicted change of the validation loss when each cluster is removed (negative: removal
    helps, i.e. the cluster is harmful). Validation is a held-out part of the TRAINING data
    (never test); a cluster's own members are left out of its validation average."""
    return np.asarray(attributor.validation_effects, dtype=np.float64).copy()


def cluster_table(attributor, queries="test") -> list[dict]:
    """One row per cluster: members, size, class, residual, predicted effects, most harmful first."""
    att = attributor
    cl: Clustering = att.clustering
    C = att.cluster_scores(queries)  # [n_q, K]
    val = cluster_quality(att)
    rows = []
    for k in range(cl.n_clusters):
        rows.append({"cluster": k, "class": att._p.class_name(cl.classes[k]), "class_index": int(cl.classes[k]),
                     "size": int(cl.sizes[k]), "members": cl.members(k).tolist(), "medoid": int(cl.medoids[k]),
                     "residual": float(att.residual[k]), "residual_init": float(att.residual_init[k]),
                     "validation_loss_change": float(val[k]), "harmful": bool(val[k] < 0),
                     "mean_margin_effect": float(C[:, k].mean()) if C.shape[0] else 0.0,
                     "max_margin_effect": float(C[:, k].max()) if C.shape[0] else 0.0})
    rows.sort(key=lambda r: r["validation_loss_change"])
    return rows


def synset_images(attributor) -> dict:
    """The synthetic inputs (as the model sees them) with their medoid starting points and classes."""
    att = attributor
    cl: Clustering = att.clustering
    x0 = att._p.train_dataset.x[torch.as_tensor(cl.medoids)]
    return {"x": att.synset_x.numpy().copy(), "init": x0.numpy().copy(), "classes": cl.classes.copy(),
            "class_names": [att._p.class_name(c) for c in cl.classes], "sizes": cl.sizes.copy(),
            "residual": np.asarray(att.residual).copy(), "input_shape": list(att._p.input_shape)}
