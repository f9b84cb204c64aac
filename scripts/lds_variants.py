#!/usr/bin/env python
"""LDS of method setting variants on one project, against the same retraining ground truth.

How the GIF and EK-FAC defaults were chosen (the figures in their settings' help and the README):

    proponent bench --suite --parts lds --kinds tabular --suite-seeds 1 --workdir /tmp/suite-eval
    python scripts/lds_variants.py /tmp/suite-eval/tabular-uniform-8pct-n600-s1 --subsets 40 --queries 16 \\
        '[["gif", {"damping_ratio": 0.1}], ["gif", {"damping_ratio": 1}], ["gif", {"preconditioner": "diagonal"}]]'

Ground truth: ``--subsets`` random half-subsets retrained at 2 seeds (cached in the project, shared
with ``proponent bench``); queries: the bench's choice (seeded). Prints one line per variant with
LDS, the noise ceiling, seconds and the solver's convergence record where the method keeps one.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.api import fit_method  # noqa: E402
from engine.core.errors import ProponentError  # noqa: E402
from engine.core.project import Project  # noqa: E402
from engine.evaluate import groundtruth as gt  # noqa: E402
from engine.evaluate.lds import lds  # noqa: E402

KEPT = ("damping_used", "iterations", "worst_residual", "unconverged_queries", "projection")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project")
    ap.add_argument("variants", help='JSON list of [method, settings], e.g. [["ekfac", {"damping_ratio": 1}]]')
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--json", help="also write the rows as a docs/bench table (rendered into docs/benchmarks.md)")
    ap.add_argument("--title", default="", help="with --json: the table's title")
    ap.add_argument("--cold", action="store_true",
                    help="time every variant from scratch: remove its run folder and the fitted curvature factors "
                         "(Proponent's own caches in .proponent) before fitting it")
    a = ap.parse_args(argv)
    try:
        variants = json.loads(a.variants)
        if not isinstance(variants, list) or not all(isinstance(v, list) and len(v) == 2 for v in variants):
            raise ProponentError("variants must be a JSON list of [method, settings] pairs")
        p = Project.load(a.project)
        n_test, n_train = len(p.test_dataset), len(p.train_dataset)
        rng = np.random.default_rng(0)
        q = (np.arange(n_test) if a.queries <= 0 or a.queries >= n_test
             else np.sort(rng.choice(n_test, size=a.queries, replace=False)))
        subsets = gt.random_subsets(n_train, a.subsets, 0.5, seed=0)
        margins = gt.retrain_margins(p, subsets=subsets, seeds=[0, 1])
    except (ProponentError, json.JSONDecodeError) as e:
        print(f"lds_variants: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for method, settings in variants:
        if a.cold:
            _clear_caches(p, method, settings)
        t0 = time.perf_counter()
        try:
            att, _ = fit_method(p, method, settings, device="cpu")
            r = lds(att.scores(q), subsets, margins, queries=q)
            secs = time.perf_counter() - t0
            kept = {k: att.meta[k] for k in KEPT if k in att.meta}
            print(f"{method:10s} {json.dumps(settings):50s} LDS {r['lds']:.3f} ceiling {r['noise_ceiling']:.3f} "
                  f"{secs:.1f}s {json.dumps(kept)[:300]}", flush=True)
            proj = kept.get("projection") or {}
            rows.append([method, json.dumps(settings), round(r["lds"], 3), round(r["noise_ceiling"], 3), round(secs, 1),
                         proj.get("kind", ""), proj.get("out_dim", "")])
        except ProponentError as e:
            print(f"{method:10s} {json.dumps(settings):50s} error: {e}", flush=True)
            rows.append([method, json.dumps(settings), None, None, None, "", str(e)])
    if a.json:
        import datetime
        import os
        import platform

        doc = {"title": a.title or f"LDS of setting variants: {p.name}", "date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "command": "python scripts/lds_variants.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "tables": [{"title": f"{p.name}: {n_train} training rows, {len(q)} test queries, LDS against "
                                    f"{a.subsets} retrained random halves × 2 seeds",
                           "columns": ["method", "settings", "LDS", "noise ceiling", "fit + score s",
                                       "projection", "k"], "rows": rows}]}
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _clear_caches(p: Project, method: str, settings: dict) -> None:
    """The variant's run folder, the curvature factors and the shared gradient stores, all written by Proponent."""
    import shutil

    from engine.api import run_dir, run_key
    from engine.methods import get_method
    from engine.methods.base import coerce_settings

    shutil.rmtree(run_dir(p, run_key(p, method, coerce_settings(get_method(method), settings))), ignore_errors=True)
    shutil.rmtree(p.state_dir / "factors", ignore_errors=True)
    shutil.rmtree(p.state_dir / "features", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
