"""One writer at a time per project: a file lock around whatever rewrites checkpoints/."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from engine.core.errors import ProponentError

LOCK_NAME = "writer.lock"


class ProjectBusy(ProponentError):
    """Another process is writing this project's checkpoints."""


@contextlib.contextmanager
def project_writer_lock(state_dir: Path, action: str):
    """Hold the project's writer lock for ``action``; a second writer gets a one-line "busy" error
    at once (no waiting), naming who holds it."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    owner = state_dir / (LOCK_NAME + ".owner")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        who = owner.read_text().strip() if owner.is_file() else "another process"
        raise ProjectBusy(f"project busy: {who} is writing it; try again when it has finished",
                             file=str(path)) from None
    try:
        owner.write_text(f"{action} (pid {os.getpid()}: {' '.join(sys.argv[:3])})\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


__all__ = ["project_writer_lock", "ProjectBusy", "LOCK_NAME"]
