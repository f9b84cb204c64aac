"""Exports: flags as CSV/JSON and a cleaned copy of the dataset."""
from __future__ import annotations

import csv
import io
import json
import shutil
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from app.services.flags import flag_state
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.storage.folders import (
    MARKER,
    is_owned,
    make_owned_dir,
    partial_path,
    replace_owned_dir,
)
from engine.storage.statedb import StateDB

FLAG_CSV_COLUMNS = ["split", "index", "item", "file", "label", "suggested", "score", "flag", "relabel", "note", "time"]


def _iso(ts) -> str | None:
    return None if ts is None else datetime.fromtimestamp(float(ts), timezone.utc).isoformat(timespec="seconds")


def _sort_key(rec: dict):
    # numeric order within a split ("10" after "9"); pairs "test:train" by both numbers
    nums = [int(p) for p in str(rec["item"]).split(":") if p.isdigit()]
    return rec["split"], nums, str(rec["item"])


def _record(project: Project, split: str, item: str, r: dict | None, by_index) -> dict:
    r = r or {}
    rec = {"split": split, "index": None, "item": item, "file": None, "label": None, "suggested": None,
           "score": None, "flag": r.get("flag"), "relabel": r.get("relabel"), "note": r.get("note"),
           "time": _iso(r.get("updated")), "updated": r.get("updated")}
    if split in ("train", "test") and item.isdigit():
        i = int(item)
        ds = project.train_dataset if split == "train" else project.test_dataset
        if i < len(ds):
            rec["index"] = i
            rec["label"] = str(project.class_name(int(ds.y[i])))
            f = project.example_file(split, i)
            rec["file"] = None if f is None else _relative(f, project.root)
            if split == "train" and by_index is not None and i in by_index.index:
                rec["suggested"] = str(by_index.at[i, "suggested"])
                rec["score"] = float(by_index.at[i, "suspicion"])
    return rec


def flags_records(project: Project, db: StateDB, suspects: pd.DataFrame | None = None) -> list[dict]:
    """Every flag with what a reviewer needs beside it: the row index, its file, the given label,
    and, when ``suspects`` (a triage table) is given, the suggested label and suspicion score.
    Sorted by split, then numerically by index. ``updated`` stays the epoch time for scripts."""
    by_index = suspects.set_index("index") if suspects is not None and len(suspects) else None
    return sorted((_record(project, r["split"], str(r["item"]), r, by_index) for r in db.flags().values()),
                  key=_sort_key)


def selection_csv(project: Project, db: StateDB, indices, suspects: pd.DataFrame | None = None) -> str:
    """The selected training examples (flagged or not), in the flags CSV's columns: what a grid or
    table selection exports."""
    by_index = suspects.set_index("index") if suspects is not None and len(suspects) else None
    flags = db.flags("train")
    recs = sorted((_record(project, "train", str(int(i)), flags.get(str(int(i))), by_index)
                   for i in indices), key=_sort_key)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FLAG_CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in recs:
        w.writerow(r)
    return buf.getvalue()


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def export_flags_json(project: Project, db: StateDB, suspects: pd.DataFrame | None = None) -> str:
    return json.dumps({"project": project.name, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "flags": flags_records(project, db, suspects)}, indent=1)


def export_flags_csv(project: Project, db: StateDB, suspects: pd.DataFrame | None = None) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FLAG_CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in flags_records(project, db, suspects):
        w.writerow(r)
    return buf.getvalue()


def _remap_train_indices(obj, new_index: dict[int, int]):
    """A copy of a truth.json-like object with every ``train_index`` renumbered for the cleaned
    rows; entries whose training row was removed are dropped."""
    if isinstance(obj, list):
        out = []
        for v in obj:
            if isinstance(v, dict) and "train_index" in v and int(v["train_index"]) not in new_index:
                continue
            out.append(_remap_train_indices(v, new_index))
        return out
    if isinstance(obj, dict):
        return {k: (new_index[int(v)] if k == "train_index" else _remap_train_indices(v, new_index))
                for k, v in obj.items()}
    return obj


def export_cleaned(project: Project, db: StateDB, dest: str | Path | None = None) -> dict:
    """A cleaned copy of the project: training rows flagged mislabeled or leak are dropped,
    relabelled rows carry their new label, and a truth.json is renumbered to the new rows.
    Checkpoints and state are not copied (retrain it). An existing ``dest`` is replaced only if
    Proponent made it. Returns {"folder", "removed", "relabelled", "n_train"}."""
    flags = flag_state(db, "train")
    n = len(project.train_dataset)
    drop = sorted(i for i, r in flags.items() if r.get("flag") in ("mislabeled", "leak") and not r.get("relabel")
                  and 0 <= i < n)
    relabel = {i: r["relabel"] for i, r in flags.items() if r.get("relabel") and 0 <= i < n}
    dest = Path(dest) if dest else project.state_dir / "exports" / f"cleaned-{time.strftime('%Y%m%d-%H%M%S')}"
    if dest.exists() and not is_owned(dest):
        raise ProponentError("the folder exists and Proponent did not make it; choose a new folder", file=str(dest))
    staged = make_owned_dir(partial_path(dest))
    skip_top = {".proponent", project.checkpoint_dir.name, MARKER}
    if project.data_format == "image_folder":
        skip_top.add(project.train_csv.relative_to(project.root).parts[0])
    shutil.copytree(project.root, staged, dirs_exist_ok=True,
                    ignore=lambda d, names: [m for m in names if Path(d) == project.root and m in skip_top])
    kept = [i for i in range(n) if i not in set(drop)]
    if project.data_format == "image_folder":
        _write_image_folder(project, staged, kept, relabel)
    else:
        df = project.train_df.copy()
        lc = project.label_column
        dtype = df[lc].dtype
        for i, new in relabel.items():
            df.at[i, lc] = label_value(new, dtype)
        df = df.drop(index=drop)
        df.to_csv(staged / project.train_csv.relative_to(project.root), index=False)
    truth_file = staged / "truth.json"
    if truth_file.is_file():
        new_index = {old: new for new, old in enumerate(kept)}
        truth_file.write_text(json.dumps(_remap_train_indices(json.loads(truth_file.read_text()), new_index), indent=1))
    replace_owned_dir(dest, staged)
    return {"folder": str(dest), "removed": len(drop), "relabelled": len(relabel), "n_train": len(kept)}


def _write_image_folder(project: Project, staged: Path, kept: list[int], relabel: dict) -> None:
    """The training tree again, without the dropped files and with relabelled files moved into
    their new class folder (so the cleaned copy's ImageFolder order is its own)."""
    train_rel = project.train_csv.relative_to(project.root)
    for i in kept:
        src = project.example_file("train", i)
        cls = relabel.get(i) or str(project.class_name(int(project.train_dataset.y[i])))
        target = staged / train_rel / str(cls) / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def label_value(v: str, dtype):
    if np.issubdtype(dtype, np.integer):
        try:
            return int(v)
        except ValueError:
            return v
    if np.issubdtype(dtype, np.floating):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def zip_folder(folder: str | Path) -> bytes:
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.name != MARKER:
                zf.write(p, f"{folder.name}/{p.relative_to(folder)}")
    return buf.getvalue()
