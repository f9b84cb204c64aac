#!/usr/bin/env python
"""Image splits decoded on demand: wall time and peak memory of loading a split, against the
in-RAM float32 stack the loader used before (docs/bench/data-streaming.json).

Each run is its own process (peak RSS is the process's ``VmHWM``), on generated PNG files:
  * ``in RAM``: decode every file to float32 and stack (the old loader);
  * ``streamed``: decode through the DataLoader into a uint8 file (0 and N worker processes);
  * ``cached``: map the uint8 cache of a later load, then read every row once in blocks.
A baseline process that only imports the engine gives the floor of the RSS column.

Usage: python scripts/bench_data.py [--sizes 5000:32,20000:32,4000:128] [--workers 2] [--json docs/bench/data-streaming.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _make_images(folder: Path, n: int, side: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    for i in range(n):
        p = folder / f"{i:06d}.png"
        if not p.exists():
            # smooth-ish content, so PNG sizes resemble real images rather than pure noise
            arr = np.roll(base, (i * 7) % side, axis=i % 2) // 2 + rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
            Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _old_decode(path, prep):
    """The loader before splits were read on demand: numpy float32 per file, normalised at once."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert(prep.pil_mode(im)), dtype=np.float32) / 255.0
    arr = np.transpose(arr, (2, 0, 1)) if arr.ndim == 3 else arr[None]
    mean = np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - mean) / np.asarray(prep.std, np.float32).reshape(-1, 1, 1), dtype=np.float32)


def _child(mode: str, folder: str, n: int, workers: int, cache: str) -> None:
    """Run one measurement in this process and print a JSON line."""
    os.environ["PROPONENT_DECODE_WORKERS"] = str(workers)
    import numpy as np

    from engine.core import images
    from engine.core.data import row_blocks
    from engine.evaluate.memory import peak_rss_mb

    paths = sorted(Path(folder).glob("*.png"))[:n]
    prep = images.ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    names, rows = [p.name for p in paths], [None] * len(paths)
    t0 = time.perf_counter()
    checksum = 0.0
    if mode == "baseline":
        pass
    elif mode == "in RAM":
        x = np.stack([_old_decode(p, prep) for p in paths])
        checksum = float(x[:, 0, 0, 0].sum())
    elif mode == "streamed":
        x = images.load_split(paths, names, prep, paths, rows, None, cache=None, pending=None)
        checksum = float(sum(b[:, 0, 0, 0].sum() for _, _, b in row_blocks(x)))
    elif mode == "cached":
        c = Path(cache)
        x = images.load_split(paths, names, prep, paths, rows, None, cache=(c, "train"), pending=None)
        checksum = float(sum(b[:, 0, 0, 0].sum() for _, _, b in row_blocks(x)))
    secs = time.perf_counter() - t0
    rss = peak_rss_mb()  # VmHWM: ru_maxrss would carry the parent's peak over exec
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": secs, "rss_mb": rss, "worker_rss_mb": kids, "checksum": checksum}))


def _run(mode, folder, n, workers, cache) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(n), str(workers), str(cache)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5000:32,20000:32,4000:128", help="n:side pairs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, folder, n, workers, cache = a.child
        _child(mode, folder, int(n), int(workers), cache)
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-data-"))
    rows = []
    base = _run("baseline", work, 0, 0, "")
    for spec in a.sizes.split(","):
        n, side = (int(v) for v in spec.split(":"))
        folder = work / f"png-{side}"
        _make_images(folder, n, side)
        cache = work / f"cache-{n}-{side}"
        shutil.rmtree(cache, ignore_errors=True)  # the first cached run must decode
        cache.mkdir()
        float_mb = n * 3 * side * side * 4 / 2**20
        runs = (("in RAM", 0, "decode, stack float32 in RAM (before)"),
                ("streamed", 0, "decode through the DataLoader, in-process → uint8 file"),
                ("streamed", a.workers, f"decode through the DataLoader, {a.workers} workers → uint8 file"),
                ("cached", 0, "first load of a project that keeps state: decode into the cache"),
                ("cached", 0, "later load: map the uint8 cache, read every row once"))
        for mode, workers, label in runs:
            r = _run(mode, folder, n, workers, cache)
            rows.append([n, side, label, round(r["seconds"], 2), round(r["rss_mb"]), round(r["rss_mb"] - base["rss_mb"]),
                         round(r["worker_rss_mb"]) if workers else None, round(float_mb)])
            print(rows[-1], flush=True)
    doc = {
        "title": "Image splits decoded on demand: load time and peak memory",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python scripts/bench_data.py " + " ".join(sys.argv[1:]),
        "tables": [{
            "title": "loading one split of generated RGB PNGs (normalised), each run its own process",
            "columns": ["images", "side px", "how", "seconds", "peak RSS MB", "above import MB", "worker peak MB",
                        "split as float32 MB"],
            "rows": rows,
            "notes": [f"'above import' subtracts the RSS of a process that only imports the engine ({base['rss_mb']:.0f} MB).",
                      "The cache is uint8 (exact: pixels are 8-bit after mode and resize), normalised on read; "
                      "its pages are file-backed, so the OS can drop them under memory pressure.",
                      "'worker peak MB' is the largest worker process (ru_maxrss of children).",
                      "Streamed rows: RSS above import is the 64 MiB read block plus the touched (file-backed) "
                      "pages of the uint8 file; the float32 split is never held."],
        }],
    }
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        print("wrote", a.json)


if __name__ == "__main__":
    main()
