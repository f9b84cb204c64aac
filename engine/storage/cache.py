"""What a project's ``.proponent/`` cache holds, and pruning it by age or size.

Everything here can be recomputed: method runs (``runs/<key>``), the training-side gradient stores
and curvature factors runs share (``features``, ``factors``), retrained ground truth
(``groundtruth``), calibrations, embedding layouts and job logs. ``state.db`` (flags, notes, the
audit trail) is never touched. Pruning removes whole entries, least recently used first.

Only entries Proponent wrote are listed or pruned: each kind's writer names its entries by a fixed
pattern (a method and a hash, a store kind and a hash, ...), and anything else there (a user's
notes, a folder of their own) is reported as skipped and left in place. A symlinked cache folder or
entry is never followed: it is skipped with a note, so pruning cannot reach outside the project.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import ProponentError
from engine.storage.folders import foreign_entry
from engine.storage.statedb import STATE_DIRNAME, StateDB

# folders of recomputable results, each entry one child (runs: one per run key)
CACHE_KINDS = ("runs", "features", "factors", "groundtruth", "calibration", "embeddings", "jobs")
_H = r"[0-9a-f]{8,}"
# how each kind's writer names its entries: engine.api (run_dir: METHOD-HASH; store_dir: trak_HASH from
# methods/trak.py, grads_HASH from methods/source.py), methods/source.py (factors), evaluate/groundtruth.py,
# methods/forward_inf/calibration.py, workflows/embeddings.py (TAG-REDUCER-LAYOUT-CKPTS-DATA.npz) and
# app/jobs/queue.py (TIMESTAMP-HEX.log). Anything else in these folders is not Proponent's.
OWN_NAMES = {
    "runs": re.compile(r"^[a-z0-9][a-z0-9_-]*-[0-9a-f]{12}$"),
    "features": re.compile(rf"^(trak|grads)_{_H}$"),
    "factors": re.compile(rf"^(cov|lambda)-{_H}\.safetensors$"),
    "groundtruth": re.compile(rf"^gt-{_H}\.(npy|parts)$"),
    "calibration": re.compile(rf"^forward-inf-{_H}\.json$"),
    "embeddings": re.compile(rf"^[A-Za-z0-9_-]+-{_H}-{_H}-{_H}\.npz$"),
    "jobs": re.compile(r"^\d{14}-[0-9a-f]{8}\.log$"),
}
# an atomic write's temporary file left by a killed writer (engine.storage.arrays.temp_path_for)
_TEMP = re.compile(r"^\..+\.\d+\.[^.]+\.tmp$")
# what an entry folder holds when Proponent filled it: a run's results at the top (engine.api, the
# CLI's rows.csv, workflows/leaks.py) and a method's work folder; elsewhere arrays, chunk masks and
# manifests. A file of another name (a user's notes saved beside the results) keeps the whole entry
# out of pruning, since removing the folder would delete it.
_DATA_FILE = r"[A-Za-z0-9_.-]+\.(npy|npz|bin|json|pt|safetensors|parts)"
ENTRY_FILES = {
    "runs": re.compile(rf"^((scores|self_scores|suspicion|copy_scores)\.npy|meta\.json|rows\.csv|"
                       rf"leak_null_[0-9a-f]+\.npy|work/([A-Za-z0-9_.-]+/)*{_DATA_FILE})$"),
}
_ANY_ENTRY_FILES = re.compile(rf"^([A-Za-z0-9_.-]+/)*{_DATA_FILE}$")
ENTRY_DIRS = {"runs": re.compile(r"^work(/[A-Za-z0-9_.-]+)*$")}
_ANY_ENTRY_DIRS = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass
class CacheEntry:
    kind: str
    key: str
    path: Path
    bytes: int
    last_used: float  # newest modification time inside the entry
    method: str | None = None
    status: str | None = None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "path": str(self.path), "bytes": self.bytes,
                "mb": round(self.bytes / 2**20, 2), "last_used": self.last_used,
                "age_days": round((time.time() - self.last_used) / 86400, 2), "method": self.method,
                "status": self.status}


@dataclass
class SkippedEntry:
    """Something in a cache folder that pruning leaves alone, and why."""
    kind: str
    key: str
    path: Path
    reason: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "path": str(self.path), "reason": self.reason}


def _size_and_mtime(path: Path) -> tuple[int, float]:
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    total, newest = 0, path.stat().st_mtime
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest


def _scan(root: str | Path) -> tuple[list[CacheEntry], list[SkippedEntry]]:
    state = Path(root) / STATE_DIRNAME
    runs = {}
    if (state / "state.db").is_file():
        runs = {r["key"]: r for r in StateDB(state / "state.db").list_runs()}
    inside = state.resolve()
    out, skipped = [], []
    for kind in CACHE_KINDS:
        folder = state / kind
        if folder.is_symlink() or (folder.is_dir() and folder.resolve().parent != inside):
            skipped.append(SkippedEntry(kind, "", folder, "a symlink; not followed"))
            continue
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if child.is_symlink():
                skipped.append(SkippedEntry(kind, child.name, child, "a symlink; not followed"))
                continue
            if not (OWN_NAMES[kind].match(child.name) or (kind == "runs" and child.name in runs and child.is_dir())
                    or (_TEMP.match(child.name) and child.is_file())):
                skipped.append(SkippedEntry(kind, child.name, child, "not written by Proponent; left in place"))
                continue
            foreign = foreign_entry(child, ENTRY_FILES.get(kind, _ANY_ENTRY_FILES),
                                    ENTRY_DIRS.get(kind, _ANY_ENTRY_DIRS)) if child.is_dir() else None
            if foreign is not None:
                skipped.append(SkippedEntry(kind, child.name, child,
                                            f"holds {foreign.relative_to(child).as_posix()}, which Proponent did not "
                                            f"write; left in place (move that file out to prune it)"))
                continue
            size, mtime = _size_and_mtime(child)
            run = runs.get(child.name) if kind == "runs" else None
            out.append(CacheEntry(kind, child.name, child, size, mtime, method=run and run["method"],
                                  status=run and run["status"]))
    return sorted(out, key=lambda e: -e.bytes), skipped


def cache_entries(root: str | Path) -> list[CacheEntry]:
    """Every cached entry Proponent wrote in the project at ``root``, largest first."""
    return _scan(root)[0]


def skipped_entries(root: str | Path) -> list[SkippedEntry]:
    """What the cache folders hold that Proponent did not write (or that a symlink leads to)."""
    return _scan(root)[1]


def cache_size(root: str | Path) -> int:
    return sum(e.bytes for e in cache_entries(root))


def prune_cache(root: str | Path, *, older_than_days: float | None = None, max_total_mb: float | None = None,
                keys: list[str] | None = None, everything: bool = False, dry_run: bool = False) -> list[CacheEntry]:
    """Remove entries: named ``keys``; those unused for ``older_than_days``; then the least recently
    used until the cache is at most ``max_total_mb``; or all of them. Returns what was (or, with
    ``dry_run``, would be) removed. Runs removed also leave the state database. Only entries
    Proponent wrote are candidates (see :func:`skipped_entries` for the rest)."""
    for flag, value, unit in (("--older-than", older_than_days, "days"), ("--max-size", max_total_mb, "MB")):
        if value is not None and not (value >= 0 and not math.isnan(value)):
            raise ProponentError(f"{flag} must be 0 or more {unit}, not {value:g}")
    entries, skipped = _scan(root)
    for k in keys or []:
        if not any(e.key == k for e in entries):
            foreign = next((s for s in skipped if s.key == k), None)
            if foreign is not None:
                raise ProponentError(f"--run {k}: {foreign.reason}", file=str(foreign.path))
            raise ProponentError(f"--run {k}: no cached entry has this key (`proponent cache` lists them)")
    now = time.time()
    chosen: dict[Path, CacheEntry] = {}
    for e in entries:
        if everything or (keys and e.key in keys) or (
                older_than_days is not None and now - e.last_used > older_than_days * 86400):
            chosen[e.path] = e
    if max_total_mb is not None:
        total = sum(e.bytes for e in entries if e.path not in chosen)
        for e in sorted(entries, key=lambda e: e.last_used):
            if total <= max_total_mb * 2**20:
                break
            if e.path not in chosen:
                chosen[e.path] = e
                total -= e.bytes
    removed = list(chosen.values())
    if dry_run:
        return removed
    state = Path(root) / STATE_DIRNAME
    db = StateDB(state / "state.db") if (state / "state.db").is_file() else None
    done = []
    for e in removed:
        if e.path.is_symlink():  # replaced by a link since the scan: never followed
            continue
        if e.path.is_dir():
            shutil.rmtree(e.path)
        else:
            e.path.unlink(missing_ok=True)
        if e.kind == "runs" and db is not None:
            db.delete_run(e.key)
        done.append(e)
    return done


__all__ = ["CacheEntry", "SkippedEntry", "cache_entries", "skipped_entries", "cache_size", "prune_cache", "CACHE_KINDS",
           "OWN_NAMES"]
