"""Source benchmark: LDS (with its noise ceiling) and cost of Source, Fast-Source, EK-FAC
influence, TRAK (1 model and an ensemble) and TracIn, plus kronfluence's EK-FAC as a peer on
the same final checkpoint, on three sample projects:

- digits             (MLP, 15 epochs: close to converged),
- digits-multistage  (pre-train on upright digits, fine-tune on tilted digits),
- digits-noisy       (3 epochs at a small learning rate on 20%-noisy labels: not converged).

Ground truth: retrain on M random half-subsets with R seeds (engine.evaluate.groundtruth,
cached under each project's .proponent/); LDS per engine.evaluate.lds over all test queries.
Writes docs/bench/source-<project>.json (one per project).

    python scripts/bench_source.py [--projects digits,digits-multistage,digits-noisy] [--m 100] [--r 2]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("PROPONENT_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import Project  # noqa: E402
from engine.core.data import whole  # noqa: E402
from engine.evaluate.groundtruth import random_subsets, retrain_margins  # noqa: E402
from engine.evaluate.lds import lds  # noqa: E402
from engine.methods.base import get_method  # noqa: E402
from engine.core.samples import prepare_sample  # noqa: E402
from engine.storage.arrays import atomic_write_json  # noqa: E402

ENSEMBLE = 5

# (row label, method, settings)
METHODS = [
    ("Source (L=3 / one per stage)", "source", {}),
    ("Source, training grads projected to k=512", "source", {"proj_dim": 512}),
    ("Source, training grads projected to k=2048", "source", {"proj_dim": 2048}),
    ("Fast-Source", "source", {"fast": True}),
    ("Source, one segment (L=1)", "source", {"segments": 1, "segment_by": "count"}),
    ("EK-FAC influence (λ = 0.1·mean σ)", "ekfac", {}),
    ("EK-FAC influence (λ = 0.01·mean σ)", "ekfac", {"damping_ratio": 0.01}),
    ("EK-FAC configured as kronfluence (1 label sample, λ = 1e-8, no weight decay in σ)", "ekfac",
     {"fisher_samples": 1, "damping": 1e-8, "weight_decay_in_curvature": False}),
    ("TRAK, 1 model", "trak", {"ensemble": "final"}),
    (f"TRAK, {ENSEMBLE} models", "trak", {"ensemble": "models"}),
    ("TracIn(CP), all checkpoints", "tracin", {}),
]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def r3(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 3)


def run_project(name: str, workdir: Path, m: int, r: int, alpha: float, with_peer: bool) -> dict:
    root = workdir / name
    if not (root / "checkpoints" / "trajectory.json").is_file():
        log(f"{name}: preparing the sample ({ENSEMBLE} models)")
        prepare_sample(name, root, train=True, models=ENSEMBLE, force=True)
    p = Project.load(root)
    if len(p.model_ids()) < ENSEMBLE:
        prepare_sample(name, root, train=True, models=ENSEMBLE, force=True)
        p = Project.load(root)
    n = len(p.train_dataset)
    subsets = random_subsets(n, m, alpha, seed=12345)
    t0 = time.perf_counter()
    margins = retrain_margins(p, subsets=subsets, seeds=list(range(100, 100 + r)),
                              progress=lambda st, d, t: log(f"{name}: retrain {d}/{t}") if d % 25 == 0 else None)
    gt_s = time.perf_counter() - t0
    log(f"{name}: ground truth ready ({gt_s:.0f}s)")
    rows = []
    results = {}
    for label, method, settings in METHODS:
        cls = get_method(method)
        att = cls(cls.Settings(**settings))
        # a cold fit: factors are cached per checkpoint across runs, which would hide their cost
        shutil.rmtree(p.state_dir / "factors", ignore_errors=True)
        t0 = time.perf_counter()
        att.fit(p)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        S = att.scores("test")
        score_s = time.perf_counter() - t0
        res = lds(S, subsets, margins)
        results[label] = res["lds"]
        if method == "source" and not settings:
            results["_c_sigma"] = [round(sg["eta_K"] * sm, 3) for sg, sm in zip(att.meta["segments"], att.meta["sigma_mean"])]
        extra = ""
        if method in ("source", "ekfac"):
            segs = att.meta["segments"]
            extra = "; ".join(f"seg{s['index'] + 1}: {len(s['checkpoints'])} ckpt, K={s['steps']}, η̄K={s['eta_K']:.3g}, "
                              f"mean σ={sm:.3g}" for s, sm in zip(segs, att.meta["sigma_mean"]))
            if method == "ekfac":
                extra = f"λ per layer={[round(d, 5) for d in att.meta['damping'][0]]}; " + extra
        log(f"{name}: {label}: LDS {res['lds']:.3f} (fit {fit_s:.1f}s, score {score_s:.1f}s)")
        rows.append([label, method, settings, r3(res["lds"]), r3(res["noise_ceiling"]), round(fit_s, 2),
                     round(score_s, 2), extra])
    if with_peer:
        from engine.evaluate.peers import PeerInputs, run_peer

        final = [c for c in p.checkpoints if c.model_id == p.model_ids()[0]]
        inputs = PeerInputs(build_model=p.build_model, checkpoints=[p.load_state(c) for c in final],
                            checkpoint_lrs=[c.lr for c in final], x_train=whole(p.train_dataset.x), y_train=p.train_dataset.y,
                            x_test=whole(p.test_dataset.x), y_test=p.test_dataset.y, num_classes=p.num_classes)
        pr = run_peer("kronfluence", "ekfac", inputs)
        if pr.skipped:
            rows.append(["kronfluence EK-FAC (peer)", "peer", {}, None, None, None, None, f"skipped: {pr.skipped}"])
        else:
            res = lds(pr.scores, subsets, margins)
            results["kronfluence"] = res["lds"]
            log(f"{name}: kronfluence: LDS {res['lds']:.3f}")
            rows.append(["kronfluence EK-FAC (peer, its defaults)", "peer", {"damping_factor": pr.settings.get("damping_factor")},
                         r3(res["lds"]), r3(res["noise_ceiling"]), round(pr.fit_seconds, 2), round(pr.score_seconds, 2),
                         f"kronfluence {pr.settings.get('version')}, 1 label sample, same final checkpoint"])
    return {"rows": rows, "ceiling": r3(res["noise_ceiling"]), "n_train": n, "n_test": len(p.test_dataset),
            "checkpoints": len([c for c in p.checkpoints if c.model_id == 0]), "results": results, "gt_seconds": gt_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", default="digits,digits-multistage,digits-noisy")
    ap.add_argument("--workdir", default="/tmp/proponent-bench-source")
    ap.add_argument("--m", type=int, default=100, help="LDS subsets")
    ap.add_argument("--r", type=int, default=2, help="retraining seeds per subset (≥ 2 for the noise ceiling)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out-dir", default=str(ROOT / "docs/bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    machine = f"{platform.platform()} {platform.machine()}, CPU, {os.cpu_count()} cores, no GPU, torch threads 1"
    for name in args.projects.split(","):
        out = run_project(name, Path(args.workdir), args.m, args.r, args.alpha, not args.no_peer)
        res = out["results"]
        src, ek = res["Source (L=3 / one per stage)"], res["EK-FAC influence (λ = 0.1·mean σ)"]
        doc = {
            "title": f"Source vs EK-FAC influence, TRAK, TracIn: LDS on {name}",
            "date": datetime.date.today().isoformat(),
            "machine": machine,
            "command": f"python scripts/bench_source.py --projects {name} --m {args.m} --r {args.r}",
            "tables": [{
                "title": f"{name}: LDS over all {out['n_test']} test queries ({out['n_train']} train, "
                         f"{out['checkpoints']} checkpoints in model 0's run)",
                "columns": ["method", "registry name", "settings", "LDS", "noise ceiling", "fit s", "score s", "details"],
                "rows": out["rows"],
                "notes": (f"LDS: M={args.m} random subsets of α={args.alpha}, R={args.r} retraining seeds each "
                          f"(margins averaged over seeds); noise ceiling = Spearman between two seeds' margins. "
                          f"Ground truth retraining took {out['gt_seconds']:.0f}s (cached). Source, EK-FAC and TracIn "
                          f"use model 0's recorded trajectory; the TRAK ensemble uses {ENSEMBLE} independently "
                          f"trained models. Times are wall seconds on a shared, loaded 2-core CPU; every curvature fit is cold (the per-checkpoint factor cache is cleared first)."),
            }],
            "notes": (f"Source − EK-FAC (default damping) LDS: {src - ek:+.3f} ({src:.3f} vs {ek:.3f}). "
                      f"η̄K × mean σ per Source segment: {res['_c_sigma']} (≪ 1: the response F(σ) ≈ η̄K is nearly flat, "
                      f"so Source behaves like a learning-rate-weighted gradient product such as TracIn; ≫ 1: F(σ) ≈ 1/σ "
                      f"in the high-curvature directions, as in influence functions). LDS compares with the margins "
                      f"averaged over R seeds, so it can exceed the seed-vs-seed noise ceiling."),
        }
        path = Path(args.out_dir) / f"source-{name}.json"
        atomic_write_json(path, doc)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
