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


__all__ = ["MARKER", "make_owned_dir", "is_owned", "remove_owned", "replace_owned_dir", "recover_interrupted_swap",
           "partial_path", "old_path"]
