"""Mislabel and leak detection benchmarks.

Mislabel: flip a fraction ``p`` of the training labels (seeded, uniformly to another class),
write the flipped train CSV into a temporary copy of the project, retrain it with the recipe
(``record_training``), fit each method on that copy and rank the training set by the method's
``suspicion()``; report AUROC and precision at k = number flipped. On a project whose
``truth.json`` already records planted flips (the digits sample), ``source="truth"`` measures on
the project as it is.

Leak: copy ``m`` test examples into the training set of a temporary copy, exactly and as near
duplicates, retrain, and check whether each leaked query's planted twin is among its top-1 / top-5
proponents (recall@1, recall@5), and the precision and recall of
``engine.workflows.leaks.detect_leaks``'s flags over all test queries.

``truth.json`` is read only here, by the benchmark, never by a method.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from engine.api import cached_scores
from engine.core.errors import ProponentError
from engine.core.project import STATE_DIRNAME, Project
from engine.core.train import cross_val_probs, record_training
from engine.evaluate.metrics import auroc, precision_at_k
from engine.evaluate.suite import perturb_image
from engine.evaluate.peers import project_inputs, run_peer
from engine.storage.arrays import atomic_write_text
from engine.workflows.leaks import detect_leaks

ProgressFn = Callable[[str, int, int], None]

__all__ = ["flip_labels", "copy_project", "make_flipped_project", "plant_leaks", "cross_val_probs",
           "truth_flips", "truth_leaks", "mislabel_metrics", "leak_recall", "leak_flag_metrics",
           "mislabel_benchmark", "leak_benchmark"]


# ----------------------------------------------------------------------------- helpers
def flip_labels(y, p: float, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flip round(p · n) labels, chosen uniformly, each to a uniformly chosen other class.

    Returns (new labels, sorted flipped indices)."""
    y = np.asarray(y.numpy() if torch.is_tensor(y) else y, dtype=np.int64)
    if not 0.0 < p < 1.0:
        raise ProponentError(f"flip fraction must be between 0 and 1, not {p}")
    if num_classes < 2:
        raise ProponentError("flipping labels needs at least 2 classes")
    rng = np.random.default_rng(seed)
    k = max(1, int(round(p * len(y))))
    idx = np.sort(rng.choice(len(y), size=k, replace=False))
    new = y.copy()
    shift = rng.integers(1, num_classes, size=k)  # never 0: always another class
    new[idx] = (y[idx] + shift) % num_classes
    return new, idx


def copy_project(project: Project, dest: str | Path, *, checkpoints: bool = False) -> Path:
    """Copy a project folder without its .proponent state (and without checkpoints unless asked)."""
    dest = Path(dest)
    ignore = [STATE_DIRNAME]
    if not checkpoints:
        ignore.append(project.checkpoint_dir.name)
    shutil.copytree(project.root, dest, ignore=shutil.ignore_patterns(*ignore))
    return dest


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def make_flipped_project(project: Project, labels: np.ndarray, dest: str | Path, *, models: int | None = None,
                         progress: ProgressFn | None = None) -> Project:
    """A trained copy of ``project`` whose train CSV carries ``labels`` (class indices)."""
    dest = copy_project(project, dest)
    rel = project.train_csv.relative_to(project.root)
    df = project.train_df.copy()
    df[project.label_column] = [project.classes[int(c)] for c in labels]
    _write_csv_atomic(df, dest / rel)
    p = Project.load(dest)
    if p.classes != project.classes:
        raise ProponentError("flipping removed a class from the training set; use a smaller flip fraction")
    record_training(p, models=models or max(1, len(project.model_ids())), progress=progress)
    return Project.load(dest)


def plant_leaks(project: Project, m: int, dest: str | Path, *, seed: int = 0, models: int | None = None,
                progress: ProgressFn | None = None) -> tuple[Project, list[dict]]:
    """Copy ``m`` test examples into the training set of a trained copy of ``project``.

    Kinds cycle through exact, noise, shift, brightness (images) or exact, noise (tabular).
    Returns the trained copy and ``[{"test_index", "train_index", "kind"}]``."""
    n_test = len(project.test_dataset)
    if not 1 <= m <= n_test:
        raise ProponentError(f"number of planted leaks must be between 1 and {n_test}, not {m}")
    rng = np.random.default_rng(seed)
    tests = np.sort(rng.choice(n_test, size=m, replace=False))
    dest = copy_project(project, dest)
    rel = project.train_csv.relative_to(project.root)
    df = project.train_df.copy()
    n0 = len(df)
    new_rows, leaks = [], []
    if project.data_format == "images":
        kinds = ["exact", "noise", "shift", "brightness"]
        csv_dir = (dest / rel).parent
        (csv_dir / "leaks").mkdir(exist_ok=True)
        for j, t in enumerate(tests):
            kind = kinds[j % len(kinds)]
            x = project.test_dataset.x[t].numpy().astype(np.float64) * 255
            arr = perturb_image(x, kind, rng).round().astype(np.uint8)
            img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(np.transpose(arr, (1, 2, 0)), mode="RGB")
            name = f"leaks/leak_{j:04d}.png"
            img.save(csv_dir / name)
            row = df.iloc[0].copy()
            row[project.image_column] = name
            row[project.label_column] = project.test_df[project.label_column].iloc[t]
            new_rows.append(row)
            leaks.append({"test_index": int(t), "train_index": n0 + j, "kind": kind})
    else:
        kinds = ["exact", "noise"]
        feats = project.feature_columns
        std = project.train_df[feats].astype(float).std(axis=0).to_numpy()
        for j, t in enumerate(tests):
            kind = kinds[j % len(kinds)]
            row = df.iloc[0].copy()
            vals = project.test_df[feats].iloc[t].astype(float).to_numpy()
            if kind == "noise":
                vals = vals + rng.normal(0, 0.05, len(vals)) * std
            for c, v in zip(feats, vals):
                row[c] = v
            row[project.label_column] = project.test_df[project.label_column].iloc[t]
            new_rows.append(row)
            leaks.append({"test_index": int(t), "train_index": n0 + j, "kind": kind})
    df = pd.concat([df, pd.DataFrame(new_rows)], ignore_index=True)
    _write_csv_atomic(df, dest / rel)
    p = Project.load(dest)
    record_training(p, models=models or max(1, len(project.model_ids())), progress=progress)
    return Project.load(dest), leaks


def _truth(project: Project) -> dict | None:
    path = project.root / "truth.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProponentError(f"cannot parse truth file: {e}", file=str(path)) from None


def truth_flips(project: Project) -> np.ndarray | None:
    """Indices of the planted label flips recorded in truth.json (None if there is no truth file)."""
    t = _truth(project)
    if t is None or "flipped" not in t:
        return None
    if int(t.get("n_train", len(project.train_dataset))) != len(project.train_dataset):
        raise ProponentError("truth.json does not match the training set size", file=str(project.root / "truth.json"))
    return np.array(sorted(int(f["train_index"]) for f in t["flipped"]), dtype=np.int64)


def truth_leaks(project: Project) -> list[dict] | None:
    t = _truth(project)
    if t is None or not t.get("leaks"):
        return None
    return [{"test_index": int(l["test_index"]), "train_index": int(l["train_index"]), "kind": l.get("kind", "?")}
            for l in t["leaks"]]


# ----------------------------------------------------------------------------- metrics
def mislabel_metrics(suspicion: np.ndarray, flipped: np.ndarray, n_train: int) -> dict:
    susp = np.asarray(suspicion, np.float64)
    if susp.shape != (n_train,):
        raise ProponentError(f"suspicion must have shape ({n_train},), not {susp.shape}")
    if not np.isfinite(susp).all():
        raise ProponentError("suspicion scores contain NaN or inf")
    pos = np.zeros(n_train, bool)
    pos[np.asarray(flipped, np.int64)] = True
    k = int(pos.sum())
    return {"auroc": auroc(susp, pos), "precision_at_k": precision_at_k(susp, pos, k), "k": k,
            "recall_at_2k": float(pos[np.argsort(-susp, kind="mergesort")[:2 * k]].sum() / max(1, k))}


def leak_recall(scores: np.ndarray, twins: Sequence[int], ks=(1, 5)) -> dict:
    """``scores`` [n_leaks, n_train] of the leaked queries; ``twins[j]`` the planted copy of query j."""
    scores = np.asarray(scores, np.float64)
    twins = np.asarray(twins, np.int64)
    order = np.argsort(-scores, axis=1, kind="mergesort")
    rank = np.array([int(np.flatnonzero(order[j] == twins[j])[0]) for j in range(len(twins))])
    out = {f"recall@{k}": float((rank < k).mean()) for k in ks}
    out["twin_rank"] = rank.tolist()
    return out


def leak_flag_metrics(pairs: list[dict], leaks: list[dict]) -> dict:
    """Precision and recall of a detector's flags over all test queries (one pair per query)."""
    truth = {(l["test_index"], l["train_index"]) for l in leaks}
    flagged = [(p["test_index"], p["train_index"]) for p in pairs if p.get("flagged")]
    tp = sum(1 for f in flagged if f in truth)
    return {"precision": tp / len(flagged) if flagged else float("nan"), "recall": tp / len(truth) if truth else float("nan"),
            "n_flagged": len(flagged), "n_planted": len(truth)}


# ----------------------------------------------------------------------------- benchmarks
def _cached(project: Project, method: str, settings, device: str) -> tuple[dict, float]:
    """The method's cached run (test scores, self-scores, suspicion), computed once per project copy."""
    t0 = time.perf_counter()
    res = cached_scores(project, method, settings, device=device)
    return res, time.perf_counter() - t0


def mislabel_benchmark(project: Project, methods: Sequence[tuple[str, dict]], *, source: str = "auto", p: float = 0.1,
                       seed: int = 0, workdir: str | Path | None = None, device: str = "cpu", cleanlab: bool = True,
                       folds: int = 5, progress: ProgressFn | None = None) -> dict:
    """AUROC and precision@k of each method's suspicion at finding flipped labels.

    ``source``: "truth" (the project's own planted flips), "flip" (flip ``p`` of the labels in a
    temporary copy) or "auto" (truth when the project has it)."""
    flips = truth_flips(project) if source in ("auto", "truth") else None
    if source == "truth" and flips is None:
        raise ProponentError("no truth.json with planted flips in the project", file=str(project.root))
    tmp = None
    try:
        if flips is not None:
            target, used = project, "truth.json"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="proponent-mislabel-", dir=workdir)
            labels, flips = flip_labels(project.train_dataset.y, p, project.num_classes, seed)
            target = make_flipped_project(project, labels, Path(tmp.name) / "flipped")
            used = f"flipped {len(flips)} labels (p={p}, seed={seed}) and retrained"
        n = len(target.train_dataset)
        rows = []
        for j, (name, settings) in enumerate(methods):
            if progress:
                progress("mislabel", j, len(methods))
            row = {"method": name}
            try:
                res, secs = _cached(target, name, settings, device)
                susp = np.asarray(res["suspicion"], np.float64)
                row.update(mislabel_metrics(susp, flips, n), seconds=secs)
            except Exception as e:  # noqa: BLE001 - a method's failure is its row
                row["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            rows.append(row)
        peers = []
        if cleanlab:
            t0 = time.perf_counter()
            probs_cache = {}

            def cv():
                if "p" not in probs_cache:
                    probs_cache["p"] = cross_val_probs(target, folds=folds, seed=seed)
                return probs_cache["p"]

            res = run_peer("cleanlab", "label-quality", project_inputs(target, device=device, cross_val_probs=cv))
            prow = {"method": "cleanlab label-quality", "peer": "cleanlab", "fit_seconds": res.fit_seconds,
                    "total_seconds": time.perf_counter() - t0}
            if res.skipped:
                prow["skipped"] = res.skipped
            else:
                prow.update(mislabel_metrics(res.scores, flips, n))
                issues = np.zeros(n, bool)
                issues[np.asarray(res.settings.get("label_issue_indices", []), np.int64)] = True
                pos = np.zeros(n, bool)
                pos[flips] = True
                prow["find_label_issues"] = {"n_flagged": int(issues.sum()),
                                             "precision": float(pos[issues].mean()) if issues.any() else float("nan"),
                                             "recall": float(issues[pos].mean())}
            peers.append(prow)
        if progress:
            progress("mislabel", len(methods), len(methods))
        return {"source": used, "n_flipped": int(len(flips)), "n_train": n, "methods": rows, "peers": peers}
    finally:
        if tmp is not None:
            tmp.cleanup()


def leak_benchmark(project: Project, methods: Sequence[tuple[str, dict]], *, source: str = "auto", m: int = 8,
                   seed: int = 0, workdir: str | Path | None = None, device: str = "cpu", detector: bool = True,
                   progress: ProgressFn | None = None) -> dict:
    """recall@1/@5 of the planted twin among each leaked query's top proponents, per method;
    with ``detector`` and engine.workflows.leaks available, precision/recall of its flags over all queries."""
    leaks = truth_leaks(project) if source in ("auto", "truth") else None
    if source == "truth" and leaks is None:
        raise ProponentError("no truth.json with planted leaks in the project", file=str(project.root))
    tmp = None
    try:
        if leaks is not None:
            target, used = project, "truth.json"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="proponent-leaks-", dir=workdir)
            target, leaks = plant_leaks(project, m, Path(tmp.name) / "leaked", seed=seed)
            used = f"planted {len(leaks)} copies of test examples (seed={seed}) and retrained"
        q = np.array([l["test_index"] for l in leaks], np.int64)
        twins = np.array([l["train_index"] for l in leaks], np.int64)
        rows = []
        for j, (name, settings) in enumerate(methods):
            if progress:
                progress("leaks", j, len(methods))
            row = {"method": name}
            try:
                res, secs = _cached(target, name, settings, device)
                S = np.asarray(res["scores"][q], np.float64)
                row.update(leak_recall(S, twins), seconds=secs)
                row["kinds"] = [l["kind"] for l in leaks]
                if detector :
                    try:
                        det = detect_leaks(target, name, settings, device=device)
                        row["detector"] = leak_flag_metrics(det["pairs"], leaks)
                        row["detector"]["statistic"] = det.get("statistic")
                    except Exception as e:  # noqa: BLE001
                        row["detector"] = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
            except Exception as e:  # noqa: BLE001
                row["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            rows.append(row)
        if progress:
            progress("leaks", len(methods), len(methods))
        return {"source": used, "n_leaks": len(leaks), "leaks": leaks, "methods": rows,
                "detector_available": True}
    finally:
        if tmp is not None:
            tmp.cleanup()
