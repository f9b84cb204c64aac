"""Results on disk: arrays and JSON written atomically, and chunked feature stores.

Arrays: ``.npy`` files written to a temporary name in the same folder and renamed into
place, so a reader never sees half a file and a killed writer leaves nothing half-written.
Chunked stores (features) keep a manifest; an interrupted featurization resumes at the
first missing chunk.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


# ---------------------------------------------------------------------------- atomic files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; results should read like any other file


_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _atomic_write(path: str | Path, write) -> None:
    """Write through ``write(fileobj)`` to a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid is in the name, so a later start can tell an orphan from a write in progress
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _CANNOT_WRITE:
            # a full disk or a read-only/forbidden folder is the user's to fix: one line, nothing half-written
            from engine.core.errors import ProponentError

            raise ProponentError(f"cannot write: {os.strerror(e.errno).lower()} (nothing was half-written; finished "
                                 f"parts are kept and a rerun resumes)", file=str(path)) from None
        raise


TEMP_SUFFIX = ".tmp"


def temp_path_for(path: str | Path) -> Path:
    """A new empty temporary file beside ``path``, named so orphan cleanup recognises it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    return Path(tmp)
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_orphan_temp_files(folder: str | Path) -> int:
    """Remove temporary files that :func:`_atomic_write` left behind when its process was killed
    (only ours: the name pattern, and a writer pid that no longer runs). Returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.rglob(f"*{TEMP_SUFFIX}"):
        m = _TEMP_NAME.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=json_default))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    # np.asarray keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
    _atomic_write(path, lambda f: np.save(f, np.asarray(array, order="C"), allow_pickle=False))


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def jsonable(o):
    """Plain JSON values: numpy → Python, non-finite floats → null (strict JSON for the docs)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, Path):
        return str(o)
    return o


def stable_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=json_default).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------- chunked arrays
class ChunkedArray:
    """A 2-D float array of known row count stored as fixed-size row chunks.

    Each chunk is its own atomically written ``.npy``, so a run killed half-way keeps every
    finished chunk and resumes with the first missing one.
    """

    def __init__(self, folder: str | Path, n_rows: int, chunk_rows: int, meta: dict | None = None):
        self.folder = Path(folder)
        self.n_rows = int(n_rows)
        self.chunk_rows = int(chunk_rows)
        self.meta = dict(meta or {})
        manifest = self.folder / "manifest.json"
        want = {"n_rows": self.n_rows, "chunk_rows": self.chunk_rows, "meta": self.meta}
        if manifest.is_file():
            have = json.loads(manifest.read_text())
            if have != json.loads(json.dumps(want, default=json_default)):
                # a different request under the same folder: start over rather than mix results
                for f in self.folder.glob("chunk_*.npy"):
                    if re.fullmatch(r"chunk_\d{6}", f.stem):  # only what this store wrote
                        f.unlink()
                atomic_write_json(manifest, want)
        else:
            atomic_write_json(manifest, want)

    @property
    def n_chunks(self) -> int:
        return (self.n_rows + self.chunk_rows - 1) // self.chunk_rows

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min(self.n_rows, (c + 1) * self.chunk_rows)

    def chunk_path(self, c: int) -> Path:
        return self.folder / f"chunk_{c:06d}.npy"

    def has_chunk(self, c: int) -> bool:
        return self.chunk_path(c).is_file()

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not self.has_chunk(c)]

    def write_chunk(self, c: int, block: np.ndarray) -> None:
        lo, hi = self.chunk_bounds(c)
        if block.shape[0] != hi - lo:
            raise ValueError(f"chunk {c} should have {hi - lo} rows, got {block.shape[0]}")
        atomic_save_npy(self.chunk_path(c), block)

    def read_chunk(self, c: int) -> np.ndarray:
        """One chunk, float16 chunks widened to float32 (a store may hold both: see ``write_chunk``)."""
        block = load_npy(self.chunk_path(c), mmap=False)
        return block.astype(np.float32) if block.dtype == np.float16 else block

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows at arbitrary positions, reading only the chunks that hold them (memory-mapped)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = None
        chunk_of = rows // self.chunk_rows
        for c in np.unique(chunk_of):
            sel = np.nonzero(chunk_of == c)[0]
            block = load_npy(self.chunk_path(int(c)), mmap=True)
            part = np.asarray(block[rows[sel] - int(c) * self.chunk_rows])
            if part.dtype == np.float16:
                part = part.astype(np.float32)
            if out is None:
                out = np.empty((len(rows), part.shape[1]), dtype=part.dtype)
            out[sel] = part
        return out if out is not None else np.empty((0, 0), np.float32)

    def iter_chunks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for c in range(self.n_chunks):
            lo, hi = self.chunk_bounds(c)
            yield lo, hi, self.read_chunk(c)

    @property
    def complete(self) -> bool:
        return not self.missing_chunks()

    def to_array(self) -> np.ndarray:
        if not self.complete:
            raise RuntimeError(f"{self.folder}: {len(self.missing_chunks())} chunks missing")
        return np.concatenate([self.read_chunk(c) for c in range(self.n_chunks)], axis=0)
