"""Image splits decoded once, kept as uint8 on disk, and read row by row.

A split of an image project is an :class:`ImageRows`: a row-indexable view over a uint8
``[n, channels, height, width]`` array that is memory-mapped from ``.proponent/cache``. Indexing
it (an int, a slice, or an index array) returns float32 rows in the project's preprocessing
(``/255``, then ``normalize``); nothing holds the split as one float tensor, so memory is the
rows asked for plus what the OS keeps in its page cache.

The first load decodes every file through a ``torch.utils.data.DataLoader`` (worker processes
for large splits) straight into a preallocated file, so decoding is bounded by one batch of
images too. Every file is checked on that pass (missing, unreadable, wrong shape) and the error
names the file and row. Later loads map the file while no image, path or preprocessing changes.

Why uint8: the decoded pixels after mode conversion and resize are 8-bit, so the cache is exact
and 4× smaller than float32, and ``normalize`` can change without decoding again.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.core.errors import ProponentError, ValidationError
from engine.storage.arrays import atomic_save_npy, temp_path_for

IMAGE_CACHE_VERSION = 2  # 2: uint8 pixels before normalisation (1 held float32 after it)
DECODE_BATCH = 256  # images per DataLoader batch: the decode pass holds about this many at once
BLOCK_BYTES = 64 << 20  # whole-split passes read float32 blocks of at most this size
WORKERS_FROM = 2048  # smaller splits decode in-process: starting worker processes costs more


@dataclass(frozen=True)
class ImagePreprocessing:
    """``[data] resize``, ``mode`` and ``normalize``: one definition used for training,
    attribution and the app's uploads. The app shows the original pixels (:func:`read_raw_image`)."""

    resize: tuple[int, int] | None = None  # (height, width)
    mode: str | None = None  # "rgb" | "grey"; None: grey for single-channel files, else RGB
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def pil_mode(self, im) -> str:
        if self.mode == "rgb":
            return "RGB"
        if self.mode == "grey":
            return "L"
        return "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"

    def pixels(self, im) -> np.ndarray:
        """A PIL image → uint8 [channels, height, width]: mode and resize, before normalisation."""
        im = eight_bit(im)
        im = im.convert(self.pil_mode(im))
        if self.resize is not None:
            h, w = self.resize
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
        arr = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on PIL's read-only view)
        arr = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
        return np.ascontiguousarray(arr)

    def check_channels(self, channels: int) -> None:
        if self.mean is not None and len(self.mean) not in (1, channels):
            raise ValueError(f"normalize has {len(self.mean)} channel(s) but the images have {channels}")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., channels, h, w] → float32 in the project's preprocessing."""
        x = pixels.to(torch.float32)
        x.div_(255.0)  # in place: a block is one float32 copy, not three
        if self.mean is not None:
            self.check_channels(x.shape[-3])
            x.sub_(torch.tensor(self.mean, dtype=torch.float32).reshape(-1, 1, 1))
            x.div_(torch.tensor(self.std, dtype=torch.float32).reshape(-1, 1, 1))
        return x.contiguous()

    def apply(self, im) -> np.ndarray:
        """A PIL image → float32 [channels, height, width] in the project's preprocessing."""
        return self.normalize(torch.from_numpy(self.pixels(im))).numpy()

    def fingerprint(self) -> dict:
        return {"resize": self.resize, "mode": self.mode, "mean": self.mean, "std": self.std}

    def pixel_fingerprint(self) -> dict:
        """What the cached uint8 pixels depend on (normalisation is applied on read)."""
        return {"resize": self.resize, "mode": self.mode}


def eight_bit(im):
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit grey ("L"), scaled the way
    scikit-image's ``img_as_ubyte`` does (16 bits: / 257; floats: 0..1 → 0..255). PIL's own convert
    clips instead, so every 16-bit scan came out white and every float image black. Values that fit
    no such range are refused (ValueError) rather than guessed at. Other modes are returned as they are."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    arr = np.asarray(im)
    if arr.size == 0:
        return im
    if im.mode == "F" and not np.isfinite(arr).all():
        raise ValueError("float pixels hold NaN or infinite values; save it as an 8- or 16-bit image")
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode == "F":
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float pixels must lie in 0..1 (this file holds {lo:g}..{hi:g}); "
                             f"save it as an 8- or 16-bit image")
        out = np.rint(arr * 255.0)
    else:
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit pixel values {lo:g}..{hi:g} do not fit 16 bits; save it as an 8- or "
                             f"16-bit image")
        out = np.rint(arr / 257.0)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def regular_file(path: Path) -> bool:
    """A plain file (links followed): not a FIFO, socket or device, which an image reader would block on."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # missing or a broken link: the reader names it as missing


def read_raw_image(source):
    """The pixels of a file (a path, bytes or a binary file object) as a PIL image (loaded, file
    closed). An image over PIL's pixel limit (a possible decompression bomb: a 17 KB PNG can hold
    144 million pixels) is refused before it is decoded, and so is a path that is not a regular
    file (opening a FIFO would wait for a writer for ever)."""
    if isinstance(source, (str, os.PathLike)) and not regular_file(Path(source)):
        raise ValueError("not a regular file (a pipe, socket or device?)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as im:
                w, h = im.size
                # checked here as well: the warnings filter is process-wide, and another thread (a
                # Streamlit session) may reset it between the two lines above
                if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{w}×{h} = {w * h} pixels, over the limit of "
                                                       f"{Image.MAX_IMAGE_PIXELS}")
                im.load()
                return im.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"too large ({e}); refused as a possible decompression bomb") from None


def _decode_problem(path: Path, prep: ImagePreprocessing) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None) or (None, what is wrong): plain values, so worker processes can return them."""
    try:
        im = read_raw_image(path)
    except FileNotFoundError:
        return None, f"image file not found: {path}"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return None, f"unreadable image {path.name}: {e}"
    try:
        return prep.pixels(im), None
    except ValueError as e:
        return None, f"image {path.name}: {e}"


def load_pixels(path: Path, prep: ImagePreprocessing, file: Path, row: int | None) -> np.ndarray:
    """One file's uint8 pixels, or a :class:`ValidationError` naming ``file`` and ``row``."""
    arr, problem = _decode_problem(path, prep)
    if problem is not None:
        raise ValidationError(problem, file=str(file), row=row)
    return arr


def load_image(path: Path, prep: ImagePreprocessing, file: Path, row: int | None) -> np.ndarray:
    """One file as float32 [channels, height, width] in the project's preprocessing."""
    arr = load_pixels(path, prep, file, row)
    try:
        return prep.normalize(torch.from_numpy(arr)).numpy()
    except ValueError as e:
        raise ValidationError(f"image {path.name}: {e}", file=str(file), row=row) from None


# ----------------------------------------------------------------------------- the row view
class ImageRows:
    """Rows of an image split: ``x[i]``, ``x[lo:hi]`` and ``x[index array]`` return float32
    tensors in the project's preprocessing, read from uint8 ``pixels`` (usually memory-mapped).

    ``rows`` makes a subset view without copying; ``.to(device)`` makes a view whose reads land
    on that device (pinned and copied asynchronously on CUDA), so a training loop can index it
    as it would a tensor already there."""

    def __init__(self, pixels: np.ndarray, prep: ImagePreprocessing, rows: np.ndarray | None = None,
                 device: torch.device | str = "cpu"):
        if pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise ValueError(f"ImageRows needs uint8 [n, c, h, w] pixels, got {pixels.dtype} {pixels.shape}")
        self.pixels = pixels
        self.prep = prep
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.device = torch.device(device)
        prep.check_channels(pixels.shape[1])

    # tensor-like surface the engine relies on
    dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self),) + tuple(self.pixels.shape[1:]))

    def __len__(self) -> int:
        return len(self.pixels) if self.rows is None else len(self.rows)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return 4

    def __repr__(self) -> str:
        return f"ImageRows({list(self.shape)}, uint8 → float32, device={self.device})"

    def _positions(self, key) -> np.ndarray | slice | int:
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} is out of range for {len(self)} rows")
            i %= len(self)
            return i if self.rows is None else int(self.rows[i])
        if isinstance(key, slice):
            if self.rows is None:
                return slice(*key.indices(len(self)))
            return self.rows[key]
        if isinstance(key, torch.Tensor):
            key = key.detach().cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.max() >= len(self) or idx.min() < -len(self)):
            raise IndexError(f"an index is out of range for {len(self)} rows")
        idx = idx % max(len(self), 1)
        return idx if self.rows is None else self.rows[idx]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):  # x[rows, channel, ...]: rows first, the rest on the read tensor
            head = self[key[0]]
            rest = key[1:]
            return head[rest] if isinstance(key[0], (int, np.integer)) else head[(slice(None),) + rest]
        pos = self._positions(key)
        if isinstance(pos, np.ndarray) and pos.ndim == 1 and len(pos) > 1 and np.all(np.diff(pos) == 1):
            pos = slice(int(pos[0]), int(pos[-1]) + 1)  # a run of rows: one contiguous read
        block = np.array(self.pixels[pos], copy=True)  # fancy index or slice of the memory map → RAM
        out = self.prep.normalize(torch.from_numpy(block))
        if self.device.type == "cpu":
            return out
        if self.device.type == "cuda":
            return out.pin_memory().to(self.device, non_blocking=True)
        return out.to(self.device)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices) -> "ImageRows":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageRows(self.pixels, self.prep, idx if self.rows is None else self.rows[idx], self.device)

    def to(self, device=None, *args, **kwargs) -> "ImageRows":
        if device is None or isinstance(device, torch.dtype):
            return self
        return ImageRows(self.pixels, self.prep, self.rows, device)

    def cpu(self) -> "ImageRows":
        return self.to("cpu")

    def block_rows(self, max_bytes: int = BLOCK_BYTES) -> int:
        """Rows per block so that one float32 block stays within ``max_bytes``."""
        row = 4 * int(np.prod(self.pixels.shape[1:]))
        return max(1, max_bytes // max(row, 1))


# ----------------------------------------------------------------------------- decode pass
def image_cache_key(paths: list[Path], prep: ImagePreprocessing, expect: tuple | None) -> str:
    """What the decoded pixels depend on: every file's path, size and modification time, the
    mode/resize and the expected shape (an edited or replaced image misses the cache)."""
    h = hashlib.sha256(json.dumps([IMAGE_CACHE_VERSION, prep.pixel_fingerprint(), list(expect or ())]).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_file(folder: Path, split: str, key: str) -> Path:
    return folder / f"images-{split}-{key}.npy"


def _open_cached(path: Path) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.dtype == np.uint8 and arr.ndim == 4 else None


class _ImageFiles(torch.utils.data.Dataset):
    """The files of a split decoded one by one (what the DataLoader's workers run)."""

    def __init__(self, paths: list[Path], prep: ImagePreprocessing):
        self.paths, self.prep = paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        arr, problem = _decode_problem(self.paths[i], self.prep)
        return i, arr, problem


def _as_list(batch):
    return batch


def decode_workers(n: int) -> int:
    """Workers decoding ``n`` images (forked processes, or threads where other threads run: see
    :func:`_batches`): ``PROPONENT_DECODE_WORKERS`` if set, else none below :data:`WORKERS_FROM`
    images, else the usable cores up to 8."""
    env = os.environ.get("PROPONENT_DECODE_WORKERS", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ProponentError(f"PROPONENT_DECODE_WORKERS={env!r} is not a whole number") from None
    if n < WORKERS_FROM:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores, 8)) if cores > 1 else 0


def _batches(paths: list[Path], prep: ImagePreprocessing, workers: int) -> Iterator[list]:
    """The split's decoded batches, in order: [(index, uint8 pixels or None, problem or None)].

    In a process running no other thread, ``workers`` forked DataLoader processes decode them. Where
    other threads run (the app's server, a job's watchdog), forking can deadlock a child, and
    "spawn" re-runs the parent's ``__main__`` file in every child: under Streamlit that is the
    page script (its runner installs the page as ``__main__``), so the children died at start and
    the parent blocked for ever writing a large split to a child that was gone (CPython writes the
    pickled dataset before it notices). There a pool of ``workers`` threads decodes instead (Pillow
    releases the GIL while it decodes), at most two batches per thread ahead of the consumer."""
    if workers and threading.active_count() == 1:
        yield from torch.utils.data.DataLoader(_ImageFiles(paths, prep), batch_size=DECODE_BATCH, shuffle=False,
                                               num_workers=workers, collate_fn=_as_list,
                                               multiprocessing_context="fork")
        return
    files = _ImageFiles(paths, prep)

    def batch(lo: int) -> list:
        return [files[i] for i in range(lo, min(lo + DECODE_BATCH, len(paths)))]

    starts = range(0, len(paths), DECODE_BATCH)
    if not workers:
        for lo in starts:
            yield batch(lo)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        ahead: collections.deque = collections.deque()
        for lo in starts:
            ahead.append(pool.submit(batch, lo))
            if len(ahead) >= 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _new_file(final: Path | None) -> tuple[Path, bool]:
    """(where a decode pass writes, whether it is a private temporary file). Beside the cache file
    when the project keeps state (renamed into place when complete); else a temporary file that is
    unlinked as soon as it is mapped, so no process, however it ends, leaves it behind."""
    if final is not None and final.parent.is_dir():
        try:
            return temp_path_for(final), False
        except OSError:
            pass  # a cache folder this process cannot write (a read-only project): decode privately
    fd, tmp = tempfile.mkstemp(prefix="proponent-images-", suffix=".npy")
    os.close(fd)
    return Path(tmp), True


def decode_split(paths: list[Path], names: list[str], prep: ImagePreprocessing, files: list[Path],
                 rows: list[int | None], expect: tuple | None, final: Path | None) -> tuple[np.ndarray, Path | None]:
    """Decode every file into a preallocated uint8 file, batch by batch; (memory map, its path, or
    None for a private temporary file: already unlinked, alive only through the map).

    ``final`` is the cache file to become (None: no caching). The first file fixes the shape
    (or ``expect``, the training split's); a file of another shape, or one that cannot be read,
    is a :class:`ValidationError` naming it, and no partial file is left."""
    if not paths:
        raise ValidationError("the split has no images", file=str(files[0]) if files else None)
    first = load_pixels(paths[0], prep, files[0], rows[0])
    shape = tuple(expect) if expect else tuple(first.shape)
    try:
        prep.check_channels(shape[0])
    except ValueError as e:
        raise ValidationError(f"image {names[0]}: {e}", file=str(files[0]), row=rows[0]) from None
    tmp, private = _new_file(final)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths),) + shape)
        with open(tmp, "r+b") as f:
            if hasattr(os, "posix_fallocate"):
                # claim the blocks now: a full disk is an error here, not a SIGBUS while writing rows
                os.posix_fallocate(f.fileno(), 0, mm.offset + mm.nbytes)
        for batch in _batches(paths, prep, decode_workers(len(paths))):
            for i, arr, problem in batch:
                if problem is not None:
                    raise ValidationError(problem, file=str(files[i]), row=rows[i])
                if arr.shape != shape:
                    hints = []
                    if arr.shape[0] != shape[0] and prep.mode is None:
                        hints.append(f'set [data] mode = "{"rgb" if 3 in (arr.shape[0], shape[0]) else "grey"}" '
                                    f'to convert their colours')
                    if arr.shape[1:] != shape[1:] and not prep.resize:
                        hints.append("set [data] resize = [h, w] to resize them")
                    hint = "; " + " and ".join(hints) if hints else ""
                    raise ValidationError(f"image {names[i]} has shape {tuple(arr.shape)} (channels, height, width) "
                                          f"but the others have {shape}{hint}", file=str(files[i]), row=rows[i])
                mm[i] = arr
        mm.flush()
        del mm
        if final is not None and tmp.parent == final.parent:
            os.replace(tmp, final)
            tmp = final
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise ProponentError(f"cannot write the decoded images to {tmp.parent}: {e.strerror or e}") from None
        raise
    pixels = np.load(tmp, mmap_mode="r", allow_pickle=False)
    if private:
        os.unlink(tmp)  # the mapping keeps the data; the name goes now
        return pixels, None
    return pixels, tmp


@dataclass
class PendingImageCache:
    """A split decoded before the project kept state: written into ``.proponent/cache`` once it
    does (``Project.state_dir``), so a command that fails validation leaves the project folder as
    it was. ``pixels`` is the memory map of the (already unlinked) temporary file."""

    folder: Path
    split: str
    key: str
    pixels: np.ndarray

    def write(self) -> None:
        """Best effort (a read-only project decodes again next time); older caches of the same
        split, which this wrote, are removed."""
        try:
            atomic_save_npy(cache_file(self.folder, self.split, self.key), self.pixels)  # streamed from the map
        except (OSError, ProponentError):
            return
        remove_stale(self.folder, self.split, self.key)


def remove_stale(folder: Path, split: str, key: str) -> None:
    for old in folder.glob(f"images-{split}-*.npy"):
        if re.fullmatch(rf"images-{split}-[0-9a-f]{{20}}", old.stem) and old.stem != f"images-{split}-{key}":
            with contextlib.suppress(OSError):
                old.unlink()


def load_split(paths: list[Path], names: list[str], prep: ImagePreprocessing, files: list[Path],
               rows: list[int | None], expect: tuple | None, cache: tuple[Path, str] | None,
               pending: list | None) -> ImageRows:
    """A split as :class:`ImageRows`: mapped from ``cache`` = (folder, split) while no file
    changes, else decoded (into the cache when its folder exists, else into an unlinked temporary
    file whose map is added to ``pending``)."""
    key = image_cache_key(paths, prep, expect) if cache is not None else None
    final = cache_file(cache[0], cache[1], key) if cache is not None else None
    if final is not None:
        hit = _open_cached(final)
        if hit is not None and len(hit) == len(paths) and (expect is None or tuple(hit.shape[1:]) == tuple(expect)):
            return ImageRows(hit, prep)
    if final is not None and final.parent.parent.is_dir() and not final.parent.is_dir():
        with contextlib.suppress(OSError):
            final.parent.mkdir()  # the project keeps state already (.proponent exists): cache beside it
    pixels, path = decode_split(paths, names, prep, files, rows, expect, final)
    if final is not None:
        if path == final:
            remove_stale(cache[0], cache[1], key)
        elif pending is not None:
            pending.append(PendingImageCache(cache[0], cache[1], key, pixels))
    return ImageRows(pixels, prep)


__all__ = ["ImagePreprocessing", "ImageRows", "read_raw_image", "load_image", "load_pixels", "load_split",
           "decode_split", "decode_workers", "PendingImageCache", "image_cache_key", "IMAGE_CACHE_VERSION"]
