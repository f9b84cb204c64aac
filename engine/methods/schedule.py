"""How long each recorded checkpoint was trained: the rows of each stage, and Σ of the learning
rates over its optimizer steps (from the recipe's schedule where it is known, else the recorded
rate). Source scales its segments by it; TRAK's damping rule reads the training time of a checkpoint.
"""
from __future__ import annotations

import json
import math

import numpy as np

from engine.core.errors import ProponentError
from engine.core.project import Checkpoint, Project
from engine.core.train import lr_at


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


def training_time(project: Project, ck: Checkpoint) -> float | None:
    """τ = Σ_t η_t / (1 − β) over every optimizer step of ``ck``'s run up to ``ck``: how far SGD with
    momentum β moved the linearised model (gradient descent for time τ on a quadratic fits the
    directions of curvature above about 1/τ, as a ridge would). None where it is not known: a
    weights-only checkpoint, or an optimizer other than SGD (Adam scales each coordinate's step)."""
    if ck.kind == "weights" or ck.optimizer != "sgd" or ck.step <= 0:
        return None
    rows = stage_rows(project)
    run = sorted((c for c in project.checkpoints if c.model_id == ck.model_id and c.step <= ck.step),
                 key=lambda c: c.step)
    total, prev = 0.0, 0
    for c in run:
        if c.step > prev:
            total += lr_sum(project, c, c.step - prev, rows) / (1.0 - c.momentum)
            prev = c.step
    return total if total > 0 else None
