"""Cost estimates for a run before it starts, from measured throughput.

The unit is this project's per-example gradient (timed on 64 examples); a method's cost is a
multiple of it. Where the method has run on this project before, the multiple is what those runs
took; otherwise it is what the method took on the digits sample (``cost_ratios.json``, measured by
``scripts/measure_cost_ratios.py``), shown as a range because a multiple carries over between
projects only roughly. Start-up of the job's worker process is added from this project's earlier
jobs (or the sample's figure).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from engine.autodiff import GradientComputer
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods import coerce_settings, get_method
from engine.methods.trak import ensemble_checkpoints


CALIBRATION_REPEATS = 5


def calibrate_gradients(project: Project, n: int = 64, repeats: int = CALIBRATION_REPEATS) -> float:
    """Seconds per training example for one per-example margin gradient at the final checkpoint:
    the median of ``repeats`` timings on ``n`` examples (the unit most methods' cost is made of).
    One timing of 64 examples (about 3 ms) gave 2.2e-5 to 11e-5 s within minutes on a shared
    machine, and every estimate is scaled by it; the median of five is steadier."""
    computer = GradientComputer(project.load_model())
    x, y = project.train_dataset.x[:n], project.train_dataset.y[:n]
    computer.per_example(x[:2], y[:2])  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        computer.per_example(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / max(1, len(y))


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


RATIOS_FILE = Path(__file__).with_name("cost_ratios.json")
SPREAD = 2.0  # a sample's multiple carries over within about this factor either way (measured ratios vary so)


def _sample_ratios() -> dict:
    try:
        return json.loads(RATIOS_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def estimate_cost(project: Project, method: str, settings: dict, per_example_s: float,
                  history: list[dict] | None = None, startup: list[float] | None = None) -> dict:
    """{"passes", "seconds" (gradients alone, a floor), "per_example_ms", "low", "high", "basis"}.

    ``history``: this project's finished runs (``list_runs``) with their fit and score seconds;
    ``startup``: seconds earlier jobs spent before their work began."""
    passes = gradient_passes(project, method, settings)
    n = len(project.train_dataset) + len(project.test_dataset)
    unit = n * per_example_s  # one gradient pass over the project
    out = {"passes": passes, "seconds": passes * unit, "per_example_ms": per_example_s * 1e3,
           "low": None, "high": None, "basis": None}
    ratios = []
    for r in history or []:
        took = (r.get("fit_s") or 0) + (r.get("score_s") or 0)
        if r.get("method") == method and r.get("status") == "done" and took > 0 and unit > 0:
            ratios.append(took / (gradient_passes(project, method, r.get("settings") or {}) * unit))
    sample = _sample_ratios()
    boot = sorted(startup or [])
    boot_s = boot[len(boot) // 2] if boot else float(sample.get("startup_s", 0.0))
    if ratios:
        lo, hi = min(ratios) / 1.25, max(ratios) * 1.25
        out["basis"] = f"{len(ratios)} earlier {method} run(s) on this project"
    elif method in sample.get("ratios", {}):
        r = float(sample["ratios"][method])
        lo, hi = r / SPREAD, r * SPREAD
        out["basis"] = f"{method} on the {sample.get('project', 'sample')} sample, scaled to this project's gradients"
    else:
        return out
    out["low"], out["high"] = boot_s + lo * passes * unit, boot_s + hi * passes * unit
    return out


def job_startup_seconds(jobs: list[dict]) -> list[float]:
    """Seconds from queueing to the first progress of earlier finished attribute jobs (worker start,
    imports, loading the project)."""
    out = []
    for j in jobs:
        res = j.get("result") or {}
        if j.get("kind") == "attribute" and j.get("status") == "done" and res.get("seconds") is not None:
            total = float(j["updated"]) - float(j["created"])
            out.append(max(0.0, total - float(res["seconds"])))
    return out
