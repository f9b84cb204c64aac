"""Opening projects and samples, summaries, predictions and the query table."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from app.services.runs import list_runs
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods import SIGN_CONVENTION

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
    from engine.core.samples import prepare_sample

    dest = Path(directory) if directory else sample_root() / name
    if (dest / "project.toml").is_file() and (dest / "checkpoints" / "trajectory.json").is_file():
        return dest
    return Path(prepare_sample(name, dest, train=True, models=1, progress=progress))


def class_counts(project: Project, split: str = "train") -> dict[str, int]:
    ds = project.train_dataset if split == "train" else project.test_dataset
    counts = np.bincount(ds.y.numpy(), minlength=project.num_classes)
    return {str(project.class_name(c)): int(n) for c, n in enumerate(counts)}


def project_summary(project: Project) -> dict:
    """Everything the Project page shows, as plain data."""
    from engine.core.train import accuracy

    s = project.summary()
    s["train_counts"] = class_counts(project, "train")
    s["test_counts"] = class_counts(project, "test")
    accs = []
    for ck in project.final_checkpoints():
        accs.append(accuracy(project.load_model(ck), project.test_dataset.x, project.test_dataset.y))
    s["test_accuracy"] = float(np.mean(accs)) if accs else None
    s["trajectory"] = [{"model": c.model_id, "checkpoint": c.index, "step": c.step, "epoch": c.epoch, "lr": c.lr,
                        "stage": c.stage} for c in project.checkpoints]
    s["runs"] = list_runs(project)
    return s


def predictions(project: Project, split: str = "test") -> dict:
    """The model's (model 0, final checkpoint) class probabilities, predictions and margins."""
    import torch

    from engine.autodiff.measurement import correct_class_margin
    from engine.core.train import predict_logits

    ds = project.test_dataset if split == "test" else project.train_dataset
    logits = predict_logits(project.load_model(), ds.x)
    probs = torch.softmax(logits, 1).numpy()
    y = ds.y.numpy()
    return {"probs": probs, "pred": probs.argmax(1), "label": y,
            "margin": correct_class_margin(logits, ds.y).numpy(), "confidence": probs.max(1)}


def query_table(project: Project, preds: dict, *, classes: Iterable | None = None, correctness: str = "all",
                conf_range: tuple[float, float] = (0.0, 1.0)):
    """Test queries filtered by true class, correct/wrong and confidence (a pandas DataFrame)."""
    import pandas as pd

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
    from engine.workflows.triage import load_truth

    return load_truth(project)
