"""Progress reporting: a terminal bar with a rate in the stage's own unit and an ETA, silent when piped."""
from __future__ import annotations

import sys
import time

# what a stage's done/total count, by a word in the stage's name (first match); examples otherwise
_UNITS = (("solve", "iterations"), ("retrain", "retrains"), ("train model", "steps"), ("train", "steps"),
          ("score", "queries"), ("queries", "queries"), ("leaks", "queries"), ("layout", "layouts"),
          ("fit methods", "methods"), ("peers", "peers"), ("kernel", "solves"), ("hessian", "examples"),
          ("distill", "steps"), ("cluster", "clusters"))


def unit_of(stage: str | None) -> str:
    """The unit a stage's progress counts ("examples", "iterations", "queries", …)."""
    s = (stage or "").lower()
    if any(w in s for w in ("gradients", "featurize", "covariances", "eigenvalues", "training chunks")):
        return "examples"
    return next((unit for word, unit in _UNITS if word in s), "examples")


class TerminalProgress:
    def __init__(self, stream=None, min_interval: float = 0.2):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = min_interval
        self._stage = None
        self._t0 = 0.0
        self._d0 = 0
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if stage != self._stage:
            if self._stage is not None:
                self.stream.write("\n")
            self._stage, self._t0, self._d0 = stage, now, done
        if now - self._last < self.min_interval and done < total:
            return
        self._last = now
        rate = (done - self._d0) / max(1e-9, now - self._t0)
        eta = (total - done) / rate if rate > 0 else float("nan")
        width = 28
        filled = int(width * done / max(1, total))
        eta_s = f"{eta:5.0f}s" if eta == eta else "    ?s"
        self.stream.write(f"\r{stage:<24} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                          f"{rate:8.1f} {unit_of(stage)}/s ETA {eta_s}")
        if done >= total:
            self.stream.write("\n")
            self._stage = None
        self.stream.flush()


class RateTracker:
    """Examples/s and ETA of the current stage, for background jobs and the UI."""

    def __init__(self):
        self.stage = None
        self.t0 = time.perf_counter()
        self.d0 = 0

    def update(self, stage: str, done: int, total: int) -> tuple[float, float]:
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.t0, self.d0 = stage, now, done
        rate = (done - self.d0) / max(1e-9, now - self.t0)
        eta = (total - done) / rate if rate > 0 else float("nan")
        return rate, eta
