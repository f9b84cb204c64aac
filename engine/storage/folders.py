"""Folders Proponent creates and may later replace or remove, and only those.

A folder Proponent makes to swap in (a trajectory, an imported checkpoint set) carries a marker
file. Replacing or deleting a folder requires the marker (or, for trajectories recorded before
markers existed, a folder holding nothing but what ``proponent train`` writes). Anything else
is refused with a one-line error naming the path, so a misconfigured path can never delete a
user's data.

A swap is two renames: ``final → final.old`` then ``final.partial → final``. A process killed
between them leaves only ``final.old``; :func:`recover_interrupted_swap` puts it back.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from engine.core.errors import ValidationError

MARKER = ".proponent-owned"
# what `proponent train` wrote before folders carried a marker
_RECORDED = re.compile(r"^(trajectory\.json|stage_[^/]+_rows\.json|model_\d+/step_\d+(\.optim)?\.safetensors|"
                       r"imported/.*)$")
# everything ``proponent train`` (and ``proponent import`` beside it) writes into a checkpoint folder,
# marker included: a marked folder holding anything else holds a user's file and is not replaced
TRAINED_FILES = re.compile(r"^(\.proponent-owned|trajectory\.json|stage_[^/]+_rows\.json|"
                           r"model_\d+/step_\d+(\.optim)?\.safetensors|"
                           r"imported(\.partial|\.old)?/(\.proponent-owned|model_\d+/step_\d+\.safetensors))$")
TRAINED_DIRS = re.compile(r"^(model_\d+|imported(\.partial|\.old)?(/model_\d+)?)$")
# an atomic write's temporary file (engine.storage.arrays.temp_path_for), left behind by a kill
_TEMP = re.compile(r"^\..+\.\d+\.[^.]+\.tmp$")


def make_owned_dir(path: Path) -> Path:
    """A fresh, marked folder at ``path`` (a stale one of ours is cleared first)."""
    path = Path(path)
    if path.exists():
        remove_owned(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by Proponent; it may replace or remove this folder\n")
    return path


def is_owned(path: Path) -> bool:
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / MARKER).is_file():
        return True
    files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()]
    return bool(files) and "trajectory.json" in files and all(_RECORDED.match(f) for f in files)


def foreign_entry(path: Path, files: re.Pattern = TRAINED_FILES, dirs: re.Pattern = TRAINED_DIRS) -> Path | None:
    """The first thing inside ``path`` that Proponent does not write there (``files`` and ``dirs``
    match relative POSIX paths; an atomic write's leftover temporary file is Proponent's), or None."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_dir() and not p.is_symlink():
            ok = dirs.match(rel)
        else:
            ok = files.match(rel) or (_TEMP.match(p.name) and not p.is_symlink())
        if not ok:
            return p
    return None


def require_only_ours(path: Path, files: re.Pattern = TRAINED_FILES, dirs: re.Pattern = TRAINED_DIRS) -> None:
    """A one-line refusal naming the first file in ``path`` that Proponent did not write: replacing or
    removing the folder would lose it (the marker says who made the folder, not who filled it)."""
    bad = foreign_entry(path, files, dirs)
    if bad is not None:
        raise ValidationError(f"Proponent did not write this, and replacing {Path(path).name}/ would delete it; "
                              "move it out of the folder and run again", file=str(bad))


def remove_owned(path: Path) -> None:
    """Delete ``path`` if Proponent made it; otherwise a one-line refusal."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not is_owned(path):
        raise ValidationError("refusing to delete a folder Proponent did not create (no "
                              f"{MARKER} marker); move it away or choose another [model] checkpoints folder",
                              file=str(path))
    shutil.rmtree(path)


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def old_path(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def replace_owned_dir(final: Path, staged: Path) -> None:
    """Swap the complete folder ``staged`` in at ``final``. An existing ``final`` must be Proponent's."""
    final, staged = Path(final), Path(staged)
    old = old_path(final)
    if final.exists() and not is_owned(final):
        raise ValidationError("refusing to replace a folder Proponent did not create (no "
                              f"{MARKER} marker); move it away or choose another folder", file=str(final))
    remove_owned(old)
    if final.exists():
        os.replace(final, old)
    _between_renames()
    os.replace(staged, final)
    remove_owned(old)


def _between_renames() -> None:
    """A seam for the crash test: a kill here leaves only ``final.old``."""


def recover_interrupted_swap(final: Path) -> bool:
    """After a kill between the two renames: put the previous folder back. True if it did."""
    final = Path(final)
    old = old_path(final)
    if not final.exists() and is_owned(old):
        os.replace(old, final)
        return True
    return False


__all__ = ["MARKER", "TRAINED_FILES", "TRAINED_DIRS", "make_owned_dir", "is_owned", "foreign_entry", "require_only_ours",
           "remove_owned", "replace_owned_dir", "recover_interrupted_swap", "partial_path", "old_path"]
