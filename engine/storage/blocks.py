"""Large results written and reduced block by block, so memory is bounded by one block.

``write_blocks`` fills a preallocated on-disk ``.npy`` (a memmap) from a stream of row blocks and
renames it into place only when complete, so readers never see a half-written matrix.
``RunningTopK`` keeps each query's k largest and k smallest scores across column blocks of the
training set, without ever holding a full [n_queries, n_train] row set.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from engine.core.errors import ProponentError
from engine.storage.arrays import _refused_write, temp_path_for

REMAP_BYTES = 128 << 20


def write_blocks(path: str | Path, shape: tuple[int, int], blocks: Iterable[tuple[int, int, np.ndarray]],
                 dtype=np.float32, axis: int = 0) -> Path:
    """Write the blocks ``(lo, hi, block)`` of a ``shape`` matrix to ``path`` (a ``.npy``): row
    blocks (``axis=0``) or column blocks (``axis=1``, rows × (hi - lo)).

    The matrix's disk space is reserved before the first block (a full disk is an error here, not a
    SIGBUS while a mapped page is written). A write the filesystem refuses (a full disk, a read-only or
    forbidden folder, a folder where the file should be, a file where a folder should be) ends in one
    line naming ``path``, and nothing is left behind."""
    path = Path(path)
    tmp = None
    try:
        tmp = temp_path_for(path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(int(s) for s in shape))
        size = out.offset + out.nbytes
        if hasattr(os, "posix_fallocate") and size > 0:
            with open(tmp, "rb+") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        filled, since_remap = 0, 0
        for lo, hi, block in blocks:
            if axis == 0:
                out[lo:hi] = block
            else:
                out[:, lo:hi] = block
            filled += hi - lo
            since_remap += np.asarray(block).size * out.itemsize
            if since_remap > REMAP_BYTES:
                # written pages of a mapping count as this process's memory until it is unmapped
                out.flush()
                del out
                out = np.load(tmp, mmap_mode="r+")
                since_remap = 0
        if filled != shape[axis]:
            raise RuntimeError(f"{path}: {filled} of {shape[axis]} {'rows' if axis == 0 else 'columns'} written")
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        refused = _refused(e, path)
        if refused is not None:
            raise refused from None
        raise
    return path


_FOLDER_IN_THE_WAY = {errno.EEXIST: "a file is where a folder of this path should be",
                      errno.ENOTDIR: "a file is where a folder of this path should be",
                      errno.EISDIR: "is a folder; give a file name"}


def _refused(e: BaseException, path: Path):
    """The one-line error for a write of ``path`` the filesystem refused; None for anything else."""
    if isinstance(e, OSError) and e.errno in _FOLDER_IN_THE_WAY:
        where = e.filename if e.errno != errno.EISDIR and e.filename else None
        return ProponentError(f"cannot write: {_FOLDER_IN_THE_WAY[e.errno]}" + (f" ({where})" if where else ""),
                              file=str(path))
    return _refused_write(e, path, "cannot write", "nothing was half-written")


def iter_row_blocks(matrix: np.ndarray, rows: int = 256) -> Iterator[tuple[int, int, np.ndarray]]:
    for lo in range(0, matrix.shape[0], rows):
        hi = min(matrix.shape[0], lo + rows)
        yield lo, hi, np.asarray(matrix[lo:hi])


class RunningTopK:
    """Per-query top-k (largest) and bottom-k (smallest) over column blocks, ties broken by the
    lower training index (the order a stable sort of the full row gives)."""

    def __init__(self, n_queries: int, k: int):
        self.k = int(k)
        self.top_s = np.full((n_queries, 0), -np.inf)
        self.top_i = np.zeros((n_queries, 0), np.int64)
        self.bot_s = np.full((n_queries, 0), np.inf)
        self.bot_i = np.zeros((n_queries, 0), np.int64)

    @staticmethod
    def _merge(s_old, i_old, s_new, i_new, k, largest: bool):
        s = np.concatenate([s_old, s_new], 1)
        i = np.concatenate([i_old, i_new], 1)
        # lexsort: last key is primary; ties by index ascending
        order = np.lexsort((i, -s if largest else s), axis=1)[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)

    def update(self, col_lo: int, block: np.ndarray) -> None:
        """``block`` [n_queries, cols] holds the scores of training rows col_lo … col_lo + cols."""
        block = np.asarray(block, dtype=np.float64)
        idx = np.broadcast_to(np.arange(col_lo, col_lo + block.shape[1]), block.shape)
        self.top_s, self.top_i = self._merge(self.top_s, self.top_i, block, idx, self.k, True)
        self.bot_s, self.bot_i = self._merge(self.bot_s, self.bot_i, block, idx, self.k, False)

    def result(self) -> dict[str, np.ndarray]:
        return {"proponents": self.top_i, "proponent_scores": self.top_s,
                "opponents": self.bot_i, "opponent_scores": self.bot_s}
