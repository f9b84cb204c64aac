"""What a project's ``.proponent/`` cache holds, and pruning it by age or size.

Everything here can be recomputed: method runs (``runs/<key>``), the training-side gradient stores
and curvature factors runs share (``features``, ``factors``), retrained ground truth
(``groundtruth``), calibrations, embedding layouts and job logs. ``state.db`` (flags, notes, the
audit trail) is never touched. Pruning removes whole entries, least recently used first.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from engine.storage.statedb import STATE_DIRNAME, StateDB

# folders of recomputable results, each entry one child (runs: one per run key)
CACHE_KINDS = ("runs", "features", "factors", "groundtruth", "calibration", "embeddings", "jobs")


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


def cache_entries(root: str | Path) -> list[CacheEntry]:
    """Every cached entry of the project at ``root``, largest first."""
    state = Path(root) / STATE_DIRNAME
    runs = {}
    if (state / "state.db").is_file():
        runs = {r["key"]: r for r in StateDB(state / "state.db").list_runs()}
    out = []
    for kind in CACHE_KINDS:
        folder = state / kind
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            size, mtime = _size_and_mtime(child)
            run = runs.get(child.name) if kind == "runs" else None
            out.append(CacheEntry(kind, child.name, child, size, mtime, method=run and run["method"],
                                  status=run and run["status"]))
    return sorted(out, key=lambda e: -e.bytes)


def cache_size(root: str | Path) -> int:
    return sum(e.bytes for e in cache_entries(root))


def prune_cache(root: str | Path, *, older_than_days: float | None = None, max_total_mb: float | None = None,
                keys: list[str] | None = None, everything: bool = False, dry_run: bool = False) -> list[CacheEntry]:
    """Remove entries: named ``keys``; those unused for ``older_than_days``; then the least recently
    used until the cache is at most ``max_total_mb``; or all of them. Returns what was (or, with
    ``dry_run``, would be) removed. Runs removed also leave the state database."""
    entries = cache_entries(root)
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
    for e in removed:
        if e.path.is_dir():
            shutil.rmtree(e.path)
        else:
            e.path.unlink(missing_ok=True)
        if e.kind == "runs" and db is not None:
            db.delete_run(e.key)
    return removed


__all__ = ["CacheEntry", "cache_entries", "cache_size", "prune_cache", "CACHE_KINDS"]
