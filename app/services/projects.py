"""Opening projects and samples, summaries, predictions and the query table."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from app.services.runs import list_runs
from engine.autodiff.measurement import correct_class_margin
from engine.core.checkpoints import WEIGHT_SUFFIXES, fit_state, read_state_dict
from engine.core.errors import ProponentError
from engine.core.init_project import init_project, inspect_folder
from engine.core.project import Project
from engine.core.samples import prepare_sample
from engine.core.train import predict_logits
from engine.methods import SIGN_CONVENTION
from engine.storage.arrays import atomic_write_text
from engine.storage.cache import cache_entries
from engine.workflows.triage import load_truth

REPO = Path(__file__).resolve().parents[2]


SIGN_HELP = SIGN_CONVENTION


def open_project(path: str | os.PathLike) -> Project:
    """Load and validate a project folder; a bad folder raises ProponentError naming file and row."""
    if not str(path).strip():
        raise ProponentError("no project folder given")
    return Project.load(path)


def project_from_env() -> str | None:
    v = os.environ.get("PROPONENT_PROJECT")
    return v or None


def sample_root() -> Path:
    return REPO / "sample_projects"


def open_sample(name: str = "digits", directory: str | Path | None = None, progress=None) -> Path:
    """The sample project folder, prepared (data + trained checkpoints) if it is not there yet."""
    dest = Path(directory) if directory else sample_root() / name
    trained = (dest / "checkpoints" / "trajectory.json").is_file() or (dest / "weights").is_dir()  # text: [model] weights
    if (dest / "project.toml").is_file() and trained:
        return dest
    return Path(prepare_sample(name, dest, train=True, models=1, progress=progress))


def class_counts(project: Project, split: str = "train") -> dict[str, int]:
    ds = project.train_dataset if split == "train" else project.test_dataset
    counts = np.bincount(ds.y.numpy(), minlength=project.num_classes)
    return {str(project.class_name(c)): int(n) for c, n in enumerate(counts)}


def project_summary(project: Project) -> dict:
    """Everything the Project page shows, as plain data."""
    s = project.summary()
    s["train_counts"] = class_counts(project, "train")
    s["test_counts"] = class_counts(project, "test")
    # train/test accuracy of each final model, with a warning when test accuracy is near chance
    rep = project.accuracy_report()
    s["accuracy"] = rep["models"]
    s["warnings"] = [w for w in [rep["warning"], *project.data_warnings] if w]
    s["test_accuracy"] = float(np.mean([r["test"] for r in rep["models"]])) if rep["models"] else None
    s["trajectory"] = [{"model": c.model_id, "checkpoint": c.index, "step": c.step, "epoch": c.epoch, "lr": c.lr,
                        "stage": c.stage} for c in project.checkpoints]
    s["runs"] = list_runs(project)
    return s


def predictions(project: Project, split: str = "test") -> dict:
    """The model's (model 0, final checkpoint) class probabilities, predictions and margins."""
    ds = project.test_dataset if split == "test" else project.train_dataset
    logits = predict_logits(project.load_model(), ds.x)
    probs = torch.softmax(logits, 1).numpy()
    y = ds.y.numpy()
    return {"probs": probs, "pred": probs.argmax(1), "label": y,
            "margin": correct_class_margin(logits, ds.y).numpy(), "confidence": probs.max(1)}


def query_table(project: Project, preds: dict, *, classes: Iterable | None = None, correctness: str = "all",
                conf_range: tuple[float, float] = (0.0, 1.0)):
    """Test queries filtered by true class, correct/wrong and confidence (a pandas DataFrame)."""
    y, pred, conf = preds["label"], preds["pred"], preds["confidence"]
    df = pd.DataFrame({"test_index": np.arange(len(y)),
                       "label": [str(project.class_name(c)) for c in y],
                       "prediction": [str(project.class_name(c)) for c in pred],
                       "correct": y == pred, "confidence": conf, "margin": preds["margin"]})
    if classes:
        df = df[df["label"].isin([str(c) for c in classes])]
    if correctness == "correct":
        df = df[df["correct"]]
    elif correctness == "wrong":
        df = df[~df["correct"]]
    df = df[(df["confidence"] >= conf_range[0]) & (df["confidence"] <= conf_range[1])]
    return df.reset_index(drop=True)


def truth(project: Project) -> dict | None:
    return load_truth(project)


# ----------------------------------------------------------------------------- new projects and weights
def cache_summary(project: Project) -> dict:
    """Size and entry count of the project's recomputable cache (``proponent cache`` prunes it)."""
    entries = cache_entries(project.root)
    return {"mb": sum(e.bytes for e in entries) / 2**20, "entries": len(entries),
            "runs": sum(e.kind == "runs" for e in entries)}


def inspect_new_folder(path: str | os.PathLike) -> dict:
    """What `proponent init` would write for a data folder: {"data", "weights", "notes", "num_classes"}."""
    if not str(path).strip():
        raise ProponentError("no folder given")
    return inspect_folder(path)


def create_project(path: str | os.PathLike, *, force: bool = False) -> dict:
    """`proponent init` from the app: writes project.toml and model.py; returns the report lines."""
    res = init_project(path, force=force)
    return {"root": str(res.root), "report": res.report, "guessed": res.guessed}


def add_weights_file(root: str | os.PathLike, filename: str, data: bytes) -> str:
    """Save uploaded weights as ``weights/<name>`` and list them in ``[model] weights``.

    The file is read (safetensors, or a tensors-only .pt state dict) and fitted to model.py before
    anything is kept; project.toml is rewritten atomically and restored if the project then fails
    to load. Returns the path written, relative to the project."""
    root = Path(root).resolve()
    name = Path(filename).name
    if Path(name).suffix not in WEIGHT_SUFFIXES or name.startswith("."):
        raise ProponentError(f"weights must be a {', '.join(WEIGHT_SUFFIXES)} file", file=name or None)
    project = Project.load(root, check_model=False)
    folder = root / "weights"
    folder.mkdir(exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.partial{Path(name).suffix}"  # keeps the suffix, which picks the reader
    tmp.write_bytes(data)
    try:
        fit_state(project.build_model(), read_state_dict(tmp), final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rel = final.relative_to(root).as_posix()
    toml_path = root / "project.toml"
    old = toml_path.read_text()
    listed = tomllib.loads(old).get("model", {}).get("weights", [])
    listed = [listed] if isinstance(listed, str) else list(listed)
    os.replace(tmp, final)
    if rel in listed:
        return rel
    lines = old.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "[model]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    new_line = "weights = [" + ", ".join(f'"{w}"' for w in listed + [rel]) + "]"
    at = next((i for i in range(start + 1, end) if lines[i].split("=")[0].strip() == "weights"), None)
    if at is not None and "]" in lines[at]:
        lines[at] = new_line
    elif at is None:
        lines.insert(start + 1, new_line)
    else:
        raise ProponentError("[model] weights spans several lines; add the uploaded file by hand", file=str(toml_path))
    atomic_write_text(toml_path, "\n".join(lines) + "\n")
    try:
        Project.load(root)
    except ProponentError:
        atomic_write_text(toml_path, old)  # leave the project as it was
        raise
    return rel
