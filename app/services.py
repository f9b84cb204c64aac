"""The app's service layer: plain functions over the engine (no Streamlit import here).

Pages stay thin and call these; tests call them directly, including the selection and
table-editing logic that AppTest cannot click.
"""
from __future__ import annotations

import base64
import csv
import importlib
import importlib.util
import io
import json
import os
import shutil
import stat
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from engine.errors import ProponentError
from engine.methods import SIGN_CONVENTION, describe_settings, get_method, list_methods
from engine.project import Project
from engine.store import FLAG_VALUES, StateDB, atomic_save_npy, atomic_write_bytes, load_npy, stable_hash

REPO = Path(__file__).resolve().parents[1]
MAX_UPLOAD_BYTES = 200 * 2**20          # uncompressed size limit of an uploaded project archive
MAX_UPLOAD_FILES = 200_000
SIGN_HELP = SIGN_CONVENTION


# ------------------------------------------------------------------------------- projects
def open_project(path: str | os.PathLike) -> Project:
    """Load and validate a project folder; a bad folder raises ProponentError naming file and row."""
    if not str(path).strip():
        raise ProponentError("no project folder given")
    return Project.load(path)


def project_from_env() -> str | None:
    v = os.environ.get("PROPONENT_PROJECT")
    return v or None


def sample_root() -> Path:
    return REPO / "sample_projects"


def open_sample(name: str = "digits", directory: str | Path | None = None, progress=None) -> Path:
    """The sample project folder, prepared (data + trained checkpoints) if it is not there yet."""
    from engine.samples import prepare_sample

    dest = Path(directory) if directory else sample_root() / name
    if (dest / "project.toml").is_file() and (dest / "checkpoints" / "trajectory.json").is_file():
        return dest
    return Path(prepare_sample(name, dest, train=True, models=1, progress=progress))


def extract_upload(data: bytes, dest_root: str | Path, *, max_bytes: int = MAX_UPLOAD_BYTES,
                   max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Unpack an uploaded project zip into a fresh folder under ``dest_root``; return the folder
    holding project.toml. Rejects path traversal, absolute paths, links, oversize archives."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ProponentError("the upload is not a zip archive") from None
    infos = zf.infolist()
    if len(infos) > max_files:
        raise ProponentError(f"archive has {len(infos)} entries; the limit is {max_files}")
    total = 0
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
            raise ProponentError(f"archive entry {name!r} points outside the project folder (path traversal)")
        mode = (info.external_attr >> 16) & 0o170000
        if mode == stat.S_IFLNK:
            raise ProponentError(f"archive entry {name!r} is a symbolic link; links are not accepted")
        total += info.file_size
        if total > max_bytes:
            raise ProponentError(f"archive unpacks to more than {max_bytes // 2**20} MiB; the limit is {max_bytes // 2**20} MiB")
    tomls = sorted((PurePosixPath(i.filename) for i in infos if PurePosixPath(i.filename).name == "project.toml"),
                   key=lambda p: len(p.parts))
    if not tomls:
        raise ProponentError("archive has no project.toml")
    dest = Path(dest_root) / f"upload-{stable_hash(base64.b64encode(data[:1 << 20]).decode() + str(len(data)), 12)}"
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for info in infos:
            target = (tmp / info.filename).resolve()
            if not str(target).startswith(str(tmp.resolve()) + os.sep) and target != tmp.resolve():
                raise ProponentError(f"archive entry {info.filename!r} points outside the project folder (path traversal)")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / tomls[0].parent


def class_counts(project: Project, split: str = "train") -> dict[str, int]:
    ds = project.train_dataset if split == "train" else project.test_dataset
    counts = np.bincount(ds.y.numpy(), minlength=project.num_classes)
    return {str(project.class_name(c)): int(n) for c, n in enumerate(counts)}


def project_summary(project: Project) -> dict:
    """Everything the Project page shows, as plain data."""
    from engine.train import accuracy

    s = project.summary()
    s["train_counts"] = class_counts(project, "train")
    s["test_counts"] = class_counts(project, "test")
    accs = []
    for ck in project.final_checkpoints():
        accs.append(accuracy(project.load_model(ck), project.test_dataset.x, project.test_dataset.y))
    s["test_accuracy"] = float(np.mean(accs)) if accs else None
    s["trajectory"] = [{"model": c.model_id, "checkpoint": c.index, "step": c.step, "epoch": c.epoch, "lr": c.lr,
                        "stage": c.stage} for c in project.checkpoints]
    s["runs"] = list_runs(project)
    return s


def list_runs(project: Project) -> list[dict]:
    out = []
    for r in db_for(project).list_runs():
        out.append({"key": r["key"], "method": r["method"], "status": r["status"],
                    "settings": r.get("settings") or {}, "device": r.get("device"),
                    "fit_s": r.get("fit_seconds"), "score_s": r.get("score_seconds"), "peak_mb": r.get("peak_mb"),
                    "created": r.get("created"), "message": r.get("message")})
    return out


def done_runs(project: Project) -> list[dict]:
    """Finished runs whose score files exist, newest first."""
    from engine.api import run_dir

    out = []
    for r in list_runs(project):
        if r["status"] == "done" and (run_dir(project, r["key"]) / "scores.npy").is_file():
            out.append(r)
    return out


def run_label(run: dict) -> str:
    cost = (run.get("fit_s") or 0) + (run.get("score_s") or 0)
    return f"{run['method']} · {run['key'][-6:]} · {cost:.1f}s"


def load_run(project: Project, key: str) -> dict:
    """A finished run's arrays: scores [n_test, n_train], self_scores and suspicion [n_train]."""
    from engine.api import run_dir

    folder = run_dir(project, key)
    if not (folder / "scores.npy").is_file():
        raise ProponentError(f"run {key} has no scores on disk", file=str(folder))
    out = {"key": key}
    for n in ("scores", "self_scores", "suspicion"):
        f = folder / f"{n}.npy"
        out[n] = np.asarray(load_npy(f, mmap=False)) if f.is_file() else None
    return out


# ------------------------------------------------------------------------------- methods
def methods_info(project: Project | None = None) -> list[dict]:
    out = []
    for cls in list_methods():
        out.append({"name": cls.name, "label": cls.label or cls.name, "description": cls.description,
                    "settings": describe_settings(cls), "extension": bool(getattr(cls, "extension", False)),
                    "unsupported": (cls.supports(project) if project is not None else None)})
    return out


def coerce_ui_settings(method: str, values: dict) -> dict:
    """Keep only the settings that differ from the defaults (so the run key is the CLI's)."""
    from engine.methods import coerce_settings, settings_dict

    cls = get_method(method)
    s = settings_dict(coerce_settings(cls, values))
    defaults = {d["name"]: d["default"] for d in describe_settings(cls)}
    return {k: v for k, v in s.items() if v != defaults.get(k)}


def run_key_for(project: Project, method: str, settings: dict) -> str:
    from engine.api import run_key
    from engine.methods import coerce_settings

    return run_key(project, method, coerce_settings(get_method(method), settings))


# ------------------------------------------------------------------------------- predictions
def predictions(project: Project, split: str = "test") -> dict:
    """The model's (model 0, final checkpoint) class probabilities, predictions and margins."""
    import torch

    from engine.grads.measurement import correct_class_margin
    from engine.train import predict_logits

    ds = project.test_dataset if split == "test" else project.train_dataset
    logits = predict_logits(project.load_model(), ds.x)
    probs = torch.softmax(logits, 1).numpy()
    y = ds.y.numpy()
    return {"probs": probs, "pred": probs.argmax(1), "label": y,
            "margin": correct_class_margin(logits, ds.y).numpy(), "confidence": probs.max(1)}


def query_table(project: Project, preds: dict, *, classes: Iterable | None = None, correctness: str = "all",
                conf_range: tuple[float, float] = (0.0, 1.0)):
    """Test queries filtered by true class, correct/wrong and confidence (a pandas DataFrame)."""
    import pandas as pd

    y, pred, conf = preds["label"], preds["pred"], preds["confidence"]
    df = pd.DataFrame({"test_index": np.arange(len(y)),
                       "label": [str(project.class_name(c)) for c in y],
                       "prediction": [str(project.class_name(c)) for c in pred],
                       "correct": y == pred, "confidence": conf, "margin": preds["margin"]})
    if classes:
        df = df[df["label"].isin([str(c) for c in classes])]
    if correctness == "correct":
        df = df[df["correct"]]
    elif correctness == "wrong":
        df = df[~df["correct"]]
    df = df[(df["confidence"] >= conf_range[0]) & (df["confidence"] <= conf_range[1])]
    return df.reset_index(drop=True)


def topk(scores_row: np.ndarray, k: int) -> dict:
    row = np.asarray(scores_row, dtype=np.float64)
    k = min(k, len(row))
    top = np.argsort(-row, kind="stable")[:k]
    bot = np.argsort(row, kind="stable")[:k]
    return {"proponents": top, "proponent_scores": row[top], "opponents": bot, "opponent_scores": row[bot]}


def compare_rows(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """Agreement of two methods on one query: top-k proponent overlap and Spearman rank correlation."""
    from scipy.stats import spearmanr

    ta, tb = set(topk(a, k)["proponents"].tolist()), set(topk(b, k)["proponents"].tolist())
    rho = spearmanr(np.asarray(a), np.asarray(b)).statistic
    return {"overlap": len(ta & tb) / max(1, k), "overlap_count": len(ta & tb), "spearman": float(rho)}


# ------------------------------------------------------------------------------- images
def example_array(project: Project, split: str, index: int) -> np.ndarray:
    ds = project.train_dataset if split == "train" else project.test_dataset
    return ds.x[int(index)].numpy()


def image_png(project: Project, split: str, index: int, size: int = 112) -> bytes | None:
    """A crisp PNG of an image example, upscaled with nearest-neighbour; None for tabular data."""
    if project.data_format != "images":
        return None
    return array_png(example_array(project, split, index), size)


def array_png(arr: np.ndarray, size: int = 112) -> bytes:
    from PIL import Image

    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:  # normalised inputs: stretch back to 0..1 for display
        a = (a - lo) / max(1e-12, hi - lo)
    img = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    h, w = a.shape[:2]
    scale = max(1, int(round(size / max(h, w))))
    img = img.resize((w * scale, h * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def example_row(project: Project, split: str, index: int) -> dict:
    """A tabular example's raw values (for row cards)."""
    df = project.train_df if split == "train" else project.test_df
    return {str(k): v for k, v in df.iloc[int(index)].to_dict().items()}


# ------------------------------------------------------------------------------- flags
def db_for(project: Project | str | Path) -> StateDB:
    root = project.root if isinstance(project, Project) else Path(project)
    return StateDB(Path(root) / ".proponent" / "state.db")


def flag_state(db: StateDB, split: str = "train") -> dict[int | str, dict]:
    out = {}
    for item, row in db.flags(split).items():
        key: int | str = int(item) if split != "pair" and item.lstrip("-").isdigit() else item
        out[key] = row
    return out


def toggle_flag(db: StateDB, split: str, index: int | str, flag: str = "mislabeled", source: str = "app") -> str | None:
    """One-click flag: set ``flag`` if the item does not carry it, clear it if it does. Returns the new flag."""
    cur = db.flags(split).get(str(index), {}).get("flag")
    new = None if cur == flag else flag
    db.set_flag(split, index, flag=new, source=source)
    return new


def bulk_update(db: StateDB, split: str, indices: Iterable, *, flag: str | None = ..., relabel: Any = ...,
                note: str | None = ..., source: str = "app") -> int:
    """Apply one action to many items (each change goes to the audit trail). Returns the count."""
    if flag not in (..., None) and flag not in FLAG_VALUES:
        raise ProponentError(f"flag must be one of {', '.join(FLAG_VALUES)}, not {flag!r}")
    n = 0
    for i in indices:
        db.set_flag(split, int(i) if split != "pair" else i, flag=flag, relabel=relabel, note=note, source=source)
        n += 1
    return n


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
            old, new = _cell(b.at[idx, col]) if idx in b.index else None, _cell(a.at[idx, col])
            if old != new:
                kw[col] = new
        if kw:
            if "flag" in kw and kw["flag"] is not None and kw["flag"] not in FLAG_VALUES:
                raise ProponentError(f"row {idx}: flag must be one of {', '.join(FLAG_VALUES)}, not {kw['flag']!r}")
            db.set_flag(split, idx, source=source, **kw)
            changed += 1
    return changed


def _cell(v):
    if v is None:
        return None
    try:
        if isinstance(v, float) and np.isnan(v):
            return None
    except TypeError:
        pass
    s = str(v)
    return None if s in ("", "None", "nan", "<NA>") else s


# ------------------------------------------------------------------------------- triage
def triage_table(project: Project, key: str, method: str, settings: dict | None = None, flags: dict | None = None):
    """Ranked suspects of a finished run with suggested label, evidence and flag state (DataFrame)."""
    import pandas as pd

    from engine.triage import ensemble_probabilities, suggest_labels

    run = load_run(project, key)
    susp = np.asarray(run["suspicion"] if run["suspicion"] is not None else run["self_scores"], dtype=np.float64)
    self_s = np.asarray(run["self_scores"], dtype=np.float64) if run["self_scores"] is not None else susp
    labels = project.train_dataset.y.numpy()
    probs = ensemble_probabilities(project)
    suggested = suggest_labels(probs, labels)
    S = run["scores"]
    # the opponents it creates: test queries for which this example is among the 10 strongest opponents
    opp_count = np.zeros(len(labels), dtype=np.int64)
    if S is not None and S.size:
        k = min(10, S.shape[1])
        bot = np.argpartition(S, k - 1, axis=1)[:, :k]
        np.add.at(opp_count, bot.ravel(), 1)
    order = np.argsort(-susp, kind="mergesort")
    flags = flags if flags is not None else flag_state(db_for(project), "train")
    rows = []
    for rank, i in enumerate(order):
        f = flags.get(int(i), {})
        rows.append({"rank": rank + 1, "index": int(i), "label": str(project.class_name(labels[i])),
                     "suggested": str(project.class_name(suggested[i])), "suspicion": float(susp[i]),
                     "self_influence": float(self_s[i]), "p_label": float(probs[i, labels[i]]),
                     "model_disagrees": bool(probs[i].argmax() != labels[i]), "opponent_of": int(opp_count[i]),
                     "flag": f.get("flag"), "relabel": f.get("relabel"), "note": f.get("note")})
    return pd.DataFrame(rows)


def truth(project: Project) -> dict | None:
    from engine.triage import load_truth

    return load_truth(project)


def truth_found(project: Project, db: StateDB) -> dict | None:
    """On a sample with truth.json: how many planted problems the user's flags have found."""
    t = truth(project)
    if not t:
        return None
    train_flags = {int(k): v for k, v in db.flags("train").items()}
    pair_flags = db.flags("pair")
    flipped = {int(f["train_index"]) for f in t.get("flipped", [])}
    leaks = {(int(l["test_index"]), int(l["train_index"])) for l in t.get("leaks", [])}
    flagged_mis = {i for i, r in train_flags.items() if r.get("flag") == "mislabeled" or r.get("relabel")}
    flagged_leak_train = {i for i, r in train_flags.items() if r.get("flag") == "leak"}
    flagged_pairs = set()
    for item, r in pair_flags.items():
        if r.get("flag") == "leak":
            a, _, b = item.partition(":")
            flagged_pairs.add((int(a), int(b)))
    found_leaks = {lk for lk in leaks if lk in flagged_pairs or lk[1] in flagged_leak_train}
    return {"mislabeled_planted": len(flipped), "mislabeled_found": len(flipped & flagged_mis),
            "mislabeled_flagged": len(flagged_mis), "mislabeled_false": len(flagged_mis - flipped),
            "leaks_planted": len(leaks), "leaks_found": len(found_leaks)}


# ------------------------------------------------------------------------------- exports
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
            df.at[i, lc] = _label_value(new, dtype)
    df = df.drop(index=[i for i in drop if 0 <= i < len(df)])
    rel = project.train_csv.relative_to(project.root)
    df.to_csv(tmp / rel, index=False)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return {"folder": str(dest), "removed": len(drop), "relabelled": len(relabel), "n_train": int(len(df))}


def _label_value(v: str, dtype):
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


# ------------------------------------------------------------------------------- optional engines
def optional_module(name: str):
    """Import an engine module another engineer may not have delivered yet; None if absent."""
    if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
        return None
    try:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)
    except ImportError:
        return None


def verify_available(project: Project) -> str | None:
    """None if the counterfactual Verify check can run, else why it is off."""
    mod = optional_module("engine.evaluate.counterfactual")
    if mod is None or not hasattr(mod, "counterfactual_check"):
        return "the counterfactual retraining check (engine.evaluate.counterfactual) is not installed in this build"
    if not project.checkpoints:
        return "no recorded training run to retrain from"
    n_params = sum(p.numel() for p in project.build_model().parameters())
    if n_params * len(project.train_dataset) > 5e9:
        return f"this model ({n_params:,} parameters × {len(project.train_dataset):,} examples) is too costly to retrain here"
    return None


def whatif_available() -> str | None:
    mod = optional_module("engine.whatif")
    if mod is None or not hasattr(mod, "predict_edit"):
        return "the GIF what-if engine (engine.whatif.predict_edit) is not installed in this build"
    return None


def leaks_available() -> str | None:
    mod = optional_module("engine.leaks")
    if mod is None or not hasattr(mod, "detect_leaks"):
        return "the calibrated leak detector (engine.leaks.detect_leaks) is not installed in this build"
    return None


def leak_pairs(project: Project, key: str, detector: dict | None = None, max_pairs: int = 60) -> dict:
    """Suspected train/test duplicates. With ``detector`` (the output of engine.leaks.detect_leaks,
    run as a background job) its calibrated decisions are used; otherwise each test query's
    input-closest among its top proponents in this run, flagged when the input-space cosine is at least
    ``QUICK_LEAK_COSINE``."""
    x_tr = project.train_dataset.x.reshape(len(project.train_dataset), -1).numpy().astype(np.float64)
    x_te = project.test_dataset.x.reshape(len(project.test_dataset), -1).numpy().astype(np.float64)
    xn_tr = x_tr / np.maximum(1e-12, np.linalg.norm(x_tr, axis=1, keepdims=True))
    xn_te = x_te / np.maximum(1e-12, np.linalg.norm(x_te, axis=1, keepdims=True))
    if detector is not None:
        pairs = []
        for p in detector.get("pairs", []):
            t, i = int(p["test_index"]), int(p["train_index"])
            c = p.get("input_cosine")
            pairs.append({**p, "cosine": float(c if c is not None else xn_te[t] @ xn_tr[i])})
        pairs.sort(key=lambda p: (not p.get("flagged"), -float(p.get(detector.get("statistic", "score"), p["score"]))))
        return {"source": f"calibrated detector (engine.leaks, {detector.get('method')})",
                "threshold": detector.get("threshold"), "pairs": pairs[:max_pairs],
                "rule": f"flagged when {detector.get('statistic')} > {detector.get('threshold'):.4g} "
                        f"(calibration: {detector.get('calibration', {}).get('kind', 'given')}, "
                        f"false-positive rate {detector.get('calibration', {}).get('fpr', '—')})"}
    S = np.asarray(load_run(project, key)["scores"])
    m = min(QUICK_LEAK_TOP, S.shape[1])
    cand = np.argpartition(-S, m - 1, axis=1)[:, :m]  # each query's top-m proponents
    cos_c = np.einsum("qk,qmk->qm", xn_te, xn_tr[cand])
    best = cand[np.arange(len(S)), cos_c.argmax(1)]
    cosines = cos_c.max(1)
    threshold = QUICK_LEAK_COSINE
    order = np.argsort(-cosines, kind="stable")[:max_pairs]
    pairs = [{"test_index": int(t), "train_index": int(best[t]), "score": float(S[t, best[t]]),
              "cosine": float(cosines[t]), "flagged": bool(cosines[t] >= threshold)} for t in order]
    return {"source": f"quick check: the input-closest of each query's top-{m} proponents", "threshold": threshold,
            "pairs": pairs, "rule": f"flagged when the input-space cosine of a test query and that proponent "
                                    f"is ≥ {threshold}"}


QUICK_LEAK_TOP = 100
# natural near-twins (8×8 digits) reach 0.98–0.99; copies, noisy and re-brightened copies ≥ 0.995
QUICK_LEAK_COSINE = 0.995


# ------------------------------------------------------------------------------- embeddings
EMBED_MAX_POINTS = 3000


def embedding_path(project: Project, kind: str, reducer: str) -> Path:
    return project.state_dir / "embeddings" / f"{kind}-{reducer}-{project.checkpoint_hash()}-{project.data_hash()}.npz"


def cached_embedding(project: Project, kind: str, reducer: str) -> dict | None:
    p = embedding_path(project, kind, reducer)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def compute_embedding(project: Project, kind: str = "influence", reducer: str = "umap", *, max_points: int = EMBED_MAX_POINTS,
                      proj_dim: int = 256, progress=None, cancel=None) -> dict:
    """A 2-D layout of training examples, cached on disk under .proponent/embeddings.

    kind "influence": margin gradients at the final checkpoint, randomly projected (TRAK's
    features; engine.grads GradientComputer + make_projector). kind "penultimate": inputs of the
    last Linear layer. Sets larger than ``max_points`` are subsampled (seeded)."""
    from engine.grads import GradientComputer, make_projector
    from engine.grads.embeddings import penultimate_features
    from engine.grads.features import project_gradients

    cached = cached_embedding(project, kind, reducer)
    if cached is not None:
        return cached
    n = len(project.train_dataset)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    x, y = project.train_dataset.x[idx], project.train_dataset.y[idx]
    if progress:
        progress(f"features ({kind})", 0, len(idx))
    model = project.load_model()
    if kind == "influence":
        computer = GradientComputer(model)
        k = min(proj_dim, computer.n_params)
        projector = make_projector("auto", computer.n_params, k, seed=0)
        feats = []
        for lo in range(0, len(idx), 256):
            if cancel and cancel():
                from engine.errors import Cancelled
                raise Cancelled("embedding cancelled")
            feats.append(project_gradients(computer, projector, x[lo:lo + 256], y[lo:lo + 256], "margin").numpy())
            if progress:
                progress(f"features ({kind})", min(len(idx), lo + 256), len(idx))
        F = np.concatenate(feats, 0)
        # cosine geometry: influence directions matter more than gradient size
        F = F / np.maximum(1e-12, np.linalg.norm(F, axis=1, keepdims=True))
    elif kind == "penultimate":
        F = penultimate_features(model, x).numpy()
    else:
        raise ProponentError(f"embedding kind must be 'influence' or 'penultimate', not {kind!r}")
    if progress:
        progress(f"layout ({reducer})", 0, 1)
    xy = reduce_2d(F.astype(np.float32), reducer)
    if progress:
        progress(f"layout ({reducer})", 1, 1)
    out = {"xy": xy.astype(np.float32), "index": idx.astype(np.int64), "n_total": np.array(n)}
    path = embedding_path(project, kind, reducer)
    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(path, buf.getvalue())
    return out


def reduce_2d(F: np.ndarray, reducer: str = "umap") -> np.ndarray:
    if reducer == "pca":
        Fc = F - F.mean(0)
        _, _, vt = np.linalg.svd(Fc, full_matrices=False)
        return Fc @ vt[:2].T
    if reducer == "umap":
        import umap

        return umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(F)
    raise ProponentError(f"layout must be 'umap' or 'pca', not {reducer!r}")


def embedding_frame(project: Project, emb: dict, colour: str, *, flags: dict | None = None, run: dict | None = None,
                    preds: dict | None = None):
    """The scatter's data: x, y, index (customdata), and the colour column."""
    import pandas as pd

    idx = emb["index"]
    labels = project.train_dataset.y.numpy()[idx]
    df = pd.DataFrame({"x": emb["xy"][:, 0], "y": emb["xy"][:, 1], "index": idx,
                       "label": [str(project.class_name(c)) for c in labels]})
    if preds is not None:
        df["prediction"] = [str(project.class_name(c)) for c in preds["pred"][idx]]
    flags = flags or {}
    df["flag"] = [str(flags.get(int(i), {}).get("flag") or "none") for i in idx]
    if run is not None and run.get("self_scores") is not None:
        df["self_influence"] = np.asarray(run["self_scores"])[idx]
    return df


def verify_kwargs(fn, *, query: int, method: str, settings: dict | None, scores_row=None,
                  k_values=(5, 10, 20), seeds=(0, 1), random_trials: int = 3) -> dict:
    """Arguments for engine.evaluate.counterfactual.counterfactual_check, keeping only the names
    its signature has (JSON-able: they travel through the jobs table)."""
    import inspect

    cands = {"query": int(query), "method": method, "settings": settings or None,
             "scores_row": None if scores_row is None else [float(v) for v in np.asarray(scores_row).ravel()],
             "k_values": [int(k) for k in k_values], "seeds": [int(s) for s in seeds],
             "random_trials": int(random_trials)}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in cands.items() if k in params and v is not None}


def verify_frame(result: dict):
    """The Verify result as a table: per k, the margin change from removing the top-k proponents
    against the mean change from k random removals."""
    import pandas as pd

    return pd.DataFrame([{"k": r["k"], "margin after": r["margin"], "change (top-k removed)": r["change"],
                          "change (k random, mean)": r["random_change_mean"],
                          "random std": r["random_change_std"], "prediction flipped": r["flipped"]}
                         for r in result.get("rows", [])])


# ------------------------------------------------------------------------------- cost estimate
def calibrate_gradients(project: Project, n: int = 64) -> float:
    """Seconds per training example for one per-example margin gradient at the final checkpoint,
    measured on ``n`` examples (the unit most methods' cost is made of)."""
    from engine.grads import GradientComputer

    computer = GradientComputer(project.load_model())
    x, y = project.train_dataset.x[:n], project.train_dataset.y[:n]
    computer.per_example(x[:2], y[:2])  # warm-up
    t0 = time.perf_counter()
    computer.per_example(x, y)
    return (time.perf_counter() - t0) / max(1, len(y))


def gradient_passes(project: Project, method: str, settings: dict) -> int:
    """How many passes of per-example gradients over the training set a run makes (an estimate)."""
    from engine.methods import coerce_settings

    cls = get_method(method)
    s = coerce_settings(cls, settings)
    if hasattr(s, "ensemble") and hasattr(s, "max_models"):
        try:
            from engine.methods.trak import ensemble_checkpoints

            return max(1, len(ensemble_checkpoints(project, s.ensemble, s.max_models)))
        except Exception:
            return 1
    if hasattr(s, "max_checkpoints"):
        n = len(project.checkpoints)
        return max(1, min(n, s.max_checkpoints) if s.max_checkpoints > 0 else n)
    return 1


def estimate_cost(project: Project, method: str, settings: dict, per_example_s: float) -> dict:
    passes = gradient_passes(project, method, settings)
    n = len(project.train_dataset) + len(project.test_dataset)
    return {"passes": passes, "seconds": passes * n * per_example_s, "per_example_ms": per_example_s * 1e3}


# ------------------------------------------------------------------------------- uploaded queries
def query_from_upload(project: Project, data: bytes, filename: str = "") -> np.ndarray:
    """An uploaded input as one query [1, *input_shape], preprocessed like the project's data:
    an image (PNG/JPEG; resized to the training images' size if it differs) or a one-row CSV with
    the feature columns (standardised with the training statistics)."""
    if project.data_format == "images":
        from PIL import Image, UnidentifiedImageError

        c, h, w = project.input_shape
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ProponentError(f"unreadable image: {e}", file=filename or None) from None
        arr = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
        return arr[None].astype(np.float32)
    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(data))
    except Exception as e:
        raise ProponentError(f"cannot parse CSV: {str(e).splitlines()[0]}", file=filename or None) from None
    missing = [c for c in project.feature_columns if c not in df.columns]
    if missing:
        raise ProponentError(f"feature column {missing[0]!r} missing", file=filename or None)
    if len(df) != 1:
        raise ProponentError(f"expected one data row, found {len(df)}", file=filename or None)
    row = pd.to_numeric(df[project.feature_columns].iloc[0], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(row).all():
        bad = project.feature_columns[int(np.argmax(~np.isfinite(row)))]
        raise ProponentError(f"column {bad!r} is not a finite number", file=filename or None, row=0)
    return ((row - project.feature_mean) / project.feature_std).astype(np.float32)[None]


def save_query(project: Project, x: np.ndarray) -> str:
    """Store an uploaded query's input under .proponent/queries; returns its id."""
    qid = stable_hash(base64.b64encode(np.ascontiguousarray(x).tobytes()).decode(), 12)
    atomic_save_npy(project.state_dir / "queries" / f"{qid}-x.npy", x)
    return qid


def query_scores_path(project: Project, qid: str, key: str, label: int) -> Path:
    return project.state_dir / "queries" / f"{qid}-{key}-y{int(label)}.npy"


def score_uploaded_query(project: Project, qid: str, method: str, settings: dict, key: str, label: int,
                         device: str = "auto", progress=None, cancel=None) -> dict:
    """Scores [n_train] of an uploaded query (explaining its margin for class ``label``)."""
    import torch

    from engine.api import attribute

    x = load_npy(project.state_dir / "queries" / f"{qid}-x.npy", mmap=False)
    S = attribute(project, method, (torch.as_tensor(x), torch.tensor([int(label)])), settings or None, device=device,
                  progress=progress, cancel=cancel)
    row = np.asarray(S, dtype=np.float32).reshape(-1)
    atomic_save_npy(query_scores_path(project, qid, key, label), row)
    return {"qid": qid, "key": key, "label": int(label)}


def uploaded_prediction(project: Project, x: np.ndarray) -> dict:
    import torch

    from engine.grads.measurement import correct_class_margin
    from engine.train import predict_logits

    logits = predict_logits(project.load_model(), torch.as_tensor(x))
    probs = torch.softmax(logits, 1).numpy()[0]
    return {"probs": probs, "pred": int(probs.argmax()),
            "margins": [float(correct_class_margin(logits, torch.tensor([c]))[0]) for c in range(project.num_classes)]}
