"""The project folder: spec, data, model factory, recorded checkpoints, and their validation.

Every validation failure is a :class:`ValidationError` whose text names the file, the row
(0-based data-row position, as used by every index Proponent prints) and the problem.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
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

from engine.core import checkpoints as ckpt
from engine.core.checkpoints import TRAJECTORY_FILE, Checkpoint
from engine.core.data import (
    DataConfig,
    cache_folder,
    ImageRows,
    TensorDict,
    input_bytes,
    load_data,
    read_raw_image,
    rows_table,
    take,
    tokenize_texts,
)
from engine.core.errors import ValidationError
from engine.core.paths import check_inside
from engine.core.spec import ProjectSpec, TrainingTable, parse_spec
from engine.core.tables import iter_table
from engine.storage.arrays import atomic_write_text, clean_orphan_temp_files
from engine.storage.folders import recover_interrupted_swap
from engine.storage.statedb import STATE_DIRNAME

ROWS_FILE = "rows.csv"


class ExampleSet(torch.utils.data.Dataset):
    """A dataset of (x, y: int). ``x`` is row-indexable: a Tensor (tables), a :class:`TensorDict`
    of tensors (text), or :class:`ImageRows` (images, read from a memory-mapped uint8 file and
    normalised per read, never one float tensor). The engine slices ``x[lo:hi]`` / ``x[idx]``
    batches from it; code must not assume ``x`` is a whole tensor in memory."""

    def __init__(self, x: "torch.Tensor | TensorDict", y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x = x
        self.y = y.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

    def subset(self, indices) -> "ExampleSet":
        # image rows stay a view over the same file; tensors are copied
        x = self.x.subset(indices) if isinstance(self.x, ImageRows) else take(self.x, indices)
        return ExampleSet(x, take(self.y, indices))


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


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValidationError("missing project.toml (is this a project folder?)", file=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ValidationError(f"invalid TOML: {e}", file=str(path)) from None


class Project:
    """A loaded, validated project folder.

    >>> p = Project.load("sample_projects/digits")
    >>> p.train_dataset, p.test_dataset, p.build_model(), p.checkpoints
    """

    def __init__(self, root: Path, spec: dict):
        self.root = root
        self.toml_path = root / "project.toml"
        self.config: ProjectSpec = parse_spec(spec, self.toml_path)
        self.spec = spec
        cfg = self.config
        self.allow_outside_paths: bool = cfg.project.allow_outside_paths
        self.name: str = cfg.project.name or root.name
        self.task: str = cfg.project.task
        self.data_config = DataConfig.from_spec(cfg.data, self.toml_path, allow_outside_paths=self.allow_outside_paths)
        # data_format is the kind of input (images | tabular | text), what pages and workflows
        # branch on; data_source is the layout on disk ([data] format, e.g. image_folder)
        self.data_source: str = self.data_config.format
        self.data_format: str = "images" if self.data_source == "image_folder" else self.data_source
        self.train_csv = root / self.data_config.train  # a folder for image_folder
        self.test_csv = root / self.data_config.test
        self.label_column: str = self.data_config.label_column
        self.image_column: str = self.data_config.image_column
        self.text_column: str = self.data_config.text_column
        self.preprocessing = self.data_config.preprocessing
        self.factory_spec: str = cfg.model.factory
        self._inside(self._factory_file, "[model] factory file")
        self.checkpoint_dir = root / cfg.model.checkpoints
        self.weight_files: list[str] = list(cfg.model.weights)
        for w in self.weight_files:
            self._inside(root / w, "[model] weights file")
        self._attribute_globs: list[str] = list(cfg.model.attribute)
        # without [training] there is no recipe: final-weights methods run, retraining does not
        self.has_recipe: bool = cfg.training is not None
        self.recipe = self._parse_recipe(cfg.training)
        self._check_checkpoint_dir()
        # a kill between the two renames of a trajectory swap leaves only the previous folder, as .old
        recover_interrupted_swap(self.checkpoint_dir)
        recover_interrupted_swap(self.checkpoint_dir / "imported")
        for folder in (root / STATE_DIRNAME, self.checkpoint_dir):
            clean_orphan_temp_files(folder)  # left by a killed writer (its pid is in the name)
        self._load_data()

    def _inside(self, path: Path, what: str) -> Path:
        return check_inside(path, self.root, allowed=self.allow_outside_paths, what=what, file=self.toml_path)

    def _check_checkpoint_dir(self) -> None:
        """The checkpoint folder is replaced wholesale by ``train``/``import``, so it must be a folder
        of its own: inside the project (unless allowed), not the project folder, and not a folder
        that holds the data, the model file or project.toml."""
        d = self.checkpoint_dir.resolve()
        key = f"[model] checkpoints = {self.config.model.checkpoints!r}"
        self._inside(d, key + ":")
        protected = {self.root.resolve(): "the project folder"}
        for what, path in (("the training data", self.train_csv), ("the test data", self.test_csv),
                           ("the model file", self._factory_file), ("project.toml", self.toml_path)):
            path = path.resolve()
            protected.setdefault(path if path.is_dir() else path.parent, f"the folder of {what}")
        for w in self.weight_files:
            protected.setdefault((self.root / w).resolve().parent, "the folder of a [model] weights file")
        if self.data_config.image_root:
            protected.setdefault((self.root / self.data_config.image_root).resolve(), "the image folder")
        for folder, what in protected.items():
            if d == folder or d in folder.parents:
                raise ValidationError(f"{key} points at {what} ({d}); `proponent train` replaces that folder, so "
                                      f"it must be a folder of its own, e.g. checkpoints = \"checkpoints\"",
                                      file=str(self.toml_path))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, *, check_model: bool = True, check_trajectory: bool = True) -> "Project":
        """The project at ``path``, its TOML and data checked; ``check_model``: model.py builds and fits the
        data, and the weights in force load. ``check_trajectory=False`` for commands that write a new
        trajectory (train, import): a damaged log must not stop the command that replaces it."""
        root = Path(path).expanduser().resolve()
        if not root.exists():
            raise ValidationError("project folder not found", file=str(path))
        if root.is_file() and root.name == "project.toml":
            root = root.parent
        elif not root.is_dir():
            raise ValidationError("not a folder; give the project folder that holds project.toml", file=str(path))
        spec = _read_toml(root / "project.toml")
        p = cls(root, spec)
        if check_model:
            p._check_model()
            if check_trajectory and not p.has_trajectory:
                p.check_weights()
        return p

    @staticmethod
    def _parse_recipe(t: TrainingTable | None) -> Recipe:
        """The validated ``[training]`` table as a Recipe (the defaults when there is none)."""
        if t is None:
            return Recipe()
        r = Recipe(optimizer=t.optimizer, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, epochs=t.epochs,
                   batch_size=t.batch_size, seed=t.seed, checkpoints_per_epoch=t.checkpoints_per_epoch,
                   lr_schedule=t.lr_schedule)
        for s in t.stages:
            r.stages.append(Stage(name=s.name or f"stage{len(r.stages)}", epochs=s.epochs or r.epochs,
                                  lr=s.lr or r.lr, lr_schedule=s.lr_schedule or r.lr_schedule, select=s.select))
        return r

    def _load_data(self) -> None:
        tokenize = None
        if self.data_source == "text":
            tokenize = getattr(self._model_module, "tokenize", None)
        d = load_data(self.data_config, self.root, exclude_columns=self._stage_columns(), tokenize=tokenize,
                      factory_file=self._factory_file)
        self._data = d
        self.classes: list = d.classes
        self.feature_columns: list[str] = d.feature_columns
        if d.feature_mean is not None:
            self.feature_mean, self.feature_std = d.feature_mean, d.feature_std
        self.categories: dict[str, list] = d.categories
        self.data_warnings: list[str] = d.warnings
        self._pending_image_cache = list(d.image_cache)
        self.train_dataset = ExampleSet(d.x_train, d.y_train)
        self.test_dataset = ExampleSet(d.x_test, d.y_test)
        self._apply_stage_selections()

    # ------------------------------------------------------------------ rows and raw inputs
    @property
    def train_df(self) -> pd.DataFrame:
        """The training table as read (a tabular split is read whole on first use only)."""
        return self._data.frame("train")

    @property
    def test_df(self) -> pd.DataFrame:
        return self._data.frame("test")

    def table_head(self, split: str = "train", n: int = 10) -> pd.DataFrame:
        """The first ``n`` raw rows of ``split`` (a preview: a large table is not read whole for it)."""
        return self._data.head(split, n)

    def rows(self, split: str = "train") -> pd.DataFrame:
        """index, file, label per example of ``split``: how printed indexes map back to the data."""
        return rows_table(self._data, split, self.root)

    def write_rows_csv(self, folder: str | Path) -> Path:
        """Write ``rows.csv`` (split, index, file, label; train rows then test rows) into ``folder``."""
        frames = []
        for split in ("train", "test"):
            df = self.rows(split)
            df.insert(0, "split", split)
            frames.append(df)
        path = Path(folder) / ROWS_FILE
        atomic_write_text(path, pd.concat(frames, ignore_index=True).to_csv(index=False))
        return path

    def row_fingerprints(self, split: str = "train") -> np.ndarray:
        """One uint64 per example of ``split`` that names it by content, not position: the raw table row
        (tabular and text: every column, numbers as float64 and the rest as text, so a column read as
        integers in one version of the file and as floats in another still matches), or the image's
        file (relative to the project) and label. What flags follow when rows are added, removed or
        re-ordered (:mod:`engine.workflows.flag_rows`)."""
        cache = self.__dict__.setdefault("_row_fingerprints", {})
        if split not in cache:
            if self.data_format in ("tabular", "text") and self._data.table_files is not None:
                # chunk by chunk, as attribution reads the table: memory is one chunk plus 8 bytes a row
                path = self._data.table_files[0 if split == "train" else 1]
                parts = [_content_hashes(df) for _, df in iter_table(path, self._data.label_column,
                                                                     text_columns=self._data.text_columns)]
                cache[split] = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
            else:
                cache[split] = _content_hashes(self.rows(split)[["file", "label"]])
        return cache[split]

    def example_file(self, split: str, index: int) -> Path | None:
        files = self._data.train_files if split == "train" else self._data.test_files
        return None if files is None else files[int(index)]

    def raw_image(self, split: str, index: int):
        """The example's original pixels (a PIL image, before resize/mode/normalize), for display;
        None when the project has no image files."""
        f = self.example_file(split, index)
        return None if f is None else read_raw_image(f)

    def preprocess_image(self, image) -> np.ndarray:
        """A PIL image → [channels, height, width] float32, exactly as the training data was prepared."""
        return self.preprocessing.apply(image)

    def text(self, split: str, index: int) -> str | None:
        if self.data_format != "text":
            return None
        df = self.train_df if split == "train" else self.test_df
        return str(df[self.text_column].iloc[int(index)])

    def tokenize(self, texts: list[str]) -> TensorDict:
        """model.py's tokenizer, as applied to the project's texts (for queries typed in the app)."""
        fn = getattr(self._model_module, "tokenize", None)
        if fn is None:
            raise ValidationError("no function 'tokenize'", file=str(self._factory_file))
        return tokenize_texts(fn, texts, self._factory_file)

    def require_recipe(self, action: str) -> None:
        """One line, before anything is written, when ``action`` retrains but there is no [training]."""
        if not self.has_recipe:
            raise ValidationError(f"{action} needs a training recipe: add a [training] table (optimizer, lr, epochs, "
                                  f"batch_size) describing how the model is trained", file=str(self.toml_path))

    @property
    def tracked_parameter_globs(self) -> list[str]:
        """``[model] attribute``: globs over parameter names that gradients, curvature and projections
        are restricted to (empty: every parameter that requires grad)."""
        return list(self._attribute_globs)

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
        """Per-example input shape (for dict inputs: that of the first tensor)."""
        return tuple(self.train_dataset.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def _factory_file(self) -> Path:
        return self.root / self.factory_spec.partition(":")[0]

    @cached_property
    def _factory(self):
        func = self.factory_spec.partition(":")[2] or "build"
        module = self._model_module
        if not hasattr(module, func):
            raise ValidationError(f"no function {func!r}", file=str(self._factory_file))
        return getattr(module, func)

    @cached_property
    def _model_module(self):
        path = self._factory_file
        if not path.is_file():
            raise ValidationError(f"model factory file not found ({self.factory_spec})", file=str(path))
        mod_name = f"_proponent_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)  # the user's own model.py: code they wrote, not a pickle
        except (Exception, SystemExit) as e:  # model code that calls sys.exit() is an error in it, not an exit
            sys.modules.pop(mod_name, None)
            raise ValidationError(f"cannot import: {_failure(e)}", file=str(path)) from None
        return module

    def build_model(self) -> nn.Module:
        """A fresh, untrained module from the project's factory."""
        factory = self._factory  # a missing file or function is its own one-line error
        # text models are built from the class count alone: build(num_classes)
        args = (self.num_classes,) if self.data_format == "text" and _positional_arity(factory) == 1 \
            else (self.input_shape, self.num_classes)
        try:
            model = factory(*args)
        except (Exception, SystemExit) as e:
            raise ValidationError(f"build{args} failed: {_failure(e)}",
                                  file=str(self.root / self.factory_spec.partition(':')[0])) from None
        if not isinstance(model, nn.Module):
            raise ValidationError(f"factory returned {type(model).__name__}, not a torch.nn.Module",
                                  file=str(self.root / self.factory_spec.partition(':')[0]))
        return model

    def _check_model(self) -> None:
        model = self.build_model().eval()
        if not any(True for _ in model.parameters()):
            raise ValidationError("the model has no parameters to attribute", file=str(self._factory_file))
        # two rows, then a realistic batch: a model that only breaks for larger batches fails here,
        # not half-way through training or featurization
        for n in (2, min(len(self.train_dataset), 32)):
            x = take(self.train_dataset.x, range(n))
            with torch.no_grad():
                try:
                    out = model(x)
                except (Exception, SystemExit) as e:
                    raise ValidationError(f"model forward failed on a batch of {n}, input {_describe(x)}: "
                                          f"{_failure(e)}", file=str(self._factory_file)) from None
            if not isinstance(out, torch.Tensor):
                raise ValidationError(f"model forward returned {_describe_output(out)}, not a logits tensor "
                                      f"[batch, {self.num_classes}]; make build() return a module whose forward "
                                      f"returns the logits alone", file=str(self._factory_file))
            if out.ndim != 2 or out.shape[0] != n:
                break
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise ValidationError(f"model output has shape {tuple(out.shape)} but the data has {self.num_classes} classes; "
                                  f"expected [batch, {self.num_classes}]", file=str(self.root / self.factory_spec.partition(':')[0]))

    # ------------------------------------------------------------------ checkpoints
    @property
    def trajectory_path(self) -> Path:
        return self.checkpoint_dir / TRAJECTORY_FILE

    def trajectory(self) -> dict:
        return ckpt.read_trajectory(self.checkpoint_dir)

    @property
    def has_trajectory(self) -> bool:
        """A recorded trajectory (``proponent train`` or ``proponent import``) exists."""
        return bool(self.trajectory().get("checkpoints"))

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """All recorded checkpoints, ordered by (model, step); without a trajectory, the
        ``[model] weights`` files (one final checkpoint per model)."""
        cks = ckpt.trajectory_checkpoints(self.checkpoint_dir, self.trajectory(), self.allow_outside_paths)
        return cks or ckpt.weights_checkpoints(self.root, self.weight_files)

    def model_ids(self) -> list[int]:
        return sorted({c.model_id for c in self.checkpoints})

    def final_checkpoints(self) -> list[Checkpoint]:
        """The last checkpoint of each independently trained model."""
        last: dict[int, Checkpoint] = {}
        for c in self.checkpoints:
            last[c.model_id] = c
        return [last[m] for m in sorted(last)]

    def run_checkpoints(self, model_id: int | None = None) -> list[Checkpoint]:
        """The checkpoints of one model's run in step order (default: the first recorded model,
        whose trajectory the trajectory-aware methods use)."""
        cks = self.checkpoints
        if model_id is None:
            model_id = min((c.model_id for c in cks), default=0)
        return [c for c in cks if c.model_id == model_id]

    def final_checkpoint(self, model_id: int = 0) -> Checkpoint:
        cks = [c for c in self.checkpoints if c.model_id == model_id]
        if not cks:
            raise ValidationError("no trained weights: run `proponent train`, or list your own in "
                                  "[model] weights = [\"model.safetensors\"]", file=str(self.checkpoint_dir))
        return cks[-1]

    def load_state(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        return ckpt.read_state_dict(checkpoint.weights)

    def load_model(self, checkpoint: Checkpoint | None = None) -> nn.Module:
        """A module with the checkpoint's weights (default: final checkpoint of model 0), in eval mode."""
        checkpoint = checkpoint or self.final_checkpoint()
        return ckpt.fit_state(self.build_model(), self.load_state(checkpoint), checkpoint.weights).eval()

    def accuracy_report(self, batch: int = 1024) -> dict[str, Any]:
        """Train/test accuracy of each final model, and a warning when test accuracy is near chance
        (for a model trained elsewhere that usually means the preprocessing differs)."""
        if not self.checkpoints:
            return {"models": [], "warning": None}
        rows = []
        for c in self.final_checkpoints():
            model = self.load_model(c)
            acc = {}
            for split, ds in (("train", self.train_dataset), ("test", self.test_dataset)):
                with torch.no_grad():
                    pred = torch.cat([model(ds.x[i:i + batch]).argmax(1) for i in range(0, len(ds), batch)])
                acc[split] = float((pred == ds.y).float().mean())
            rows.append({"model": c.model_id, "weights": c.key, **acc})
        # chance: always predicting the most common test class
        chance = float(np.bincount(self.test_dataset.y.numpy(), minlength=self.num_classes).max() / len(self.test_dataset))
        test = float(np.mean([r["test"] for r in rows]))
        warning = None
        if test <= chance + 0.5 * (1 - chance) * 0.2:
            warning = (f"test accuracy {test:.3f} is near chance ({chance:.3f}): if the model was trained elsewhere, "
                       f"check that [data] resize, mode and normalize match its training preprocessing")
        return {"models": rows, "chance": chance, "warning": warning}

    def check_weights(self) -> None:
        """Every ``[model] weights`` file exists and fits model.py (one line naming file and key)."""
        for c in ckpt.weights_checkpoints(self.root, self.weight_files):
            self.load_model(c)

    def checkpoint_hash(self) -> str:
        """Hash of the recorded weights; part of every run's cache key. Cached until the trajectory
        log changes, since every cache lookup (and every app rerun) asks for it."""
        log = self.trajectory_path
        stamp = (log.stat().st_mtime_ns if log.is_file() else None,
                 tuple(c.weights.stat().st_mtime_ns if c.weights.is_file() else None
                       for c in ckpt.weights_checkpoints(self.root, self.weight_files)))
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
        return _hash_examples(self.train_dataset, self.test_dataset)

    @cached_property
    def train_data_hash(self) -> str:
        """Hash of the training inputs and labels: what a recorded trajectory was trained on."""
        return _hash_examples(self.train_dataset)

    def data_hash(self) -> str:
        """Hash of the loaded inputs and labels (fixed for the life of this Project)."""
        return self._data_hash

    def check_data_unchanged(self) -> None:
        """The data the trajectory was recorded on is the data now; otherwise one line saying what
        changed and how to fix it (nothing may run on checkpoints of other data)."""
        log = self.trajectory() if self.has_trajectory else {}
        # train_hash: trajectories recorded before it existed are checked by their row count only
        recorded_n, recorded_hash = log.get("n_train"), log.get("train_hash")
        n = len(self.train_dataset)
        if recorded_n is not None and int(recorded_n) != n:
            raise ValidationError(f"the training data has {n} rows but the trajectory was recorded on {recorded_n}; "
                                  f"retrain (`proponent train`) or re-import (`proponent import`)",
                                  file=str(self.trajectory_path))
        if recorded_hash and recorded_hash != self.train_data_hash:
            raise ValidationError("the training data changed since the trajectory was recorded; retrain "
                                  "(`proponent train`) or re-import (`proponent import`)", file=str(self.trajectory_path))

    # ------------------------------------------------------------------ state
    @property
    def scratch_folder(self) -> Path:
        """Where unlinked scratch arrays of whole splits go (engine.storage.arrays.scratch_array): the
        project's cache when it keeps state (the same disk as its stores), else the system's temporary
        folder. Nothing is created here."""
        return cache_folder(self.root)

    @property
    def state_dir(self) -> Path:
        d = self.root / STATE_DIRNAME
        try:
            d.mkdir(exist_ok=True)
        except FileExistsError:  # not a folder: mkdir's "File exists" does not say what to do
            raise ValidationError(f"is a file, not a folder; Proponent keeps its results and state in "
                                  f"{STATE_DIRNAME}/: move the file away", file=str(d)) from None
        # the project now keeps state: keep its decoded images too (see engine.core.data.PendingImageCache)
        pending, self._pending_image_cache = getattr(self, "_pending_image_cache", []), []
        for item in pending:
            item.write()
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
            "weights": "trajectory" if self.has_trajectory else ("weights files" if self.weight_files else "none"),
            "recipe": self.has_recipe,
        }


def _content_hashes(df: pd.DataFrame) -> np.ndarray:
    """One uint64 per row of ``df``: numbers as float64 (an int/float re-typing still matches), the rest
    as text."""
    canonical = pd.DataFrame({
        str(c): (df[c].astype(np.float64) if pd.api.types.is_numeric_dtype(df[c])
                 and not pd.api.types.is_bool_dtype(df[c]) else df[c].astype(str))
        for c in df.columns})
    return pd.util.hash_pandas_object(canonical, index=False).to_numpy(np.uint64)


def _hash_examples(*datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        for block in input_bytes(ds.x):
            h.update(block)
        h.update(ds.y.numpy().tobytes())
    return h.hexdigest()[:16]


def _failure(e: BaseException) -> str:
    """What went wrong in the user's model code, for a one-line error."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r}) (model code must not exit)"
    return f"{type(e).__name__}: {e}"


def _positional_arity(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _describe_output(out) -> str:
    """A model output that is not a tensor, in a few words: "a tuple (Tensor[2, 3], Tensor[2, 16])"."""
    def one(v) -> str:
        return f"Tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} ({', '.join(one(v) for v in list(out)[:4])}{', …' if len(out) > 4 else ''})"
    if isinstance(out, dict):
        return f"a {type(out).__name__} with keys {', '.join(map(str, list(out)[:6]))}"
    return f"a {type(out).__name__}"


def _describe(x) -> str:
    if isinstance(x, TensorDict):
        return repr(x)
    return f"of shape {tuple(x.shape)}"
