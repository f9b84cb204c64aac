"""Results on disk: arrays and JSON written atomically, and chunked feature stores.

Arrays: ``.npy`` files written to a temporary name in the same folder and renamed into
place, so a reader never sees half a file and a killed writer leaves nothing half-written.
Chunked stores (features) keep a manifest; an interrupted featurization resumes at the
first missing chunk.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


# ---------------------------------------------------------------------------- half-precision casts
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def cast_float(a: np.ndarray, dtype) -> np.ndarray:
    """``a.astype(dtype)``, with casts to or from float16 done by torch: bit-identical (round to nearest
    even, the same inf/NaN; tests/test_store.py checks it) and faster. On one digits store matrix
    (1,445 × 4,810, in memory): float32→float16 37 ms with numpy, 7 ms with torch; float16→float32 21
    vs 12 ms. numpy's half casts were 0.8 s of a TRAK digits run (cProfile; the run went 8.1 → 7.2 s,
    one A/B pair on a shared machine)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    # not float64 -> float16: torch rounds that through float32 (double rounding; the test caught it)
    if (a.dtype.itemsize, dtype.itemsize) in ((4, 2), (2, 4), (2, 8)) and a.dtype in _FLOATS and dtype in _FLOATS \
            and a.size >= 4096:
        import warnings

        import torch

        with warnings.catch_warnings():  # a read-only memmap: torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(np.ascontiguousarray(a))
        return src.to({2: torch.float16, 4: torch.float32, 8: torch.float64}[dtype.itemsize]).numpy()
    return a.astype(dtype)


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns in uint16 (numpy has no bfloat16): the top half of each
    float32, rounded to nearest even by torch. float32's exponent range: only values beyond 3.39e38
    (to inf) or below 9e-41 (to 0) are lost, where float16 flushes anything under 6e-8 to zero and
    keeps 6e-5 only at full precision (many gradient entries are smaller)."""
    import torch

    src = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns back to float32 (exact: bfloat16 is float32's top half)."""
    out = np.zeros(bits.shape, np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


# ---------------------------------------------------------------------------- atomic files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; results should read like any other file


_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _refused_write(e: BaseException, file: str | Path, doing: str, kept: str, errnos=_CANNOT_WRITE):
    """The one-line error (naming ``file``) for a write the filesystem refused, ``doing``: the reason (``kept``);
    None for any other error, which the caller re-raises as it is."""
    if not isinstance(e, OSError) or e.errno not in errnos:
        return None
    from engine.core.errors import ProponentError

    return ProponentError(f"{doing}: {os.strerror(e.errno).lower()} ({kept})", file=str(file))


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
        # a full disk or a read-only/forbidden folder is the user's to fix: one line, nothing half-written
        refused = _refused_write(e, path, "cannot write",
                                 "nothing was half-written; finished parts are kept and a rerun resumes")
        if refused is not None:
            raise refused from None
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


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after time ``when`` (so it cannot have written a file last
    modified then: the pid was reused). False where unknown (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime (clock ticks since boot)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    started = time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    return started > when + 0.5  # both clocks are read to ~10 ms; the margin keeps a live writer's file


def clean_orphan_temp_files(folder: str | Path, names: Iterable[str] | None = None) -> int:
    """Remove temporary files that :func:`_atomic_write` left behind when its process was killed
    (only ours: the name pattern, and a writer pid that no longer runs, or that now belongs to a
    process started after the file was last written: on a busy machine a killed writer's pid is
    reused). ``names``: only the temporary files of these file names, directly in ``folder`` (a
    folder that is not Proponent's own, e.g. where ``attribute --export`` writes), else every one
    under ``folder``. Returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    found = (folder.rglob(f"*{TEMP_SUFFIX}") if names is None else
             (p for name in names for p in folder.glob(f".{glob.escape(name)}.*{TEMP_SUFFIX}")))
    for p in found:
        m = _TEMP_NAME.match(p.name)
        pid = int(m.group(1)) if m else 0
        if m and p.is_file() and (not _alive(pid) or _started_after(pid, p.stat().st_mtime)):
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


def read_cached_npy(path: str | Path, shape: tuple[int, ...] | None = None, *, ndim: int | None = None,
                    mmap: bool = True) -> np.ndarray | None:
    """A float array Proponent cached at ``path``, or None where it is missing or cannot be read back as
    one (truncated, overwritten, not a .npy, another shape or rank): a cache miss, so the caller
    recomputes and replaces the file, which Proponent wrote. Never unpickled."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        arr = load_npy(path, mmap=mmap)
    except (ValueError, OSError, EOFError):
        return None
    if arr.dtype.kind != "f" or (shape is not None and arr.shape != tuple(shape)) or (ndim is not None and arr.ndim != ndim):
        return None
    return arr


def save_tensors(tensors: dict, path: str | Path) -> None:
    """A safetensors file readable like any other result (the library creates it 0600)."""
    from safetensors.torch import save_file  # imports torch, which this module otherwise does not need

    save_file(tensors, str(path))
    os.chmod(path, _FILE_MODE)


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


# ---------------------------------------------------------------------------- scratch arrays
def scratch_file(folder: str | Path | None, what: str):
    """(an unlinked temporary file opened "w+b", its folder): only this process's handle and maps
    keep it, so no run, however it ends, leaves it behind. In ``folder`` (e.g. the project's
    cache) when it exists and can be written, else in the system's temporary folder."""
    folder = Path(folder) if folder is not None else None
    for where in ([folder] if folder is not None and folder.is_dir() else []) + [None]:
        try:
            fd, name = tempfile.mkstemp(prefix=f"proponent-{what}-", suffix=".bin", dir=where)
        except OSError:
            continue
        os.unlink(name)
        return os.fdopen(fd, "w+b"), Path(name).parent
    from engine.core.errors import ProponentError

    raise ProponentError(f"cannot create a temporary file for the {what}")


def disk_error(e: OSError, where: str | Path, what: str):
    """One line for a write that failed (a full disk, a read-only folder)."""
    from engine.core.errors import ProponentError

    return ProponentError(f"cannot write the {what} in {where}: {e.strerror or e}")


def scratch_array(shape: tuple[int, ...], dtype, folder: str | Path | None, what: str) -> np.ndarray:
    """A writable array of ``shape`` in an unlinked temporary file (:func:`scratch_file`), for
    whole-split intermediates whose size grows with the number of examples: the OS may page them
    out, the heap never holds them. The blocks are claimed first, so a full disk is one line here,
    not a crash while rows are written."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    f, where = scratch_file(folder, what)
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(nbytes)
        except OSError as e:
            raise disk_error(e, where, what) from None
        return np.memmap(f, dtype=dtype, mode="r+", shape=tuple(int(v) for v in shape))
    finally:
        f.close()  # the map keeps its own handle


def stable_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=json_default).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------- chunked arrays
F16_MAX = 6.0e4  # below float16's largest finite value (65504), with room for rounding up
STORE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_LOAD_BUDGET = 4 * 2**30  # to_array() refuses a store larger than this in memory (bytes)


class ChunkedArray:
    """A 2-D float array of known shape, preallocated on disk and written chunk by chunk.

    Files in ``folder`` (the only ones this store creates or deletes):

    - ``data.npy``: the whole [n_rows, width] array, allocated (disk space reserved) before the
      first chunk is written, so a full disk shows at the start, not half-way; written and read
      with plain pwrite/preadv (a memory map's pages would count in resident memory), a chunk or
      part of one at a time;
    - ``done.bin``: the done-mask, one byte per chunk, set after the chunk's rows are flushed. A
      process killed while writing a chunk leaves its byte 0 and the next run rewrites it. Ranks
      of a torchrun job write disjoint chunks and disjoint bytes of the same files;
    - ``scale.bin``: one float32 per chunk. A float16 store keeps each chunk as rows / scale with
      scale a power of two (1 unless the chunk exceeds float16's range), read back in float32. A
      bfloat16 store (float32's range, 8 significant bits) needs no scale and keeps the bit patterns
      in a uint16 array;
    - ``manifest.json``: the request (shape, chunking, dtype, meta). A different request in the
      same folder resets the store rather than mixing results.
    """

    LAYOUT = "preallocated-v1"
    FILES = ("data.npy", "done.bin", "scale.bin")

    def __init__(self, folder: str | Path, n_rows: int, chunk_rows: int, meta: dict | None = None, *,
                 width: int | None = None, dtype: str = "float32"):
        self.folder = Path(folder)
        self.n_rows = int(n_rows)
        self.chunk_rows = int(chunk_rows)
        self.meta = dict(meta or {})
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, not {dtype!r}")
        self.dtype_name = dtype
        # bfloat16 is kept as its bit patterns, so ``dtype`` (the on-disk type) is uint16 there: test
        # ``dtype_name`` for the kind of store; readers always get float32
        self.dtype = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
        self._geom = None  # (offset, width) of data.npy, read on first use
        self.rows_written = 0  # rows this process wrote (featurize sets it; torchrun reports it per rank)
        manifest = self.folder / "manifest.json"
        want = {"n_rows": self.n_rows, "chunk_rows": self.chunk_rows, "meta": self.meta, "layout": self.LAYOUT,
                "dtype": dtype}
        have = None
        if manifest.is_file():
            try:
                have = json.loads(manifest.read_text())
            except ValueError:
                have = None
        stale = have != json.loads(json.dumps(want, default=json_default))
        if not stale and width is not None and self.allocated and self.width != int(width):
            stale = True
        if stale:
            self._reset()
            atomic_write_json(manifest, want)
        if width is not None and not self.allocated:
            self._allocate(int(width))

    # -- files
    @property
    def data_path(self) -> Path:
        return self.folder / "data.npy"

    @property
    def allocated(self) -> bool:
        return self.data_path.is_file()

    def _reset(self) -> None:
        """Delete what a store (this layout or the older one-file-per-chunk layout) wrote here, and
        nothing else."""
        self._geom = None
        if not self.folder.is_dir():
            return
        for name in self.FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
        for f in self.folder.glob("chunk_*.npy"):
            if re.fullmatch(r"chunk_\d{6}", f.stem):  # the older layout's chunk files
                f.unlink()

    def _allocate(self, width: int) -> None:
        """Reserve the whole array on disk and clear the done-mask (every file renamed into place)."""
        self._geom = None
        atomic_write_bytes(self.folder / "done.bin", bytes(self.n_chunks))
        atomic_write_bytes(self.folder / "scale.bin", np.ones(self.n_chunks, np.float32).tobytes())
        tmp = temp_path_for(self.data_path)
        try:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(self.n_rows, width))
            offset = mm.offset
            del mm
            with open(tmp, "r+b") as f:
                size = offset + self.n_rows * width * self.dtype.itemsize
                if hasattr(os, "posix_fallocate") and size > 0:
                    os.posix_fallocate(f.fileno(), 0, size)  # blocks now: no SIGBUS on a full disk later
                os.fsync(f.fileno())
            os.replace(tmp, self.data_path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            need = self.n_rows * width * self.dtype.itemsize / 2**20
            refused = _refused_write(e, self.data_path, f"cannot reserve {need:,.0f} MB for the feature store",
                                     "finished stores are kept and a rerun resumes")
            if refused is not None:
                raise refused from None
            raise

    def _mask(self) -> bytes:
        try:
            mask = (self.folder / "done.bin").read_bytes() if self.allocated else b""
        except FileNotFoundError:  # never allocated, or the mask was removed: nothing counts as done
            mask = b""
        return mask.ljust(self.n_chunks, b"\x00")

    def _scales(self) -> np.ndarray:
        return np.fromfile(self.folder / "scale.bin", dtype=np.float32)

    def _pwrite(self, name: str, data, offset: int) -> None:
        """Write ``data`` (bytes or any contiguous buffer) at ``offset`` of one of the store's files, then fsync."""
        view = memoryview(data).cast("B")
        try:
            fd = os.open(self.folder / name, os.O_WRONLY)
            try:
                while len(view):  # one pwrite moves at most 2 GiB on Linux
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            # the space is reserved when the store is made, but a filesystem may still refuse (a quota, a full
            # disk where the reservation is emulated, a folder made read-only, EIO): one line; the chunk is not
            # marked done, so a rerun writes it again
            refused = _refused_write(e, self.folder / name, "cannot write the feature store",
                                     "finished chunks are kept and a rerun resumes", _CANNOT_WRITE | {errno.EIO})
            if refused is not None:
                raise refused from None
            raise

    # -- shape
    @property
    def n_chunks(self) -> int:
        return (self.n_rows + self.chunk_rows - 1) // self.chunk_rows

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min(self.n_rows, (c + 1) * self.chunk_rows)

    @property
    def width(self) -> int:
        """Columns per row."""
        return self._geometry()[1]

    def scale(self, c: int) -> float:
        """The factor chunk ``c`` was divided by to fit float16 (1 for float32 and in-range chunks)."""
        return float(self._scales()[c])

    # -- writing
    def has_chunk(self, c: int) -> bool:
        return self._mask()[c] == 1

    def missing_chunks(self) -> list[int]:
        mask = self._mask()
        return [c for c in range(self.n_chunks) if mask[c] != 1]

    def write_chunk(self, c: int, block: np.ndarray) -> None:
        """Write chunk ``c``'s rows, flush them, then mark the chunk done."""
        lo, hi = self.chunk_bounds(c)
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[0] != hi - lo:
            raise ValueError(f"chunk {c} should have {hi - lo} rows, got {block.shape[0] if block.ndim else 0}")
        scale = 1.0
        if self.dtype == np.float16:
            peak = float(np.abs(block).max(initial=0.0))
            if peak >= F16_MAX and np.isfinite(peak):
                scale = float(2.0 ** math.ceil(math.log2(peak / F16_MAX)))
        self._write_rows(c, 0, block / scale if scale != 1.0 else block)
        self._pwrite("scale.bin", np.float32(scale).tobytes(), 4 * c)
        self.mark_done(c)

    def write_rows(self, c: int, start: int, block: np.ndarray) -> None:
        """Write rows ``start…start + len(block)`` of chunk ``c`` (a float32 or bfloat16 store: a float16
        chunk's scale depends on the whole chunk), flushed; the chunk counts as done only after
        :meth:`mark_done`. Lets a writer hold a part of a chunk rather than all of it."""
        if self.dtype == np.float16:
            raise ValueError("write_rows is for float32 and bfloat16 stores; write a float16 chunk whole with "
                             "write_chunk")
        self._write_rows(c, start, self._rows_inside(c, start, block))

    def write_bfloat16_rows(self, c: int, start: int, bits: np.ndarray) -> None:
        """:meth:`write_rows` for a bfloat16 store, given values already rounded to bfloat16 as their uint16
        bit patterns (e.g. ``tensor.bfloat16().view(torch.int16).numpy()``): written as they are, with
        no second rounding pass."""
        if self.dtype_name != "bfloat16":
            raise ValueError(f"{self.folder}: write_bfloat16_rows writes bfloat16 stores, this one is {self.dtype_name}")
        bits = self._rows_inside(c, start, bits)
        if bits.dtype.itemsize != 2 or bits.dtype.kind not in "iu":
            raise ValueError(f"bfloat16 bit patterns come as 16-bit integers, not {bits.dtype}")
        self._write_rows(c, start, bits, as_bits=True)

    def _rows_inside(self, c: int, start: int, block) -> np.ndarray:
        lo, hi = self.chunk_bounds(c)
        block = np.asarray(block)
        if block.ndim != 2 or start < 0 or lo + start + block.shape[0] > hi:
            raise ValueError(f"rows {start}…{start + (block.shape[0] if block.ndim else 0)} are outside chunk {c} "
                             f"({hi - lo} rows)")
        return block

    def mark_done(self, c: int) -> None:
        self._pwrite("done.bin", b"\x01", c)  # last: a chunk counts only once its rows are on disk

    def _write_rows(self, c: int, start: int, block: np.ndarray, as_bits: bool = False) -> None:
        """Through :meth:`_pwrite` (not a writable memory map: its dirty pages counted in the process's
        resident memory, a whole chunk of them)."""
        if not self.allocated:
            self._allocate(block.shape[1])
        offset, width = self._geometry()
        if width != block.shape[1]:
            raise ValueError(f"chunk {c} has {block.shape[1]} columns, the store {width}")
        pos = offset + (self.chunk_bounds(c)[0] + start) * width * self.dtype.itemsize
        if as_bits:
            stored = block
        else:
            stored = to_bfloat16_bits(block) if self.dtype_name == "bfloat16" else cast_float(block, self.dtype)
        self._pwrite(self.data_path.name, np.ascontiguousarray(stored), pos)

    def _geometry(self) -> tuple[int, int]:
        """(byte offset of row 0 in data.npy, columns): read once from the .npy header."""
        if self._geom is None:
            mm = load_npy(self.data_path, mmap=True)
            self._geom = (int(mm.offset), int(mm.shape[1]))
            del mm
        return self._geom

    # -- reading
    def _widen(self, rows: np.ndarray, scales: np.ndarray | float) -> np.ndarray:
        """float32 rows, rescaled; ``rows`` must be this process's own array (it may be scaled in place)."""
        if self.dtype_name == "bfloat16":
            return from_bfloat16_bits(rows)
        out = cast_float(rows, np.float32)
        if np.any(np.asarray(scales) != 1.0):
            out *= np.asarray(scales, dtype=np.float32).reshape(-1, 1) if np.ndim(scales) else scales
        return out

    def _read_rows(self, lo: int, hi: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """Rows lo…hi as stored, read into a new array, or into the first rows of ``buffer`` (a flat array
        of the store's dtype, at least (hi − lo) × width long). Plain reads: a memory map's pages would count
        in resident memory on top of the copy."""
        offset, width = self._geometry()
        out = (np.empty((hi - lo, width), self.dtype) if buffer is None
               else buffer[:(hi - lo) * width].reshape(hi - lo, width))
        view = memoryview(out).cast("B")
        pos = offset + lo * width * self.dtype.itemsize
        fd = os.open(self.data_path, os.O_RDONLY)
        try:
            while len(view):
                n = os.preadv(fd, [view], pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"{self.data_path}: short read at byte {pos}")
                view, pos = view[n:], pos + n
        finally:
            os.close(fd)
        return out

    def read_chunk(self, c: int, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """One chunk (or its rows lo…hi, absolute) in float32 (float16 stores are widened and rescaled)."""
        if not self.has_chunk(c):
            raise RuntimeError(f"{self.folder}: chunk {c} has not been written")
        clo, chi = self.chunk_bounds(c)
        lo, hi = (clo if lo is None else lo), (chi if hi is None else hi)
        return self._widen(self._read_rows(lo, hi), self.scale(c))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows at arbitrary positions, read through the memory map (only the pages that hold them)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.allocated:
            return np.empty((0, 0), np.float32)
        mm = load_npy(self.data_path, mmap=True)
        return self._widen(np.asarray(mm[rows]), self._scales()[rows // self.chunk_rows])

    def _parts(self, chunks, max_bytes: int | None, item_bytes: int) -> Iterator[tuple[int, int, int]]:
        """(chunk, lo, hi) of every chunk in order (or the given ones), each cut into blocks of at most
        ``max_bytes`` at ``item_bytes`` per entry (None: whole chunks)."""
        step = None
        if max_bytes is not None and self.allocated:
            step = max(1, int(max_bytes) // (item_bytes * max(1, self.width)))
        for c in range(self.n_chunks) if chunks is None else chunks:
            lo, hi = self.chunk_bounds(c)
            for a in range(lo, hi, step or max(1, hi - lo)):
                yield c, a, min(hi, a + (step or hi - lo))

    def iter_chunks(self, chunks=None, max_bytes: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(lo, hi, rows) of every chunk in order, or of the given chunk numbers; with ``max_bytes``,
        each chunk in blocks of at most that many float32 bytes (memory: one block, not one chunk)."""
        for c, a, b in self._parts(chunks, max_bytes, 4):
            yield a, b, self.read_chunk(c, a, b)

    def iter_bfloat16(self, max_bytes: int | None = None, reuse: bool = False):
        """(lo, hi, rows) of a bfloat16 store as torch bfloat16 tensors, straight from the stored bits (no
        float32 copy), each at most ``max_bytes`` bytes: for products that run in bfloat16.

        ``reuse``: every part is read into one buffer, so a part is valid only until the next is asked for.
        A fresh array is page-faulted in as the read fills it: on this project's VM the first reads of a
        64 MiB part into new arrays took 190-300 ms against 10-15 ms into a used one."""
        import torch

        if self.dtype_name != "bfloat16":
            raise ValueError(f"{self.folder}: iter_bfloat16 reads bfloat16 stores, this one is {self.dtype_name}")
        buffer = None
        for c, a, b in self._parts(None, max_bytes, 2):
            if not self.has_chunk(c):
                raise RuntimeError(f"{self.folder}: chunk {c} has not been written")
            if reuse and buffer is None:  # the first part is the largest (only the last chunk is shorter)
                buffer = np.empty((b - a) * self.width, self.dtype)
            rows = self._read_rows(a, b, buffer)
            yield a, b, torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)

    @property
    def complete(self) -> bool:
        return not self.missing_chunks()

    def to_array(self, max_bytes: int = DEFAULT_LOAD_BUDGET) -> np.ndarray:
        """The whole store in memory (float32), for callers whose training side is small; refused
        above ``max_bytes`` (stream with :meth:`iter_chunks` instead)."""
        if not self.complete:
            raise RuntimeError(f"{self.folder}: {len(self.missing_chunks())} chunks missing")
        need = self.n_rows * self.width * 4
        if need > max_bytes:
            from engine.core.errors import ProponentError

            raise ProponentError(f"the feature store is {need / 2**30:.1f} GiB in float32, more than the "
                                 f"{max_bytes / 2**30:.1f} GiB this step may hold in memory; use a smaller proj_dim",
                                 file=str(self.data_path))
        return self._widen(self._read_rows(0, self.n_rows), np.repeat(
            self._scales(), self.chunk_rows)[: self.n_rows]) if self.n_rows else np.empty((0, self.width), np.float32)
