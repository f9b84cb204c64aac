"""One ``proponent bench`` run over a project: each stage adds its figures to the methods' and
peers' rows (see engine/evaluate/bench/__init__.py for the metrics)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine.api import cached_scores
from engine.core.errors import Cancelled
from engine.core.project import Project
from engine.evaluate import groundtruth as gt
from engine.evaluate.bench.peer_runs import (
    error_line,
    peer_options,
    run_peer_limited,
    trak_vs_traker,
)
from engine.evaluate.cost import featurize_throughput, measure_method, scaling
from engine.evaluate.detection import (
    leak_benchmark,
    leak_recall,
    mislabel_benchmark,
    truth_leaks,
)
from engine.evaluate.lds import lds, loo_correlation
from engine.evaluate.peers import (
    SCORE_METHODS,
    featurize_throughput_traker,
    project_inputs,
)
from engine.methods.base import coerce_settings, get_method, list_methods, settings_dict
from engine.workflows.counterfactual import counterfactual_check

ProgressFn = Callable[[str, int, int], None]


def deadline(seconds: float | None):
    """A cancel callback that turns true ``seconds`` from now (methods check it between chunks)."""
    if not seconds or seconds <= 0:
        return None
    end = time.perf_counter() + float(seconds)
    return lambda: time.perf_counter() > end


@dataclass
class BenchRun:
    """What the stages share: the configuration, the chosen queries, and the rows they fill in."""

    project: Project
    cfg: dict
    queries: np.ndarray
    progress: ProgressFn
    log: Callable[[str], None]
    rows: list[dict] = field(default_factory=list)          # one per method
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    peer_rows: list[dict] = field(default_factory=list)
    peer_scores: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    lds_truth: tuple | None = None                          # (subsets, margins), for TRAK vs traker

    @property
    def n_train(self) -> int:
        return len(self.project.train_dataset)

    @property
    def n_test(self) -> int:
        return len(self.project.test_dataset)

    @property
    def peer_names(self) -> set[str]:
        return {p.partition(":")[0] for p in self.cfg["peers"]}

    @property
    def seeds(self) -> list[int]:
        return list(range(self.cfg["seeds"]))

    def scored(self):
        """(row, key, scores) of every method and peer that produced test scores."""
        for r in self.rows:
            if r["method"] in self.scores:
                yield r, self.scores[r["method"]]
        for r in self.peer_rows:
            k = f"{r['peer']}:{r['method']}"
            if k in self.peer_scores:
                yield r, self.peer_scores[k]

    def runnable_methods(self) -> list[tuple[str, dict]]:
        return [(r["method"], {}) for r in self.rows if r["method"] in self.scores]


def fit_methods(b: BenchRun) -> None:
    """Every requested method that supports the project: its cached test scores (fit if needed)."""
    for name in b.cfg["methods"]:
        cls = get_method(name)
        row = {"method": name, "label": cls.label, "settings": settings_dict(coerce_settings(cls, None))}
        reason = cls.supports(b.project)
        if reason:
            row["skipped"] = reason
        b.rows.append(row)
    runnable = [r for r in b.rows if "skipped" not in r]
    for j, r in enumerate(runnable):
        b.progress("fit methods", j, len(runnable))
        b.log(f"bench: fitting {r['method']}")
        t0 = time.perf_counter()
        try:
            res = cached_scores(b.project, r["method"], None, device=b.cfg["device"],
                                cancel=deadline(b.cfg["method_timeout"]))
            b.scores[r["method"]] = np.asarray(res["scores"], np.float64)
            r["run"] = res["key"]
            r["seconds_fit_and_score_or_cached"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a method's failure is its row
            r["error"] = error_line(e)
            if isinstance(e, Cancelled):
                r["error"] = f"timed out after {b.cfg['method_timeout']:.0f} s (--method-timeout); " + r["error"]


def run_score_peers(b: BenchRun) -> None:
    """Peers' score matrices on the same queries (plus any planted-leak queries) and checkpoints."""
    wanted = []
    for item in b.cfg["peers"]:
        peer, _, only = item.partition(":")
        wanted += [(peer, m) for m in SCORE_METHODS.get(peer, []) if not only or m == only]
    if not wanted or not {"lds", "loo", "leak", "cost"} & set(b.cfg["metrics"]):
        return
    leak_q = None
    if "leak" in b.cfg["metrics"] and b.cfg["leak_source"] in ("auto", "truth"):
        planted = truth_leaks(b.project)
        leak_q = None if planted is None else np.array([l["test_index"] for l in planted], np.int64)
    peer_q = b.queries if leak_q is None else np.union1d(b.queries, leak_q)
    for j, (peer, method) in enumerate(wanted):
        b.progress("peers", j, len(wanted))
        b.log(f"bench: peer {peer}:{method}")
        res = run_peer_limited(b.project, peer, method, queries=peer_q, proj_dim=b.cfg["proj_dim"],
                               device=b.cfg["device"], options=peer_options(peer, method), timeout=b.cfg["peer_timeout"])
        prow = {"peer": peer, "method": method, "fit_seconds": res.fit_seconds, "score_seconds": res.score_seconds,
                "peak_mb": res.peak_rss_mb, "settings": res.settings, "n_queries": int(len(peer_q))}
        if res.skipped:
            prow["skipped"] = res.skipped
        else:
            full = np.zeros((b.n_test, b.n_train))
            full[peer_q] = res.scores
            b.peer_scores[f"{peer}:{method}"] = full
        b.peer_rows.append(prow)


def measure_lds(b: BenchRun) -> None:
    cfg, q = b.cfg, b.queries
    b.log(f"bench: LDS ground truth, M={cfg['subsets']} subsets × R={len(b.seeds)} seeds")
    subsets = gt.random_subsets(b.n_train, cfg["subsets"], cfg["alpha"], seed=0)
    t0 = time.perf_counter()
    margins = gt.retrain_margins(b.project, subsets=subsets, seeds=b.seeds, progress=b.progress,
                                 processes=cfg["processes"])
    b.lds_truth = (subsets, margins)
    b.metrics["lds"] = {"subsets": cfg["subsets"], "seeds": len(b.seeds), "alpha": cfg["alpha"],
                        "groundtruth_seconds": time.perf_counter() - t0}
    ceiling = None
    for row, S in b.scored():
        res = lds(S[q], subsets, margins, queries=q)
        row["lds"], ceiling = res["lds"], res["noise_ceiling"]
    if ceiling is None:  # nothing scored: the ceiling from tiny distinct scores
        ceiling = lds(np.zeros((len(q), b.n_train)) + 1e-12 * np.arange(b.n_train), subsets, margins,
                      queries=q)["noise_ceiling"]
    b.metrics["lds"]["noise_ceiling"] = ceiling


def measure_loo(b: BenchRun) -> None:
    cfg, q = b.cfg, b.queries
    if cfg["loo"] <= 0:
        return
    b.log(f"bench: leave-one-out, {cfg['loo']} examples × R={len(b.seeds)} seeds")
    idx = np.sort(np.random.default_rng(1).choice(b.n_train, size=min(cfg["loo"], b.n_train), replace=False))
    t0 = time.perf_counter()
    per_seed, _ = gt.loo_effects(b.project, idx, b.seeds, progress=b.progress, processes=cfg["processes"])
    b.metrics["loo"] = {"indices": idx.tolist(), "seeds": len(b.seeds), "groundtruth_seconds": time.perf_counter() - t0}
    ceiling = float("nan")
    for row, S in b.scored():
        res = loo_correlation(S[q], idx, per_seed, queries=q)
        row["loo"], row["loo_spearman"], ceiling = res["loo"], res["spearman"], res["noise_ceiling"]
    b.metrics["loo"]["noise_ceiling"] = ceiling


def _by_method(b: BenchRun, results: list[dict], key: str) -> None:
    by = {m["method"]: m for m in results}
    for r in b.rows:
        if r["method"] in by:
            r[key] = {k: v for k, v in by[r["method"]].items() if k != "method"}


def measure_mislabel(b: BenchRun) -> None:
    b.log("bench: mislabel detection")
    res = mislabel_benchmark(b.project, b.runnable_methods(), source=b.cfg["mislabel_source"], device=b.cfg["device"],
                             cleanlab="cleanlab" in b.peer_names, progress=b.progress)
    b.metrics["mislabel"] = {"source": res["source"], "n_flipped": res["n_flipped"]}
    _by_method(b, res["methods"], "mislabel")
    for prow in res["peers"]:
        b.peer_rows.append({"peer": prow["peer"], "method": "label-quality", "mislabel": prow,
                            "fit_seconds": prow.get("fit_seconds"), "skipped": prow.get("skipped")})


def measure_leaks(b: BenchRun) -> None:
    b.log("bench: leak detection")
    res = leak_benchmark(b.project, b.runnable_methods(), source=b.cfg["leak_source"], device=b.cfg["device"],
                         progress=b.progress)
    b.metrics["leak"] = {"source": res["source"], "n_leaks": res["n_leaks"], "leaks": res["leaks"],
                         "detector_available": res["detector_available"]}
    _by_method(b, res["methods"], "leak")
    if res["source"] == "truth.json":  # peers scored the planted queries too
        twins = [l["train_index"] for l in res["leaks"]]
        lq = [l["test_index"] for l in res["leaks"]]
        for prow in b.peer_rows:
            k = f"{prow['peer']}:{prow['method']}"
            if k in b.peer_scores:
                prow["leak"] = leak_recall(b.peer_scores[k][lq], twins)


def measure_cost(b: BenchRun) -> None:
    cfg = b.cfg
    b.log("bench: cost")
    for r in b.rows:
        if r["method"] in b.scores:
            try:
                r["cost"] = measure_method(b.project, r["method"], None, device=cfg["device"], queries=b.queries,
                                           cancel=deadline(cfg["method_timeout"]))
            except Exception as e:  # noqa: BLE001 - a failure is the row's cost
                r["cost"] = {"error": error_line(e)}
    throughput = {"proponent": featurize_throughput(b.project, proj_dim=cfg["proj_dim"], device=cfg["device"])}
    if "traker" in b.peer_names:
        try:
            throughput["traker"] = featurize_throughput_traker(
                project_inputs(b.project, device=cfg["device"], proj_dim=cfg["proj_dim"], queries=b.queries[:1]))
        except Exception as e:  # noqa: BLE001 - reported beside our figure
            throughput["traker_error"] = error_line(e)
    b.metrics["cost"] = {"featurize_examples_per_second": throughput}
    if cfg["scaling"]:
        b.log("bench: cost growth (3 training-set sizes)")
        chosen = cfg.get("scaling_methods")
        methods = [m for m in b.runnable_methods() if chosen is None or m[0] in chosen]
        b.metrics["cost"]["scaling"] = scaling(b.project, methods, device=cfg["device"], progress=b.progress,
                                               timeout=cfg["method_timeout"])


def measure_counterfactual(b: BenchRun, ks=(10, 40)) -> None:
    """Remove each query's top-k proponents vs k random examples, and retrain."""
    b.log(f"bench: counterfactual check, {b.cfg['cf_queries']} queries")
    cf_q = b.queries[: max(1, b.cfg["cf_queries"])]
    b.metrics["counterfactual"] = {"queries": cf_q.tolist(), "k_values": list(ks), "seeds": [0], "random_trials": 2}
    for r in b.rows:
        if r["method"] not in b.scores:
            continue
        per_k = {k: {"top": [], "random": [], "flipped": 0} for k in ks}
        for q in cf_q:
            res = counterfactual_check(b.project, int(q), scores_row=b.scores[r["method"]][q], k_values=ks, seeds=(0,),
                                       random_trials=2, processes=b.cfg["processes"])
            for row in res["rows"]:
                per_k[row["k"]]["top"].append(row["change"])
                per_k[row["k"]]["random"].append(row["random_change_mean"])
                per_k[row["k"]]["flipped"] += int(row["flipped"])
        r["counterfactual"] = {str(k): {"mean_change_top": float(np.mean(v["top"])),
                                        "mean_change_random": float(np.mean(v["random"])),
                                        "flipped_share": v["flipped"] / len(cf_q)} for k, v in per_k.items()}


STAGES = (("lds", measure_lds), ("loo", measure_loo), ("mislabel", measure_mislabel), ("leak", measure_leaks),
          ("cost", measure_cost), ("counterfactual", measure_counterfactual))


def run_bench(project: Project, cfg: dict, progress: ProgressFn | None = None, log=print) -> dict:
    t_start = time.perf_counter()
    n_test = len(project.test_dataset)
    nq = cfg["queries"]
    rng = np.random.default_rng(0)
    queries = np.arange(n_test) if nq <= 0 or nq >= n_test else np.sort(rng.choice(n_test, size=nq, replace=False))
    b = BenchRun(project, cfg, queries, progress or (lambda s, d, t: None), log)
    fit_methods(b)
    run_score_peers(b)
    for metric, stage in STAGES:
        if metric in cfg["metrics"]:
            stage(b)
    out: dict = {"project": {**project.summary(), "root": str(project.root)}, "config": cfg,
                 "queries": queries.tolist(), "methods": b.rows, "peers": b.peer_rows, "metrics": b.metrics}
    if "traker" in b.peer_names and "trak" in cfg["methods"] and b.lds_truth is not None:
        out["trak_vs_traker"] = trak_vs_traker(project, cfg, *b.lds_truth, queries, log=log)
    out["registry_not_run"] = [c.name for c in list_methods() if c.name not in cfg["methods"]]
    out["seconds"] = time.perf_counter() - t_start
    return out
