"""Where a project's weights come from: a recorded trajectory, or the user's own trained weights.

- ``checkpoints/trajectory.json`` (written by ``proponent train`` or ``proponent import``): every
  recorded checkpoint of one or more runs, with step, epoch and learning rate. Trajectory methods
  (Source, TracIn, DDM) need it.
- ``[model] weights = ["a.safetensors", ...]``: one file per independently trained model, no
  history. Enough for every final-weights method (TRAK, EK-FAC, Grad-Dot/Cos, kNN, ...).

Weights are read with safetensors, or ``torch.load(weights_only=True)`` for ``.pt``/``.pth``
state dicts: never an unpickle of arbitrary objects.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file
from torch import nn

from engine.core.errors import ValidationError
from engine.core.paths import OPT_OUT, FolderResolver
from engine.storage.arrays import atomic_write_json, save_tensors
from engine.storage.folders import (
    make_owned_dir,
    partial_path,
    remove_owned,
    replace_owned_dir,
)
from engine.storage.locks import project_writer_lock

TRAJECTORY_FILE = "trajectory.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MANIFEST_NAMES = ("manifest.json", "manifest.csv")


@dataclass(frozen=True)
class Checkpoint:
    """One set of weights: a recorded checkpoint of a trajectory (see engine.core.train), or a
    ``[model] weights`` file (``kind == "weights"``: no step, epoch or learning rate known)."""

    model_id: int
    index: int  # position within its model's run
    step: int
    epoch: float
    lr: float
    stage: str
    weights: Path
    optimizer_state: Path | None
    stage_steps: int  # optimizer steps taken within this checkpoint's stage so far
    momentum: float = 0.0
    optimizer: str = "sgd"
    kind: str = "trajectory"  # "trajectory" | "weights"

    @property
    def key(self) -> str:
        return f"m{self.model_id}/{self.weights.name}"


class TrajectoryEntry(BaseModel):
    """One checkpoint in trajectory.json (other keys, e.g. the seed, are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    model_id: int = Field(ge=0)
    index: int = Field(ge=0)
    step: int = Field(ge=0)
    epoch: float = Field(allow_inf_nan=False)
    lr: float = Field(ge=0, allow_inf_nan=False)
    weights: str = Field(min_length=1)
    stage: str = "train"
    stage_steps: int | None = None
    optimizer_state: str | None = None
    momentum: float = Field(0.0, ge=0, allow_inf_nan=False)
    optimizer: str = "sgd"


class TrajectoryLog(BaseModel):
    model_config = ConfigDict(extra="allow")
    checkpoints: list[TrajectoryEntry] = []


def read_trajectory(checkpoint_dir: Path) -> dict:
    """The trajectory log, validated: a bad entry is one line naming the file, the entry and the key."""
    path = checkpoint_dir / TRAJECTORY_FILE
    if not path.is_file():
        return {"checkpoints": []}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidationError(f"corrupt trajectory log: {e}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise ValidationError(f"trajectory log must be a JSON object with a 'checkpoints' list, not a "
                              f"{type(raw).__name__}", file=str(path))
    try:
        TrajectoryLog.model_validate(raw)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValidationError(f"trajectory log: {where}: {err['msg'].lower()}", file=str(path)) from None
    return raw


def trajectory_checkpoints(checkpoint_dir: Path, log: dict, allow_outside: bool = False) -> list[Checkpoint]:
    """The log's checkpoints; their files must lie in the checkpoint folder (links followed) unless
    ``allow_outside`` ([project] allow_outside_paths)."""
    out = []
    resolver = FolderResolver()
    where = checkpoint_dir / TRAJECTORY_FILE

    def inside(rel: str, i: int, key: str) -> Path:
        path = checkpoint_dir / rel
        if not allow_outside and not resolver.inside(path, checkpoint_dir):
            raise ValidationError(f"trajectory log: checkpoints.{i}.{key}: {rel} is outside the checkpoint folder "
                                  f"{checkpoint_dir}; {OPT_OUT}", file=str(where))
        return path

    for i, c in enumerate(TrajectoryEntry.model_validate(e) for e in log.get("checkpoints", [])):
        out.append(Checkpoint(
            model_id=c.model_id, index=c.index, step=c.step, epoch=c.epoch, lr=c.lr, stage=c.stage,
            weights=inside(c.weights, i, "weights"),
            optimizer_state=inside(c.optimizer_state, i, "optimizer_state") if c.optimizer_state else None,
            stage_steps=c.step if c.stage_steps is None else c.stage_steps, momentum=c.momentum,
            optimizer=c.optimizer))
    return sorted(out, key=lambda c: (c.model_id, c.step))


def weights_checkpoints(root: Path, files: list[str]) -> list[Checkpoint]:
    """``[model] weights``: model i is the i-th file."""
    out = []
    for i, f in enumerate(files):
        p = Path(f)
        p = p if p.is_absolute() else root / p
        out.append(Checkpoint(model_id=i, index=0, step=0, epoch=0.0, lr=0.0, stage="final", weights=p,
                              optimizer_state=None, stage_steps=0, kind="weights"))
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a tensors-only .pt/.pth/.bin file."""
    if not path.is_file():
        raise ValidationError("is a folder, not a weights file" if path.is_dir() else "weights file not found",
                              file=str(path))
    try:
        with open(path, "rb"):  # the OS's reason (permissions, I/O), not a parser's guess
            pass
    except OSError as e:
        raise ValidationError(f"cannot read weights: {e.strerror or e}", file=str(path)) from None
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValidationError(f"cannot read safetensors: {e}", file=str(path)) from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle objects
        except Exception as e:
            raise ValidationError(f"cannot read weights (only tensors are loaded, weights_only=True): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=str(path)) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} bundle
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValidationError("expected a state dict (parameter name → tensor)", file=str(path))
        return {str(k): v for k, v in obj.items()}
    raise ValidationError(f"unknown weights format {path.suffix!r} (use .safetensors, or a .pt state dict)", file=str(path))


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Load ``state`` into ``model``; a mismatch is one line naming the file and the first key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise ValidationError(f"weights do not fit model.py: key {missing[0]!r} is missing"
                              + (f" ({len(missing)} missing)" if len(missing) > 1 else ""), file=str(path))
    if unexpected:
        raise ValidationError(f"weights do not fit model.py: unexpected key {unexpected[0]!r}"
                              + (f" ({len(unexpected)} unexpected)" if len(unexpected) > 1 else ""), file=str(path))
    for k, v in own.items():
        got = state[k]
        if tuple(got.shape) != tuple(v.shape):
            raise ValidationError(f"weights do not fit model.py: key {k!r} has shape {tuple(got.shape)} "
                                  f"but model.py builds {tuple(v.shape)}", file=str(path))
        # load_state_dict would cast integers into float parameters without a word
        if v.is_floating_point() and not (got.is_floating_point() or got.is_complex()):
            raise ValidationError(f"weights do not fit model.py: key {k!r} holds {str(got.dtype).replace('torch.', '')} "
                                  f"values but model.py builds {str(v.dtype).replace('torch.', '')}", file=str(path))
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ValidationError(f"key {k!r} holds {bad} NaN or infinite value(s); these weights come from a run "
                                  f"that diverged or a damaged file", file=str(path))
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- import
def read_manifest(src: Path) -> list[dict]:
    """The user's manifest: ``manifest.json`` (a list, or {"checkpoints": [...]}) or ``manifest.csv``,
    one entry per checkpoint with ``file``, ``step``, ``lr`` and optionally ``epoch``, ``model_id``,
    ``stage``, ``optimizer``, ``momentum``."""
    path = next((src / n for n in MANIFEST_NAMES if (src / n).is_file()), None)
    if path is None:
        raise ValidationError(f"no manifest ({' or '.join(MANIFEST_NAMES)}) with file, step, epoch, lr per checkpoint",
                              file=str(src))
    if path.suffix == ".csv":
        try:
            rows = pd.read_csv(path).to_dict("records")
        except Exception as e:
            raise ValidationError(f"cannot parse CSV: {str(e).splitlines()[0]}", file=str(path)) from None
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValidationError(f"invalid JSON: {e}", file=str(path)) from None
        rows = data.get("checkpoints") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValidationError("expected a list of checkpoints (or {\"checkpoints\": [...]})", file=str(path))
    if not rows:
        raise ValidationError("the manifest lists no checkpoints", file=str(path))
    out = []
    as_lines = path.suffix == ".csv"  # a JSON manifest's entries are not lines
    for r, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValidationError("each checkpoint must be a table with file, step, lr", file=str(path), row=r, lines=as_lines)
        for key in ("file", "step", "lr"):
            if key not in row or row[key] is None or row[key] != row[key]:
                raise ValidationError(f"missing {key!r}", file=str(path), row=r, lines=as_lines)
        entry = {}
        # each key checked as the trajectory log will be (a bad import must not leave a log no command can read)
        for key, kind, default, low in (("step", int, None, 0), ("lr", float, None, 0.0), ("epoch", float, 0.0, None),
                                        ("model_id", int, 0, 0), ("momentum", float, 0.0, 0.0)):
            v = row.get(key, default)
            v = default if v is None or v != v or v == "" else v
            try:
                num = float(v)
            except (TypeError, ValueError, OverflowError):
                num = None
            problem = ("not a number" if num is None else "not a finite number" if not math.isfinite(num)
                       else "not a whole number" if kind is int and num != int(num) else None)
            if problem:
                raise ValidationError(f"{key}: {row.get(key)!r} is {problem}", file=str(path), row=r, lines=as_lines)
            v = kind(num)
            if low is not None and v < low:
                raise ValidationError(f"{key}: {v!r} is negative", file=str(path), row=r, lines=as_lines)
            entry[key] = v
        file = str(row["file"])
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ValidationError(f"file: {file!r} is not a path inside the checkpoint folder", file=str(path), row=r, lines=as_lines)
        out.append({"file": file, **entry, "stage": str(row.get("stage") or "train"),
                    "optimizer": str(row.get("optimizer") or "sgd")})
    return out


def import_trajectory(project, src: str | Path) -> int:
    """Turn a folder of the user's saved checkpoints + manifest into ``checkpoints/trajectory.json``,
    so trajectory methods (Source, TracIn) can run on a model trained elsewhere. Every file is read and
    fitted to model.py first; the trajectory folder is swapped in only when all of them fit."""
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise ValidationError("checkpoint folder not found", file=str(src))
    entries = read_manifest(src)
    # written beside (not over) whatever the checkpoint folder holds, which may be the user's own
    # [model] weights; trajectory.json is written last, so a failure leaves the old log in force
    with project_writer_lock(project.state_dir, "proponent import"):
        return _import_into(project, src, entries)


def _import_into(project, src: Path, entries: list[dict]) -> int:
    ck_dir = project.checkpoint_dir
    ck_dir.mkdir(parents=True, exist_ok=True)
    final = ck_dir / "imported"
    tmp = make_owned_dir(partial_path(final))
    try:
        log = {"imported_from": str(src), "n_train": len(project.train_dataset), "data_hash": project.data_hash(), "train_hash": project.train_data_hash,
               "models": len({e["model_id"] for e in entries}), "checkpoints": [], "stages": {}}
        index: dict[int, int] = {}
        seen = set()
        for e in sorted(entries, key=lambda e: (e["model_id"], e["step"])):
            if (e["model_id"], e["step"]) in seen:
                raise ValidationError(f"model {e['model_id']} has two checkpoints at step {e['step']}", file=str(src))
            seen.add((e["model_id"], e["step"]))
            path = src / e["file"]
            state = read_state_dict(path)
            fit_state(project.build_model(), state, path)
            sub = f"model_{e['model_id']}"
            (tmp / sub).mkdir(exist_ok=True)
            wname = f"{sub}/step_{e['step']:07d}.safetensors"
            save_tensors({k: v.contiguous() for k, v in state.items()}, tmp / wname)
            i = index.get(e["model_id"], 0)
            index[e["model_id"]] = i + 1
            log["checkpoints"].append({
                "model_id": e["model_id"], "index": i, "step": e["step"], "epoch": e["epoch"], "lr": e["lr"],
                "stage": e["stage"], "stage_steps": e["step"], "weights": f"{final.name}/{wname}",
                "optimizer_state": None, "optimizer": e["optimizer"], "momentum": e["momentum"]})
    except BaseException:
        remove_owned(tmp)  # nothing half-written
        raise
    replace_owned_dir(final, tmp)
    atomic_write_json(ck_dir / TRAJECTORY_FILE, log)
    return len(log["checkpoints"])
