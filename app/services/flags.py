"""Flags, relabels and notes in the project's state database, from clicks, selections and table edits."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.storage.statedb import FLAG_VALUES, StateDB
from engine.workflows.flag_rows import follow_data, gone_flags, identity_for


# a click waits this long for another process's write (a job recording its progress holds the lock for
# milliseconds); past it the page says the change was not saved, instead of hanging for 30 s
APP_BUSY_TIMEOUT_S = 5.0


def db_for(project: Project | str | Path) -> StateDB:
    """The project's state database. Given a loaded Project, flags are stamped with the example they are
    set on, and flags set on other data are first moved to where their examples are now
    (:mod:`engine.workflows.flag_rows`), so a flag never lands on another row."""
    if not isinstance(project, Project):
        return StateDB(Path(project) / ".proponent" / "state.db", busy_timeout=APP_BUSY_TIMEOUT_S)
    db = StateDB(project.state_dir / "state.db", identity=identity_for(project), busy_timeout=APP_BUSY_TIMEOUT_S)
    follow_data(db, project)
    return db


def missing_flags(db: StateDB) -> dict[str, dict]:
    """Flags whose examples are no longer in the data (kept; they return with their examples)."""
    return gone_flags(db)


def flag_state(db: StateDB, split: str = "train") -> dict[int | str, dict]:
    out = {}
    for item, row in db.flags(split).items():
        key: int | str = int(item) if split != "pair" and item.lstrip("-").isdigit() else item
        out[key] = row
    return out


def toggle_flag(db: StateDB, split: str, index: int | str, flag: str = "mislabeled", source: str = "app") -> str | None:
    """One-click flag: set ``flag`` if the item does not carry it, clear it if it does. Returns the new flag.
    Read and write are one transaction (StateDB.toggle_flag), so two clicks at once are never lost."""
    return db.toggle_flag(split, index, flag, source=source)


def bulk_update(db: StateDB, split: str, indices: Iterable, *, flag: str | None = ..., relabel: Any = ...,
                note: str | None = ..., source: str = "app") -> int:
    """Apply one action to many items (each change goes to the audit trail). Returns the count."""
    if flag not in (..., None) and flag not in FLAG_VALUES:
        raise ProponentError(f"flag must be one of {', '.join(FLAG_VALUES)}, not {flag!r}")
    items = [int(i) if split != "pair" else i for i in indices]
    db.set_flags(split, items, flag=flag, relabel=relabel, note=note, source=source)
    return len(items)


def selection_indices(event: Any) -> list[int]:
    """Example indices from a plotly selection event (lasso/box) whose points carry the index as
    the first ``customdata`` entry. Accepts the Streamlit event object or its dict form."""
    if event is None:
        return []
    sel = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    if sel is None:
        return []
    points = sel.get("points", []) if isinstance(sel, dict) else getattr(sel, "points", [])
    out: list[int] = []
    seen = set()
    for p in points or []:
        cd = p.get("customdata") if isinstance(p, dict) else getattr(p, "customdata", None)
        if cd is None:
            continue
        v = cd[0] if isinstance(cd, (list, tuple)) else cd
        try:
            i = int(v)
        except (TypeError, ValueError):
            continue
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


EDITABLE = ("flag", "relabel", "note")


def apply_table_edits(db: StateDB, before, after, split: str = "train", index_col: str = "index",
                      source: str = "app-table") -> int:
    """Write the cells a user changed in a data_editor (flag / relabel / note columns) to SQLite.
    ``before`` and ``after`` are DataFrames with the same rows. Returns the number of items changed."""
    changed = 0
    b = before.set_index(index_col)
    a = after.set_index(index_col)
    for idx in a.index:
        kw = {}
        for col in EDITABLE:
            if col not in a.columns:
                continue
            old, new = cell_value(b.at[idx, col]) if idx in b.index else None, cell_value(a.at[idx, col])
            if old != new:
                kw[col] = new
        if kw:
            if "flag" in kw and kw["flag"] is not None and kw["flag"] not in FLAG_VALUES:
                raise ProponentError(f"row {idx}: flag must be one of {', '.join(FLAG_VALUES)}, not {kw['flag']!r}")
            db.set_flag(split, idx, source=source, **kw)
            changed += 1
    return changed


def cell_value(v):
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    s = str(v)
    return None if s in ("", "None", "nan", "<NA>") else s
