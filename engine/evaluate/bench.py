"""``proponent bench PROJECT``: every method's accuracy and cost, beside the peers, in one run.

Metrics (evaluation.md): LDS with its noise ceiling, leave-one-out correlation, mislabel
detection (AUROC, precision@k), leak detection (recall@1/@5 of the planted twin; precision and
recall of the leak detector's flags) and cost (fit/score time and peak memory, featurization
throughput, growth as the training set doubles). Peers run on the same checkpoints and the same
queries. The JSON holds the raw figures and a generic "tables" list that
``scripts/make_benchmarks_md.py`` renders into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.core.errors import ProponentError
from engine.core.project import Project

ProgressFn = Callable[[str, int, int], None]

DEFAULT_METRICS = ("lds", "loo", "mislabel", "leak", "cost")
ALL_METRICS = DEFAULT_METRICS + ("counterfactual",)
QUICK_METHODS = ("trak", "grad-dot", "knn")
# peers' methods that give [n_test, n_train] scores (cleanlab joins the mislabel table instead)
PEER_SCORE_METHODS = {"traker": ["trak"], "kronfluence": ["ekfac"],
                      "dattri": ["trak", "tracin", "if-cg", "if-lissa", "grad-dot", "grad-cos"], "captum": ["tracincp"]}
# dattri LiSSA's default recursion (5000 steps per query batch) takes hours on a CPU; the
# benchmark runs it shorter and says so in the peer's settings
PEER_OPTIONS = {("dattri", "if-lissa"): {"recursion_depth": 300, "batch_size": 32, "scaling": 50.0},
                ("dattri", "if-cg"): {"max_iter": 10}}


def machine_description() -> str:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.release()}, {cpu}, {cores} cores, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")


def _deadline(seconds: float | None):
    """A cancel callback that turns true ``seconds`` from now (methods check it between chunks)."""
    if not seconds or seconds <= 0:
        return None
    end = time.perf_counter() + float(seconds)
    return lambda: time.perf_counter() > end


def _err(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _f(x, nd: int = 3):
    """A table cell: rounded float, '' for missing, 'n/a' for NaN."""
    if x is None:
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return "n/a"
        return round(float(x), nd)
    return str(x)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, Path):
        return str(o)
    return o


# ----------------------------------------------------------------------------- configuration
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="proponent bench", description="Accuracy and cost of attribution methods and peers.")
    ap.add_argument("project")
    ap.add_argument("--methods", help="comma-separated method names (default: every method in the registry that supports "
                                      "the project; --quick: trak,grad-dot,knn)")
    ap.add_argument("--peers", help="comma-separated peers: traker,kronfluence,dattri,captum,cleanlab (or peer:method, "
                                    "e.g. dattri:if-cg), or 'none' (default: all; --quick: none)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help=f"comma-separated, of {','.join(ALL_METRICS)} (default: {','.join(DEFAULT_METRICS)})")
    ap.add_argument("--cf-queries", type=int, default=5, help="test queries for the counterfactual metric")
    ap.add_argument("--subsets", type=int, help="LDS subsets M (default 100; --quick 12)")
    ap.add_argument("--seeds", type=int, help="retraining seeds R per subset (default 2; ≥ 2 gives the noise ceiling)")
    ap.add_argument("--alpha", type=float, default=0.5, help="fraction of the training set in each LDS subset")
    ap.add_argument("--queries", type=int, help="test queries used for LDS/LOO (default 100; --quick 40; 0: all)")
    ap.add_argument("--loo", type=int, help="training examples removed one at a time for LOO (default 20; --quick 6)")
    ap.add_argument("--proj-dim", type=int, default=512, help="projection size for the TRAK vs traker comparison")
    ap.add_argument("--mislabel-source", default="auto", choices=("auto", "truth", "flip"),
                    help="planted flips from truth.json (auto: when present) or flip 10%% of labels in a copy")
    ap.add_argument("--leak-source", default="auto", choices=("auto", "truth", "plant"))
    ap.add_argument("--no-scaling", action="store_true", help="skip the cost-growth measurement (3 training-set sizes)")
    ap.add_argument("--scaling-methods", help="comma-separated methods for the cost-growth measurement (default: all run)")
    ap.add_argument("--method-timeout", type=float, help="seconds a method may spend on its fit and scoring before it is "
                                                          "cancelled into its row (default 600; --quick 180)")
    ap.add_argument("--peer-timeout", type=float, help="seconds one peer method may run (in its own process) before it "
                                                        "is stopped and reported as skipped (default 600; 0: no limit)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, help="retraining processes (default: cores − 1; 1 on ≤ 2 cores)")
    ap.add_argument("--quick", action="store_true", help="the CI configuration: a few minutes on 2 cores")
    ap.add_argument("--title", help="title of the benchmark in docs/benchmarks.md")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--command", help="the command to record as reproducing this file (default: this invocation)")
    return ap


def _csv(s: str | None) -> list[str] | None:
    if s is None:
        return None
    items = [t.strip() for t in s.split(",") if t.strip()]
    return [] if items == ["none"] else items


def resolve_config(a: argparse.Namespace) -> dict:
    from engine.methods.base import list_methods
    from engine.evaluate.peers import PEER_METHODS

    metrics = _csv(a.metrics) or []
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        raise ProponentError(f"unknown metric {bad[0]!r} (known: {', '.join(ALL_METRICS)})")
    known = [c.name for c in list_methods()]
    methods = _csv(a.methods)
    if methods is None:
        methods = [m for m in QUICK_METHODS if m in known] if a.quick else known
    bad = [m for m in methods if m not in known]
    if bad:
        raise ProponentError(f"unknown method {bad[0]!r} (known: {', '.join(known)})")
    peers = _csv(a.peers)
    if peers is None:
        peers = [] if a.quick else list(PEER_METHODS)
    bad = [p for p in peers if p.partition(":")[0] not in PEER_METHODS]
    if bad:
        raise ProponentError(f"unknown peer {bad[0]!r} (known: {', '.join(PEER_METHODS)})")
    bad = [p for p in peers if ":" in p and p.partition(":")[2] not in PEER_METHODS[p.partition(":")[0]]]
    if bad:
        peer = bad[0].partition(":")[0]
        raise ProponentError(f"peer {peer!r} has no method {bad[0].partition(':')[2]!r} (it offers {', '.join(PEER_METHODS[peer])})")
    cfg = {"metrics": metrics, "methods": methods, "peers": peers,
           "subsets": a.subsets if a.subsets is not None else (12 if a.quick else 100),
           "seeds": a.seeds if a.seeds is not None else 2,
           "alpha": a.alpha, "queries": a.queries if a.queries is not None else (40 if a.quick else 100),
           "loo": a.loo if a.loo is not None else (6 if a.quick else 20), "proj_dim": a.proj_dim,
           "mislabel_source": a.mislabel_source, "leak_source": a.leak_source,
           "scaling": not (a.no_scaling or a.quick), "scaling_methods": _csv(a.scaling_methods), "device": a.device,
           "processes": a.processes, "quick": a.quick, "cf_queries": a.cf_queries,
           "peer_timeout": a.peer_timeout if a.peer_timeout is not None else 600.0,
           "method_timeout": a.method_timeout if a.method_timeout is not None else (180.0 if a.quick else 600.0)}
    if cfg["subsets"] < 3:
        raise ProponentError("--subsets must be at least 3")
    if cfg["seeds"] < 1:
        raise ProponentError("--seeds must be at least 1")
    if not 0 < cfg["alpha"] <= 1:
        raise ProponentError("--alpha must be in (0, 1]")
    return cfg


# ----------------------------------------------------------------------------- the run
def _peer_checkpoints(project: Project, peer_method: tuple[str, str]):
    """TracIn-style peers use model 0's whole trajectory; TRAK-style ones the same members as our TRAK."""
    from engine.methods.trak import ensemble_checkpoints

    if peer_method in (("dattri", "tracin"), ("captum", "tracincp")):
        return [c for c in project.checkpoints if c.model_id == project.final_checkpoints()[0].model_id]
    if peer_method in (("traker", "trak"), ("dattri", "trak")):
        return ensemble_checkpoints(project, "auto", 0)
    return project.final_checkpoints()


def _peer_worker(root: str, peer: str, method: str, proj_dim: int, queries, device: str, options, seed: int, out_q) -> None:
    os.environ["PROPONENT_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        from engine.evaluate.detection import _peer_inputs
        from engine.evaluate.peers import run_peer

        project = Project.load(root)
        inputs = _peer_inputs(project, device=device, proj_dim=proj_dim, queries=np.asarray(queries), seed=seed,
                              checkpoints=_peer_checkpoints(project, (peer, method)))
        out_q.put(run_peer(peer, method, inputs, options=options))
    except BaseException as e:  # noqa: BLE001 - reported as the peer's skip reason
        out_q.put(_err(e))


def run_peer_limited(project: Project, peer: str, method: str, *, queries, proj_dim: int, device: str = "cpu",
                     options=None, seed: int = 0, timeout: float | None = None):
    """``peers.run_peer`` on the project's checkpoints; with ``timeout``, in a spawned process that is
    stopped after ``timeout`` seconds (the peer then comes back skipped, saying so)."""
    import multiprocessing as mp
    import queue as _queue

    from engine.evaluate.peers import PeerResult, run_peer

    if not timeout or timeout <= 0:
        from engine.evaluate.detection import _peer_inputs

        inputs = _peer_inputs(project, device=device, proj_dim=proj_dim, queries=queries, seed=seed,
                              checkpoints=_peer_checkpoints(project, (peer, method)))
        return run_peer(peer, method, inputs, options=options)
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    proc = ctx.Process(target=_peer_worker, args=(str(project.root), peer, method, proj_dim, np.asarray(queries), device,
                                                  options, seed, out_q), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    try:
        res = out_q.get(timeout=timeout)
    except _queue.Empty:
        res = PeerResult(peer, method, None, time.perf_counter() - t0, 0.0, 0.0, {"timeout_s": timeout},
                         skipped=f"timed out after {timeout:.0f} s (--peer-timeout) on this machine")
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=10)
    if isinstance(res, str):
        res = PeerResult(peer, method, None, time.perf_counter() - t0, 0.0, 0.0, {}, skipped=res)
    return res


def run_bench(project: Project, cfg: dict, progress: ProgressFn | None = None, log=print) -> dict:
    from engine.api import cached_scores
    from engine.methods.base import coerce_settings, get_method, settings_dict
    from engine.evaluate import groundtruth as gt
    from engine.evaluate.lds import lds, loo_correlation

    prog = progress or (lambda s, d, t: None)
    t_start = time.perf_counter()
    n_train, n_test = len(project.train_dataset), len(project.test_dataset)
    rng = np.random.default_rng(0)
    nq = cfg["queries"]
    queries = np.arange(n_test) if nq <= 0 or nq >= n_test else np.sort(rng.choice(n_test, size=nq, replace=False))
    seeds = list(range(cfg["seeds"]))
    metrics = cfg["metrics"]
    out: dict = {"project": {**project.summary(), "root": str(project.root)}, "config": cfg,
                 "queries": queries.tolist(), "methods": [], "peers": [], "metrics": {}}

    # ---- methods: which run, their settings, their cached test scores
    rows = []
    for name in cfg["methods"]:
        cls = get_method(name)
        row = {"method": name, "label": cls.label, "settings": settings_dict(coerce_settings(cls, None))}
        reason = cls.supports(project)
        if reason:
            row["skipped"] = reason
        rows.append(row)
    runnable = [r for r in rows if "skipped" not in r]
    scores: dict[str, np.ndarray] = {}
    for j, r in enumerate(runnable):
        prog("fit methods", j, len(runnable))
        log(f"bench: fitting {r['method']}")
        t0 = time.perf_counter()
        try:
            res = cached_scores(project, r["method"], None, device=cfg["device"], cancel=_deadline(cfg["method_timeout"]))
            scores[r["method"]] = np.asarray(res["scores"], np.float64)
            r["run"] = res["key"]
            r["seconds_fit_and_score_or_cached"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a method's failure is its row
            r["error"] = _err(e)
            if type(e).__name__ == "Cancelled":
                r["error"] = f"timed out after {cfg['method_timeout']:.0f} s (--method-timeout); " + r["error"]
    out["methods"] = rows

    # ---- peers' score matrices on the same queries and checkpoints
    peer_rows = []
    peer_scores: dict[str, np.ndarray] = {}
    score_peers = []
    for item in cfg["peers"]:
        peer, _, only = item.partition(":")
        score_peers += [(peer, m) for m in PEER_SCORE_METHODS.get(peer, []) if not only or m == only]
    peer_names = {p.partition(":")[0] for p in cfg["peers"]}
    leak_q = None
    if "leak" in metrics and cfg["leak_source"] in ("auto", "truth"):
        from engine.evaluate.detection import truth_leaks

        tl = truth_leaks(project)
        leak_q = None if tl is None else np.array([l["test_index"] for l in tl], np.int64)
    peer_q = queries if leak_q is None else np.union1d(queries, leak_q)
    if score_peers and ("lds" in metrics or "loo" in metrics or "leak" in metrics or "cost" in metrics):
        for j, (peer, method) in enumerate(score_peers):
            prog("peers", j, len(score_peers))
            log(f"bench: peer {peer}:{method}")
            res = run_peer_limited(project, peer, method, queries=peer_q, proj_dim=cfg["proj_dim"], device=cfg["device"],
                                   options=PEER_OPTIONS.get((peer, method)), timeout=cfg["peer_timeout"])
            prow = {"peer": peer, "method": method, "fit_seconds": res.fit_seconds, "score_seconds": res.score_seconds,
                    "peak_mb": res.peak_rss_mb, "settings": res.settings, "n_queries": int(len(peer_q))}
            if res.skipped:
                prow["skipped"] = res.skipped
            else:
                full = np.zeros((n_test, n_train))
                full[peer_q] = res.scores
                peer_scores[f"{peer}:{method}"] = full
            peer_rows.append(prow)

    # ---- LDS
    if "lds" in metrics:
        log(f"bench: LDS ground truth, M={cfg['subsets']} subsets × R={len(seeds)} seeds")
        subsets = gt.random_subsets(n_train, cfg["subsets"], cfg["alpha"], seed=0)
        t0 = time.perf_counter()
        margins = gt.retrain_margins(project, subsets=subsets, seeds=seeds, progress=prog, processes=cfg["processes"])
        out["metrics"]["lds"] = {"subsets": cfg["subsets"], "seeds": len(seeds), "alpha": cfg["alpha"],
                                 "groundtruth_seconds": time.perf_counter() - t0}
        ceiling = None
        for r in rows:
            if r["method"] in scores:
                res = lds(scores[r["method"]][queries], subsets, margins, queries=queries)
                r["lds"], ceiling = res["lds"], res["noise_ceiling"]
        for prow in peer_rows:
            k = f"{prow['peer']}:{prow['method']}"
            if k in peer_scores:
                res = lds(peer_scores[k][queries], subsets, margins, queries=queries)
                prow["lds"], ceiling = res["lds"], res["noise_ceiling"]
        if ceiling is None:
            ceiling = lds(np.zeros((len(queries), n_train)) + 1e-12 * np.arange(n_train), subsets, margins,
                          queries=queries)["noise_ceiling"]
        out["metrics"]["lds"]["noise_ceiling"] = ceiling

    # ---- LOO
    if "loo" in metrics and cfg["loo"] > 0:
        log(f"bench: leave-one-out, {cfg['loo']} examples × R={len(seeds)} seeds")
        idx = np.sort(np.random.default_rng(1).choice(n_train, size=min(cfg["loo"], n_train), replace=False))
        t0 = time.perf_counter()
        per_seed, _ = gt.loo_effects(project, idx, seeds, progress=prog, processes=cfg["processes"])
        out["metrics"]["loo"] = {"indices": idx.tolist(), "seeds": len(seeds), "groundtruth_seconds": time.perf_counter() - t0}
        ceiling = float("nan")
        for holder, src in ((rows, scores), (peer_rows, peer_scores)):
            for r in holder:
                k = r["method"] if holder is rows else f"{r['peer']}:{r['method']}"
                if k in src:
                    res = loo_correlation(src[k][queries], idx, per_seed, queries=queries)
                    r["loo"], r["loo_spearman"], ceiling = res["loo"], res["spearman"], res["noise_ceiling"]
        out["metrics"]["loo"]["noise_ceiling"] = ceiling

    # ---- mislabel
    runnable_names = [(r["method"], {}) for r in rows if r["method"] in scores]
    if "mislabel" in metrics:
        from engine.evaluate.detection import mislabel_benchmark

        log("bench: mislabel detection")
        res = mislabel_benchmark(project, runnable_names, source=cfg["mislabel_source"], device=cfg["device"],
                                 cleanlab="cleanlab" in peer_names, progress=prog)
        out["metrics"]["mislabel"] = {"source": res["source"], "n_flipped": res["n_flipped"]}
        by = {m["method"]: m for m in res["methods"]}
        for r in rows:
            m = by.get(r["method"])
            if m:
                r["mislabel"] = {k: v for k, v in m.items() if k != "method"}
        for prow in res["peers"]:
            peer_rows.append({"peer": prow["peer"], "method": "label-quality", "mislabel": prow,
                              "fit_seconds": prow.get("fit_seconds"), "skipped": prow.get("skipped")})

    # ---- leak
    if "leak" in metrics:
        from engine.evaluate.detection import leak_benchmark, leak_recall

        log("bench: leak detection")
        res = leak_benchmark(project, runnable_names, source=cfg["leak_source"], device=cfg["device"], progress=prog)
        out["metrics"]["leak"] = {"source": res["source"], "n_leaks": res["n_leaks"], "leaks": res["leaks"],
                                  "detector_available": res["detector_available"]}
        by = {m["method"]: m for m in res["methods"]}
        for r in rows:
            m = by.get(r["method"])
            if m:
                r["leak"] = {k: v for k, v in m.items() if k != "method"}
        if res["source"] == "truth.json":
            twins = [l["train_index"] for l in res["leaks"]]
            lq = [l["test_index"] for l in res["leaks"]]
            for prow in peer_rows:
                k = f"{prow['peer']}:{prow['method']}"
                if k in peer_scores:
                    prow["leak"] = leak_recall(peer_scores[k][lq], twins)

    # ---- cost
    if "cost" in metrics:
        from engine.evaluate.cost import featurize_throughput, measure_method, scaling

        log("bench: cost")
        for r in rows:
            if r["method"] in scores:
                try:
                    r["cost"] = measure_method(project, r["method"], None, device=cfg["device"], queries=queries,
                                               cancel=_deadline(cfg["method_timeout"]))
                except Exception as e:  # noqa: BLE001
                    r["cost"] = {"error": _err(e)}
        out["metrics"]["cost"] = {"featurize_examples_per_second": {
            "proponent": featurize_throughput(project, proj_dim=cfg["proj_dim"], device=cfg["device"])}}
        if "traker" in peer_names:
            from engine.evaluate.detection import _peer_inputs
            from engine.evaluate.peers import featurize_throughput_traker

            try:
                out["metrics"]["cost"]["featurize_examples_per_second"]["traker"] = featurize_throughput_traker(
                    _peer_inputs(project, device=cfg["device"], proj_dim=cfg["proj_dim"], queries=queries[:1]))
            except Exception as e:  # noqa: BLE001
                out["metrics"]["cost"]["featurize_examples_per_second"]["traker_error"] = _err(e)
        if cfg["scaling"]:
            log("bench: cost growth (3 training-set sizes)")
            chosen = cfg.get("scaling_methods")
            sc_methods = [m for m in runnable_names if chosen is None or m[0] in chosen]
            out["metrics"]["cost"]["scaling"] = scaling(project, sc_methods, device=cfg["device"], progress=prog,
                                                        timeout=cfg["method_timeout"])

    # ---- counterfactual: remove each query's top-k proponents vs k random examples, retrain
    if "counterfactual" in metrics:
        from engine.workflows.counterfactual import counterfactual_check

        log(f"bench: counterfactual check, {cfg['cf_queries']} queries")
        cf_q = queries[: max(1, cfg["cf_queries"])]
        ks = (10, 40)
        out["metrics"]["counterfactual"] = {"queries": cf_q.tolist(), "k_values": list(ks), "seeds": [0],
                                            "random_trials": 2}
        for r in rows:
            if r["method"] not in scores:
                continue
            per_k = {k: {"top": [], "random": [], "flipped": 0} for k in ks}
            for q in cf_q:
                res = counterfactual_check(project, int(q), scores_row=scores[r["method"]][q], k_values=ks, seeds=(0,),
                                           random_trials=2, processes=cfg["processes"])
                for row in res["rows"]:
                    per_k[row["k"]]["top"].append(row["change"])
                    per_k[row["k"]]["random"].append(row["random_change_mean"])
                    per_k[row["k"]]["flipped"] += int(row["flipped"])
            r["counterfactual"] = {str(k): {"mean_change_top": float(np.mean(v["top"])),
                                            "mean_change_random": float(np.mean(v["random"])),
                                            "flipped_share": v["flipped"] / len(cf_q)} for k, v in per_k.items()}

    # ---- our TRAK against traker at the same checkpoints and projection size
    if "traker" in peer_names and "trak" in cfg["methods"] and "lds" in metrics:
        out["trak_vs_traker"] = trak_vs_traker(project, cfg, subsets, margins, queries, log=log)

    out["peers"] = peer_rows
    from engine.methods.base import list_methods

    out["registry_not_run"] = [c.name for c in list_methods() if c.name not in cfg["methods"]]
    out["seconds"] = time.perf_counter() - t_start
    return out


def trak_vs_traker(project: Project, cfg: dict, subsets, margins, queries, log=print) -> dict:
    """Our TRAK and traker with identical checkpoints, projection size k, Rademacher projection and no
    damping, each with two projection seeds: LDS, times, featurization throughput."""
    import tempfile

    from engine.methods.base import coerce_settings, get_method
    from engine.methods.trak import ensemble_checkpoints
    from engine.evaluate.detection import _peer_inputs
    from engine.evaluate.lds import lds
    from engine.evaluate.peers import run_peer

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
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
        rows.append(row)
        inputs = _peer_inputs(project, device=cfg["device"], proj_dim=k, queries=queries, checkpoints=cks, seed=seed)
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


# ----------------------------------------------------------------------------- tables
def make_tables(result: dict) -> list[dict]:
    lds_m = result["metrics"].get("lds", {})
    loo_m = result["metrics"].get("loo", {})
    mis_m = result["metrics"].get("mislabel", {})
    leak_m = result["metrics"].get("leak", {})
    columns = ["method", "LDS", "LDS noise ceiling", "LOO r", "LOO noise ceiling", "mislabel AUROC", "precision@k",
               "leak recall@1", "leak recall@5", "leak flags P/R", "fit s", "score s", "fit peak MB",
               "featurize ex/s", "skipped / error"]
    table_rows = []
    for r in result["methods"]:
        c = r.get("cost", {})
        mis = r.get("mislabel", {})
        lk = r.get("leak", {})
        det = lk.get("detector") or {}
        flags = f"{_f(det.get('precision'), 2)}/{_f(det.get('recall'), 2)}" if "precision" in det else ""
        table_rows.append([r["label"] or r["method"], _f(r.get("lds")), _f(lds_m.get("noise_ceiling")) if "lds" in r else "",
                           _f(r.get("loo")), _f(loo_m.get("noise_ceiling")) if "loo" in r else "",
                           _f(mis.get("auroc")), _f(mis.get("precision_at_k")), _f(lk.get("recall@1"), 2),
                           _f(lk.get("recall@5"), 2), flags, _f(c.get("fit_seconds"), 2), _f(c.get("score_seconds"), 2),
                           _f(c.get("fit_peak_mb"), 0), _f(c.get("featurize_examples_per_second"), 0),
                           r.get("skipped") or r.get("error") or mis.get("error") or lk.get("error") or c.get("error") or ""])
    for p in result["peers"]:
        mis = p.get("mislabel") or {}
        lk = p.get("leak") or {}
        table_rows.append([f"{p['peer']}: {p['method']} (peer)", _f(p.get("lds")),
                           _f(lds_m.get("noise_ceiling")) if "lds" in p else "", _f(p.get("loo")),
                           _f(loo_m.get("noise_ceiling")) if "loo" in p else "", _f(mis.get("auroc")),
                           _f(mis.get("precision_at_k")), _f(lk.get("recall@1"), 2), _f(lk.get("recall@5"), 2), "",
                           _f(p.get("fit_seconds"), 2), _f(p.get("score_seconds"), 2), _f(p.get("peak_mb"), 0), "",
                           p.get("skipped") or ""])
    proj = result["project"]
    notes = [f"{proj['name']}: {proj['n_train']} train / {proj['n_test']} test, {proj['parameters']} parameters, "
             f"{proj['models']} recorded model(s), {proj['checkpoints']} checkpoints."]
    if lds_m:
        notes.append(f"LDS: M={lds_m['subsets']} random subsets of α={lds_m['alpha']}, R={lds_m['seeds']} retraining seeds "
                     f"each (margins averaged over seeds), {len(result['queries'])} test queries; noise ceiling = the same "
                     f"Spearman between seed 0's and seed 1's margins (one seed predicting another). Methods are scored "
                     f"against the mean of the R seeds, a less noisy target than one seed, so a good method can exceed "
                     f"that ceiling.")
    if loo_m:
        notes.append(f"LOO: Pearson over ({len(loo_m['indices'])} removed examples × queries) of predicted vs retrained "
                     f"margin change, R={loo_m['seeds']} seeds; noise ceiling = seed 0's vs seed 1's measured changes.")
    if mis_m:
        notes.append(f"Mislabel: {mis_m['source']} ({mis_m['n_flipped']} flipped); suspicion = each method's suspicion(); "
                     f"precision@k with k = number flipped. cleanlab gets 5-fold out-of-sample probabilities; its fit s "
                     f"includes the cross-validation.")
    if leak_m:
        notes.append(f"Leak: {leak_m['source']} ({leak_m['n_leaks']} planted copies); recall@k = share of leaked queries whose "
                     f"planted twin is among its top-k proponents. Leak flags P/R: engine.workflows.leaks.detect_leaks over all "
                     f"test queries.")
    not_run = result.get("registry_not_run") or []
    if not_run:
        notes.append(f"Registry methods not in this run's --methods: {', '.join(not_run)}.")
    notes.append("Peers run on the same checkpoints and queries (TRAK-style: the same ensemble members as our TRAK; "
                 "TracIn-style: the whole trajectory; others: the final checkpoint). fit/score s of methods are fresh fits "
                 "on a copy of the project without its cached state (cost metric); peak MB is the process RSS peak.")
    tables = [{"title": f"Accuracy and cost: {proj['name']}", "columns": columns, "rows": table_rows,
               "notes": " ".join(notes)}]
    cf = result["metrics"].get("counterfactual")
    if cf:
        ks = [str(k) for k in cf["k_values"]]
        cols = ["method"] + [c for k in ks for c in (f"Δmargin top-{k}", f"Δmargin random-{k}", f"flipped top-{k}")]
        rws = []
        for r in result["methods"]:
            c = r.get("counterfactual")
            if c:
                rws.append([r["label"] or r["method"]] + [x for k in ks for x in (
                    _f(c[k]["mean_change_top"]), _f(c[k]["mean_change_random"]), _f(c[k]["flipped_share"], 2))])
        tables.append({"title": f"Counterfactual check: {proj['name']}", "columns": cols, "rows": rws,
                       "notes": f"Mean over {len(cf['queries'])} test queries of the margin change after removing the "
                                f"query's top-k proponents and retraining (seed 0), against k random removals "
                                f"({cf['random_trials']} draws); flipped = share of queries whose prediction flips."})
    cost = result["metrics"].get("cost", {})
    sc = cost.get("scaling")
    if sc:
        cols = ["method"] + [f"n={n} s" for n in sc["sizes"]] + ["growth exponent (time ∝ n^b)", "errors"]
        rws = []
        for m in sc["methods"]:
            by = dict(zip(m["sizes"], (np.asarray(m["fit_seconds"]) + np.asarray(m["score_seconds"])).tolist()))
            rws.append([m["method"]] + [_f(by.get(n), 2) for n in sc["sizes"]] + [_f(m.get("growth_exponent"), 2),
                                                                                  "; ".join(m.get("errors", []))])
        tables.append({"title": f"Cost growth as the training set doubles: {proj['name']}", "columns": cols, "rows": rws,
                       "notes": f"Fit + scoring of {sc['n_queries']} queries, fresh fit at each size; each size is a random "
                                f"subsample of the training set, retrained with the recipe."})
    tp = cost.get("featurize_examples_per_second")
    tv = result.get("trak_vs_traker")
    if tv:
        rws = [[r["implementation"], r["seed"], _f(r.get("lds")), _f(r.get("fit_seconds"), 2), _f(r.get("score_seconds"), 2),
                r.get("error", "")] for r in tv["rows"]]
        s = tv.get("summary", {})
        note = (f"Same {len(tv['checkpoints'])} checkpoints, k={tv['proj_dim']} Rademacher projection, no damping, two "
                f"projection seeds each.")
        if s:
            note += (f" Mean LDS: proponent {s['mean_lds_proponent']:.3f}, traker {s['mean_lds_traker']:.3f}; gap "
                     f"{s['gap']:.3f} vs projection-seed spread {s['projection_seed_spread']:.3f} → "
                     f"{'within' if s['within_seed_noise'] else 'NOT within'} seed noise.")
        if tp:
            note += (" Featurization (per-example margin gradients + projection, final checkpoint): proponent "
                     f"{tp.get('proponent', float('nan')):.0f} ex/s" +
                     (f", traker {tp['traker']:.0f} ex/s." if "traker" in tp else "."))
        tables.append({"title": f"TRAK: proponent vs traker at the same checkpoints: {proj['name']}",
                       "columns": ["implementation", "projection seed", "LDS", "fit s", "score s", "error"],
                       "rows": rws, "notes": note})
    return tables


def print_table(table: dict, stream=sys.stdout) -> None:
    cols = table["columns"]
    rows = [[str(c) for c in r] for r in table["rows"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    stream.write(table["title"] + "\n")
    stream.write("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "\n")
    for r in rows:
        stream.write("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "\n")


def cli_main(argv: list[str]) -> int:
    from engine.core.progress import TerminalProgress
    from engine.storage.arrays import atomic_write_json

    ap = build_parser()
    a = ap.parse_args(argv)
    cfg = resolve_config(a)
    project = Project.load(a.project)
    os.environ.setdefault("PROPONENT_THREADS", "1")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_bench(project, cfg, progress=TerminalProgress(), log=log)
    command = a.command or "proponent bench " + " ".join(shlex.quote(x) for x in argv)
    tables = make_tables(result)
    doc = {"title": a.title or f"proponent bench: {project.name}" + (" (quick)" if cfg["quick"] else ""),
           "date": _dt.date.today().isoformat(), "machine": machine_description(), "command": command,
           "tables": tables, "notes": f"Wall time of this invocation: {result['seconds'] / 60:.1f} min (method runs and "
                                      f"retrained margins already in the project's cache are reused; cost figures are "
                                      f"always fresh fits).", **result}
    for t in tables:
        print_table(t)
        print()
    if a.json:
        atomic_write_json(a.json, _jsonable(doc))
        print(f"wrote {a.json}", file=sys.stderr)
    return 0
