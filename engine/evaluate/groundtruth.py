"""Ground truth by retraining: margins of every test query under models retrained on subsets.

``retrain_margins`` is what LDS, leave-one-out and the mislabel benchmark measure against.
Each (subset, seed) pair is a full retrain with the project's own recipe
(``engine.core.train.train_model``); what is recorded is each test query's correct-class margin
``f = z_y − logsumexp_{j≠y} z_j``.

Results are cached under ``<project>/.proponent/groundtruth/<key>.npy`` where the key hashes
the recipe, the data, the model factory's source, the subsets, the seeds and any replaced
labels or inputs. A computation stopped half-way keeps one atomically written file per
finished subset (``<key>.parts/``) and resumes from the first missing one.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.autodiff.functional import forward_batches
from engine.autodiff.measurement import correct_class_margin
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import train_model
from engine.storage.arrays import (
    atomic_save_npy,
    atomic_write_json,
    load_npy,
    stable_hash,
)

ProgressFn = Callable[[str, int, int], None]

__all__ = ["random_subsets", "retrain_margins", "loo_margins", "loo_effects", "groundtruth_key", "test_margins"]


def random_subsets(n_train: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``m`` random subsets, each holding exactly ``round(alpha · n_train)`` rows: bool [m, n_train]."""
    n_train, m = int(n_train), int(m)
    if n_train < 1 or m < 1:
        raise ProponentError(f"random_subsets needs n_train ≥ 1 and m ≥ 1 (got n_train={n_train}, m={m})")
    if not 0.0 < alpha <= 1.0:
        raise ProponentError(f"subset fraction alpha must be in (0, 1], not {alpha}")
    size = max(1, int(round(alpha * n_train)))
    rng = np.random.default_rng(seed)
    out = np.zeros((m, n_train), dtype=bool)
    for j in range(m):
        out[j, rng.choice(n_train, size=size, replace=False)] = True
    return out


def _digest(a) -> str | None:
    if a is None:
        return None
    arr = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes() + str(arr.dtype).encode() + str(arr.shape).encode()).hexdigest()


def _factory_source(project: Project) -> str:
    path = project.root / project.factory_spec.partition(":")[0]
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest() + ":" + project.factory_spec
    except OSError:
        return project.factory_spec


def groundtruth_key(project: Project, subsets: np.ndarray, seeds: Sequence[int], labels=None, x=None) -> str:
    return "gt-" + stable_hash({
        "recipe": project.recipe.fingerprint(), "data": project.data_hash(), "model": _factory_source(project),
        "subsets": _digest(np.packbits(np.asarray(subsets, bool), axis=1)), "shape": list(np.shape(subsets)),
        "seeds": [int(s) for s in seeds], "labels": _digest(labels), "x": _digest(x)}, 16)


def test_margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> np.ndarray:
    model.eval()
    out = [correct_class_margin(f, y[lo:hi]).double().cpu().numpy() for lo, hi, f in forward_batches(model, x, batch=batch)]
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------- one subset
def _subset_margins(project: Project, rows: np.ndarray, seeds: Sequence[int], labels, x) -> np.ndarray:
    ts = project.test_dataset
    out = np.empty((len(seeds), len(ts)))
    for r, seed in enumerate(seeds):
        model = train_model(project, indices=rows, labels=labels, x=x, seed=int(seed))
        out[r] = test_margins(model, ts.x, ts.y)
        if not np.isfinite(out[r]).all():
            raise ProponentError(f"a retrained model (seed {seed}, {len(rows)} rows) gives non-finite margins; "
                                 f"the recipe diverges on subsets — lower [training] lr")
    return out


_WORKER: dict = {}


def _worker_init(root: str) -> None:
    os.environ["PROPONENT_THREADS"] = "1"
    torch.set_num_threads(1)
    _WORKER["project"] = Project.load(root, check_model=False)


def _worker_task(args) -> int:
    m, rows, seeds, labels, x, part = args
    arr = _subset_margins(_WORKER["project"], rows, seeds, labels, x)
    atomic_save_npy(part, arr)
    return m


def default_processes(todo: int) -> int:
    env = os.environ.get("PROPONENT_PROCESSES")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    # leave a core for the caller when there are several; a 2-core machine runs in-process
    return max(1, min(todo, cores - 1 if cores > 2 else 1))


def retrain_margins(project: Project, *, subsets: np.ndarray, seeds: Sequence[int], progress: ProgressFn | None = None,
                    labels: torch.Tensor | None = None, x: torch.Tensor | None = None,
                    processes: int | None = None, use_cache: bool = True) -> np.ndarray:
    """Margins of every test query after retraining on each subset with each seed.

    ``subsets`` is bool [M, n_train]; returns float64 [M, len(seeds), n_test]. ``labels`` /
    ``x`` replace the training labels / inputs (mislabel benchmark). Cached and resumable.
    """
    project.require_recipe("retraining for ground truth (LDS, LOO)")
    subsets = np.asarray(subsets)
    n_train = len(project.train_dataset)
    if subsets.ndim != 2 or subsets.shape[1] != n_train:
        raise ProponentError(f"subsets must be a bool array [M, {n_train}], not shape {subsets.shape}")
    subsets = subsets.astype(bool)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ProponentError("retrain_margins needs at least one seed")
    if (subsets.sum(1) == 0).any():
        raise ProponentError(f"subset {int(np.argmax(subsets.sum(1) == 0))} is empty")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n_train,):
            raise ProponentError(f"labels must have shape ({n_train},), not {tuple(labels.shape)}")
    M, n_test = len(subsets), len(project.test_dataset)
    key = groundtruth_key(project, subsets, seeds, labels, x)
    folder = project.state_dir / "groundtruth"
    final = folder / f"{key}.npy"
    parts = folder / f"{key}.parts"
    if use_cache and final.is_file():
        arr = load_npy(final, mmap=False)
        if arr.shape == (M, len(seeds), n_test):
            if progress:
                progress("retrain", M, M)
            return arr
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(parts / "request.json", {"M": M, "seeds": seeds, "n_train": n_train, "n_test": n_test})

    def part(m: int) -> Path:
        return parts / f"subset_{m:05d}.npy"

    def valid(m: int) -> bool:
        if not part(m).is_file():
            return False
        try:
            return load_npy(part(m), mmap=True).shape == (len(seeds), n_test)
        except Exception:  # a corrupt part is recomputed
            return False

    todo = [m for m in range(M) if not (use_cache and valid(m))]
    done = M - len(todo)
    if progress:
        progress("retrain", done, M)
    procs = default_processes(len(todo)) if processes is None else max(1, int(processes))
    if todo and procs > 1 and len(todo) > 1:
        ctx = mp.get_context("spawn")
        tasks = [(m, np.flatnonzero(subsets[m]), seeds, labels, x, part(m)) for m in todo]
        old = os.environ.get("PROPONENT_THREADS")
        os.environ["PROPONENT_THREADS"] = "1"
        try:
            with ctx.Pool(procs, initializer=_worker_init, initargs=(str(project.root),)) as pool:
                for _ in pool.imap_unordered(_worker_task, tasks):
                    done += 1
                    if progress:
                        progress("retrain", done, M)
        finally:
            if old is None:
                os.environ.pop("PROPONENT_THREADS", None)
            else:
                os.environ["PROPONENT_THREADS"] = old
    else:
        for m in todo:
            atomic_save_npy(part(m), _subset_margins(project, np.flatnonzero(subsets[m]), seeds, labels, x))
            done += 1
            if progress:
                progress("retrain", done, M)
    arr = np.stack([load_npy(part(m), mmap=False) for m in range(M)]).astype(np.float64)
    atomic_save_npy(final, arr)
    shutil.rmtree(parts, ignore_errors=True)
    return arr


def loo_margins(project: Project, indices, seeds: Sequence[int], *, progress: ProgressFn | None = None,
                processes: int | None = None, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out retraining: ``(full [R, n_test], without [len(indices), R, n_test])``.

    ``full`` are the margins after training on every row with each seed; ``without[j]`` after
    training without ``indices[j]``. The LOO effect ``full − without`` is positive when
    removing the example lowers the margin (a proponent, per the sign convention).
    """
    n = len(project.train_dataset)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        raise ProponentError("loo_margins needs at least one training index")
    if indices.min() < 0 or indices.max() >= n:
        raise ProponentError(f"training index {int(indices[(indices < 0) | (indices >= n)][0])} is out of range 0..{n - 1}")
    subsets = np.ones((len(indices) + 1, n), dtype=bool)
    subsets[np.arange(1, len(indices) + 1), indices] = False
    arr = retrain_margins(project, subsets=subsets, seeds=seeds, progress=progress, processes=processes, labels=labels)
    return arr[0], arr[1:]


def loo_effects(project: Project, indices, seeds: Sequence[int], **kw) -> tuple[np.ndarray, np.ndarray]:
    """Per seed LOO effects ``full − without``: [R, len(indices), n_test], and their mean over seeds."""
    full, without = loo_margins(project, indices, seeds, **kw)
    per_seed = full[None, :, :] - without  # [k, R, n_test]
    per_seed = np.transpose(per_seed, (1, 0, 2))
    return per_seed, per_seed.mean(0)
