"""``project.toml`` as typed, validated tables (pydantic v2).

Every table forbids unknown keys (the error names the key and suggests the closest known one),
values are strict (TOML ``lr = true`` or ``epochs = 2.7`` is an error, never a silent cast) and
ranges are checked (``lr > 0``, ``0 ≤ momentum < 1``, ``epochs ≥ 1``, ``batch_size ≥ 1``, …).
A failure is one :class:`ValidationError` line naming project.toml, the table and the key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.core.errors import ValidationError

FORMATS = ("images", "image_folder", "tabular", "text")
OPTIMIZERS = ("sgd", "adam", "lbfgs")
LR_SCHEDULES = ("constant", "cosine", "linear", "step")

NonEmptyStr = Annotated[str, Field(min_length=1)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ProjectTable(_Table):
    name: NonEmptyStr | None = None
    task: Literal["classification"] = "classification"
    # images, model files, weights and checkpoints outside the project folder are refused unless this is set
    allow_outside_paths: bool = False


MAX_IMAGE_SIDE = 4096


class NormalizeTable(_Table):
    mean: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(min_length=1)


class DataTable(_Table):
    format: Literal[FORMATS] = "images"
    train: NonEmptyStr
    test: NonEmptyStr
    label_column: NonEmptyStr = "label"
    image_column: NonEmptyStr = "path"
    text_column: NonEmptyStr = "text"
    image_root: NonEmptyStr | None = None
    feature_columns: list[NonEmptyStr] | None = None
    categorical_columns: list[NonEmptyStr] = []
    # at most MAX_IMAGE_SIDE a side: a typo such as 100000 would otherwise decode into tens of GB before any check
    resize: Annotated[list[Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]], Field(min_length=2, max_length=2)] | None = None
    mode: Literal["rgb", "grey", "gray"] | None = None
    normalize: NormalizeTable | None = None

    @field_validator("feature_columns", "categorical_columns")
    @classmethod
    def _distinct(cls, v):
        if v is not None and len(set(v)) != len(v):
            dup = next(c for c in v if v.count(c) > 1)
            raise ValueError(f"column {dup!r} is listed twice")
        return v


class ModelTable(_Table):
    factory: NonEmptyStr = "model.py:build"
    checkpoints: NonEmptyStr = "checkpoints"
    weights: list[NonEmptyStr] = []
    attribute: list[NonEmptyStr] = []

    @field_validator("weights", "attribute", mode="before")
    @classmethod
    def _one_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v


class StageTable(_Table):
    name: NonEmptyStr | None = None
    epochs: PositiveInt | None = None
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    lr_schedule: Literal[LR_SCHEDULES] | None = None
    select: NonEmptyStr | None = None


class TrainingTable(_Table):
    optimizer: Literal[OPTIMIZERS] = "sgd"
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    seed: Annotated[int, Field(ge=0)] = 0
    checkpoints_per_epoch: PositiveInt = 1
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    stages: list[StageTable] = []


class ProjectSpec(_Table):
    project: ProjectTable = ProjectTable()
    data: DataTable
    model: ModelTable
    training: TrainingTable | None = None


# pydantic's words for the common failures, in the words of a TOML file
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "string_type": "must be text (a quoted string)",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list, e.g. [...]",
    "model_type": "must be a table",
    "dict_type": "must be a table",
    "string_too_short": "must not be empty",
    "too_short": "has too few entries",
    "too_long": "has too many entries",
}


def _where(loc: tuple) -> tuple[str, str]:
    """(table, key) as a TOML reader sees them, e.g. ("[training]", "stages[0].epochs")."""
    parts = [p for p in loc if not (isinstance(p, str) and p in ("int", "float", "str", "list", "function-after"))]
    if not parts:
        return "", ""
    table, rest = parts[0], parts[1:]
    key = ""
    for p in rest:
        key += f"[{p}]" if isinstance(p, int) else (f".{p}" if key else str(p))
    return f"[{table}]", key


def _known_keys(loc: tuple) -> list[str]:
    model: Any = ProjectSpec
    for p in loc[:-1]:
        if isinstance(p, int):
            continue
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            return []
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(cand, "__args__", None)
            cand = inner[0] if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel) else cand
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def describe_error(err: dict) -> str:
    """One pydantic error as ``[table] key: problem (got value)``."""
    loc = tuple(err["loc"])
    table, key = _where(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc)
        name = str(loc[-1])
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else (f" (known: {', '.join(known)})" if known else "")
        where = table if len(loc) > 1 else f"[{name}]"
        what = "unknown table" if len(loc) == 1 else "unknown key"
        return f"{where} {what} {name!r}{hint}" if len(loc) > 1 else f"{what} {where}{hint}"
    msg = _MESSAGES.get(kind)
    if msg is None:
        msg = err["msg"]
        msg = msg[0].lower() + msg[1:]
        msg = msg.replace("input should be", "must be").replace("value error, ", "")
    got = ""
    if kind != "missing" and "input" in err and not isinstance(err["input"], (dict, list)):
        got = f" (got {err['input']!r})"
    return f"{table} {key}: {msg}{got}" if key else f"{table} {msg}{got}"


def parse_spec(raw: dict, toml: Path) -> ProjectSpec:
    """The validated spec, or one line naming project.toml, the table, the key and the problem."""
    if "training" in raw and raw["training"] is None:  # pragma: no cover - TOML has no null
        raw = {k: v for k, v in raw.items() if k != "training"}
    try:
        return ProjectSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        # a misspelt key explains the "required" error it causes, so it is named first
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ValidationError(describe_error(errors[0]) + more, file=str(toml)) from None


__all__ = ["ProjectSpec", "ProjectTable", "DataTable", "ModelTable", "TrainingTable", "StageTable", "parse_spec",
           "describe_error", "FORMATS", "OPTIMIZERS", "LR_SCHEDULES"]
