"""Exports: flags as CSV/JSON and a cleaned copy of the dataset."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from app.services.flags import flag_state
from engine.core.project import Project
from engine.storage.statedb import StateDB


def flags_records(project: Project, db: StateDB) -> list[dict]:
    recs = []
    for key, r in sorted(db.flags().items()):
        split, item = r["split"], r["item"]
        rec = {"split": split, "item": item, "flag": r["flag"], "relabel": r["relabel"], "note": r["note"],
               "updated": r["updated"], "label": None}
        if split in ("train", "test") and item.isdigit():
            ds = project.train_dataset if split == "train" else project.test_dataset
            if int(item) < len(ds):
                rec["label"] = str(project.class_name(int(ds.y[int(item)])))
        recs.append(rec)
    return recs


def export_flags_json(project: Project, db: StateDB) -> str:
    return json.dumps({"project": project.name, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "flags": flags_records(project, db)}, indent=1)


def export_flags_csv(project: Project, db: StateDB) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["split", "item", "label", "flag", "relabel", "note", "updated"])
    w.writeheader()
    for r in flags_records(project, db):
        w.writerow(r)
    return buf.getvalue()


def export_cleaned(project: Project, db: StateDB, dest: str | Path | None = None) -> dict:
    """A cleaned copy of the project: training rows flagged mislabeled or leak are dropped,
    relabelled rows carry their new label. Checkpoints and state are not copied (retrain it).
    Returns {"folder", "removed", "relabelled", "n_train"}."""
    flags = flag_state(db, "train")
    drop = sorted(i for i, r in flags.items() if r.get("flag") in ("mislabeled", "leak") and not r.get("relabel"))
    relabel = {i: r["relabel"] for i, r in flags.items() if r.get("relabel")}
    dest = Path(dest) if dest else project.state_dir / "exports" / f"cleaned-{time.strftime('%Y%m%d-%H%M%S')}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ignore_dirs = {".proponent", project.checkpoint_dir.name}
    shutil.copytree(project.root, tmp, ignore=lambda d, names: [n for n in names if Path(d) == project.root and n in ignore_dirs])
    df = project.train_df.copy()
    lc = project.label_column
    dtype = df[lc].dtype
    for i, new in relabel.items():
        if 0 <= i < len(df):
            df.at[i, lc] = label_value(new, dtype)
    df = df.drop(index=[i for i in drop if 0 <= i < len(df)])
    rel = project.train_csv.relative_to(project.root)
    df.to_csv(tmp / rel, index=False)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return {"folder": str(dest), "removed": len(drop), "relabelled": len(relabel), "n_train": int(len(df))}


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
            if p.is_file():
                zf.write(p, f"{folder.name}/{p.relative_to(folder)}")
    return buf.getvalue()
