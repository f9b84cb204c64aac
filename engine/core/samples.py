"""Ready sample projects (`proponent prepare NAME`), made from data that packages ship.

A sample's definition lives in ``sample_projects/NAME/``: ``project.toml``, ``model.py`` and
``make_data.py`` (whose ``materialise(root)`` writes the data and an optional truth.json of
planted problems that no method reads). A sample whose model is trained outside Proponent (a
``[model] weights`` project, e.g. text) also defines ``train(root, progress=...)``, which writes
those weight files; the others are trained by ``proponent train``'s recorder.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.core.train import record_training
from engine.storage.folders import MARKER, make_owned_dir, remove_owned

SAMPLES_ROOT = Path(__file__).resolve().parents[2] / "sample_projects"


def available_samples() -> list[str]:
    if not SAMPLES_ROOT.is_dir():
        return []
    return sorted(p.name for p in SAMPLES_ROOT.iterdir() if (p / "make_data.py").is_file())


STAGING = ".proponent-prepare.partial"  # inside the destination, so its files move in by rename


def _staged_files(staging: Path) -> list[str]:
    """Relative POSIX paths of the files written into ``staging`` (its marker aside)."""
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.name != MARKER)


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and not a.is_symlink() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _install(staging: Path, dest: Path, *, force: bool) -> None:
    """Move the staged files into ``dest``. Without ``force`` any existing file that differs from
    the staged one is refused (one line naming it) before anything moves; with ``force`` only the
    files prepare writes are overwritten, and nothing else in ``dest`` is touched."""
    files = _staged_files(staging)
    for rel in files:
        target = dest / rel
        for parent in list(reversed(Path(rel).parents))[1:]:  # a file (or link) where a folder must be
            d = dest / parent
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                raise ProponentError(f"prepare writes {rel} here, but {parent.as_posix()} is not a folder; move it "
                                     "away or choose another --dir", file=str(d))
        if target.is_dir() and not target.is_symlink():
            raise ProponentError(f"prepare writes a file here, but this is a folder; move it away or choose another "
                                 "--dir", file=str(target))
        if not force and (target.exists() or target.is_symlink()) and not _same_bytes(target, staging / rel):
            raise ProponentError("already exists and is not the sample's file; move it away, or pass --force to "
                                 "overwrite the files prepare writes (nothing else is touched)", file=str(target))
    for rel in files:
        target = dest / rel
        if not force and _same_bytes(target, staging / rel):
            continue  # identical: left as it is
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target)


def prepare_sample(name: str, directory: str | Path | None = None, *, train: bool = True, models: int = 1,
                   progress=None, force: bool = False, seed: int | None = None) -> Path:
    """Write the sample ``name`` into ``directory`` (default: its own folder in sample_projects).

    Everything is written into a marked staging folder first and then moved in, file by file, so
    prepare knows every file it writes before it writes one: an existing file that differs is
    refused unless ``force``, and ``force`` overwrites those files only (a data folder may hold the
    user's other files). The checkpoint folder is replaced only through ``train``'s owned-folder rules.
    """
    src = SAMPLES_ROOT / name
    if not (src / "make_data.py").is_file():
        raise ProponentError(f"unknown sample {name!r} (available: {', '.join(available_samples())})")
    dest = Path(directory) if directory else src
    dest = dest.resolve()
    if dest.exists() and not dest.is_dir():
        raise ProponentError("is not a folder; choose another --dir", file=str(dest))
    spec = importlib.util.spec_from_file_location(f"_proponent_sample_{name.replace('-', '_')}", src / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    in_place = dest == src.resolve()
    # in place, the definition files are the destination's own; data already there is reused
    copy = [] if in_place else [f for f in sorted(src.iterdir()) if f.is_file() and f.suffix in (".toml", ".py", ".md")]
    materialise = force or not in_place or not (dest / "data").is_dir()
    if copy or materialise:
        made = not dest.exists()
        staging = make_owned_dir(dest / STAGING)
        try:
            for f in copy:
                shutil.copy2(f, staging / f.name)
            if materialise:
                mod.materialise(staging) if seed is None else mod.materialise(staging, seed=seed)
            _install(staging, dest, force=force)
        except BaseException:
            remove_owned(staging)
            if made and not any(dest.iterdir()):
                dest.rmdir()  # a folder this call created and left empty
            raise
        remove_owned(staging)
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
