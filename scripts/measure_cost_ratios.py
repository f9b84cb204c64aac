#!/usr/bin/env python
"""Measure each method's cost as a multiple of one per-example gradient pass, for the app's estimates.

    python scripts/measure_cost_ratios.py --workdir /tmp/cost-ratios

Prepares the digits sample in the workdir, times one per-example gradient pass (the unit the
Attribute page calibrates on every project), then runs every method with its defaults as the app's
job does (fit + score of the test queries, self-scores and suspicion) and writes
``seconds / (passes × examples × seconds per example)`` per method, plus the median start-up of a
background job's worker (forked by the warm launcher, as in the app), to app/services/cost_ratios.json.
``--methods a,b`` updates those methods' entries and keeps the others.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".proponent-bench-workdir"
sys.path.insert(0, str(ROOT))

from app import jobs  # noqa: E402
from app import services as svc  # noqa: E402
from engine.core.errors import ProponentError  # noqa: E402
from engine.core.project import Project  # noqa: E402
from engine.core.samples import prepare_sample  # noqa: E402
from engine.methods import list_methods  # noqa: E402
from engine.storage.arrays import atomic_write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sample", default="digits")
    ap.add_argument("--methods", default="", help="comma-separated (default: every method)")
    ap.add_argument("--out", default=str(ROOT / "app" / "services" / "cost_ratios.json"))
    a = ap.parse_args(argv)
    work = Path(a.workdir).resolve()
    proj = work / a.sample
    if proj.exists():
        # every run starts from an unrun project, but only a folder this script made is removed
        if not (proj / MARKER).is_file():
            print(f"measure_cost_ratios: {proj} exists and was not made by this script; give another --workdir" , file=sys.stderr)
            return 2
        shutil.rmtree(proj)
    prepare_sample(a.sample, proj)
    (proj / MARKER).write_text("made by scripts/measure_cost_ratios.py; removed and made again on its next run\n")
    p = Project.load(proj)
    per_ex = min(svc.calibrate_gradients(p) for _ in range(3))
    if a.methods and Path(a.out).is_file():
        # a partial run keeps the file's unit, so every ratio in it is a multiple of the same gradient pass
        per_ex = json.loads(Path(a.out).read_text()).get("seconds_per_example", per_ex)
    unit = (len(p.train_dataset) + len(p.test_dataset)) * per_ex
    methods = [m for m in (a.methods.split(",") if a.methods else [c.name for c in list_methods()]) if m]
    # the app starts its job launcher first thing, so its jobs start warm: measure them that way
    from app.jobs.launcher import LAUNCHER
    LAUNCHER.start()
    t_ready = time.monotonic()
    while LAUNCHER.would_wait() and time.monotonic() - t_ready < 120:
        time.sleep(0.2)
    ratios, seconds = {}, {}
    startup = []
    for m in methods:
        t0 = time.perf_counter()
        jid = jobs.start_job(p, "attribute", {"method": m, "settings": {}, "device": "cpu"})
        j = jobs.wait(p, jid, timeout=3600)
        wall = time.perf_counter() - t0
        if j["status"] != "done":
            print(f"{m:12s} {j['status']}: {j.get('message')}")
            continue
        run = next(r for r in svc.list_runs(p) if r["key"] == j["result"]["key"])
        took = (run["fit_s"] or 0) + (run["score_s"] or 0)
        try:
            passes = svc.gradient_passes(p, m, {})
        except ProponentError:
            passes = 1
        ratios[m] = round(took / (passes * unit), 2)
        seconds[m] = round(took, 2)
        startup += svc.job_startup_seconds([j])
        print(f"{m:12s} {took:8.2f} s  (job wall {wall:.1f} s)  ratio {ratios[m]}")
    startup.sort()
    if a.methods and Path(a.out).is_file():  # a partial run updates the methods it measured
        old = json.loads(Path(a.out).read_text())
        ratios = {**old.get("ratios", {}), **ratios}
        seconds = {**old.get("seconds", {}), **seconds}
        startup = startup or [old.get("startup_s", 0.0)]
    atomic_write_json(a.out, {
        "command": "python scripts/measure_cost_ratios.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"), "project": a.sample,
        "seconds_per_example": per_ex, "examples": len(p.train_dataset) + len(p.test_dataset),
        "startup_s": round(startup[len(startup) // 2], 2) if startup else 0.0,
        "ratios": ratios, "seconds": seconds,
        "notes": "ratio = the method's fit + score seconds / (gradient passes × examples × seconds per example), "
                 "defaults, CPU, one machine shared with other work."})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
