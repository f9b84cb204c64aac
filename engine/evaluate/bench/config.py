"""The command line of ``proponent bench`` and the configuration it resolves to."""
from __future__ import annotations

import argparse
import os
import platform

import torch

from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.evaluate.detection import truth_flips, truth_leaks
from engine.evaluate.peers import PEER_METHODS
from engine.methods.base import list_methods

DEFAULT_METRICS = ("lds", "loo", "mislabel", "leak", "cost")
ALL_METRICS = DEFAULT_METRICS + ("counterfactual",)
QUICK_METHODS = ("trak", "grad-dot", "knn")


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


def at_least(low: int):
    """An argparse type: a whole number ≥ ``low`` (a negative count used to mean "all" or be clamped)."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value
    return whole


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="proponent bench", description="Accuracy and cost of attribution methods and peers.")
    ap.add_argument("project", help="the project to benchmark (or --suite: generated validation projects, see "
                                    "proponent bench --suite --help)")
    ap.add_argument("--methods", help="comma-separated method names (default: every method in the registry that supports "
                                      "the project; --quick: trak,grad-dot,knn)")
    ap.add_argument("--peers", help="comma-separated peers: traker,kronfluence,dattri,captum,cleanlab (or peer:method, "
                                    "e.g. dattri:if-cg), or 'none' (default: all; --quick: none)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help=f"comma-separated, of {','.join(ALL_METRICS)} (default: {','.join(DEFAULT_METRICS)})")
    ap.add_argument("--cf-queries", type=at_least(0), default=5, help="test queries for the counterfactual metric")
    ap.add_argument("--subsets", type=at_least(2), help="LDS subsets M (default 100; --quick 12)")
    ap.add_argument("--seeds", type=at_least(1), help="retraining seeds R per subset (default 2; ≥ 2 gives the noise ceiling)")
    ap.add_argument("--alpha", type=float, default=0.5, help="fraction of the training set in each LDS subset")
    ap.add_argument("--queries", type=at_least(0), help="test queries used for LDS/LOO (default 100; --quick 40; 0: all)")
    ap.add_argument("--loo", type=at_least(0), help="training examples removed one at a time for LOO (default 20; --quick 6)")
    ap.add_argument("--proj-dim", type=at_least(1), default=512, help="projection size for the TRAK vs traker comparison")
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
    ap.add_argument("--processes", type=at_least(1), help="retraining processes (default: cores − 1; 1 on ≤ 2 cores)")
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


def retraining_metrics(project: Project, cfg: dict) -> list[str]:
    """The requested metrics that retrain the model (and so need ``[training]``)."""
    metrics = cfg["metrics"]
    need = [m for m in ("lds", "loo", "counterfactual") if m in metrics]
    if "mislabel" in metrics and (cfg["mislabel_source"] == "flip" or truth_flips(project) is None):
        need.append("mislabel")  # flips planted in a copy, which is retrained
    if "leak" in metrics and (cfg["leak_source"] == "plant" or truth_leaks(project) is None):
        need.append("leak")
    return need


def check_recipe(project: Project, cfg: dict, explicit_metrics: bool) -> None:
    """Without ``[training]``: an explicit request for a retraining metric is a one-line error naming
    it; the default metric list just leaves those metrics out (recorded in ``cfg['skipped_metrics']``)."""
    need = retraining_metrics(project, cfg)
    if project.has_recipe or not need:
        return
    if explicit_metrics:
        project.require_recipe(f"bench --metrics {','.join(need)}")
    cfg["metrics"] = [m for m in cfg["metrics"] if m not in need]
    cfg["skipped_metrics"] = {m: "needs a training recipe ([training] in project.toml)" for m in need}
