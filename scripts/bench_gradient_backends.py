#!/usr/bin/env python
"""One method end to end under each per-example gradient backend (PROPONENT_GRADIENTS=layers|vmap),
interleaved, each run in its own process on a fresh copy of the project (no stores shared).

    python scripts/bench_gradient_backends.py PROJECT [--method ekfac] [--queries 200] [--repeats 2]
        [--work DIR]

Prints one JSON line per run (seconds, peak RSS) and the largest score difference between the
backends relative to the largest score.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(project: str, method: str, queries: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from engine import api
    from engine.core.project import Project

    t0 = time.perf_counter()
    scores = api.attribute(Project.load(project), method, queries=np.arange(queries))
    seconds = time.perf_counter() - t0
    np.save(out, scores)
    print(json.dumps({"backend": os.environ.get("PROPONENT_GRADIENTS", "auto"), "method": method,
                      "seconds": round(seconds, 1),
                      "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("project")
    ap.add_argument("--method", default="ekfac")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", nargs=2, metavar=("PROJECT_COPY", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.method, a.queries, a.child[1])
        return 0
    import numpy as np

    src = Path(a.project).resolve()
    work = Path(a.work or tempfile.mkdtemp(prefix="proponent-backends-"))
    work.mkdir(parents=True, exist_ok=True)
    outs: dict[str, list[np.ndarray]] = {}
    for r in range(a.repeats):
        for backend in ("layers", "vmap"):
            dst = work / f"{backend}{r}"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".proponent"))
            out = work / f"{backend}{r}.npy"
            subprocess.run([sys.executable, __file__, str(dst), "--method", a.method, "--queries", str(a.queries),
                            "--child", str(dst), str(out)], check=True, env={**os.environ, "PROPONENT_GRADIENTS": backend})
            outs.setdefault(backend, []).append(np.load(out))
            shutil.rmtree(dst)
    ref = outs["vmap"][0]
    diff = float(np.abs(outs["layers"][0] - ref).max() / np.abs(ref).max())
    print(json.dumps({"max |Δ| / max |score|, layers vs vmap": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
