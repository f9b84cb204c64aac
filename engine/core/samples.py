"""Ready sample projects (`proponent prepare NAME`), made from data that packages ship.

A sample's definition lives in ``sample_projects/NAME/``: ``project.toml``, ``model.py`` and
``make_data.py`` (whose ``materialise(root)`` writes the data and an optional truth.json of
planted problems that no method reads). A sample whose model is trained outside Proponent (a
``[model] weights`` project, e.g. text) also defines ``train(root, progress=...)``, which writes
those weight files; the others are trained by ``proponent train``'s recorder.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import record_training

SAMPLES_ROOT = Path(__file__).resolve().parents[2] / "sample_projects"


def available_samples() -> list[str]:
    if not SAMPLES_ROOT.is_dir():
        return []
    return sorted(p.name for p in SAMPLES_ROOT.iterdir() if (p / "make_data.py").is_file())


def prepare_sample(name: str, directory: str | Path | None = None, *, train: bool = True, models: int = 1,
                   progress=None, force: bool = False, seed: int | None = None) -> Path:
    src = SAMPLES_ROOT / name
    if not (src / "make_data.py").is_file():
        raise ProponentError(f"unknown sample {name!r} (available: {', '.join(available_samples())})")
    dest = Path(directory) if directory else src
    dest = dest.resolve()
    if dest != src.resolve():
        if (dest / "project.toml").exists() and not force:
            raise ProponentError(f"{dest} already holds a project; pass --force to overwrite it")
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".toml", ".py", ".md"):
                shutil.copy2(f, dest / f.name)
    spec = importlib.util.spec_from_file_location(f"_proponent_sample_{name.replace('-', '_')}", dest / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if force or not (dest / "data").is_dir():
        if (dest / "data").is_dir():
            shutil.rmtree(dest / "data")
        mod.materialise(dest) if seed is None else mod.materialise(dest, seed=seed)
    if train and hasattr(mod, "train"):
        # the sample's own training loop writes its [model] weights (no trajectory, no recipe)
        p = Project.load(dest, check_model=False)
        if force or not p.checkpoints or not all(c.weights.is_file() for c in p.checkpoints):
            mod.train(dest, progress=progress)
    elif train:
        p = Project.load(dest)
        want = getattr(mod, "MODELS", models)
        if force or len(p.model_ids()) < want:
            record_training(p, models=max(models, want), progress=progress)
    return dest
