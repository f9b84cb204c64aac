"""Cost estimates for a run before it starts."""
from __future__ import annotations

import time

from engine.autodiff import GradientComputer
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods import coerce_settings, get_method
from engine.methods.trak import ensemble_checkpoints


def calibrate_gradients(project: Project, n: int = 64) -> float:
    """Seconds per training example for one per-example margin gradient at the final checkpoint,
    measured on ``n`` examples (the unit most methods' cost is made of)."""
    computer = GradientComputer(project.load_model())
    x, y = project.train_dataset.x[:n], project.train_dataset.y[:n]
    computer.per_example(x[:2], y[:2])  # warm-up
    t0 = time.perf_counter()
    computer.per_example(x, y)
    return (time.perf_counter() - t0) / max(1, len(y))


def gradient_passes(project: Project, method: str, settings: dict) -> int:
    """How many passes of per-example gradients over the training set a run makes (an estimate)."""
    cls = get_method(method)
    s = coerce_settings(cls, settings)
    if hasattr(s, "ensemble") and hasattr(s, "max_models"):
        try:
            return max(1, len(ensemble_checkpoints(project, s.ensemble, s.max_models)))
        except ProponentError:  # e.g. an ensemble this project's checkpoints cannot give: the run will say why
            return 1
    if hasattr(s, "max_checkpoints"):
        n = len(project.checkpoints)
        return max(1, min(n, s.max_checkpoints) if s.max_checkpoints > 0 else n)
    return 1


def estimate_cost(project: Project, method: str, settings: dict, per_example_s: float) -> dict:
    passes = gradient_passes(project, method, settings)
    n = len(project.train_dataset) + len(project.test_dataset)
    return {"passes": passes, "seconds": passes * n * per_example_s, "per_example_ms": per_example_s * 1e3}
