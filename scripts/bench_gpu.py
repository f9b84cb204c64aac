#!/usr/bin/env python
"""The GPU path, measured: one short script for a borrowed CUDA machine.

Stages, in order of importance, each in its own process (a crash or a hang costs one stage), each
written to ``--out`` as soon as it ends, and skipped once ``--budget-s`` would be overrun:

1. ``methods``: every registered method and the app's jobs (triage ranking, leak detection,
   influence map, the exact top-k index) on the digits-CNN sample with ``--device cuda``; TRAK
   and EK-FAC scores on CUDA compared with the same run on the CPU.
2. ``cnn-N``: a generated 32×32 RGB project (10 classes of coloured shapes; a 94k-parameter CNN
   with BatchNorm trained on the GPU) at N training images. Proponent's TRAK with its defaults
   against traker 0.3.2 with its defaults at the same k and checkpoints, Proponent's EK-FAC against
   kronfluence's EK-FAC, and TRAK with bfloat16 per-example gradients; wall time (fit and scoring
   of every test query), peak GPU memory, peak RSS, and LDS against retraining on random halves.
3. ``oom``: per-example gradients under a capped CUDA allocator: batches that do not fit back
   off to ones that do, with the same features; a single example that does not fit ends in one line.
4. ``topk``: a new query's top-10 over a TRAK run at 100k and 1M training rows, exact on the GPU
   (training vectors resident there) against the streamed exact scan.

    python scripts/bench_gpu.py --out DIR [--budget-s 480] [--stages methods,cnn-5000,oom,topk]
    python scripts/bench_gpu.py --render DIR   # DIR's gpu-*.json → docs/bench/, after the run

Numbers are only ever what this script measured; docs/bench/gpu-*.json say on which machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()
DEVICE = "cuda"  # --device cpu: a dry run of the script itself on a machine without a GPU
DEFAULT_STAGES = "methods,cnn-5000,oom,topk,cnn-20000"
N_TEST = 500
LIMIT_SCALE = 1.0  # --limit-scale: the per-run limits are sized for the GPU; a CPU run needs more
PER_METHOD_S = 30  # a method still running after this is cancelled into its row (the engine's own cancel)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def peak_gpu_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def peak_rss_mb() -> float:
    from engine.evaluate.memory import peak_rss_mb as vm_hwm  # ru_maxrss carries the parent's over exec

    return vm_hwm()


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    isa = f", CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    return (f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores, {gpu}{isa}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def cpu_model() -> str:
    try:  # the same core count and kernels can hide very different CPUs (a Xeon with AMX, an EPYC with AVX2 only)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --isa avx2: a CPU without AVX-512 and AMX, emulated on this one (the same cores, clock and memory): torch's own
# kernels, oneDNN's and MKL's limited to AVX2, and Proponent's bfloat16 products off as its probe would find them
# there. Peers run under the same limits. Only an estimate of such a CPU: its caches and clocks differ.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "PROPONENT_BF16_PRODUCTS": "0"}}
ISA = ""
TAG = ""  # --tag: the CPU's own name in the file name (cpu-TAG-cnn-N.json), so one machine's rows keep another's


# ----------------------------------------------------------------------------- the 32×32 RGB project
CNN_MODEL = '''from torch import nn


def build(input_shape, num_classes):
    c = input_shape[0]

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(c, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
'''
CNN_RECIPE = ('[training]\noptimizer = "sgd"\nlr = 0.05\nlr_schedule = "cosine"\nmomentum = 0.9\nweight_decay = 0.0005\nepochs = 10\n'
              'batch_size = 64\nseed = 0\ncheckpoints_per_epoch = 1\n')
SHAPE_NAMES = ("disc", "square", "ring", "cross", "diamond")


def render_rgb(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n 32×32 RGB images of 10 classes (5 shapes × warm/cool ink) on noisy, tinted backgrounds."""
    size = 32
    y = rng.integers(0, 10, n)
    shape, cool = y % 5, y // 5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = rng.uniform(4, 10, n)[:, None, None]
    cx = rng.uniform(10, 22, n)[:, None, None]
    cy = rng.uniform(10, 22, n)[:, None, None]
    dx, dy = xx[None] - cx, yy[None] - cy
    d2 = np.sqrt(dx ** 2 + dy ** 2)
    masks = np.stack([d2 <= r,                                                     # disc
                      np.maximum(abs(dx), abs(dy)) <= r * 0.8,                     # square
                      (d2 <= r) & (d2 >= r * 0.55),                                # ring
                      ((abs(dx) <= r * 0.25) | (abs(dy) <= r * 0.25)) & (np.maximum(abs(dx), abs(dy)) <= r),  # cross
                      abs(dx) + abs(dy) <= r])                                     # diamond
    mask = masks[shape, np.arange(n)]
    # warm and cool inks overlap, and the noise is strong: the classes are learnable but not trivially
    warm = np.stack([rng.uniform(110, 255, n), rng.uniform(40, 160, n), rng.uniform(0, 150, n)], 1)
    coolc = np.stack([rng.uniform(0, 150, n), rng.uniform(40, 160, n), rng.uniform(110, 255, n)], 1)
    ink = np.where(cool[:, None] == 1, coolc, warm)
    bg = rng.uniform(30, 120, (n, 1)) + rng.uniform(-25, 25, (n, 3))
    img = np.where(mask[:, None], ink[:, :, None, None], bg[:, :, None, None])
    img = img + rng.normal(0, 30, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), y


def make_cnn_project(root: Path, n_train: int, seed: int = 7) -> Path:
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    x, y = render_rgb(n_train + N_TEST, rng)
    names = np.array([f"{s}-{'cool' if c else 'warm'}" for c in (0, 1) for s in SHAPE_NAMES])
    (root / "img").mkdir(parents=True)
    for split, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        paths = []
        for i, a in enumerate(x[sl]):
            rel = f"img/{split}_{i:06d}.png"
            Image.fromarray(a.transpose(1, 2, 0), mode="RGB").save(root / rel, compress_level=1)
            paths.append(rel)
        pd.DataFrame({"path": paths, "label": names[y[sl]]}).to_csv(root / f"{split}.csv", index=False)
    (root / "model.py").write_text(CNN_MODEL)
    (root / "project.toml").write_text(
        f'[project]\nname = "rgb32-{n_train}"\ntask = "classification"\n\n[data]\nformat = "images"\n'
        'train = "train.csv"\ntest = "test.csv"\nlabel_column = "label"\nimage_column = "path"\n\n'
        '[model]\nfactory = "model.py:build"\ncheckpoints = "checkpoints"\n\n' + CNN_RECIPE)
    return root


# ----------------------------------------------------------------------------- children
def child_train(a: dict) -> dict:
    from engine import Project
    from engine.core.train import accuracy, record_training

    root = Path(a["root"])
    if a.get("make") and not (root / "project.toml").is_file():
        make_cnn_project(root, a["n_train"])
    p = Project.load(root)
    t0 = time.perf_counter()
    if not p.checkpoints:
        record_training(p, device=a["device"])
    p = Project.load(root)
    model = p.load_model(p.final_checkpoints()[0])
    return {"train_s": time.perf_counter() - t0, "n_params": sum(q.numel() for q in model.parameters()),
            "test_accuracy": accuracy(model, p.test_dataset.x, p.test_dataset.y),
            "checkpoints": len(p.run_checkpoints())}


def child_attribute(a: dict) -> dict:
    """One timed run in a fresh process: fit + scores of every test query."""
    import torch

    from engine import Project

    p = Project.load(a["root"])
    if a["tool"] == "proponent":
        # every run starts cold: no curvature factors or training-gradient stores from an earlier run of this
        # benchmark (they are keyed by checkpoint and rows, so a rerun, or a 5-point run after the 1-point one,
        # would reuse them); the decoded-image cache stays, decoding is not the method's cost
        for name in ("factors", "features", "runs"):
            shutil.rmtree(p.state_dir / name, ignore_errors=True)
    len(p.train_dataset), len(p.test_dataset)  # decoding is not the method's cost
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mb()
    stage = {"now": "start", "peak": 0.0, "at": ""}

    def sample() -> None:  # which stage the resident memory peaks in
        while True:
            with open("/proc/self/statm") as f:
                mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            if mb > stage["peak"]:
                stage["peak"], stage["at"] = mb, stage["now"]
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    tool = a["tool"]
    out: dict = {"tool": tool}
    if tool == "proponent":
        from engine.api import cached_scores

        starts: dict[str, float] = {}  # when each stage was first seen

        def progress(st, done, total):
            stage["now"] = st
            starts.setdefault(st, time.perf_counter())

        r = cached_scores(p, a["method"], a.get("settings") or {}, device=a["device"], use_cache=False,
                          progress=progress)
        scores = np.asarray(r["scores"], np.float32)
        out["meta"] = {k: v for k, v in (r.get("meta") or {}).items() if isinstance(v, (int, float, str))}
        # the split peers do not have: test scores end where self-influence (for triage) starts
        end = time.perf_counter()
        scored = min((starts[k] for k in ("score", "score training chunks") if k in starts), default=None)
        if scored is not None:
            out["fit_s"] = scored - t0
            out["test_scores_s"] = starts.get("self-influence", end) - scored
        if "self-influence" in starts:
            out["self_influence_s"] = end - starts["self-influence"]
    else:
        from engine.evaluate.peers import project_inputs, run_peer
        from engine.methods.trak import ensemble_checkpoints

        cks = ensemble_checkpoints(p, "auto", 0) if a["method"] == "trak" else p.final_checkpoints()[:1]
        inputs = project_inputs(p, device=a["device"], proj_dim=a["proj_dim"], checkpoints=cks)
        res = run_peer(tool, a["method"], inputs)
        if res.skipped:
            raise RuntimeError(f"{tool} skipped: {res.skipped}")
        scores = np.asarray(res.scores, np.float32)
        out["settings"] = {k: v for k, v in res.settings.items() if isinstance(v, (int, float, str))}
        out["checkpoints"] = len(cks)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out.update(seconds=time.perf_counter() - t0, peak_gpu_mb=peak_gpu_mb(), peak_rss_mb=peak_rss_mb(),
               rss_before_mb=rss0, shape=list(scores.shape), rss_peak_stage=stage["at"])
    np.save(a["save"], scores)
    return out


def _load_partial_margins(path: Path, want: dict) -> list:
    """Margins an interrupted LDS child saved for the same subsets (``want``: n_train, subsets, seeds,
    n_test), else none."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return []
    try:
        if json.loads(meta.read_text()).get("key") != want:
            return []
        return list(np.load(path))
    except (OSError, ValueError):
        return []


def _save_margins(path: Path, margins: list, key: dict) -> None:
    """[done, seeds, n_test] margins and what they are (atomically: a kill mid-write loses nothing saved)."""
    from engine.storage.arrays import atomic_save_npy, atomic_write_json

    atomic_save_npy(path, np.asarray(margins))
    atomic_write_json(path.with_suffix(".json"), {"key": key, "done": len(margins)})


def child_lds(a: dict) -> dict:
    """LDS against retraining on random halves, retrained one after another on the device until
    ``seconds`` run out (the subsets finished by then are the ones scored). A subset is started only
    if the slowest one so far would still finish in time, and with ``save_margins`` every finished
    subset is saved at once, so a later run with the same arguments resumes where this one stopped."""
    import torch

    from engine import Project
    from engine.core.train import train_model
    from engine.evaluate.groundtruth import random_subsets, test_margins
    from engine.evaluate.lds import lds

    p = Project.load(a["root"])
    ts = p.test_dataset
    subsets = random_subsets(len(p.train_dataset), a["subsets"], seed=0)
    key = {"n_train": len(p.train_dataset), "subsets": a["subsets"], "seeds": a["seeds"], "n_test": len(ts)}
    save = Path(a["save_margins"]) if a.get("save_margins") else None
    # [subsets, seeds, n_test]: a later scoring of new scores needs no retraining, a stopped run resumes
    margins = _load_partial_margins(save, key) if save else []
    resumed = len(margins)
    t0 = time.perf_counter()
    slowest = 0.0
    for keep in subsets[resumed:]:
        if time.perf_counter() - t0 + slowest > a["seconds"]:
            break
        t_sub = time.perf_counter()
        rows = np.flatnonzero(keep)
        seeds = []
        for seed in range(a["seeds"]):
            model = train_model(p, indices=rows, seed=seed, device=a["device"]).to(a["device"])
            seeds.append(test_margins(model, ts.x.to(a["device"]), ts.y.to(a["device"])))
        margins.append(seeds)
        slowest = max(slowest, time.perf_counter() - t_sub)
        if save:
            _save_margins(save, margins, key)
    done = len(margins)
    margins = np.asarray(margins)
    out = {"retrain_s": time.perf_counter() - t0, "subsets": done, "resumed_subsets": resumed, "seeds": a["seeds"],
           "lds": {}}
    for name, f in a["scores"].items():
        if Path(f).is_file() and done >= 4:
            r = lds(np.load(f), subsets[:done], margins)
            out["lds"][name] = r["lds"]
            out["noise_ceiling"] = r.get("noise_ceiling")
    return out


def child_methods(a: dict) -> dict:
    """Every method and job on CUDA; each outcome appended to a JSON-lines file as it ends."""
    import torch

    from engine import Project
    from engine.api import cached_scores
    from engine.core.samples import prepare_sample
    from engine.methods.base import list_methods

    root = Path(a["root"])
    if not (root / "project.toml").is_file():
        t0 = time.perf_counter()
        prepare_sample(a["sample"], root, train=True)
        note(a["lines"], {"job": "prepare sample", "ok": True, "seconds": time.perf_counter() - t0})
    p = Project.load(root)
    results = {}
    order = ["trak", "ekfac", "source", "grad-dot", "grad-cos", "tracin", "knn", "forward-inf", "gif", "exact-if", "ddm"]
    classes = sorted(list_methods(), key=lambda c: order.index(c.name) if c.name in order else len(order))
    if a.get("only"):
        classes = [c for c in classes if c.name in a["only"]]
    for cls in classes:
        m = cls.name
        if cls.supports(p):
            continue
        deadline = time.perf_counter() + a.get("per_method_s", 60)
        row = {"job": f"method {m}", "ok": False}
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        try:
            r = cached_scores(p, m, {}, device=a["device"], use_cache=False,
                              cancel=lambda: time.perf_counter() > deadline)
            s = np.asarray(r["scores"], np.float64)
            row.update(ok=bool(np.isfinite(s).all()), seconds=time.perf_counter() - t0, shape=list(s.shape),
                       peak_gpu_mb=peak_gpu_mb())
            results[m] = s
        except Exception as e:  # recorded, then the next method
            row.update(seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:600],
                       where=traceback.format_exc().splitlines()[-3:])
        note(a["lines"], row)
    # the same runs on the CPU, in a copy of the project without its state (nothing computed on the GPU reused)
    cpu_root = root.parent / f"{root.name}-cpu"
    if not cpu_root.exists():
        shutil.copytree(root, cpu_root, ignore=shutil.ignore_patterns(".proponent"))
    p_cpu = Project.load(cpu_root)
    for m in ("trak", "ekfac"):
        if m not in results or not a.get("jobs", True):
            continue
        row = {"job": f"{m} cuda vs cpu", "ok": False}
        try:
            t0 = time.perf_counter()
            c = np.asarray(cached_scores(p_cpu, m, {}, device="cpu", use_cache=False)["scores"], np.float64)
            g = results[m]
            top_c, top_g = np.argsort(-c, 1)[:, :10], np.argsort(-g, 1)[:, :10]
            overlap = float(np.mean([len(set(u) & set(v)) / 10 for u, v in zip(top_c, top_g)]))
            rel = float(np.abs(c - g).max() / np.abs(c).max())
            row.update(ok=overlap > 0.9, cpu_seconds=time.perf_counter() - t0, max_rel_diff=rel, top10_overlap=overlap)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:600], where=traceback.format_exc().splitlines()[-3:])
        note(a["lines"], row)
    jobs = {
        "triage ranking (trak)": lambda: _job_triage(p, a["device"]),
        "leak detection (forward-inf)": lambda: _job_leaks(p, a["device"]),
        "influence map (umap)": lambda: _job_map(p, a["device"]),
        "exact top-k index on the GPU": lambda: _job_index(p, a["device"]),
    }
    for name, fn in (jobs.items() if a.get("jobs", True) else ()):
        row = {"job": name}
        t0 = time.perf_counter()
        try:
            row.update(fn())
            row.setdefault("ok", True)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:600], where=traceback.format_exc().splitlines()[-3:])
        row["seconds"] = time.perf_counter() - t0
        note(a["lines"], row)
    return {"done": True}


def _job_triage(p, device: str) -> dict:
    from engine.workflows.mislabel import recommended_ranking

    r = recommended_ranking(p, "trak", device=device)
    return {"rows_ranked": len(r["items"]), "evidence": r.get("evidence_sources")}


def _job_leaks(p, device: str) -> dict:
    from engine.workflows.leaks import detect_leaks

    r = detect_leaks(p, "forward-inf", device=device)
    return {"pairs": len(r.get("pairs", [])) if isinstance(r, dict) else None}


def _job_map(p, device: str) -> dict:
    from engine.workflows.embeddings import compute_embedding

    r = compute_embedding(p, "influence", "umap", device=device)
    xy = r.get("xy") if isinstance(r, dict) else None
    return {"points": int(len(xy)) if xy is not None else None}


def _job_index(p, device: str) -> dict:
    from engine.api import fit_method
    from engine.workflows.index import InfluenceIndex

    # the index needs TRAK's primal (k ≤ n) form: project to 512 here (digits-CNN has 9.9k parameters)
    att, _ = fit_method(p, "trak", {"ensemble": "final", "proj_dim": 512}, device=device)
    q = att._queries(("test", np.arange(20)))
    gpu = InfluenceIndex(att, backend="exact", device=device)
    cpu = InfluenceIndex(att, backend="exact", device="cpu")
    u = gpu.query_vectors(q.x, q.y)
    a, b = gpu.search(u, 10), cpu.search(u, 10)
    same = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a["proponents"], b["proponents"])]))
    return {"resident": gpu._resident is not None, "top10_agreement_with_cpu_scan": same, "ok": same >= 0.9}


def note(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    log(json.dumps(row, default=str)[:400])


def child_oom(a: dict) -> dict:
    import torch

    from engine import Project
    from engine.autodiff.features import project_gradients
    from engine.autodiff.functional import TrackedParameters
    from engine.autodiff.per_example import GradientComputer
    from engine.autodiff.projection import make_projector
    from engine.core.errors import ProponentError

    p = Project.load(a["root"])
    ds = p.train_dataset
    x, y = ds.x[:4096], ds.y[:4096]

    def computer():
        return GradientComputer(p.load_model(p.final_checkpoints()[0]), tracked=TrackedParameters.of(p), device="cuda")

    c0 = computer()
    proj = make_projector("rademacher", c0.n_params, 2048, seed=0, device="cuda")
    ref = project_gradients(c0, proj, x, y, batch_size=4096)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # the fraction bounds the caching allocator's RESERVED memory (a cap above memory_allocated() left
    # every batch, even one example, failing in the run of 2026-12-04)
    base = torch.cuda.memory_reserved()
    cap = base + (a.get("cap_mb", 1024) << 20)  # room for about a thousand examples' gradients
    torch.cuda.set_per_process_memory_fraction(cap / total)
    c1 = computer()
    t0 = time.perf_counter()
    got = project_gradients(c1, proj, x, y, batch_size=4096)
    out = {"cap_mb": a.get("cap_mb", 1024), "asked_batch": 4096, "settled_batch": c1.max_batch,
           "oom_retries": c1.oom_retries, "seconds": time.perf_counter() - t0,
           "max_abs_diff": float((ref - got).abs().max()), "max_abs": float(ref.abs().max())}
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (1 << 20)) / total)
    try:
        project_gradients(computer(), proj, x[:8], y[:8], batch_size=8)
        out["single_example_error"] = None
    except ProponentError as e:
        out["single_example_error"] = str(e)
    except Exception as e:  # the model copy itself may not fit: say so
        out["single_example_error"] = f"(not a ProponentError) {type(e).__name__}: {str(e)[:200]}"
    return out


def child_topk(a: dict) -> dict:
    import torch

    from engine import Project
    from engine.api import fit_method
    from engine.core.train import record_training
    from engine.workflows.index import InfluenceIndex
    from scripts.bench_scale import make_project

    n = a["n_train"]
    root = Path(a["root"])
    t0 = time.perf_counter()
    make_project(root, n, 200)
    p = Project.load(root)
    record_training(p, device=a["device"])
    p = Project.load(root)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    att, _ = fit_method(p, "trak", {"ensemble": "final"}, device=a["device"])
    fit_s = time.perf_counter() - t0
    q = att._queries(("test", np.arange(a["queries"])))
    gpu = InfluenceIndex(att, backend="exact", device=a["device"])
    scan = InfluenceIndex(att, backend="exact", device="cpu")
    u = gpu.query_vectors(q.x, q.y)
    truth = scan.search(u, 10)
    one, whole = [], []
    for i in range(a["queries"]):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        r = gpu.search(u[i:i + 1], 10)
        one.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        gpu.search(gpu.query_vectors(q.x[i:i + 1], q.y[i:i + 1]), 10)
        whole.append(time.perf_counter() - t1)
        assert r["proponents"].shape == (1, 10)
    got = gpu.search(u, 10)
    recall = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(got["proponents"], truth["proponents"])]))
    scan_one = []
    for i in range(3):
        t1 = time.perf_counter()
        scan.search(u[i:i + 1], 10)
        scan_one.append(time.perf_counter() - t1)
    return {"n_train": n, "d": gpu.d, "resident": gpu._resident is not None, "upload_s": gpu.build_seconds,
            "make_and_train_s": made, "trak_fit_s": fit_s, "search_ms_median": 1e3 * statistics.median(one),
            "query_path_ms_median": 1e3 * statistics.median(whole), "streamed_scan_ms_median": 1e3 * statistics.median(scan_one),
            "recall10_vs_streamed_scan": recall, "queries": a["queries"]}


CHILDREN = {"train": child_train, "attribute": child_attribute, "lds": child_lds, "methods": child_methods,
            "oom": child_oom, "topk": child_topk}


# ----------------------------------------------------------------------------- the parent
class Runner:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, T0 + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def child(self, kind: str, args: dict, limit: float) -> dict:
        limit = min(limit, self.left() - 5)
        if limit < 10:
            return {"error": f"skipped: {self.left():.0f} s of the budget left"}
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args)],
                               cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            def text(b):
                return (b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))[-6000:]
            with open(self.out / "log.txt", "a") as f:
                f.write(f"==== {kind} {json.dumps(args)[:300]} TIMED OUT after {limit:.0f} s\n{text(e.stdout)}\n{text(e.stderr)}\n")
            return {"error": f"timed out after {limit:.0f} s", "stderr": text(e.stderr)[-800:]}
        with open(self.out / "log.txt", "a") as f:
            f.write(f"==== {kind} {json.dumps(args)[:300]} rc={r.returncode} {time.perf_counter() - t0:.1f} s\n")
            f.write(r.stdout[-6000:] + "\n" + r.stderr[-6000:] + "\n")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:600]}
        return json.loads(lines[-1])

    def save(self, name: str, doc: dict) -> None:
        doc = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "command": "python scripts/bench_gpu.py " + shlex.join(sys.argv[1:]), **doc}
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / name)


def stage_methods(run: Runner, work: Path, sample: str, only: list[str] | None = None,
                  per_method_s: float = PER_METHOD_S) -> None:
    lines = work / "methods.jsonl"
    res = run.child("methods", {"root": str(work / sample), "sample": sample, "device": DEVICE,
                                "lines": str(lines), "per_method_s": per_method_s, "only": only,
                                "jobs": not only}, 200)
    rows = [json.loads(ln) for ln in lines.read_text().splitlines()] if lines.is_file() else []
    name = "gpu-methods.json" if not only else "gpu-methods-rerun.json"
    run.save(name, {"title": f"Every method and job on {DEVICE} ({sample} sample)", "rows": rows, "end": res})


def cnn_name(n: int) -> str:
    label = "".join(f"-{v}" for v in (TAG, ISA) if v)
    return f"{'gpu' if DEVICE.startswith('cuda') else 'cpu'}{label}-cnn-{n}.json"


def stage_cnn(run: Runner, work: Path, n: int, lds_subsets: int, skip: tuple[str, ...] = (),
              lds_s: float | None = None) -> None:
    root = work / f"rgb32-{n}"
    where = f"{DEVICE} ({TAG})" if TAG else DEVICE
    where = f"{where} limited to {ISA.upper()} (emulated)" if ISA else where
    doc: dict = {"title": f"32×32 RGB CNN, {n:,} training images, on {where}", "n_train": n, "n_test": N_TEST, "runs": {}}
    doc["train"] = run.child("train", {"root": str(root), "n_train": n, "make": True, "device": DEVICE}, 240 * LIMIT_SCALE)
    run.save(cnn_name(n), doc)
    if "error" in doc["train"]:
        return
    k = 2048
    plan = [("proponent trak", {"tool": "proponent", "method": "trak"}, 150),
            # the default projects per layer (factorized) since TRAK v5; the dense one it replaced, same k
            ("proponent trak dense", {"tool": "proponent", "method": "trak", "settings": {"projection": "rademacher"}}, 150),
            ("traker trak", {"tool": "traker", "method": "trak", "proj_dim": k}, 150),
            ("proponent trak bf16", {"tool": "proponent", "method": "trak", "settings": {"grad_precision": "bfloat16"}}, 120),
            ("kronfluence ekfac", {"tool": "kronfluence", "method": "ekfac", "proj_dim": k}, 150),
            # kronfluence fits at the final checkpoint only; this is that computation (our default averages 5 points)
            ("proponent ekfac 1 point", {"tool": "proponent", "method": "ekfac", "settings": {"trajectory_points": 1}}, 120),
            ("proponent ekfac", {"tool": "proponent", "method": "ekfac"}, 150)]
    plan = [row for row in plan if row[0] not in skip]
    if DEVICE == "cpu":  # a CPU has no fast bfloat16: measured twice as slow (docs/bench/cpu-cnn-2000.json, 2026-12-04)
        plan = [row for row in plan if row[0] != "proponent trak bf16"]
    saved = {}
    for name, args, limit in plan:
        if lds_subsets and run.left() < 75:
            break  # keep a minute for the LDS of what ran
        f = work / f"scores-{n}-{name.replace(' ', '_')}.npy"
        r = run.child("attribute", {"root": str(root), "device": DEVICE, "save": str(f), **args}, limit * LIMIT_SCALE)
        doc["runs"][name] = r
        if "error" not in r:
            saved[name] = str(f)
        run.save(cnn_name(n), doc)
    if lds_subsets and saved:
        # --lds-s: the retraining's own budget (still within the run's); else what the stage budget leaves
        secs = max(20.0, min(lds_s if lds_s else 150.0 * LIMIT_SCALE, run.left() - 40))
        # the retrained margins are kept beside the scores: a later method version is scored without retraining
        doc["lds"] = run.child("lds", {"root": str(root), "subsets": lds_subsets, "seeds": 1, "scores": saved,
                                       "device": DEVICE, "seconds": secs,
                                       "save_margins": str(work / f"lds-margins-{n}.npy")}, secs + 30)
        run.save(cnn_name(n), doc)


def stage_oom(run: Runner, work: Path) -> None:
    root = work / "rgb32-5000"
    if not (root / "checkpoints").is_dir():
        run.child("train", {"root": str(root), "n_train": 5000, "make": True, "device": DEVICE}, 120)
    run.save("gpu-faults.json", {"title": "CUDA out of memory: back-off", "oom": run.child("oom", {"root": str(root)}, 120)})


def stage_topk(run: Runner, work: Path, sizes) -> None:
    doc: dict = {"title": "Top-10 of a new query on the GPU (TRAK features, exact)", "rows": []}
    for n in sizes:
        doc["rows"].append(run.child("topk", {"root": str(work / f"tab-{n}"), "n_train": n, "queries": 30,
                                              "device": DEVICE}, 200))
        run.save("gpu-topk.json", doc)


# ----------------------------------------------------------------------------- raw results → docs/bench tables
def _r(v, nd=1):
    return round(v, nd) if isinstance(v, float) else v


def render(dirs: list[Path]) -> dict[str, dict]:
    raw: dict[str, dict] = {}
    for d in dirs:  # later runs replace earlier ones, file by file (the methods rerun row by row)
        for f in sorted([*d.glob("gpu-*.json"), *d.glob("cpu-cnn-*.json"), *d.glob("cpu-*-cnn-*.json")]):
            raw[f.name] = json.loads(f.read_text())
    docs = {}
    head = {k: None for k in ("date", "machine", "command")}
    if "gpu-methods.json" in raw:
        src = raw["gpu-methods.json"]
        rows = {r["job"]: r for r in src["rows"]}
        rerun = raw.get("gpu-methods-rerun.json")
        for r in (rerun or {}).get("rows", []):
            rows[r["job"]] = {**r, "rerun": True}
        table = []
        for r in rows.values():
            detail = r.get("error") or ", ".join(f"{k} {_r(v, 3)}" for k, v in r.items() if k not in (
                "job", "ok", "seconds", "peak_gpu_mb", "shape", "where", "rerun", "evidence"))
            table.append([r["job"], bool(r.get("ok")), _r(r.get("seconds")), _r(r.get("peak_gpu_mb"), 0), detail])
        docs["gpu-methods.json"] = {
            **head, **{k: src[k] for k in head}, "title": "The GPU path: every method and job on CUDA (digits-CNN sample)",
            "tables": [{"title": "proponent's methods (default settings) and the app's jobs with device cuda",
                        "columns": ["method / job", "ran", "seconds", "peak GPU MB", "detail"], "rows": table,
                        "notes": [f"'{{m}} cuda vs cpu': the same run in a copy of the project on the CPU; top-10 "
                                  "overlap and max |Δ| / max |score|.",
                                  "a method still running after the per-method allowance is cancelled through the "
                                  "engine's own cancel and reported as such (not as a failure of the GPU path)."]
                        + ([f"rows marked by a rerun come from {rerun['command']}"] if rerun else [])}]}
    for name, src in raw.items():
        if not (name.startswith(("gpu-cnn-", "cpu-cnn-")) or (name.startswith("cpu-") and "-cnn-" in name)):
            continue
        runs, lds = src.get("runs", {}), (src.get("lds") or {}).get("lds", {})
        peer_of = {"proponent trak": "traker trak", "proponent trak bf16": "traker trak", "proponent trak dense": "traker trak",
                   "proponent ekfac": "kronfluence ekfac", "proponent ekfac 1 point": "kronfluence ekfac"}
        table = []
        for key, r in runs.items():
            if "error" in r:
                table.append([key, None, None, None, None, None, None, None, r["error"]])
                continue
            peer = runs.get(peer_of.get(key, ""), {})
            ratio = peer["seconds"] / r["seconds"] if peer.get("seconds") else None
            table.append([key, _r(r["seconds"]), _r(ratio, 2), _r(r.get("self_influence_s")), _r(r.get("peak_gpu_mb"), 0),
                          _r(r.get("peak_rss_mb"), 0), (r.get("rss_peak_stage") or "") if r.get("tool") == "proponent" else "",
                          _r(lds.get(key), 3), ""])
        tr = src.get("train", {})
        where = "the GPU" if name.startswith("gpu-") else "the CPU"
        notes = [f"{src['n_train']:,} training and {src['n_test']} test images, 32×32 RGB, 10 classes; CNN with BatchNorm, "
                 f"{tr.get('n_params', '?'):,} parameters, trained on {where}, test accuracy "
                 f"{_r(tr.get('test_accuracy'), 3)}, {tr.get('checkpoints')} checkpoints.",
                 "Each run is a fresh process: fit and scores of every test query, wall time; peak GPU memory from "
                 "torch.cuda.max_memory_allocated, peak RSS from /proc VmHWM where the run recorded it "
                 "(from 2026-12-05; getrusage's ru_maxrss before, which carries the parent's peak over exec).",
                 "traker 0.3.2 with its defaults at Proponent's k (2048) and the same 5 checkpoints (BasicProjector: "
                 "its fast_jl CUDA projector is not installed on the machines used); kronfluence 1.0.1 EK-FAC with its "
                 "defaults at the final checkpoint. 'peer s / this s' > 1: Proponent is faster.",
                 "'of which self-influence s': the part of Proponent's wall time spent on every training row's "
                 "self-influence and suspicion (what triage ranks; the peers compute neither), from runs that "
                 "recorded it (from 2026-12-06)."]
        if (src.get("lds") or {}).get("subsets"):
            L = src["lds"]
            notes.append(f"LDS against {L.get('subsets')} retrained random halves × {L.get('seeds')} seed (retrained on "
                         f"{where} in {_r(L.get('retrain_s'))} s); every test query.")
        docs[name] = {**{k: src[k] for k in head}, "title": src["title"],
                      "tables": [{"title": "TRAK against traker, EK-FAC against kronfluence, bfloat16 gradients",
                                  "columns": ["run", "wall s", "peer s / this s", "of which self-influence s",
                                              "peak GPU MB", "peak RSS MB",
                                              "RSS peaks in", "LDS", "error"], "rows": table, "notes": notes}]}
    if "gpu-topk.json" in raw:
        src = raw["gpu-topk.json"]
        table = [[r.get("n_train"), r.get("d"), r.get("resident"), _r(r.get("upload_s"), 2), _r(r.get("search_ms_median"), 2),
                  _r(r.get("query_path_ms_median"), 2), _r(r.get("streamed_scan_ms_median"), 1),
                  _r(r.get("recall10_vs_streamed_scan"), 3), r.get("error", "")] for r in src["rows"]]
        docs["gpu-topk.json"] = {**{k: src[k] for k in head}, "title": src["title"],
                                 "tables": [{"title": "one query at a time, median over the queries",
                                             "columns": ["training rows", "feature dim", "resident on GPU", "upload s",
                                                         "search ms", "gradient + projection + search ms",
                                                         "streamed scan ms", "top-10 = streamed exact scan", "error"],
                                             "rows": table,
                                             "notes": ["tabular project (20 features, MLP), TRAK on the final checkpoint "
                                                       "fitted on the GPU; exact search: one matmul and torch.topk on the "
                                                       "GPU over the resident training vectors."]}]}
    if "gpu-faults.json" in raw:
        src = raw["gpu-faults.json"]
        o = src.get("oom", {})
        rows = [[k, _r(v, 4) if isinstance(v, float) else v] for k, v in o.items()]
        docs["gpu-faults.json"] = {**{k: src[k] for k in head}, "title": "CUDA out of memory: batches back off",
                                   "tables": [{"title": "per-example gradients + projection of 4,096 images under a "
                                                        "capped allocator (torch.cuda.set_per_process_memory_fraction)",
                                               "columns": ["what", "value"], "rows": rows}]}
    return docs


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        out = CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(out, default=str), flush=True)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="where the gpu-*.json files go")
    ap.add_argument("--work", help="scratch folder (default: a fresh one under /tmp)")
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--stages", default=DEFAULT_STAGES)
    ap.add_argument("--lds-subsets", type=int, default=32)
    ap.add_argument("--lds-s", type=float, default=None,
                    help="seconds of retraining for the LDS (default 150 × --limit-scale), within --budget-s; "
                         "finished subsets are saved, and a rerun with the same --work resumes them")
    ap.add_argument("--skip", default="", help="cnn stages: runs to leave out, comma-separated names "
                                               "(e.g. 'proponent trak dense')")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU")
    ap.add_argument("--sample", default="digits-cnn", help="the sample the methods stage runs every method on")
    ap.add_argument("--topk-sizes", default="100000,1000000")
    ap.add_argument("--per-method-s", type=float, default=PER_METHOD_S)
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every per-run time limit (CPU runs)")
    ap.add_argument("--isa", choices=sorted(ISA_ENV), help="CPU runs: emulate a CPU with only this instruction set "
                                                           "(results in cpu-ISA-cnn-N.json)")
    ap.add_argument("--tag", default="", help="CPU runs: a name for this CPU in the file name (cpu-TAG-cnn-N.json)")
    ap.add_argument("--methods", help="the methods stage runs only these (and skips the jobs and CPU comparisons)")
    ap.add_argument("--note", action="append", default=[], help="FILE: TEXT, a note added to that rendered file")
    ap.add_argument("--render", help="comma-separated output folders of earlier runs (later ones win): their raw "
                                     "results as docs/bench/gpu-*.json tables")
    a = ap.parse_args()
    if a.render:
        for name, doc in render([Path(d) for d in a.render.split(",")]).items():
            for note in a.note:
                if note.split(":", 1)[0] == name:
                    doc.setdefault("notes", []).append(note.split(":", 1)[1].strip())
            (ROOT / "docs" / "bench" / name).write_text(json.dumps(doc, indent=1, default=str) + "\n")
            print(f"docs/bench/{name}")
        return 0
    global DEVICE, LIMIT_SCALE, ISA, TAG
    DEVICE, LIMIT_SCALE = a.device, a.limit_scale
    if a.tag and not a.tag.replace("-", "").isalnum():
        raise SystemExit(f"--tag {a.tag!r}: letters, digits and '-' only")
    TAG = a.tag
    if a.isa:
        if "torch" in sys.modules:
            raise SystemExit("--isa must be set before torch is imported")
        ISA = a.isa
        os.environ.update(ISA_ENV[a.isa])  # this process and every child
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or f"/tmp/proponent-gpu-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(out, a.budget_s)
    log(f"machine: {machine()}")
    for stage in a.stages.split(","):
        if run.left() < 20:
            log(f"stop: budget spent before {stage}")
            break
        log(f"stage {stage}")
        try:
            if stage == "methods":
                stage_methods(run, work, a.sample, a.methods.split(",") if a.methods else None, a.per_method_s)
            elif stage.startswith("cnn-"):
                n = int(stage.split("-")[1])
                stage_cnn(run, work, n, a.lds_subsets if n <= 5000 else 0,
                          tuple(v.strip() for v in a.skip.split(",") if v.strip()), a.lds_s)
            elif stage == "oom" and DEVICE != "cuda":
                log("oom: needs CUDA")
            elif stage == "oom":
                stage_oom(run, work)
            elif stage == "topk":
                stage_topk(run, work, [int(v) for v in a.topk_sizes.split(",")])
        except Exception:
            log(traceback.format_exc())
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
