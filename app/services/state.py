"""The app's own state outside any project: a private folder ($PROPONENT_STATE_DIR, default
~/.local/state/proponent) holding uploads and the list of projects the user opened.

A project in a URL (``?project=…``) is reopened only if the user opened it before in the UI (or
it is the one ``proponent app PROJECT`` was started with): opening a project runs its model.py,
so a link alone must never make the app run code from an arbitrary folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.storage.arrays import atomic_write_json

RECENT_FILE = "recent-projects.json"
MAX_RECENT = 50


def app_state_dir() -> Path:
    base = os.environ.get("PROPONENT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"), "proponent")
    root = Path(base)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    return root


def recent_projects() -> list[str]:
    try:
        items = json.loads((app_state_dir() / RECENT_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [str(x) for x in items if isinstance(x, str)] if isinstance(items, list) else []


def remember_project(root: str | Path) -> None:
    root = str(Path(root).resolve())
    items = [root] + [x for x in recent_projects() if x != root]
    atomic_write_json(app_state_dir() / RECENT_FILE, items[:MAX_RECENT])


def trusted_project(root: str | Path | None) -> bool:
    """True if ``root`` may be reopened from a URL: opened before in the UI, or the project the app
    was started with."""
    if not root:
        return False
    r = str(Path(root).resolve())
    env = os.environ.get("PROPONENT_PROJECT")
    return r in recent_projects() or (env is not None and r == str(Path(env).resolve()))
