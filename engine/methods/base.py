"""The one interface every attribution method implements, and the registry that lists them.

Sign convention (docs/design.md, section 2): ``S[q, i] > 0`` makes training example ``i`` a proponent of
query ``q``: removing ``i`` is predicted to lower ``q``'s correct-class margin.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pkgutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterator, Literal

import numpy as np
import pydantic
import torch

from engine.autodiff.per_example import resolve_device
from engine.core.errors import Cancelled, ProponentError
from engine.core.project import ExampleSet, Project

ProgressFn = Callable[[str, int, int], None]

SIGN_CONVENTION = ("Positive score: the training example is a proponent — removing it is predicted to lower the "
                   "query's correct-class margin. Negative: an opponent.")


RANGE_KEYS = ("ge", "gt", "le", "lt")


def setting(default, help: str, choices: tuple | None = None, *, ge=None, gt=None, le=None, lt=None, **kw):
    """A dataclass field carrying its one-line help (the UI and CLI show it), its choices and its
    range (``ge``/``gt``/``le``/``lt``), which :func:`coerce_settings` enforces."""
    meta = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    meta.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None})
    return dataclasses.field(default=default, metadata=meta, **kw)


@dataclasses.dataclass
class NoSettings:
    pass


class SelfScoresUnavailable(ProponentError):
    """A method that cannot afford self-scores on this project (e.g. one solve per example)."""


class Queries:
    """Resolved queries: inputs, labels (the measured class) and where they came from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, source: str, indices: np.ndarray | None = None):
        self.x, self.y, self.source, self.indices = x, y.long(), source, indices

    def __len__(self):
        return len(self.y)

    @classmethod
    def resolve(cls, project: Project, queries) -> "Queries":
        if isinstance(queries, Queries):
            return queries
        if isinstance(queries, str):
            if queries == "test":
                ds = project.test_dataset
            elif queries == "train":
                ds = project.train_dataset
            else:
                raise ProponentError(f"queries must be 'test', 'train', indices or (x, y), not {queries!r}")
            return cls(ds.x, ds.y, queries, np.arange(len(ds)))
        if isinstance(queries, ExampleSet):
            return cls(queries.x, queries.y, "custom")
        if isinstance(queries, tuple) and len(queries) == 2:
            split, idx = queries
            if isinstance(split, str):
                ds = project.test_dataset if split == "test" else project.train_dataset
                idx = np.asarray(idx, dtype=np.int64)
                return cls(ds.x[idx], ds.y[idx], split, idx)
            x, y = queries
            return cls(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long), "custom")
        idx = np.asarray(queries, dtype=np.int64)  # test indices
        ds = project.test_dataset
        return cls(ds.x[idx], ds.y[idx], "test", idx)


class Attributor(ABC):
    """``fit(project, settings)`` → ``scores(queries)`` [n_queries, n_train] → ``self_scores()``.

    Subclasses set ``name`` (the registry key), ``label``, ``description`` and a ``Settings``
    dataclass whose fields carry a default and one-line help. ``fit`` writes what it computes
    under ``workdir``; a fit interrupted half-way resumes from there.
    """

    name: ClassVar[str]
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    # "example": scores are per training example; "cluster": derived from clusters (DDM)
    granularity: ClassVar[str] = "example"
    # a method that cannot handle a model says why via ``supports(project)``
    extension: ClassVar[bool] = False  # our extension of a published method (labelled in the UI)
    # bump when a change alters results, so cached runs of the old code are not reused
    version: ClassVar[str] = "1"
    # what the method needs from the project (REQUIREMENTS): checked by supports() and fit()
    requires: ClassVar[frozenset] = frozenset({"weights"})
    # fit splits the training set over torchrun ranks (engine.autodiff.distributed); other methods
    # run on rank 0 alone when started under torchrun
    shards_over_ranks: ClassVar[bool] = False

    def __init__(self, settings: Any = None, *, device: str = "auto", workdir: str | Path | None = None,
                 progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                 store_dir: str | Path | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.device = resolve_device(device)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"proponent-{self.name}-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # training-side stores that runs differing only in how they use them (say, the damping) can
        # share: the project's .proponent/features when run through engine.api, else this run's workdir
        self.store_dir = Path(store_dir) if store_dir is not None else self.workdir
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress or (lambda stage, done, total: None)
        self.cancel = cancel
        self.project: Project | None = None
        self.meta: dict[str, Any] = {}

    # -- lifecycle
    def fit(self, project: Project, settings: Any = None) -> "Attributor":
        if settings is not None:
            self.settings = coerce_settings(type(self), settings)
        unmet = unmet_requirements(type(self), project, self.settings)
        if unmet:
            raise ProponentError(unmet)
        if not project.checkpoints and self.needs_checkpoints:
            raise ProponentError("no checkpoints recorded; run `proponent train PROJECT` first",
                                 file=str(project.checkpoint_dir))
        project.check_data_unchanged()
        self.project = project
        self._fit(project)
        return self

    needs_checkpoints: ClassVar[bool] = True

    @abstractmethod
    def _fit(self, project: Project) -> None: ...

    @abstractmethod
    def scores(self, queries="test") -> np.ndarray:
        """[n_queries, n_train] scores, oriented per the sign convention."""

    def self_scores(self) -> np.ndarray:
        """S[i, i] with each training example as its own query. Subclasses override with a direct form."""
        n = len(self._p.train_dataset)
        out = np.empty(n)
        step = 256
        for lo in range(0, n, step):
            idx = np.arange(lo, min(n, lo + step))
            block = self.scores(("train", idx))
            out[idx] = block[np.arange(len(idx)), idx]
        return out

    def suspicion(self) -> np.ndarray:
        """How suspicious each training example looks (higher: more likely mislabeled)."""
        return self.self_scores()

    def copy_scores(self) -> np.ndarray:
        """The score each training example would get from an exact copy of itself as a query: the
        diagonal of the scoring function itself, leak search's reference (score / copy score is 1 for
        a copy). The same as :meth:`self_scores` unless a method scores self-influence otherwise
        (:meth:`copy_scores_differ`)."""
        return self.self_scores()

    def training_query_scale(self, rows: np.ndarray) -> np.ndarray | None:
        """Per training row ``rows[j]`` scored as a query: the factor that undoes its own part in the fit,
        so its scores stand in for those of an unseen query (leak search's null of training queries).
        None: its presence changes nothing worth correcting (one row of a curvature fitted on thousands)."""
        return None

    @classmethod
    def copy_scores_differ(cls, meta: dict) -> bool:
        """Whether a fitted run (its ``meta``) scored self-influence with another function than the
        test scores, so its copy scores must be computed apart."""
        return False

    # -- helpers shared by methods
    @property
    def _p(self) -> Project:
        if self.project is None:
            raise ProponentError(f"{self.name}: call fit(project) before scoring")
        return self.project

    def _queries(self, queries) -> Queries:
        return Queries.resolve(self._p, queries)

    def _check_cancel(self, what: str) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"{self.name}: {what} cancelled; rerun to resume")

    # queries scored at once by score_blocks; None: as many as keep a block's float64 scores and
    # the temporaries of scoring (about 4 copies) within SCORE_BLOCK_BYTES, at most 256
    query_block: ClassVar[int | None] = None
    SCORE_BLOCK_BYTES: ClassVar[int] = 64 << 20

    def score_blocks(self, queries="test", block: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(lo, hi, scores[lo:hi])`` over blocks of queries: the whole [n_queries, n_train] matrix
        is never held at once (cached_scores writes it to disk block by block)."""
        q = self._queries(queries)
        n_train = len(self._p.train_dataset)
        step = int(block or self.query_block or max(1, min(256, self.SCORE_BLOCK_BYTES // (8 * 4 * max(1, n_train)))))
        for lo in range(0, len(q), step):
            hi = min(len(q), lo + step)
            self._check_cancel("scoring")
            part = Queries(q.x[lo:hi], q.y[lo:hi], q.source, None if q.indices is None else q.indices[lo:hi])
            yield lo, hi, np.asarray(self.scores(part))

    def score_columns(self, queries="test") -> Iterator[tuple[int, int, np.ndarray]] | None:
        """Optionally ``(lo, hi, scores[:, lo:hi])`` over training chunks, for methods whose
        training side lives on disk (one pass over it instead of one per query block); None
        when the method scores by query blocks only."""
        return None

    def _column_slices(self, lo: int, hi: int, n_queries: int) -> Iterator[tuple[int, int]]:
        """Training columns lo…hi of a score_columns chunk in slices whose [n_queries, columns] float64 scores
        (and the temporaries of scoring, about 4 copies) stay within SCORE_BLOCK_BYTES, as score_blocks' rows
        do: with many queries a whole chunk's block grows with them (10,000 queries × 1,024 rows: 82 MB)."""
        step = max(1, self.SCORE_BLOCK_BYTES // (8 * 4 * max(1, n_queries)))
        for a in range(lo, hi, step):
            yield a, min(hi, a + step)

    def topk(self, queries="test", k: int = 10, chunk: int | None = None) -> dict[str, np.ndarray]:
        """Top-k proponents and opponents per query (ties: lower training index first), streamed
        over query blocks so memory is bounded by ``chunk × n_train``."""
        q = self._queries(queries)
        n, n_train = len(q), len(self._p.train_dataset)
        kk = min(k, n_train)
        out = {"proponents": np.empty((n, kk), np.int64), "proponent_scores": np.empty((n, kk)),
               "opponents": np.empty((n, kk), np.int64), "opponent_scores": np.empty((n, kk))}
        for lo, hi, s in self.score_blocks(q, chunk):
            top = np.argsort(-s, axis=1, kind="stable")[:, :kk]
            bot = np.argsort(s, axis=1, kind="stable")[:, :kk]
            out["proponents"][lo:hi], out["proponent_scores"][lo:hi] = top, np.take_along_axis(s, top, 1)
            out["opponents"][lo:hi], out["opponent_scores"][lo:hi] = bot, np.take_along_axis(s, bot, 1)
        return out

    @classmethod
    def requirements(cls, settings=None) -> frozenset:
        """What this method needs with these settings; with None, what it needs whatever the
        settings (the class's ``requires``)."""
        return cls.requires

    @classmethod
    def advisories(cls, project: Project, settings) -> list[str]:
        """One-line notes that a default (or a chosen setting) is a poor fit for this project. The run
        still goes ahead; the CLI prints them, the app shows them and the run's meta keeps them."""
        return []

    @classmethod
    def supports(cls, project: Project) -> str | None:
        """None if the method can run on this project, else the one-line reason it cannot.
        Subclasses that add model-specific checks call ``super().supports(project)`` first."""
        return unmet_requirements(cls, project)


# what a method can need, and how a project provides it
REQUIREMENTS = {
    "weights": "final trained weights",
    "models": "several independently trained models",
    "trajectory": "a recorded training trajectory",
    "recipe": "a training recipe ([training] in project.toml)",
}


# the order in which runnable alternatives are suggested: general-purpose and fast first
SUGGESTION_ORDER = {name: i for i, name in enumerate(("trak", "ekfac", "grad-cos", "knn", "source", "tracin", "grad-dot",
                                                      "forward-inf", "gif", "exact-if", "ddm"))}


def _has(project: Project, need: str) -> bool:
    if need == "weights":
        return bool(project.checkpoints)
    if need == "models":
        return len(project.model_ids()) > 1
    if need == "trajectory":
        return project.has_trajectory
    if need == "recipe":
        return project.has_recipe
    raise ValueError(f"unknown requirement {need!r} (known: {', '.join(REQUIREMENTS)})")


def unmet_requirements(cls: type[Attributor], project: Project, settings=None) -> str | None:
    """None if the project provides everything ``cls`` needs, else one line naming what is
    missing, how to provide it, and which methods can run instead."""
    missing = [n for n in ("weights", "trajectory", "models", "recipe") if n in cls.requirements(settings)
               and not _has(project, n)]
    if not missing:
        return None
    need = missing[0]
    if need == "weights":
        return (f"{cls.name} needs trained weights; run `proponent train` or list your own in "
                f"[model] weights = [\"model.safetensors\"]")
    # requirements first: supports() of a method whose requirements are met never comes back here
    others = [m.name for m in sorted(list_methods(), key=lambda m: SUGGESTION_ORDER.get(m.name, len(SUGGESTION_ORDER)))
              if m is not cls and all(_has(project, n) for n in m.requirements()) and m.supports(project) is None]
    instead = f" or choose {', '.join(others[:4])}{' …' if len(others) > 4 else ''}" if others else ""
    traj = project.trajectory_path.relative_to(project.root) if project.trajectory_path.is_relative_to(project.root) \
        else project.trajectory_path
    if need == "trajectory":
        return (f"{cls.name} needs a recorded trajectory ({traj.as_posix()}); record one with `proponent train`, "
                f"import yours with `proponent import PROJECT --checkpoints DIR`{instead}")
    if need == "models":
        return (f"{cls.name} needs several independently trained models (this project has {len(project.model_ids())}); "
                f"list them in [model] weights or run `proponent train --models N`{instead}")
    return (f"{cls.name} needs a training recipe ([training] in project.toml) because it retrains the model"
            f"{' with these settings' if settings is not None and 'recipe' not in cls.requires else ''}{instead}")


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


@functools.lru_cache(maxsize=None)
def settings_model(settings_cls: type) -> type[pydantic.BaseModel]:
    """The pydantic model that validates one method's settings: types from the defaults, choices,
    ranges and unknown names (extra="forbid"). Strings (``--set NAME=VALUE``) are parsed by it, so
    ``absolute=ture`` is an error, never False."""
    fields = {}
    for f in dataclasses.fields(settings_cls):
        default = f.default
        kind = type(default)
        ann: Any = kind
        if f.metadata.get("choices"):
            ann = Literal[tuple(f.metadata["choices"])]
        elif kind in (int, float):
            ann = Annotated[kind, pydantic.BeforeValidator(_not_bool)]
        limits = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata}
        fields[f.name] = (ann, pydantic.Field(default, allow_inf_nan=False, **limits) if kind is float
                          else pydantic.Field(default, **limits))
    return pydantic.create_model(f"{settings_cls.__name__}Model", __config__=pydantic.ConfigDict(extra="forbid"),
                                 **fields)


def coerce_settings(cls: type[Attributor], settings) -> Any:
    """Build the method's Settings from a dict (CLI strings, UI values, JSON), validated by
    :func:`settings_model`; any problem is one line naming the method and the setting."""
    S = cls.Settings
    if isinstance(settings, S):
        settings = dataclasses.asdict(settings)
    if settings is None:
        return S()
    if not isinstance(settings, dict):
        raise ProponentError(f"{cls.name}: settings must be a mapping, not {type(settings).__name__}")
    try:
        valid = settings_model(S).model_validate(settings)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        known = [f.name for f in dataclasses.fields(S)]
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known) or 'none'})"
            raise ProponentError(f"{cls.name}: unknown setting {name!r}{hint}") from None
        msg = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
        raise ProponentError(f"{cls.name}: setting {name!r} {msg[0].lower() + msg[1:]} (got {err.get('input')!r})") from None
    return S(**valid.model_dump())


def settings_dict(settings) -> dict:
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings or {})


def describe_settings(cls: type[Attributor]) -> list[dict]:
    """Each setting's name, default, type, choices and help (for the UI and `proponent info`)."""
    out = []
    for f in dataclasses.fields(cls.Settings):
        out.append({"name": f.name, "default": f.default, "type": type(f.default).__name__,
                    "choices": f.metadata.get("choices"), "help": f.metadata.get("help", ""),
                    **{k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata}})
    return out


# ----------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Attributor]] = {}


def register(cls: type[Attributor]) -> type[Attributor]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two methods registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


# modules of the package that hold shared pieces rather than a method
_NOT_METHODS = {"base", "gradsim", "settings"}


def _discover() -> None:
    """Import every method module of this package (each registers itself)."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_METHODS:
            importlib.import_module(f"{__package__}.{info.name}")


def list_methods() -> list[type[Attributor]]:
    _discover()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_method(name: str) -> type[Attributor]:
    _discover()
    if name not in _REGISTRY:
        raise ProponentError(f"unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
