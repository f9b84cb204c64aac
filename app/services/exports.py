"""Exports: flags as CSV/JSON and a cleaned copy of the dataset."""
from __future__ import annotations

import csv
import io
import json
import os
import re
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
from engine.core.tables import table_kind
from engine.storage.folders import (
    MARKER,
    is_owned,
    make_owned_dir,
    partial_path,
    replace_owned_dir,
)
from engine.storage.statedb import StateDB

FLAG_CSV_COLUMNS = ["split", "index", "item", "file", "label", "suggested", "score", "flag", "relabel", "note", "time"]


# a text cell starting with one of these opens as a formula in a spreadsheet (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def csv_safe(v):
    """A CSV cell that a spreadsheet shows as text, never runs: text starting with = + - @ tab or CR
    gets a leading single quote (OWASP). Numbers, and text that is just a number ("-1"), stay as they are."""
    if isinstance(v, str) and v.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(v):
        return "'" + v
    return v


def _write_csv(recs) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FLAG_CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in recs:
        w.writerow({k: csv_safe(v) for k, v in r.items()})
    return buf.getvalue()


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
    return _write_csv(sorted((_record(project, "train", str(int(i)), flags.get(str(int(i))), by_index)
                              for i in indices), key=_sort_key))


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def export_flags_json(project: Project, db: StateDB, suspects: pd.DataFrame | None = None) -> str:
    return json.dumps({"project": project.name, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "flags": flags_records(project, db, suspects)}, indent=1)


def export_flags_csv(project: Project, db: StateDB, suspects: pd.DataFrame | None = None) -> str:
    return _write_csv(flags_records(project, db, suspects))


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
    Checkpoints and state are not copied (retrain it). The training table keeps its format (CSV,
    JSON Lines, Parquet) and every value it had: kept rows are copied, not re-serialised. Symbolic
    links are never followed out of the project (see :func:`_copy_project`). An existing ``dest`` is
    replaced only if Proponent made it; a failure leaves no partial folder. Returns {"folder",
    "removed", "relabelled", "n_train", "skipped"} (skipped: "path: why" for each link or special
    file left out)."""
    flags = flag_state(db, "train")
    n = len(project.train_dataset)
    drop = sorted(i for i, r in flags.items() if r.get("flag") in ("mislabeled", "leak") and not r.get("relabel")
                  and isinstance(i, int) and 0 <= i < n)
    relabel = {i: r["relabel"] for i, r in flags.items() if r.get("relabel") and isinstance(i, int) and 0 <= i < n}
    dest = Path(dest) if dest else project.state_dir / "exports" / f"cleaned-{time.strftime('%Y%m%d-%H%M%S')}"
    if dest.exists() and not is_owned(dest):
        raise ProponentError("the folder exists and Proponent did not make it; choose a new folder", file=str(dest))
    root = Path(project.root)
    image_folder = project.data_source == "image_folder"
    try:  # not resolved: a table that is a link inside the project is replaced under its own name
        train_rel = Path(os.path.normpath(project.train_csv)).relative_to(os.path.normpath(root))
    except ValueError:
        raise ProponentError("the training data is outside the project folder; a cleaned copy holds only the "
                             "project's own files", file=str(project.train_csv)) from None
    staged = make_owned_dir(partial_path(dest))
    try:
        skip_top = {".proponent", project.checkpoint_dir.name, MARKER}
        if image_folder:
            skip_top.add(train_rel.parts[0])
        skipped = _copy_project(root, staged, skip_top)
        kept = [i for i in range(n) if i not in set(drop)]
        if image_folder:
            _write_image_folder(project, staged, kept, relabel)
        else:
            target = staged / train_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)  # the copy of the original table
            _write_cleaned_table(project.train_csv, target, n, set(drop), relabel, project.label_column)
        truth_file = staged / "truth.json"
        if truth_file.is_file():
            new_index = {old: new for new, old in enumerate(kept)}
            try:
                truth = json.loads(truth_file.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ProponentError(f"not valid JSON ({e}); its train_index entries cannot be renumbered for the "
                                     "cleaned rows: fix or move it", file=str(root / "truth.json")) from None
            truth_file.write_text(json.dumps(_remap_train_indices(truth, new_index), indent=1))
        replace_owned_dir(dest, staged)
    except BaseException as e:
        shutil.rmtree(staged, ignore_errors=True)  # never a half-written .partial copy left behind
        if isinstance(e, OSError):
            raise ProponentError(f"cannot write the cleaned copy: {e.strerror or e}",
                                 file=str(e.filename or dest)) from None
        raise
    return {"folder": str(dest), "removed": len(drop), "relabelled": len(relabel), "n_train": len(kept),
            "skipped": skipped}


def _copy_project(src: Path, dest: Path, skip_top: set[str]) -> list[str]:
    """Copy the project's files into ``dest`` without following a link out of it: a symlink that
    leads outside the project, into a folder the export leaves out, nowhere, or into a loop (a
    folder inside itself, ``ln -s . self``) is skipped, as is anything not a plain file or folder
    (a FIFO would block the copy). A link to a file or folder inside the project is copied as what
    it points to. Returns "relative path: why" for each thing skipped."""
    src = Path(src)
    real_root = src.resolve()
    left_out = [real_root / name for name in skip_top]
    skipped: list[str] = []

    def _inside(p: Path) -> bool:
        return p == real_root or real_root in p.parents

    def _walk(folder: Path, out: Path, rel: Path, open_dirs: frozenset) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path, rel_p = Path(entry.path), rel / entry.name
            if folder == src and entry.name in skip_top:
                continue
            target = path
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    skipped.append(f"{rel_p.as_posix()}: a broken or looping symlink")
                    continue
                if not _inside(target):
                    skipped.append(f"{rel_p.as_posix()}: a symlink to {target}, outside the project")
                    continue
                if any(target == t or t in target.parents for t in left_out):
                    skipped.append(f"{rel_p.as_posix()}: a symlink into a folder the export leaves out")
                    continue
            if target.is_dir():
                target = target.resolve()
                if target in open_dirs:  # a link back to a folder being copied: it would recurse for ever
                    skipped.append(f"{rel_p.as_posix()}: a symlink to a folder that holds it (a loop)")
                    continue
                (out / entry.name).mkdir()
                _walk(path, out / entry.name, rel_p, open_dirs | {target})
            elif target.is_file():
                shutil.copy2(target, out / entry.name)
            else:
                skipped.append(f"{rel_p.as_posix()}: not a regular file")

    _walk(src, Path(dest), Path(), frozenset({real_root}))
    return skipped


def _write_cleaned_table(src: Path, dest: Path, n: int, drop: set[int], relabel: dict, label_column: str) -> None:
    """The training table without the dropped rows and with the new labels, in ``src``'s format
    (by suffix, as the project reads it). CSV and JSON Lines are rewritten line by line, so every
    kept row is byte for byte the original (no float drift such as 0.64042 -> 0.6404200000000001)."""
    kind = table_kind(src)
    if kind == "parquet":
        _cleaned_parquet(src, dest, n, drop, relabel, label_column)
        return
    with open(src, newline="", encoding="utf-8-sig") as f:  # pandas reads UTF-8 and drops a BOM
        text = f.read()
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)  # with their endings; \r stays inside (csv handles it)
    out = _cleaned_csv_lines(lines, n, drop, relabel, label_column) if kind == "csv" else \
        _cleaned_jsonl_lines(lines, n, drop, relabel, label_column)
    if out is None:  # rows and lines did not pair up: re-read it as pandas does, every field kept as text
        if kind != "csv":
            raise ProponentError(f"the training table does not have one JSON object per line for each of its {n} "
                                 "rows; cannot write a cleaned copy", file=str(src))
        df = pd.read_csv(src, dtype=str, keep_default_na=False)
        if len(df) != n:
            raise ProponentError(f"the training table now has {len(df)} rows, not {n}; reopen the project",
                                 file=str(src))
        for i, new in relabel.items():
            df.iat[i, df.columns.get_loc(label_column)] = str(new)
        df.drop(index=sorted(drop)).to_csv(dest, index=False)
        return
    with open(dest, "w", newline="", encoding="utf-8") as f:
        f.writelines(out)


def _ending(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\n"


def _cleaned_csv_lines(lines: list[str], n: int, drop: set[int], relabel: dict, label_column: str):
    reader = csv.reader(lines)
    out, prev, header, i = [], 0, None, 0
    for rec in reader:
        span, prev = lines[prev:reader.line_num], reader.line_num  # a quoted field may span lines
        if header is None:
            header = rec
            if label_column not in header:
                return None
            col = header.index(label_column)
            out += span
            continue
        if not rec:  # a blank line: pandas skips it too
            continue
        if i not in drop:
            if i in relabel:
                rec[col] = str(relabel[i])
                buf = io.StringIO()
                csv.writer(buf, lineterminator=_ending(span[-1])).writerow(rec)
                out.append(buf.getvalue())
            else:
                out += span
        i += 1
    return out if i == n else None


def _cleaned_jsonl_lines(lines: list[str], n: int, drop: set[int], relabel: dict, label_column: str):
    out, i = [], 0
    for line in lines:
        if not line.strip():
            continue
        if i not in drop:
            if i in relabel:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return None
                old = obj.get(label_column)  # the new label keeps the old one's JSON type (3, not "3")
                obj[label_column] = (str(relabel[i]) if old is None
                                     else label_value(str(relabel[i]), np.asarray([old]).dtype))
                out.append(json.dumps(obj, ensure_ascii=False) + _ending(line))
            else:
                out.append(line if line.endswith("\n") else line + "\n")
        i += 1
    return out if i == n else None


def _cleaned_parquet(src: Path, dest: Path, n: int, drop: set[int], relabel: dict, label_column: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    if table.num_rows != n:
        raise ProponentError(f"the training table now has {table.num_rows} rows, not {n}; reopen the project",
                             file=str(src))
    if relabel:
        at = table.schema.get_field_index(label_column)
        field = table.schema.field(at)
        values = table.column(at).to_pylist()
        for i, new in relabel.items():
            values[i] = label_value(str(new), field.type.to_pandas_dtype()) if not pa.types.is_dictionary(field.type) \
                else str(new)
        try:
            col = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise ProponentError(f"a new label does not fit the label column {label_column!r} ({field.type}): {e}",
                                 file=str(src)) from None
        table = table.set_column(at, field, col)
    kept = [i for i in range(n) if i not in drop]
    pq.write_table(table.take(pa.array(kept, type=pa.int64())), dest)


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
    """A new label (stored as text) as a value of the label column's type. pandas' own dtypes (its
    string dtype, nullable integers) are asked through pandas: numpy cannot interpret them."""
    if pd.api.types.is_bool_dtype(dtype):
        return v
    if pd.api.types.is_integer_dtype(dtype):
        try:
            return int(v)
        except ValueError:
            return v
    if pd.api.types.is_float_dtype(dtype):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def zip_folder(folder: str | Path) -> bytes:
    """The folder as a zip. Symbolic links are left out, never followed (a link could lead out of the
    folder, or into a loop); export_cleaned's copies hold none."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if p.is_symlink() or not p.is_file() or p.name == MARKER:
                    continue
                zf.write(p, f"{folder.name}/{p.relative_to(folder).as_posix()}")
    return buf.getvalue()
