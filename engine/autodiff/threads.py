"""How many intra-op threads torch uses for a workload, chosen per project and never as an import
side effect.

Small models run per-example gradients faster on one thread (thread start-up and contention cost
more than the arithmetic, above all on a busy shared machine); bigger ones gain from every core.
Rather than guess from a parameter count, the first gradient workload on a project times a batch
of per-example gradients at one thread and at all cores, in turn, and keeps all cores only where
they are clearly faster (:data:`ALL_CORES_MARGIN`), cached in
``.proponent/threads.json`` per (architecture, cores). ``PROPONENT_THREADS`` overrides the choice.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from typing import Iterator

import torch

import engine.autodiff.distributed as distributed
from engine.autodiff.functional import TrackedParameters
from engine.autodiff.per_example import GradientComputer
from engine.core.errors import ProponentError
from engine.storage.arrays import atomic_write_json, stable_hash

ENV = "PROPONENT_THREADS"
_FILE = "threads.json"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def env_threads() -> int | None:
    v = os.environ.get(ENV)
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ProponentError(f"{ENV} must be a whole number ≥ 1, not {v!r}")
    return n


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads and restore the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(old)


# all cores must beat one thread by this factor to be chosen: on a shared machine the OpenMP barriers
# of a many-thread run stall on any descheduled thread (measured 3-50x slower elementwise ops while
# another process ran), while one thread only ever loses the parallel speed-up
ALL_CORES_MARGIN = 0.9


def _time_gradients(computer, x, y, counts: tuple[int, ...], repeats: int = 5) -> dict[int, float]:
    """Median seconds per batch of per-example gradients at each thread count. The counts are timed in
    turn, round after round, so a burst of load from another process falls on both, not on one."""
    times: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:
        with intra_op_threads(n):
            computer.per_example(x[:2], y[:2])  # warm-up (allocations, thread pool)
    for _ in range(repeats):
        for n in counts:
            with intra_op_threads(n):
                t0 = time.perf_counter()
                computer.per_example(x, y)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def gradient_threads(project, *, device: str = "cpu", n_examples: int = 32) -> dict:
    """{"threads", "reason", "seconds": {threads: median s per batch}} for gradient work on ``project``."""
    forced = env_threads()
    if forced is not None:
        return {"threads": forced, "reason": f"{ENV}={forced}", "seconds": {}}
    # torchrun's processes on this host share its cores
    cores = max(1, available_cores() // distributed.local_world_size())
    if device != "cpu" or cores == 1:
        return {"threads": 1 if cores == 1 else cores, "reason": "one core" if cores == 1 else f"device {device}",
                "seconds": {}}
    # the architecture decides the cost: key by what defines it, without building the model
    factory = project.root / project.factory_spec.partition(":")[0]
    source = hashlib.sha256(factory.read_bytes() if factory.is_file() else b"").hexdigest()
    # v2: counts timed in turn, all cores only when clearly faster (earlier choices are measured again)
    key = stable_hash([project.factory_spec, source, project.tracked_parameter_globs, list(project.input_shape),
                       project.num_classes, 2], 12) + f"-{cores}"
    path = project.state_dir / _FILE
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), dict):
        return table[key]
    computer = GradientComputer(project.build_model().eval(), tracked=TrackedParameters.of(project))
    rows = torch.arange(min(n_examples, len(project.train_dataset)))
    x, y = project.train_dataset.x[rows], project.train_dataset.y[rows]
    seconds = _time_gradients(computer, x, y, (1, cores))
    best = cores if seconds[cores] < ALL_CORES_MARGIN * seconds[1] else 1
    out = {"threads": best, "seconds": {str(k): round(v, 5) for k, v in seconds.items()},
           "reason": f"measured: {', '.join(f'{k} thread(s) {v * 1e3:.1f} ms' for k, v in seconds.items())} "
                     f"per {len(rows)} per-example gradients"}
    table[key] = out
    atomic_write_json(path, table)
    return out
