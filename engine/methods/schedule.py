"""How long each recorded checkpoint was trained: the rows of each stage, and Σ of the learning
rates over its optimizer steps (from the recipe's schedule where it is known, else the recorded
rate). Source scales its segments by it; TRAK's damping rule reads the training time of a checkpoint.
"""
from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np

from engine.core.errors import ProponentError
from engine.core.project import Checkpoint, Project
from engine.core.train import lr_at

# torch.optim.Adam's defaults, which engine.core.train trains with
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


def stage_rows(project: Project) -> dict[str, np.ndarray]:
    """The rows each stage trained on, from the trajectory log (engine/train.py record_training)."""
    traj = project.trajectory()
    out = {}
    for name, info in (traj.get("stages") or {}).items():
        f = project.checkpoint_dir / str(info.get("rows_file", ""))
        if f.is_file():
            try:
                out[name] = np.asarray(json.loads(f.read_text()), dtype=np.int64)
            except (json.JSONDecodeError, ValueError) as e:
                raise ProponentError(f"corrupt stage rows file: {e}", file=str(f)) from None
    return out


def lr_sum(project: Project, ck: Checkpoint, steps: int, stage_rows: dict[str, np.ndarray]) -> float:
    """Σ of the learning rates of the ``steps`` optimizer steps that end at ``ck``.

    Recomputed from the recipe's schedule (engine.core.train.lr_at, as fit_model applies it) when the
    checkpoint's stage is in the recipe; otherwise the checkpoint's recorded rate × steps.
    """
    stage = next((s for s in project.recipe.resolved_stages() if s.name == ck.stage), None)
    n_rows = len(stage_rows[ck.stage]) if ck.stage in stage_rows else None
    if stage is None or n_rows is None or ck.optimizer not in ("sgd", "adam") or stage.lr_schedule == "constant":
        return ck.lr * steps
    total = math.ceil(n_rows / project.recipe.batch_size) * stage.epochs
    end = ck.stage_steps
    start = max(0, end - steps)
    try:
        rates = [lr_at(stage, k / total) for k in range(start, end)]
    except Exception:  # an unknown schedule: fall back to the recorded rate
        return ck.lr * steps
    # the recorded rate of the checkpoint's last step must agree, else the recipe changed since training
    if rates and abs(rates[-1] - ck.lr) > 1e-9 * max(1.0, abs(ck.lr)):
        return ck.lr * steps
    return float(sum(rates)) + ck.lr * max(0, steps - len(rates))


def adam_denominator(exp_avg_sq, step: float):
    """√v̂ + ε of torch's Adam, v̂ = exp_avg_sq / (1 − β₂^step) (float64): what each coordinate's step is
    divided by."""
    vhat = exp_avg_sq.double() / max(1e-12, 1.0 - ADAM_BETA2 ** max(float(step), 1.0))
    return vhat.sqrt() + ADAM_EPS


_STEP_SCALES: dict = {}  # (state file, its mtime, parameters) → s̄: an ensemble member rereads its run's states


def adam_step_scale(ck: Checkpoint, params: Iterable[str] | None = None) -> float | None:
    """s̄ = the mean over the parameter entries (``params``, default every one in the state) of √v̂ + ε in
    ``ck``'s saved Adam state (v̂ the bias-corrected second moment): Adam divides each coordinate's step
    by √v̂ + ε, and η/s̄ is taken as the learning rate of the gradient descent it resembles. None without
    a saved state. Read one tensor at a time (the state is twice the model)."""
    from safetensors import safe_open

    f = ck.optimizer_state
    if f is None or not f.is_file():
        return None
    wanted = None if params is None else frozenset(params)
    key = (str(f), f.stat().st_mtime_ns, wanted)
    if key in _STEP_SCALES:
        return _STEP_SCALES[key]
    total, count = 0.0, 0
    try:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for k in keys:
                if not k.endswith(".exp_avg_sq") or (wanted is not None and k[:-len(".exp_avg_sq")] not in wanted):
                    continue
                v = st.get_tensor(k)
                step_key = k[: -len(".exp_avg_sq")] + ".step"
                t = float(st.get_tensor(step_key).reshape(-1)[0]) if step_key in keys else float(max(ck.step, 1))
                total += float(adam_denominator(v, t).sum())
                count += v.numel()
    except Exception as e:  # a corrupt or foreign file: say which
        raise ProponentError(f"cannot read the saved optimizer state: {e}", file=str(f)) from None
    out = _STEP_SCALES[key] = total / count if count else None
    return out


def training_time(project: Project, ck: Checkpoint, params: Iterable[str] | None = None) -> float | None:
    """τ = Σ_t η_t / (1 − β) over every optimizer step of ``ck``'s run up to ``ck``: how far SGD with
    momentum β moved the linearised model (gradient descent for time τ on a quadratic fits the
    directions of curvature above about 1/τ, as a ridge would).

    Adam: τ = Σ_t η_t / s̄_t, s̄ (:func:`adam_step_scale`, over ``params``: the tracked parameters) from the
    saved state of the checkpoint that ends each stretch of steps. Adam with a slowly varying second
    moment is gradient descent preconditioned by 1/(√v̂ + ε); that per-coordinate preconditioner is
    summarised by one learning rate η/s̄ with s̄ the mean of √v̂ + ε (the reciprocal of the mean, not the
    mean of the reciprocals, which entries with v̂ near 0 would dominate through ε; damping_scale_adam is
    calibrated for this choice). Its momentum is an average of gradients, not a longer step, so no
    1/(1 − β₁). A checkpoint without a saved state takes the nearest later one's s̄ (the nearest earlier
    one's after the last state).

    None where it is not known: a weights-only checkpoint, L-BFGS, a run that changed optimizer, or Adam
    without any saved state."""
    if ck.kind == "weights" or ck.optimizer not in ("sgd", "adam") or ck.step <= 0:
        return None
    rows = stage_rows(project)
    run = sorted((c for c in project.checkpoints if c.model_id == ck.model_id and c.step <= ck.step),
                 key=lambda c: c.step)
    if any(c.optimizer != ck.optimizer for c in run):
        return None  # a run that switched optimizers: no one rule
    scales: list[float | None] = [None] * len(run)
    if ck.optimizer == "adam":
        scales = [adam_step_scale(c, params) for c in run]
        fill = None
        for i in range(len(run) - 1, -1, -1):  # a checkpoint without a state takes the next one's
            fill = scales[i] = scales[i] if scales[i] else fill
        fill = None
        for i in range(len(run)):  # after the last state: the previous one's
            fill = scales[i] = scales[i] if scales[i] else fill
        if scales[-1] is None:
            return None
    total, prev = 0.0, 0
    for c, sbar in zip(run, scales):
        if c.step > prev:
            steps = lr_sum(project, c, c.step - prev, rows)
            total += steps / sbar if c.optimizer == "adam" else steps / (1.0 - c.momentum)
            prev = c.step
    return total if math.isfinite(total) and total > 0 else None  # a NaN state (a diverged run): unknown
