"""``proponent bench --suite`` LDS part: each method's defaults against retraining on generated projects.

Per project: ground truth from ``--lds-subsets`` random half-subsets retrained at 2 seeds (cached
in the project, engine.evaluate.groundtruth), then LDS on ``--lds-queries`` test queries for every
method with its default settings and for the peers (kronfluence's EK-FAC). A method that refuses,
fails or does not converge gets its reason in its row, never a number.
"""
from __future__ import annotations

import time

import numpy as np

from engine.api import fit_method
from engine.core.project import Project
from engine.evaluate import groundtruth as gt
from engine.evaluate.bench.peer_runs import error_line, peer_options, run_peer_limited
from engine.evaluate.lds import lds

LDS_METHODS = ("gif", "ekfac", "source", "trak", "grad-dot")
LDS_PEERS = ("kronfluence:ekfac",)
CONVERGENCE_KEYS = ("damping_used", "iterations", "worst_residual", "unconverged_queries", "solves")


def lds_project(p: Project, methods, peers, *, subsets: int, n_queries: int, log, peer_timeout: float = 600) -> dict:
    n_train, n_test = len(p.train_dataset), len(p.test_dataset)
    q = np.sort(np.random.default_rng(0).choice(n_test, size=min(n_queries, n_test), replace=False))
    sets = gt.random_subsets(n_train, subsets, 0.5, seed=0)
    t0 = time.perf_counter()
    margins = gt.retrain_margins(p, subsets=sets, seeds=[0, 1])
    out = {"subsets": subsets, "queries": q.tolist(), "groundtruth_seconds": time.perf_counter() - t0, "methods": {}}
    ceiling = None
    for m in methods:
        t0 = time.perf_counter()
        try:
            att, _ = fit_method(p, m, None, device="cpu")
            S = np.zeros((len(q), n_train))
            for lo, hi, block in att.score_blocks(q):
                S[lo:hi] = block
            res = lds(S, sets, margins, queries=q)
            ceiling = res["noise_ceiling"]
            row = {"lds": res["lds"], "seconds": time.perf_counter() - t0}
            row.update({k: att.meta[k] for k in CONVERGENCE_KEYS if k in att.meta})
        except Exception as e:  # noqa: BLE001 - a method's failure is its row
            row = {"error": error_line(e), "seconds": time.perf_counter() - t0}
        out["methods"][m] = row
    for item in peers:
        peer, _, method = item.partition(":")
        res = run_peer_limited(p, peer, method, queries=q, proj_dim=512, device="cpu",
                               options=peer_options(peer, method), timeout=peer_timeout)
        key = f"{peer}: {method} (peer)"
        if res.skipped:
            out["methods"][key] = {"skipped": res.skipped}
        else:
            full = np.asarray(res.scores, np.float64)
            out["methods"][key] = {"lds": lds(full, sets, margins, queries=q)["lds"],
                                   "seconds": res.fit_seconds + res.score_seconds}
    out["noise_ceiling"] = ceiling
    log(f"{p.name}: LDS " + ", ".join(f"{k} {v['lds']:.3f}" if "lds" in v else f"{k} –"
                                      for k, v in out["methods"].items()))
    return out


def lds_table(projects: dict[str, dict], mean_sd) -> dict:
    rows = []
    for kind in sorted({r["kind"] for r in projects.values() if "lds" in r}):
        rs = [r["lds"] for r in projects.values() if r["kind"] == kind and "lds" in r]
        for m in list(dict.fromkeys(k for r in rs for k in r["methods"])):
            got = [r["methods"].get(m, {}) for r in rs]
            fails = [g.get("error") or g.get("skipped") for g in got if "lds" not in g]
            iters = [int(np.median(g["iterations"])) for g in got if g.get("iterations")]
            rows.append([kind, m, f"{sum('lds' in g for g in got)}/{len(got)}", mean_sd([g.get("lds") for g in got]),
                         mean_sd([g.get("seconds") for g in got]),
                         (f"median {int(np.median(iters))} CG iterations, λ≈{np.mean([g['damping_used'] for g in got if 'damping_used' in g]):.2g}"
                          if iters else "") + ("; " + fails[0][:160] if fails else "")])
        rows.append([kind, "noise ceiling", "", mean_sd([r.get("noise_ceiling") for r in rs]), "", "seed-to-seed retraining"])
    return {"title": "LDS with default settings on generated projects (mean ± sd over projects)",
            "columns": ["kind", "method", "scored", "LDS", "seconds", "notes"], "rows": rows,
            "notes": "Each method with its defaults (no tuning per project); ground truth: half-subsets retrained at 2 "
                     "seeds; the same test queries for every method and the peer."}


__all__ = ["lds_project", "lds_table", "LDS_METHODS", "LDS_PEERS"]
