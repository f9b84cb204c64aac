"""Peers inside ``proponent bench``: each peer method on the project's checkpoints, optionally in
its own process with a time limit, and our TRAK against traker at identical settings."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import tempfile
import time

import numpy as np
import torch

from engine.core.project import Project
from engine.evaluate.lds import lds
from engine.evaluate.peers import PEERS, PeerResult, project_inputs, run_peer
from engine.methods.base import coerce_settings, get_method
from engine.methods.trak import ensemble_checkpoints


def error_line(e: BaseException) -> str:
    """An exception as the one line a benchmark row shows."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def peer_options(peer: str, method: str) -> dict | None:
    """The benchmark's overrides of a peer's knobs (echoed in the peer's settings)."""
    return PEERS[peer].bench_options.get(method)


def peer_checkpoints(project: Project, peer: str, method: str):
    """TracIn-style peers use model 0's whole trajectory; TRAK-style ones the same members as our TRAK."""
    if (peer, method) in (("dattri", "tracin"), ("captum", "tracincp")):
        return project.run_checkpoints()
    if (peer, method) in (("traker", "trak"), ("dattri", "trak")):
        return ensemble_checkpoints(project, "auto", 0)
    return project.final_checkpoints()


def _inputs(project: Project, peer: str, method: str, *, queries, proj_dim: int, device: str, seed: int):
    return project_inputs(project, device=device, proj_dim=proj_dim, queries=np.asarray(queries), seed=seed,
                          checkpoints=peer_checkpoints(project, peer, method))


def _peer_worker(root: str, peer: str, method: str, proj_dim: int, queries, device: str, options, seed: int, out_q) -> None:
    os.environ["PROPONENT_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        project = Project.load(root)
        inputs = _inputs(project, peer, method, queries=queries, proj_dim=proj_dim, device=device, seed=seed)
        out_q.put(run_peer(peer, method, inputs, options=options))
    except BaseException as e:  # noqa: BLE001 - reported as the peer's skip reason
        out_q.put(error_line(e))


def run_peer_limited(project: Project, peer: str, method: str, *, queries, proj_dim: int, device: str = "cpu",
                     options=None, seed: int = 0, timeout: float | None = None) -> PeerResult:
    """``peers.run_peer`` on the project's checkpoints; with ``timeout``, in a spawned process that is
    stopped after ``timeout`` seconds (the peer then comes back skipped, saying so)."""
    if not timeout or timeout <= 0:
        inputs = _inputs(project, peer, method, queries=queries, proj_dim=proj_dim, device=device, seed=seed)
        return run_peer(peer, method, inputs, options=options)
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    proc = ctx.Process(target=_peer_worker, args=(str(project.root), peer, method, proj_dim, np.asarray(queries), device,
                                                  options, seed, out_q), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    try:
        res = out_q.get(timeout=timeout)
    except queue_module.Empty:
        res = PeerResult(peer, method, None, time.perf_counter() - t0, 0.0, 0.0, {"timeout_s": timeout},
                         skipped=f"timed out after {timeout:.0f} s (--peer-timeout) on this machine")
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=10)
    if isinstance(res, str):
        res = PeerResult(peer, method, None, time.perf_counter() - t0, 0.0, 0.0, {}, skipped=res)
    return res


def trak_vs_traker(project: Project, cfg: dict, subsets, margins, queries, log=print) -> dict:
    """Our TRAK and traker with identical checkpoints, projection size k, Rademacher projection and no
    damping, each with two projection seeds: LDS, times, featurization throughput."""
    k = cfg["proj_dim"]
    cks = ensemble_checkpoints(project, "auto", 0)
    rows = []
    for seed in (0, 1):
        log(f"bench: TRAK vs traker, projection seed {seed}")
        settings = {"ensemble": "auto", "proj_dim": k, "projection": "rademacher", "damping": 0.0, "seed": seed}
        row = {"implementation": "proponent trak", "seed": seed, "settings": settings}
        try:
            cls = get_method("trak")
            with tempfile.TemporaryDirectory(prefix="proponent-trak-vs-traker-") as tmp:
                att = cls(coerce_settings(cls, settings), device=cfg["device"], workdir=tmp)
                t0 = time.perf_counter()
                att.fit(project)
                fit_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                S = att.scores(("test", queries))
                row.update(lds=lds(S, subsets, margins, queries=queries)["lds"], fit_seconds=fit_s,
                           score_seconds=time.perf_counter() - t0, members=len(getattr(att, "members", [])) or None)
        except Exception as e:  # noqa: BLE001 - a failure is the row's error
            row["error"] = error_line(e)
        rows.append(row)
        inputs = project_inputs(project, device=cfg["device"], proj_dim=k, queries=queries, checkpoints=cks, seed=seed)
        res = run_peer("traker", "trak", inputs)
        prow = {"implementation": "traker (MadryLab)", "seed": seed, "fit_seconds": res.fit_seconds,
                "score_seconds": res.score_seconds, "members": len(cks)}
        if res.skipped:
            prow["error"] = res.skipped
        else:
            prow["lds"] = lds(res.scores, subsets, margins, queries=queries)["lds"]
        rows.append(prow)
    ours = [r.get("lds") for r in rows if r["implementation"].startswith("proponent") and r.get("lds") is not None]
    theirs = [r.get("lds") for r in rows if r["implementation"].startswith("traker") and r.get("lds") is not None]
    summary = {}
    if len(ours) == 2 and len(theirs) == 2:
        seed_noise = max(abs(ours[0] - ours[1]), abs(theirs[0] - theirs[1]))
        gap = abs(np.mean(ours) - np.mean(theirs))
        summary = {"mean_lds_proponent": float(np.mean(ours)), "mean_lds_traker": float(np.mean(theirs)),
                   "gap": float(gap), "projection_seed_spread": float(seed_noise),
                   "within_seed_noise": bool(gap <= seed_noise)}
    return {"proj_dim": k, "checkpoints": [c.key for c in cks], "rows": rows, "summary": summary}
