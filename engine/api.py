"""The public entry points: ``attribute`` and cached, resumable method runs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engine.autodiff import distributed, resolve_device
from engine.autodiff.threads import gradient_threads, intra_op_threads
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods.base import (
    Attributor,
    Queries,
    SelfScoresUnavailable,
    coerce_settings,
    get_method,
    settings_dict,
    unmet_requirements,
)
from engine.storage.arrays import (
    atomic_save_npy,
    atomic_write_json,
    load_npy,
    read_cached_npy,
    stable_hash,
)
from engine.storage.blocks import write_blocks
from engine.storage.statedb import StateDB


def run_key(project: Project, method: str, settings) -> str:
    """A run is its method, its settings and the hash of the data and checkpoints."""
    version = get_method(method).version
    return f"{method}-" + stable_hash({"method": method, "version": version, "settings": settings_dict(settings),
                                       "checkpoints": project.checkpoint_hash(), "data": project.data_hash()}, 12)


def run_dir(project: Project, key: str) -> Path:
    return project.state_dir / "runs" / key


def store_dir(project: Project) -> Path:
    """``.proponent/features``: training-side gradient stores shared by every run that would compute
    the same ones; each store's name hashes what its rows depend on (weights, data, projection, seed)."""
    return project.state_dir / "features"


def fit_method(project: Project, method: str, settings=None, *, device: str = "auto", progress=None,
               cancel=None, db: StateDB | None = None) -> tuple[Attributor, str]:
    """Fit ``method`` on ``project``, resuming whatever a previous run of the same key wrote."""
    cls = get_method(method)
    reason = cls.supports(project)
    if reason:
        # requirement reasons already start with the method's name
        raise ProponentError(reason if reason.startswith(f"{cls.name} needs") else f"{method} cannot run on this project: {reason}")
    settings = coerce_settings(cls, settings)
    unmet = unmet_requirements(cls, project, settings)
    if unmet:
        raise ProponentError(unmet)
    key = run_key(project, method, settings)
    db = db or StateDB.for_project(project)
    device = resolve_device(device)
    att = cls(settings, device=device, workdir=run_dir(project, key) / "work", progress=progress, cancel=cancel,
              store_dir=store_dir(project))
    prior = db.get_run(key)
    # under torchrun rank 0 alone keeps the run record
    record = distributed.is_main() and (prior is None or prior["status"] != "done")
    if record:
        db.upsert_run(key, method=method, settings=settings_dict(settings), checkpoint_hash=project.checkpoint_hash(),
                      status="running", device=device)
    threads = gradient_threads(project, device=device)
    att.meta["threads"] = threads["threads"]
    att.meta["advisories"] = cls.advisories(project, settings)
    t0 = time.perf_counter()
    try:
        with intra_op_threads(threads["threads"]):
            att.fit(project)
    except BaseException as e:
        status = "cancelled" if type(e).__name__ == "Cancelled" or isinstance(e, KeyboardInterrupt) else "failed"
        if record:
            db.upsert_run(key, status=status, message=str(e)[:500])
        raise
    fit_s = time.perf_counter() - t0
    if record:
        db.upsert_run(key, fit_seconds=fit_s, meta=att.meta)
    att.meta["fit_seconds"] = fit_s
    return att, key


def _peak_mb() -> float:
    from engine.evaluate.memory import peak_rss_mb  # a job's worker starts from the app's process

    return peak_rss_mb()


def _read_back(files: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """A finished run's stored arrays (memory-mapped), or None where any is a cache miss (see
    :func:`read_cached_npy`)."""
    out = {}
    for name, f in files.items():
        arr = read_cached_npy(f, shapes[name])
        if arr is None:
            return None
        out[name] = arr
    return out


def cached_scores(project: Project, method: str, settings=None, *, device: str = "auto", progress=None,
                  cancel=None, use_cache: bool = True) -> dict:
    """Test-query scores, self-scores and suspicion of a run, computed once and cached on disk.

    Returns a dict with ``scores`` [n_test, n_train], ``self_scores`` and ``suspicion`` [n_train]
    (memory-mapped), and the run's ``key`` and ``meta``.
    """
    cls = get_method(method)
    settings = coerce_settings(cls, settings)
    key = run_key(project, method, settings)
    folder = run_dir(project, key)
    db = StateDB.for_project(project)
    files = {n: folder / f"{n}.npy" for n in ("scores", "self_scores", "suspicion")}
    row = db.get_run(key)
    cached = None
    if use_cache and row and row["status"] == "done":
        n_test, n_train = len(project.test_dataset), len(project.train_dataset)
        cached = _read_back(files, {"scores": (n_test, n_train), "self_scores": (n_train,), "suspicion": (n_train,)})
    if distributed.agree(cached is not None):  # under torchrun every rank takes rank 0's view of the cache
        if not distributed.is_main():
            return {"key": key, "rank": distributed.rank(), "meta": {}}
        return {"key": key, "meta": row.get("meta") or {}, **cached}
    if distributed.active() and not cls.shards_over_ranks:
        distributed.stop()  # this method does not split its fit: rank 0 runs it alone
        if not distributed.is_main_process():
            return {"key": key, "rank": distributed.process_rank(), "meta": {}}
    att, key = fit_method(project, method, settings, device=device, progress=progress, cancel=cancel, db=db)
    if not distributed.is_main():  # rank 0 scores; the other ranks' share of the fit is done
        return {"key": key, "rank": distributed.rank(), "meta": att.meta}
    t0 = time.perf_counter()
    n_test, n_train = len(project.test_dataset), len(project.train_dataset)

    def finite(blocks, axis: int, total: int):
        # by query blocks the stage counts queries; by training chunks, training examples
        stage = "score" if axis == 0 else "score training chunks"
        if progress:
            progress(stage, 0, total)
        for lo, hi, block in blocks:
            if not np.isfinite(block).all():
                bad = np.argwhere(~np.isfinite(block))[0]
                raise ProponentError(f"{method}: scores contain NaN or inf (test query {bad[0] + (lo if axis == 0 else 0)}, "
                                     f"training row {bad[1] + (lo if axis == 1 else 0)}); the checkpoints may have diverged")
            if progress:
                progress(stage, hi, total)
            yield lo, hi, block

    with intra_op_threads(att.meta.get("threads") or torch.get_num_threads()):
        # block by block onto disk: the [n_test, n_train] matrix is never held in memory
        columns = att.score_columns("test")
        if columns is not None:
            write_blocks(files["scores"], (n_test, n_train), finite(columns, 1, n_train), axis=1)
        else:
            write_blocks(files["scores"], (n_test, n_train), finite(att.score_blocks("test"), 0, n_test))
        if progress:  # its own stage: on a curvature method it is another gradient pass over the training set
            progress("self-influence", 0, n_train)
        try:
            self_s = np.asarray(att.self_scores(), dtype=np.float64)
            susp = np.asarray(att.suspicion(), dtype=np.float64)
        except SelfScoresUnavailable as e:
            # the test scores are still useful; triage says why this run cannot rank suspects
            self_s = susp = np.full(n_train, np.nan)
            att.meta["self_scores_unavailable"] = str(e)
    score_s = time.perf_counter() - t0
    atomic_save_npy(files["self_scores"], self_s)
    atomic_save_npy(files["suspicion"], susp)
    atomic_write_json(folder / "meta.json", att.meta)
    db.upsert_run(key, status="done", finished=time.time(), score_seconds=score_s, peak_mb=_peak_mb(),
                  meta={**att.meta, "label": cls.label, "granularity": cls.granularity})
    # what was stored (scores in float32), so a first run and a cached run give identical numbers
    return {"key": key, "meta": att.meta, **{n: load_npy(f) for n, f in files.items()}}


def copy_scores(project: Project, method: str, settings=None, run: dict | None = None, *, device: str = "auto",
                progress=None, fitted=None) -> np.ndarray:
    """[n_train] the score each training example would get from an exact copy of itself as a query (the
    diagonal of the run's test-score function; leak search compares a query's top score with it).

    ``run``: the run's :func:`cached_scores` result, if the caller has it. Where the method scores
    self-influence with the same function (every method but TRAK under the training-time rule) these
    are its self-scores; else they are computed once (a refit that reuses the run's stores) and cached
    beside the run. ``fitted``: a callable returning the run's fitted attributor, if the caller shares one
    (leak search also needs it for its null), else the method is fitted here."""
    cls = get_method(method)
    settings = coerce_settings(cls, settings)
    run = run or cached_scores(project, method, settings, device=device, progress=progress)
    if not cls.copy_scores_differ(run.get("meta") or {}):
        return np.asarray(run["self_scores"], dtype=np.float64)
    path = run_dir(project, run["key"]) / "copy_scores.npy"
    stored = _read_back({"copy": path}, {"copy": (len(project.train_dataset),)})  # a damaged file: recomputed
    if stored is not None:
        return np.asarray(stored["copy"], dtype=np.float64)
    att = fitted() if fitted else fit_method(project, method, settings, device=device, progress=progress)[0]
    if progress:
        progress("copy scores", 0, 1)
    with intra_op_threads(att.meta.get("threads") or torch.get_num_threads()):
        out = np.asarray(att.copy_scores(), dtype=np.float64)
    if distributed.is_main():
        atomic_save_npy(path, out)
    return out


def attribute(project: Project, method: str = "trak", queries="test", settings=None, *, device: str = "auto",
              progress=None, cancel=None, use_cache: bool = True) -> np.ndarray:
    """[n_queries, n_train] attribution scores (positive: proponent), per docs/design.md, section 2.

    ``queries``: "test" (cached), "train", test row indices, ("train"|"test", indices), an
    ExampleSet or (x, y) tensors.
    """
    if isinstance(queries, str) and queries == "test":
        return np.asarray(cached_scores(project, method, settings, device=device, progress=progress, cancel=cancel,
                                        use_cache=use_cache)["scores"], dtype=np.float64)
    att, _ = fit_method(project, method, settings, device=device, progress=progress, cancel=cancel)
    with intra_op_threads(att.meta.get("threads") or torch.get_num_threads()):
        return att.scores(Queries.resolve(project, queries))
