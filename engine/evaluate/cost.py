"""What a method costs: wall time and peak memory of fit and scoring, featurization throughput,
and how the cost grows as the training set doubles.

Every fit here runs in a fresh temporary work folder (never a cached run), so the times are
real. Peak memory is the process's resident set sampled every 5 ms from /proc (peak above
the level at the start of the call, and the absolute peak).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.autodiff.features import project_gradients
from engine.autodiff.per_example import GradientComputer
from engine.autodiff.projection import make_projector
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import record_training
from engine.evaluate.detection import copy_project
from engine.evaluate.memory import MemorySampler
from engine.methods.base import coerce_settings, get_method, settings_dict
from engine.storage.arrays import atomic_write_text

ProgressFn = Callable[[str, int, int], None]

__all__ = ["MemorySampler", "measure_method", "featurize_throughput", "scaling", "subsample_project"]


class _StageTimer:
    """Wraps a progress callback and measures examples/s of the stages whose name says "featurize"."""

    def __init__(self):
        self.stages: dict[str, list] = {}  # stage -> [t_first, done_first, t_last, done_last]

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        st = self.stages.get(stage)
        if st is None:
            self.stages[stage] = [now, done, now, done]
        else:
            st[2], st[3] = now, done

    def featurize_rate(self) -> float | None:
        n, t = 0, 0.0
        for name, (t0, d0, t1, d1) in self.stages.items():
            if "featur" in name.lower() and d1 > d0 and t1 > t0:
                n += d1 - d0
                t += t1 - t0
        return n / t if t > 0 else None


def measure_method(project: Project, method: str, settings=None, *, device: str = "cpu", queries="test",
                   cancel=None, fresh: bool = True) -> dict:
    """Fit ``method`` from scratch and score ``queries``: seconds and peak memory of each.

    With ``fresh`` (default) the fit runs on a copy of the project without its ``.proponent``
    state, so no cached features or factors of earlier runs are reused."""
    cls = get_method(method)
    reason = cls.supports(project)
    if reason:
        raise ProponentError(f"{method} cannot run on this project: {reason}")
    s = coerce_settings(cls, settings)
    timer = _StageTimer()
    with tempfile.TemporaryDirectory(prefix=f"proponent-cost-{method}-") as tmp:
        if fresh:
            # a copy without .proponent: nothing a method caches at project level can be reused

            project = Project.load(copy_project(project, Path(tmp) / "project", checkpoints=True))
        att = cls(s, device=device, workdir=Path(tmp) / "work", progress=timer, cancel=cancel)
        with MemorySampler() as mfit:
            t0 = time.perf_counter()
            att.fit(project)
            fit_s = time.perf_counter() - t0
        with MemorySampler() as mscore:
            t0 = time.perf_counter()
            S = att.scores(queries)
            score_s = time.perf_counter() - t0
    n_q = int(np.shape(S)[0])
    return {"method": method, "settings": settings_dict(s), "n_train": len(project.train_dataset), "n_queries": n_q,
            "fit_seconds": fit_s, "fit_peak_mb": mfit.peak_mb, "fit_extra_mb": mfit.extra_mb,
            "score_seconds": score_s, "score_peak_mb": mscore.peak_mb, "score_extra_mb": mscore.extra_mb,
            "queries_per_second": n_q / max(score_s, 1e-9), "featurize_examples_per_second": timer.featurize_rate(),
            "torch_threads": torch.get_num_threads(), "fresh": fresh}


def featurize_throughput(project: Project, *, proj_dim: int = 512, projection: str = "rademacher", device: str = "cpu",
                         n_examples: int | None = None, seed: int = 0) -> float:
    """Examples/s of our featurization (per-example margin gradients + projection) on the training
    set at the final checkpoint: the same work as traker's ``featurize`` (see peers.featurize_throughput_traker)."""
    ds = project.train_dataset
    n = len(ds) if n_examples is None else min(int(n_examples), len(ds))
    model = project.load_model(project.final_checkpoint())
    computer = GradientComputer(model, device=device)
    projector = make_projector(projection, computer.n_params, proj_dim, seed=seed, model_id=0, device=computer.device)
    t0 = time.perf_counter()
    out = project_gradients(computer, projector, ds.x[:n], ds.y[:n], "margin")
    dt = time.perf_counter() - t0
    if out.shape[0] != n:
        raise RuntimeError("featurization returned the wrong number of rows")
    return n / max(dt, 1e-12)


def subsample_project(project: Project, n: int, dest: str | Path, *, seed: int = 0, models: int | None = None) -> Project:
    """A trained copy of ``project`` whose training set is ``n`` rows drawn without replacement."""
    n_all = len(project.train_dataset)
    if not 1 <= n <= n_all:
        raise ProponentError(f"subsample size must be between 1 and {n_all}, not {n}")
    rows = np.sort(np.random.default_rng(seed).choice(n_all, size=n, replace=False))
    dest = copy_project(project, dest)
    rel = project.train_csv.relative_to(project.root)
    atomic_write_text(dest / rel, project.train_df.iloc[rows].to_csv(index=False))
    p = Project.load(dest)
    if p.num_classes != project.num_classes:
        raise ProponentError(f"a {n}-row subsample lost a class; use a larger size")
    record_training(p, models=models or max(1, len(project.model_ids())))
    return Project.load(dest)


def scaling(project: Project, methods: Sequence[tuple[str, dict]], *, sizes: Sequence[int] | None = None,
            device: str = "cpu", n_queries: int = 50, seed: int = 0, progress: ProgressFn | None = None,
            timeout: float | None = None) -> dict:
    """Fit + score cost of each method at training-set sizes n/4, n/2, n (or ``sizes``).

    Reports, per method, the seconds at each size and the growth exponent b of time ≈ a·n^b
    fitted over the sizes (1: linear, 2: quadratic)."""
    n_all = len(project.train_dataset)
    sizes = sorted(int(s) for s in (sizes or (n_all // 4, n_all // 2, n_all)))
    if len(sizes) < 3:
        raise ProponentError("cost growth needs at least three training-set sizes")
    q = np.arange(min(n_queries, len(project.test_dataset)))
    rows = {name: {"method": name, "sizes": [], "fit_seconds": [], "score_seconds": [], "fit_peak_mb": []}
            for name, _ in methods}
    with tempfile.TemporaryDirectory(prefix="proponent-scaling-") as tmp:
        for j, n in enumerate(sizes):
            p = project if n == n_all else subsample_project(project, n, Path(tmp) / f"n{n}", seed=seed)
            for name, settings in methods:
                if progress:
                    progress(f"cost n={n}", 0, 1)
                r = rows[name]
                try:
                    end = None if not timeout else time.perf_counter() + timeout
                    m = measure_method(p, name, settings, device=device, queries=q,
                                       cancel=None if end is None else (lambda end=end: time.perf_counter() > end))
                    r["sizes"].append(n)
                    r["fit_seconds"].append(m["fit_seconds"])
                    r["score_seconds"].append(m["score_seconds"])
                    r["fit_peak_mb"].append(m["fit_peak_mb"])
                except Exception as e:  # noqa: BLE001
                    r.setdefault("errors", []).append(f"n={n}: " + " ".join(f"{type(e).__name__}: {e}".split())[:200])
    for r in rows.values():
        if len(r["sizes"]) >= 2:
            t = np.asarray(r["fit_seconds"]) + np.asarray(r["score_seconds"])
            r["growth_exponent"] = float(np.polyfit(np.log(r["sizes"]), np.log(np.maximum(t, 1e-6)), 1)[0])
    return {"sizes": sizes, "n_queries": int(len(q)), "methods": list(rows.values())}
