"""The project folder: spec, data, model factory, recorded checkpoints, and their validation.

Every validation failure is a :class:`ValidationError` whose text names the file, the row
(0-based data-row position, as used by every index Proponent prints) and the problem.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from engine.core.errors import ValidationError

STATE_DIRNAME = ".proponent"
TRAJECTORY_FILE = "trajectory.json"


class ExampleSet(torch.utils.data.Dataset):
    """An in-memory dataset of (x: Tensor, y: int); ``x`` and ``y`` are also exposed whole
    so the engine can slice batches without a DataLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x = x
        self.y = y.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

    def subset(self, indices) -> "ExampleSet":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ExampleSet(self.x[idx], self.y[idx])


@dataclass
class Stage:
    """One stage of a (possibly multi-stage) training recipe.

    ``indices`` selects the rows of the training CSV this stage trains on (None: all rows).
    """

    name: str = "train"
    epochs: int = 20
    lr: float = 0.05
    lr_schedule: str = "constant"  # constant | cosine | linear | step
    indices: np.ndarray | None = None
    select: str | None = None  # how the indices were chosen, as written in project.toml


@dataclass
class Recipe:
    """The training recipe of ``[training]``: used to train, to retrain for LDS and
    counterfactual checks, and by trajectory-aware methods."""

    optimizer: str = "sgd"  # sgd | adam | lbfgs (full batch, for convex models)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    checkpoints_per_epoch: int = 1
    lr_schedule: str = "constant"
    stages: list[Stage] = field(default_factory=list)

    def resolved_stages(self) -> list[Stage]:
        if self.stages:
            return self.stages
        return [Stage(name="train", epochs=self.epochs, lr=self.lr, lr_schedule=self.lr_schedule)]

    def fingerprint(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in
             ("optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size", "seed",
              "checkpoints_per_epoch", "lr_schedule")}
        d["stages"] = [
            {"name": s.name, "epochs": s.epochs, "lr": s.lr, "lr_schedule": s.lr_schedule,
             "indices": None if s.indices is None else hashlib.sha1(np.asarray(s.indices, np.int64).tobytes()).hexdigest()}
            for s in self.stages
        ]
        return d


@dataclass(frozen=True)
class Checkpoint:
    """One recorded checkpoint of the trajectory (see engine.core.train)."""

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

    @property
    def key(self) -> str:
        return f"m{self.model_id}/{self.weights.name}"


def _native(v):
    """numpy scalars → Python values, so labels print and compare plainly."""
    return v.item() if hasattr(v, "item") else v


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValidationError("missing project.toml (is this a project folder?)", file=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ValidationError(f"invalid TOML: {e}", file=str(path)) from None


def _read_csv(path: Path, label_column: str) -> pd.DataFrame:
    if not path.is_file():
        raise ValidationError("file not found", file=str(path))
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types; the user needs one line
        raise ValidationError(f"cannot parse CSV: {str(e).splitlines()[0]}", file=str(path)) from None
    if label_column not in df.columns:
        raise ValidationError(
            f"label column {label_column!r} not found (columns: {', '.join(map(str, df.columns))})", file=str(path))
    if len(df) == 0:
        raise ValidationError("no data rows", file=str(path))
    missing = df[label_column].isna().to_numpy()
    if missing.any():
        raise ValidationError(f"empty label in column {label_column!r}", file=str(path), row=int(np.argmax(missing)))
    return df


def _load_image(path: Path, csv: Path, row: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValidationError(f"image file not found: {path}", file=str(csv), row=row)
    try:
        with Image.open(path) as im:
            im.load()
            mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValidationError(f"unreadable image {path.name}: {e}", file=str(csv), row=row) from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = np.transpose(arr, (2, 0, 1))
    return arr


class Project:
    """A loaded, validated project folder.

    >>> p = Project.load("sample_projects/digits")
    >>> p.train_dataset, p.test_dataset, p.build_model(), p.checkpoints
    """

    def __init__(self, root: Path, spec: dict):
        self.root = root
        self.spec = spec
        self.toml_path = root / "project.toml"
        proj = spec.get("project", {})
        data = spec.get("data")
        model = spec.get("model")
        if not isinstance(data, dict):
            raise ValidationError("missing [data] table", file=str(self.toml_path))
        if not isinstance(model, dict):
            raise ValidationError("missing [model] table", file=str(self.toml_path))
        self.name: str = str(proj.get("name", root.name))
        self.task: str = str(proj.get("task", "classification"))
        if self.task != "classification":
            raise ValidationError(f"task {self.task!r} is not supported (only 'classification')", file=str(self.toml_path))
        self.data_format: str = str(data.get("format", "images"))
        if self.data_format not in ("images", "tabular"):
            raise ValidationError(f"[data] format {self.data_format!r} must be 'images' or 'tabular'", file=str(self.toml_path))
        for key in ("train", "test"):
            if key not in data:
                raise ValidationError(f"[data] needs {key!r} (a CSV path)", file=str(self.toml_path))
        self.train_csv = root / data["train"]
        self.test_csv = root / data["test"]
        self.label_column: str = str(data.get("label_column", "label"))
        self.image_column: str = str(data.get("image_column", "path"))
        self.factory_spec: str = str(model.get("factory", "model.py:build"))
        self.checkpoint_dir = root / str(model.get("checkpoints", "checkpoints"))
        self.recipe = self._parse_recipe(spec.get("training", {}))
        self._load_data()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, *, check_model: bool = True) -> "Project":
        root = Path(path).expanduser().resolve()
        if not root.exists():
            raise ValidationError("project folder not found", file=str(path))
        if root.is_file() and root.name == "project.toml":
            root = root.parent
        spec = _read_toml(root / "project.toml")
        p = cls(root, spec)
        if check_model:
            p._check_model()
        return p

    def _parse_recipe(self, t: dict) -> Recipe:
        known = {f for f in Recipe.__dataclass_fields__} - {"stages"}
        kwargs = {}
        for k, v in t.items():
            if k == "stages":
                continue
            if k not in known:
                raise ValidationError(f"[training] unknown key {k!r} (known: {', '.join(sorted(known))})", file=str(self.toml_path))
            kwargs[k] = v
        try:
            r = Recipe(**kwargs)
            r.lr, r.momentum, r.weight_decay = float(r.lr), float(r.momentum), float(r.weight_decay)
            r.epochs, r.batch_size, r.seed = int(r.epochs), int(r.batch_size), int(r.seed)
            r.checkpoints_per_epoch = int(r.checkpoints_per_epoch)
        except (TypeError, ValueError) as e:
            raise ValidationError(f"[training] {e}", file=str(self.toml_path)) from None
        if r.optimizer not in ("sgd", "adam", "lbfgs"):
            raise ValidationError(f"[training] optimizer {r.optimizer!r} must be sgd, adam or lbfgs", file=str(self.toml_path))
        for s in t.get("stages", []) or []:
            r.stages.append(Stage(name=str(s.get("name", f"stage{len(r.stages)}")),
                                  epochs=int(s.get("epochs", r.epochs)), lr=float(s.get("lr", r.lr)),
                                  lr_schedule=str(s.get("lr_schedule", r.lr_schedule)),
                                  select=s.get("select")))
        return r

    def _load_data(self) -> None:
        lc = self.label_column
        train_df = _read_csv(self.train_csv, lc)
        test_df = _read_csv(self.test_csv, lc)
        self.train_df, self.test_df = train_df, test_df
        # classes come from the training data; a test class that train lacks cannot be attributed
        raw_classes = sorted((_native(v) for v in pd.unique(train_df[lc])), key=lambda v: (str(type(v)), v))
        self.classes: list = raw_classes
        index = {c: i for i, c in enumerate(raw_classes)}
        y_train = torch.tensor([index[_native(v)] for v in train_df[lc]], dtype=torch.long)
        unknown = np.array([_native(v) not in index for v in test_df[lc]])
        if unknown.any():
            r = int(np.argmax(unknown))
            raise ValidationError(f"class {_native(test_df[lc].iloc[r])!r} is in test but not in train",
                                  file=str(self.test_csv), row=r)
        y_test = torch.tensor([index[_native(v)] for v in test_df[lc]], dtype=torch.long)
        if self.data_format == "images":
            x_train = self._load_images(train_df, self.train_csv)
            x_test = self._load_images(test_df, self.test_csv, expect=tuple(x_train.shape[1:]))
            self.feature_columns: list[str] = []
        else:
            x_train, x_test = self._load_tabular(train_df, test_df)
        self.train_dataset = ExampleSet(x_train, y_train)
        self.test_dataset = ExampleSet(x_test, y_test)
        self._apply_stage_selections()

    def _load_images(self, df: pd.DataFrame, csv: Path, expect: tuple | None = None) -> torch.Tensor:
        col = self.image_column
        if col not in df.columns:
            raise ValidationError(f"image column {col!r} not found (columns: {', '.join(map(str, df.columns))})", file=str(csv))
        base = csv.parent
        arrays = []
        for r, rel in enumerate(df[col].tolist()):
            if not isinstance(rel, str) or not rel:
                raise ValidationError(f"empty image path in column {col!r}", file=str(csv), row=r)
            arr = _load_image((base / rel), csv, r)
            shape = expect or (arrays[0].shape if arrays else arr.shape)
            if arr.shape != tuple(shape):
                raise ValidationError(
                    f"image {rel} has shape {tuple(arr.shape)} (channels, height, width) but the others have {tuple(shape)}",
                    file=str(csv), row=r)
            arrays.append(arr)
        return torch.from_numpy(np.stack(arrays))

    def _load_tabular(self, train_df: pd.DataFrame, test_df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        lc = self.label_column
        feat_cols = [c for c in train_df.columns if c != lc and c not in self._stage_columns()]
        missing = [c for c in feat_cols if c not in test_df.columns]
        if missing:
            raise ValidationError(f"feature column {missing[0]!r} is in train but missing here", file=str(self.test_csv))
        self.feature_columns = [str(c) for c in feat_cols]
        mats = []
        for df, csv in ((train_df, self.train_csv), (test_df, self.test_csv)):
            block = df[feat_cols]
            num = block.apply(pd.to_numeric, errors="coerce")
            bad = num.isna().to_numpy() | ~np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
            if bad.any():
                r, c = map(int, np.argwhere(bad)[0])
                raise ValidationError(f"column {feat_cols[c]!r}: value {block.iat[r, c]!r} is not a finite number", file=str(csv), row=r)
            mats.append(num.to_numpy(dtype=np.float32))
        # standardise with training statistics only, so test data never leaks into preprocessing
        mean = mats[0].mean(0)
        std = mats[0].std(0)
        std[std == 0] = 1.0
        self.feature_mean, self.feature_std = mean, std
        return tuple(torch.from_numpy((m - mean) / std) for m in mats)  # type: ignore[return-value]

    def _stage_columns(self) -> set[str]:
        cols = set()
        for s in self.recipe.stages:
            if s.select and "==" in s.select:
                cols.add(s.select.split("==")[0].strip())
        return cols

    def _apply_stage_selections(self) -> None:
        """A stage's ``select`` is ``"column == value"`` over the training CSV, or ``"all"``."""
        for s in self.recipe.stages:
            if not s.select or s.select == "all":
                s.indices = None
                continue
            if "==" not in s.select:
                raise ValidationError(f"stage {s.name!r}: select must be 'all' or 'column == value'", file=str(self.toml_path))
            col, val = (t.strip().strip("'\"") for t in s.select.split("==", 1))
            if col not in self.train_df.columns:
                raise ValidationError(f"stage {s.name!r}: column {col!r} not found", file=str(self.train_csv))
            mask = self.train_df[col].astype(str).to_numpy() == val
            if not mask.any():
                raise ValidationError(f"stage {s.name!r}: no rows have {col} == {val!r}", file=str(self.train_csv))
            s.indices = np.flatnonzero(mask)

    # ------------------------------------------------------------------ model
    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_dataset.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def _factory(self):
        file_part, _, func = self.factory_spec.partition(":")
        func = func or "build"
        path = self.root / file_part
        if not path.is_file():
            raise ValidationError(f"model factory file not found ({self.factory_spec})", file=str(path))
        mod_name = f"_proponent_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)  # the user's own model.py: code they wrote, not a pickle
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise ValidationError(f"cannot import: {type(e).__name__}: {e}", file=str(path)) from None
        if not hasattr(module, func):
            raise ValidationError(f"no function {func!r}", file=str(path))
        return getattr(module, func)

    def build_model(self) -> nn.Module:
        """A fresh, untrained module from the project's factory."""
        try:
            model = self._factory(self.input_shape, self.num_classes)
        except Exception as e:
            raise ValidationError(f"build{self.input_shape, self.num_classes} failed: {type(e).__name__}: {e}",
                                  file=str(self.root / self.factory_spec.partition(':')[0])) from None
        if not isinstance(model, nn.Module):
            raise ValidationError(f"factory returned {type(model).__name__}, not a torch.nn.Module",
                                  file=str(self.root / self.factory_spec.partition(':')[0]))
        return model

    def _check_model(self) -> None:
        model = self.build_model().eval()
        with torch.no_grad():
            try:
                out = model(self.train_dataset.x[:2])
            except Exception as e:
                raise ValidationError(f"model forward failed on input of shape {tuple(self.train_dataset.x[:2].shape)}: "
                                      f"{type(e).__name__}: {e}", file=self.factory_spec) from None
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise ValidationError(f"model output has shape {tuple(out.shape)} but the data has {self.num_classes} classes; "
                                  f"expected [batch, {self.num_classes}]", file=str(self.root / self.factory_spec.partition(':')[0]))

    # ------------------------------------------------------------------ checkpoints
    @property
    def trajectory_path(self) -> Path:
        return self.checkpoint_dir / TRAJECTORY_FILE

    def trajectory(self) -> dict:
        path = self.trajectory_path
        if not path.is_file():
            return {"checkpoints": []}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValidationError(f"corrupt trajectory log: {e}", file=str(path)) from None

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """All recorded checkpoints, ordered by (model, step)."""
        out = []
        for c in self.trajectory().get("checkpoints", []):
            out.append(Checkpoint(
                model_id=int(c["model_id"]), index=int(c["index"]), step=int(c["step"]), epoch=float(c["epoch"]),
                lr=float(c["lr"]), stage=str(c.get("stage", "train")),
                weights=self.checkpoint_dir / c["weights"],
                optimizer_state=(self.checkpoint_dir / c["optimizer_state"]) if c.get("optimizer_state") else None,
                stage_steps=int(c.get("stage_steps", c["step"])), momentum=float(c.get("momentum", 0.0)),
                optimizer=str(c.get("optimizer", "sgd"))))
        return sorted(out, key=lambda c: (c.model_id, c.step))

    def model_ids(self) -> list[int]:
        return sorted({c.model_id for c in self.checkpoints})

    def final_checkpoints(self) -> list[Checkpoint]:
        """The last checkpoint of each independently trained model."""
        last: dict[int, Checkpoint] = {}
        for c in self.checkpoints:
            last[c.model_id] = c
        return [last[m] for m in sorted(last)]

    def final_checkpoint(self, model_id: int = 0) -> Checkpoint:
        cks = [c for c in self.checkpoints if c.model_id == model_id]
        if not cks:
            raise ValidationError("no checkpoints recorded; run `proponent train` first", file=str(self.checkpoint_dir))
        return cks[-1]

    def load_state(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not checkpoint.weights.is_file():
            raise ValidationError("checkpoint weights missing", file=str(checkpoint.weights))
        try:
            return load_file(str(checkpoint.weights))
        except Exception as e:
            raise ValidationError(f"cannot read safetensors: {e}", file=str(checkpoint.weights)) from None

    def load_model(self, checkpoint: Checkpoint | None = None) -> nn.Module:
        """A module with the checkpoint's weights (default: final checkpoint of model 0), in eval mode."""
        checkpoint = checkpoint or self.final_checkpoint()
        model = self.build_model()
        state = self.load_state(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValidationError(f"weights do not fit model.py's architecture: {str(e).splitlines()[0]}",
                                  file=str(checkpoint.weights)) from None
        return model.eval()

    def checkpoint_hash(self) -> str:
        """Hash of the recorded weights; part of every run's cache key. Cached until the trajectory
        log changes, since every cache lookup (and every app rerun) asks for it."""
        log = self.trajectory_path
        stamp = log.stat().st_mtime_ns if log.is_file() else None
        cached = getattr(self, "_checkpoint_hash", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        h = hashlib.sha256()
        for c in self.checkpoints:
            h.update(c.key.encode())
            h.update(hashlib.sha256(c.weights.read_bytes()).digest() if c.weights.is_file() else b"missing")
        self._checkpoint_hash = (stamp, h.hexdigest()[:16])
        return self._checkpoint_hash[1]

    @cached_property
    def _data_hash(self) -> str:
        h = hashlib.sha256()
        for ds in (self.train_dataset, self.test_dataset):
            h.update(ds.x.numpy().tobytes())
            h.update(ds.y.numpy().tobytes())
        return h.hexdigest()[:16]

    def data_hash(self) -> str:
        """Hash of the loaded inputs and labels (fixed for the life of this Project)."""
        return self._data_hash

    # ------------------------------------------------------------------ state
    @property
    def state_dir(self) -> Path:
        d = self.root / STATE_DIRNAME
        d.mkdir(exist_ok=True)
        return d

    def class_name(self, index: int):
        return self.classes[int(index)]

    def summary(self) -> dict[str, Any]:
        model = self.build_model()
        cks = self.checkpoints
        return {
            "name": self.name, "root": str(self.root), "format": self.data_format,
            "classes": [str(c) for c in self.classes], "num_classes": self.num_classes,
            "n_train": len(self.train_dataset), "n_test": len(self.test_dataset),
            "input_shape": list(self.input_shape),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "models": len(self.model_ids()), "checkpoints": len(cks),
            "epochs": max((c.epoch for c in cks), default=0),
        }


def is_finite_model(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())

