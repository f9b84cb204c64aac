"""Paths a project names stay inside the project folder, unless the user opts out.

``[project] allow_outside_paths = true`` lets images, data files, the model factory, weights and
the checkpoint folder live elsewhere; without it, an absolute path or a ``..`` that leaves the
folder is a one-line error naming the key or the row.
"""
from __future__ import annotations

from pathlib import Path

from engine.core.errors import ValidationError

OPT_OUT = "set [project] allow_outside_paths = true to allow it"


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved, links followed) lies in ``root``."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def check_inside(path: Path, root: Path, *, allowed: bool, what: str, file: str | Path,
                 row: int | None = None) -> Path:
    """``path`` itself, or a :class:`ValidationError` when it leaves ``root`` and that is not allowed."""
    if not allowed and not is_inside(path, root):
        raise ValidationError(f"{what} {path} is outside the project folder {root}; {OPT_OUT}",
                              file=str(file), row=row)
    return path


__all__ = ["is_inside", "check_inside", "OPT_OUT"]
