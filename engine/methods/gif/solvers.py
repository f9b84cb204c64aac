"""Generalized influence functions (GIF; Lyu, Jang, Ryu, Yang, 2023): selection, solvers, solve.

GIF predicts the parameters of the model retrained without a target set ``U`` (or with ``U``
relabelled) by updating only a small selected fraction of the parameters:

    min_x ‖H Pᵀ x − g‖²   ⇔   (P H Hᵀ Pᵀ) x = P H g,        θ_S ← θ_S + x

``H`` is the Hessian of the post-edit training objective (mean loss on the retained data,
plus the recipe's weight decay), used only through Hessian-vector products
(engine.autodiff.hvp); ``P`` selects whole output rows (weights + bias) of every Linear/Conv2d
layer; ``g`` is the target gradient:

- removal: ``g = (|U|/(N−|U|)) · ∇[mean loss on U + (wd/2)‖θ‖²]``. The weight-decay part is
  our addition to the paper's target: at a converged regularised optimum the gradient of the
  retained objective is exactly ``−g`` (the paper has no weight decay, where the two agree);
- relabel: ``g = (|U|/N) · ∇[mean loss on U with the old labels − with the new labels]``.

Sign: with ``∇L_new(θ) = −g`` at the old optimum, the Newton step is ``x = H⁻¹ g``, so
``θ + x`` approximates the retrained model; checked against retraining on a convex model in
tests/test_gif.py. Comparison variants from the same solver: plain IF (P = I, i.e.
``H² x = H g``), frozen (``H_SS x = g_S``) and projected (``(H⁻¹ g)_S``).

Solvers work on batches of right-hand sides (rows of ``[k, p]``), each row with its own
selection mask, so per-query attribution solves many queries at once. Non-convergence is
never returned as an answer: :func:`solve_psd` reports it and :func:`require_converged`
raises :class:`SolverNotConverged` carrying the residual.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.autodiff.curvature import Layer, _Capture, _grads_only_for
from engine.autodiff.functional import FunctionalModel, Tracked
from engine.autodiff.hvp import HessianOperator
from engine.autodiff.measurement import correct_class_margin
from engine.core.errors import ProponentError

SELECTABLE = (nn.Linear, nn.Conv2d)
SELECTIONS = ("output", "gradient", "random")
VARIANTS = ("gif", "if", "frozen", "projected")
SOLVERS = ("cg", "richardson")


# ----------------------------------------------------------------------------- selection
def _row_groups(model: nn.Module, tracked: Tracked = None) -> list[tuple[nn.Module, list[tuple[int, int]], int]]:
    """For each selectable layer with tracked parameters: (module, [(offset, row_size) of weight,
    bias], out rows), offsets in the tracked parameters' flat layout."""
    by_module: dict[int, list] = {}
    order: list[nn.Module] = []
    for s in FunctionalModel(model, tracked).layout:
        module = model.get_submodule(s.module_name)
        if isinstance(module, SELECTABLE) and s.attr in ("weight", "bias"):
            if id(module) not in by_module:
                by_module[id(module)] = []
                order.append(module)
            by_module[id(module)].append(s)
    out = []
    for m in order:
        rows = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        parts = [(s.offset, s.numel // rows) for s in by_module[id(m)]]
        out.append((m, parts, rows))
    return out


def rows_to_mask(model: nn.Module, chosen: dict[int, np.ndarray], n_params: int,
                 tracked: Tracked = None) -> torch.Tensor:
    """Boolean flat mask selecting, per layer (keyed by id(module)), whole output rows with their bias."""
    mask = torch.zeros(n_params, dtype=torch.bool)
    for m, parts, rows in _row_groups(model, tracked):
        for r in chosen.get(id(m), ()):
            for offset, size in parts:
                mask[offset + int(r) * size: offset + (int(r) + 1) * size] = True
    return mask


def rows_per_layer(rows: int, ratio: float) -> int:
    return min(rows, max(1, math.ceil(ratio * rows - 1e-9)))


def _layer_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
                      objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                      batch_size: int, device: str, tracked: Tracked = None) -> dict[int, torch.Tensor]:
    """Mean |output| (mode "output") or mean |∂objective/∂output| ("gradient") per output row."""
    groups = _row_groups(model, tracked)
    sums = {id(m): torch.zeros(rows, dtype=torch.float64) for m, _, rows in groups}
    count = {"n": 0}
    hooks = []

    def reduce(t: torch.Tensor, mod: nn.Module) -> torch.Tensor:
        """[rows] |t| summed over the batch and averaged over positions: a Conv2d's rows are its
        channels (dim 1), a Linear's its last dim (it may run over tokens, [b, T, out])."""
        t = t.detach().abs().double()
        rows = t.shape[1] if isinstance(mod, nn.Conv2d) else t.shape[-1]
        per_row = (t.transpose(0, 1) if isinstance(mod, nn.Conv2d) else t.movedim(-1, 0)).reshape(rows, -1)
        return per_row.sum(1).cpu() / max(1, t[0].numel() // rows)

    # hooks must return None: a forward hook's return value would replace the layer's output
    def on_forward(mod, inp, out) -> None:
        sums[id(mod)].add_(reduce(out, mod))

    for m, _, _ in groups if mode == "output" else ():
        hooks.append(m.register_forward_hook(on_forward))
    # gradient mode: the output gradients through the curvature capture, which also handles a model
    # that changes a layer's output in place (where a full backward hook fails)
    names = {id(m): n for n, m in model.named_modules()}
    layers = [Layer(names[id(m)], m, "", "", None, rows, 0) for m, _, rows in groups]
    cap = None if mode == "output" else _Capture(layers)
    model = model.eval()
    try:
        for lo in range(0, len(y), batch_size):
            xb = x[lo:lo + batch_size].to(device)
            yb = y[lo:lo + batch_size].to(device)
            if cap is None:
                with torch.no_grad():
                    model(xb)
            else:
                with _grads_only_for(model, cap.layers), torch.enable_grad():
                    # a layer whose weight is applied elsewhere (attention's out_proj) has no output
                    # of its own: no statistic, as in the output mode
                    out = cap.run(model, xb, require_called=False)
                    grads = cap.split(torch.autograd.grad(objective(out, yb), cap.output_list(), allow_unused=True))
                for L in cap.layers:
                    for g in grads[L.name]:  # a layer called several times: the sum over its calls
                        if g is not None:
                            sums[id(L.module)].add_(reduce(g, L.module))
                del out, grads
            count["n"] += len(yb)
    finally:
        for h in hooks:
            h.remove()
        if cap is not None:
            cap.close()
    return {k: v / max(1, count["n"]) for k, v in sums.items()}


def select_parameters(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ratio: float = 0.05,
                      mode: str = "output", objective: str | Callable = "loss", seed: int = 0,
                      batch_size: int = 512, device: str = "cpu", tracked: Tracked = None) -> torch.Tensor:
    """GIF's selection operator P as a flat boolean mask over the tracked parameters (``tracked``).

    Per Linear/Conv2d layer, ``ceil(ratio × rows)`` whole output rows (neurons / channels, with
    their bias) are taken, ranked by the mean |activation| over ``(x, y)`` ("output"), the mean
    |output gradient| of ``objective`` ("gradient": "loss", "margin" or a callable
    ``(logits, y) -> scalar``), or at random ("random", an ablation). Parameters of other
    modules (normalisation layers, embeddings) are never selected.
    """
    if mode not in SELECTIONS:
        raise ProponentError(f"selection must be one of {', '.join(SELECTIONS)}, not {mode!r}")
    if not 0 < ratio <= 1:
        raise ProponentError(f"ratio must be in (0, 1], not {ratio}")
    n_params = FunctionalModel(model, tracked).n_params
    groups = _row_groups(model, tracked)
    if not groups:
        raise ProponentError("GIF needs at least one nn.Linear or nn.Conv2d layer to select parameters from")
    model = model.to(device)
    if mode == "random":
        rng = np.random.default_rng(seed)
        chosen = {id(m): rng.choice(rows, rows_per_layer(rows, ratio), replace=False) for m, _, rows in groups}
        return rows_to_mask(model, chosen, n_params, tracked)
    if isinstance(objective, str):
        if objective == "loss":
            objective_fn = lambda logits, yb: F.cross_entropy(logits, yb, reduction="sum")
        elif objective == "margin":
            objective_fn = lambda logits, yb: correct_class_margin(logits, yb).sum()
        else:
            raise ProponentError(f"selection objective must be 'loss' or 'margin', not {objective!r}")
    else:
        objective_fn = objective
    stats = _layer_statistics(model, x, y, mode, objective_fn, batch_size, device, tracked)
    chosen = {}
    for m, _, rows in groups:
        k = rows_per_layer(rows, ratio)
        # stable ranking, ties broken by row index
        order = np.argsort(-stats[id(m)].numpy(), kind="stable")
        chosen[id(m)] = order[:k]
    return rows_to_mask(model, chosen, n_params, tracked)


# ----------------------------------------------------------------------------- solvers
@dataclass
class SolveResult:
    x: torch.Tensor  # [p] or [k, p]
    residual: float  # worst relative residual ‖b − A x‖/‖b‖ over the right-hand sides (recomputed exactly)
    converged: bool
    iterations: int
    method: str
    residuals: list[float] = field(default_factory=list)  # per right-hand side
    history: list[float] = field(default_factory=list)  # worst relative residual per iteration
    step: float | None = None  # Richardson's final μ (the smallest over rows)
    restarts: int = 0
    seconds: float = 0.0
    operator_calls: int = 0  # applications of A (each is two HVPs for the GIF normal equations)

    def summary(self) -> dict:
        return {"residual": self.residual, "converged": self.converged, "iterations": self.iterations,
                "method": self.method, "restarts": self.restarts, "seconds": self.seconds,
                "operator_calls": self.operator_calls, **({"step": self.step} if self.step is not None else {})}


class SolverNotConverged(ProponentError):
    """The iterative solve stopped above its tolerance; ``result`` holds the residual."""

    def __init__(self, message: str, result: SolveResult):
        super().__init__(message)
        self.result = result


def require_converged(result: SolveResult, what: str = "GIF solve") -> SolveResult:
    if not result.converged:
        raise SolverNotConverged(
            f"{what} did not converge: relative residual {result.residual:.3g} after {result.iterations} iterations "
            f"({result.method}); raise max_iter or tol, add damping, or estimate H on more data", result)
    return result


def _rownorm(t: torch.Tensor) -> torch.Tensor:
    return t.norm(dim=1)


def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, iters: int = 20,
                    mask: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Per-row estimate of the largest eigenvalue of the PSD operator (restricted to ``mask``)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    if mask is not None:
        v = v * mask
    v = v / _rownorm(v).clamp_min(1e-300)[:, None]
    lam = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    for _ in range(iters):
        w = apply(v)
        lam = (v * w).sum(1)
        v = w / _rownorm(w).clamp_min(1e-300)[:, None]
    # the Rayleigh quotient underestimates; the caller's step has a margin and restarts on divergence
    return lam.clamp_min(0)


def solve_psd(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, method: str = "cg",
              tol: float = 1e-3, max_iter: int = 500, mask: torch.Tensor | None = None, power_iters: int = 20,
              max_restarts: int = 8, progress: Callable[[str, int, int], None] | None = None,
              precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
              x0: torch.Tensor | None = None, rowwise: bool = False) -> SolveResult:
    """Solve ``A x = b`` for a symmetric positive semi-definite operator ``A`` (rows of ``b``
    are independent right-hand sides; ``apply`` maps ``[k, p] → [k, p]`` row-wise).

    - ``cg``: conjugate gradients (on the GIF normal equations, CGNR), per row;
    - ``richardson``: the reference's damped Richardson/LiSSA iteration ``x ← x + μ(b − A x)``
      with ``μ = 0.9/λ_max`` (power iteration), halving μ and restarting when it diverges.

    Both stop when every row's relative residual ``‖b − A x‖/‖b‖ ≤ tol``; the reported
    residual is recomputed from ``x`` at the end, not taken from a recurrence.

    ``precondition`` (cg only): an SPD approximation of ``A⁻¹`` (row-wise), turning CG into
    preconditioned CG; ``x0``: the starting point (default 0), e.g. the preconditioner's own answer.
    ``rowwise``: ``apply`` also takes ``rows=`` (indices of the rows given), so CG applies ``A`` only
    to the right-hand sides still above tolerance (a batch costs what its unconverged rows cost).
    """
    if method not in SOLVERS:
        raise ProponentError(f"solver must be one of {', '.join(SOLVERS)}, not {method!r}")
    t0 = time.perf_counter()
    single = b.ndim == 1
    B = b[None] if single else b
    calls = {"n": 0}

    def A(v):
        calls["n"] += 1
        return apply(v)

    bnorm = _rownorm(B)
    live = bnorm > 0
    safe_b = bnorm.clamp_min(1e-300)
    X = torch.zeros_like(B)
    history: list[float] = []
    iters = 0
    restarts = 0
    step_out = None
    if not live.any():
        pass
    elif method == "cg":
        M = precondition or (lambda r: r)
        if x0 is not None:
            X = x0.reshape(B.shape).to(B).clone()
            R = B - A(X)
        else:
            R = B.clone()
        Z = M(R)
        Pd = Z.clone()
        rz = (R * Z).sum(1)
        rr = (R * R).sum(1)
        active = live.clone()
        for it in range(max_iter):
            rel = rr.sqrt() / safe_b
            active = active & (rel > tol)
            history.append(float(rel[live].max()))
            if not active.any():
                break
            iters = it + 1
            idx = active.nonzero().squeeze(1)
            if rowwise and len(idx) < len(active):
                AP = torch.zeros_like(Pd)
                calls["n"] += 1
                AP[idx] = apply(Pd[idx], rows=idx)
            else:
                AP = A(Pd)
            pAp = (Pd * AP).sum(1)
            ok = active & (pAp > 0) & (rz > 0)
            alpha = torch.where(ok, rz / pAp.where(pAp > 0, torch.ones_like(pAp)), torch.zeros_like(rz))
            X += alpha[:, None] * Pd
            R -= alpha[:, None] * AP
            rr = torch.where(ok, (R * R).sum(1), rr)
            Z = M(R)
            rz_new = (R * Z).sum(1)
            beta = torch.where(ok, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
            Pd = torch.where(ok[:, None], Z + beta[:, None] * Pd, Pd)
            rz = torch.where(ok, rz_new, rz)
            active = ok  # a row with pAp ≤ 0 has broken down; its residual decides convergence below
            if progress:
                progress("solve (cg)", it + 1, max_iter)
    else:
        lam = power_iteration(A, B, power_iters, mask)
        mu = torch.where(lam > 0, 0.9 / lam.clamp_min(1e-300), torch.ones_like(lam))
        R = B.clone()
        active = live.clone()
        best = torch.ones_like(bnorm)
        it = 0
        while it < max_iter:
            rel = _rownorm(R) / safe_b
            diverged = live & (~torch.isfinite(rel) | (rel > 10.0 * best.clamp_min(1.0)))
            if diverged.any():
                if restarts >= max_restarts:
                    break
                restarts += 1
                mu = torch.where(diverged, mu / 2, mu)
                X = torch.where(diverged[:, None], torch.zeros_like(X), X)
                R = torch.where(diverged[:, None], B, R)
                best = torch.where(diverged, torch.ones_like(best), best)
                continue
            best = torch.minimum(best, rel)
            active = live & (rel > tol)
            history.append(float(rel[live].max()))
            if not active.any():
                break
            X = X + torch.where(active[:, None], mu[:, None] * R, torch.zeros_like(R))
            R = B - A(X)
            it += 1
            iters = it
            if progress:
                progress("solve (richardson)", it, max_iter)
        step_out = float(mu[live].min()) if live.any() else None
    # the honest residual, from x itself
    R_true = B - A(X) if live.any() else torch.zeros_like(B)
    rel_true = _rownorm(R_true) / safe_b
    rel_true = torch.where(live, rel_true, torch.zeros_like(rel_true))
    finite = bool(torch.isfinite(X).all() and torch.isfinite(rel_true).all())
    worst = float(rel_true.max()) if finite else float("inf")
    # a small slack over tol: the recurrence residual and the recomputed one differ by round-off
    converged = finite and worst <= tol * 1.5
    return SolveResult(x=X[0] if single else X, residual=worst, converged=converged, iterations=iters,
                       method=method, residuals=[float(r) for r in rel_true], history=history, step=step_out,
                       restarts=restarts, seconds=time.perf_counter() - t0, operator_calls=calls["n"])


# ----------------------------------------------------------------------------- the generalized IF solve
def generalized_solve(H: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, mask: torch.Tensor | None, *,
                      variant: str = "gif", method: str = "cg", tol: float = 1e-3, max_iter: int = 500,
                      damping: float = 0.0, progress=None) -> SolveResult:
    """The parameter update ``x`` (full length, zero outside the selection) for target gradient(s) ``g``.

    - ``gif``:       (P H Hᵀ Pᵀ) x = P H g            (``mask`` is P; rows of ``g`` may have their own mask)
    - ``if``:        H² x = H g  (P = I; the normal equations, so an indefinite H is handled alike)
    - ``frozen``:    H_SS x = g_S, as (P H Pᵀ)² x = (P H Pᵀ) g_S
    - ``projected``: (H⁻¹ g) restricted to the selection

    ``damping`` λ replaces H by H + λI throughout (0 by default).
    """
    if variant not in VARIANTS:
        raise ProponentError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    single = g.ndim == 1
    G = g[None] if single else g
    if variant in ("gif", "frozen", "projected") and mask is None:
        raise ProponentError(f"variant {variant!r} needs a parameter selection")
    M = None
    if mask is not None:
        M = (mask[None] if mask.ndim == 1 else mask).to(device=G.device, dtype=G.dtype)
        M = M.expand_as(G)

    def Hd(v):
        out = H(v)
        return out + damping * v if damping else out

    if variant == "gif":
        rhs = M * Hd(G)
        res = solve_psd(lambda v: M * Hd(Hd(M * v)), rhs, method=method, tol=tol, max_iter=max_iter, mask=M,
                        progress=progress)
    elif variant == "if" or variant == "projected":
        rhs = Hd(G)
        res = solve_psd(lambda v: Hd(Hd(v)), rhs, method=method, tol=tol, max_iter=max_iter, progress=progress)
        if variant == "projected":
            res.x = res.x * (M[0] if single else M)
    else:  # frozen
        def HSS(v):
            return M * Hd(M * v)
        rhs = HSS(M * G)
        res = solve_psd(lambda v: HSS(HSS(v)), rhs, method=method, tol=tol, max_iter=max_iter, mask=M,
                        progress=progress)
    if single and res.x.ndim == 2:
        res.x = res.x[0]
    return res


def adjoint_solve(H: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor, mask: torch.Tensor | None, *,
                  method: str = "cg", tol: float = 1e-3, max_iter: int = 500, damping: float = 0.0,
                  progress=None, precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  start: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, SolveResult]:
    """Per-query adjoint of the GIF update: ``v = H Pᵀ w`` with ``(P H Hᵀ Pᵀ) w = P q``.

    Then for any target gradient ``g``, ``qᵀ Pᵀ x(g) = vᵀ g`` where ``x(g)`` is the GIF update;
    with ``mask`` None (P = I) ``v = H⁻¹ q``. Rows of ``q`` (and of ``mask``) are separate queries.

    ``precondition`` and ``start`` approximate ``(H + λ)⁻²`` on full vectors (row-wise); they are
    restricted to each query's selection here. ``precondition`` turns CG into preconditioned CG;
    ``start`` gives the starting point (its answer for the right-hand side) instead of zero.
    """
    single = q.ndim == 1
    Q = q[None] if single else q

    def Hd(v):
        out = H(v)
        return out + damping * v if damping else out

    M = None if mask is None else (mask[None] if mask.ndim == 1 else mask).to(device=Q.device, dtype=Q.dtype).expand_as(Q)

    def restrict(fn):
        if fn is None:
            return None
        return fn if M is None else (lambda r: M * fn(M * r))

    pc, st = restrict(precondition if method == "cg" else None), restrict(start)

    def A(v, rows=None):
        if M is None:
            return Hd(Hd(v))
        Mr = M if rows is None else M[rows]
        return Mr * Hd(Hd(Mr * v))

    rhs = Q if M is None else M * Q
    res = solve_psd(A, rhs, method=method, tol=tol, max_iter=max_iter, mask=M, progress=progress,
                    precondition=pc, x0=None if st is None else st(rhs), rowwise=True)
    W = res.x if res.x.ndim == 2 else res.x[None]
    V = Hd(W if M is None else M * W)
    return (V[0] if single else V), res


# ----------------------------------------------------------------------------- targets
def removal_target(op: HessianOperator, x_u: torch.Tensor, y_u: torch.Tensor, n_total: int) -> torch.Tensor:
    """g = (|U|/(N−|U|)) ∇[mean loss on U + (wd/2)‖θ‖²]."""
    u = len(y_u)
    if u >= n_total:
        raise ProponentError("cannot remove every training example")
    g = op.loss_gradient(x_u, y_u)
    if op.weight_decay:
        g = g + op.weight_decay * op.theta()
    return (u / (n_total - u)) * g


def relabel_target(op: HessianOperator, x_u: torch.Tensor, y_old: torch.Tensor, y_new: torch.Tensor,
                   n_total: int) -> torch.Tensor:
    """g = (|U|/N) ∇[mean loss on U with the old labels − with the new labels]."""
    u = len(y_old)
    return (u / n_total) * (op.loss_gradient(x_u, y_old) - op.loss_gradient(x_u, y_new))


def retained_sample(n_total: int, removed: np.ndarray, max_examples: int, seed: int = 0) -> np.ndarray:
    """The rows H is estimated on: the retained rows, subsampled to at most ``max_examples`` (≤ 0: all)."""
    keep = np.ones(n_total, bool)
    keep[np.asarray(removed, dtype=np.int64)] = False
    rows = np.flatnonzero(keep)
    if 0 < max_examples < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_examples, replace=False))
    return rows


__all__ = ["select_parameters", "rows_to_mask", "rows_per_layer", "solve_psd", "power_iteration", "SolveResult",
           "SolverNotConverged", "require_converged", "generalized_solve", "adjoint_solve", "removal_target", "relabel_target",
           "retained_sample", "SELECTIONS", "VARIANTS", "SOLVERS"]
