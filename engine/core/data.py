"""Reading a project's data: image CSVs, ImageFolder trees, tables (CSV/Parquet) and text.

Every format ends in the same thing, :class:`LoadedData`: train/test inputs (a tensor, or a
:class:`TensorDict` for text), integer labels, the class names, and a table with one row per
example (``rows``) whose order is the order of every index Proponent prints.

Decisions for ImageFolder trees (torchvision's ``ImageFolder`` conventions, so indexes agree):
classes are the sorted sub-folder names of ``train``; rows are sorted by (class folder, path
inside it). A file whose extension is not an image extension is *skipped and counted* (as
torchvision does; each skip is reported in :attr:`LoadedData.warnings`, one line naming the
path). An empty class folder, or a class folder only in test, is an error naming the folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils import _pytree as pytree

from engine.core.errors import ValidationError
from engine.core.images import ImagePreprocessing, ImageRows, load_split, read_raw_image, regular_file
from engine.core.paths import FolderResolver, check_inside
from engine.core.tables import (TABLE_SUFFIXES, FirstSeen, check_labels, check_unique_header, class_list, csv_options,
                                 iter_table, load_tabular_splits, parse_error, table_kind, test_class_codes)
from engine.storage.statedb import STATE_DIRNAME

FORMATS = ("images", "image_folder", "tabular", "text")
# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- dict inputs
class TensorDict:
    """A batch of dict inputs (e.g. ``input_ids`` and ``attention_mask``), all sharing the first
    (example) dimension. Indexing by a key gives a tensor; by an int, slice or index array it gives
    the selected examples, so engine code written for tensors (``x[lo:hi]``, ``x.to(device)``,
    ``len(x)``) works unchanged. Registered as a pytree node so ``torch.func.vmap`` maps over it."""

    def __init__(self, data: dict[str, torch.Tensor]):
        if not data:
            raise ValueError("a TensorDict needs at least one tensor")
        self.data = {str(k): torch.as_tensor(v) for k, v in data.items()}

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.data[key]
        return TensorDict({k: v[key] for k, v in self.data.items()})

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __contains__(self, key) -> bool:
        return key in self.data

    def __repr__(self) -> str:
        return f"TensorDict({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self.data.items())})"

    def keys(self):
        return self.data.keys()

    def values(self):
        return self.data.values()

    def items(self):
        return self.data.items()

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the first tensor: (examples, *per-example shape of that tensor)."""
        return tuple(next(iter(self.data.values())).shape)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TensorDict":
        return TensorDict({k: fn(v) for k, v in self.data.items()})

    def to(self, *args, **kwargs) -> "TensorDict":
        return self.map(lambda v: v.to(*args, **kwargs))

    def unsqueeze(self, dim: int) -> "TensorDict":
        return self.map(lambda v: v.unsqueeze(dim))

    def numel(self) -> int:
        return int(sum(v.numel() for v in self.data.values()))

    def numpy_bytes(self) -> bytes:
        return b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(self.data.items()))

    @staticmethod
    def cat(parts: list["TensorDict"]) -> "TensorDict":
        return TensorDict({k: torch.cat([p.data[k] for p in parts]) for k in parts[0].data})


pytree.register_pytree_node(
    TensorDict,
    lambda td: (list(td.data.values()), list(td.data.keys())),
    lambda values, keys: TensorDict(dict(zip(keys, values))),
    serialized_type_name="engine.core.data.TensorDict",
)


def take(x, idx):
    """Rows ``idx`` of a tensor, TensorDict or :class:`ImageRows`, as tensors."""
    return x[torch.as_tensor(np.asarray(idx), dtype=torch.long)]


def input_bytes(x) -> Iterator[bytes]:
    """The inputs' float bytes, row block by row block (hashing never holds a whole image split)."""
    if isinstance(x, TensorDict):
        yield x.numpy_bytes()
    else:  # row blocks: the same bytes as the whole split's, without a copy of it
        for _, _, block in row_blocks(x):
            yield block.numpy().tobytes()


# ----------------------------------------------------------------------------- settings
@dataclass
class DataConfig:
    """The ``[data]`` table as the loaders use it."""

    format: str = "images"
    train: str = ""
    test: str = ""
    label_column: str = "label"
    image_column: str = "path"
    text_column: str = "text"
    image_root: str | None = None
    feature_columns: list[str] | None = None
    categorical_columns: list[str] = field(default_factory=list)
    preprocessing: ImagePreprocessing = field(default_factory=ImagePreprocessing)
    allow_outside_paths: bool = False  # [project] allow_outside_paths: files outside the project folder

    @classmethod
    def from_spec(cls, data: dict, toml: Path, *, allow_outside_paths: bool = False) -> "DataConfig":
        """Read the ``[data]`` table (or an object with the same attributes, e.g. a parsed config)."""
        get = data.get if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
        fmt = str(get("format", "images") or "images")
        if fmt not in FORMATS:
            raise ValidationError(f"[data] format {fmt!r} must be one of {', '.join(FORMATS)}", file=str(toml))
        for key in ("train", "test"):
            if not get(key):
                what = "a folder" if fmt == "image_folder" else "a file path"
                raise ValidationError(f"[data] needs {key!r} ({what})", file=str(toml))

        def str_list(key):
            v = get(key)
            if v is None:
                return None
            if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
                raise ValidationError(f"[data] {key} must be a list of column names", file=str(toml))
            return [str(s) for s in v]

        return cls(format=fmt, train=str(get("train")), test=str(get("test")),
                   label_column=str(get("label_column", "label") or "label"),
                   image_column=str(get("image_column", "path") or "path"),
                   text_column=str(get("text_column", "text") or "text"),
                   image_root=get("image_root") or None,
                   feature_columns=str_list("feature_columns"),
                   categorical_columns=str_list("categorical_columns") or [],
                   preprocessing=_parse_preprocessing(get, toml), allow_outside_paths=allow_outside_paths)


def _parse_preprocessing(get, toml: Path) -> ImagePreprocessing:
    resize = get("resize")
    if resize is not None:
        if (not isinstance(resize, (list, tuple)) or len(resize) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize)):
            raise ValidationError(f"[data] resize must be [height, width] in pixels, not {resize!r}", file=str(toml))
        resize = (int(resize[0]), int(resize[1]))
    mode = get("mode")
    if mode is not None and mode not in ("rgb", "grey", "gray"):
        raise ValidationError(f"[data] mode must be 'rgb' or 'grey', not {mode!r}", file=str(toml))
    mode = "grey" if mode == "gray" else mode
    norm = get("normalize")
    mean = std = None
    if norm is not None:
        if not isinstance(norm, dict):
            norm = {"mean": getattr(norm, "mean", None), "std": getattr(norm, "std", None)}
        mean, std = norm.get("mean"), norm.get("std")
        for name, v in (("mean", mean), ("std", std)):
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(t, (int, float)) for t in v):
                raise ValidationError(f"[data] normalize.{name} must be a list of numbers (one per channel)", file=str(toml))
        if len(mean) != len(std):
            raise ValidationError(f"[data] normalize has {len(mean)} means but {len(std)} stds", file=str(toml))
        if any(s <= 0 for s in std):
            raise ValidationError("[data] normalize.std must be positive", file=str(toml))
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return ImagePreprocessing(resize=resize, mode=mode, mean=mean, std=std)


@dataclass
class LoadedData:
    x_train: Any  # Tensor [n, ...], ImageRows (images) or TensorDict (text)
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    classes: list
    train_df: pd.DataFrame | None  # one row per training example, in index order; None: read on first use
    test_df: pd.DataFrame | None
    feature_columns: list[str] = field(default_factory=list)  # tabular: the model's input columns
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    categories: dict[str, list] = field(default_factory=dict)  # categorical column → train categories
    train_files: list[Path] | None = None  # image formats: the file behind each row
    test_files: list[Path] | None = None
    warnings: list[str] = field(default_factory=list)
    image_cache: list = field(default_factory=list)  # PendingImageCache: decoded splits to keep
    table_files: tuple[Path, Path] | None = None  # tabular: (train, test) files behind train_df/test_df
    label_column: str = "label"
    text_columns: tuple[str, ...] = ()  # read as text whatever they look like (see engine.core.tables.csv_options)

    def head(self, split: str, n: int = 10) -> pd.DataFrame:
        """The split's first ``n`` raw rows, without reading a tabular table whole when it was not."""
        attr = "train_df" if split == "train" else "test_df"
        if getattr(self, attr) is None and self.table_files is not None:
            path = self.table_files[0 if split == "train" else 1]
            return next(iter_table(path, self.label_column, rows=max(1, int(n)),
                                   text_columns=self.text_columns))[1].head(n)
        return self.frame(split).head(n)

    def frame(self, split: str) -> pd.DataFrame:
        """The split's raw table. A tabular split is read whole only here, on first use: attribution
        reads its inputs chunk by chunk (:mod:`engine.core.tables`) and never needs it."""
        attr = "train_df" if split == "train" else "test_df"
        df = getattr(self, attr)
        if df is None:
            df = read_table(self.table_files[0 if split == "train" else 1], self.label_column, self.text_columns)
            setattr(self, attr, df)
        return df


# ----------------------------------------------------------------------------- tables
def read_table(path: Path, label_column: str, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV, Parquet or JSONL file with a label column and at least one row (``text_columns``: CSV
    columns kept as written, e.g. a text "007" or an image path "123", not parsed as numbers)."""
    if not path.is_file():
        raise ValidationError("file not found", file=str(path))
    kind = table_kind(path)
    try:
        if kind == "parquet":
            df = pd.read_parquet(path)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True)
        else:
            df = pd.read_csv(path, **csv_options(text_columns))
    except Exception as e:  # pandas/pyarrow raise many types; the user needs one line
        raise parse_error(path, kind, e) from None
    if kind == "csv":
        check_unique_header(path)
    df.columns = [str(c) for c in df.columns]
    check_labels(df, label_column, path)
    if len(df) == 0:
        raise ValidationError("no data rows", file=str(path))
    return df


def _class_index(train_df, test_df, lc, test_file: Path, train_file: Path | None = None):
    labels = FirstSeen()
    labels.add(train_df[lc])
    raw = class_list(labels, lc, train_file or test_file)
    y_test = test_class_codes(test_df[lc], {c: i for i, c in enumerate(raw)}, test_file)
    return raw, torch.from_numpy(labels.remapped(raw)), torch.from_numpy(y_test)


# ----------------------------------------------------------------------------- images
def cache_folder(root: Path) -> Path:
    """A project's cache (decoded images, scratch maps of whole splits); not created here."""
    return root / STATE_DIRNAME / "cache"


def _image_cache(root: Path, split: str) -> tuple[Path, str]:
    return cache_folder(root), split


def resolve_image_path(rel: str, csv: Path, root: Path, image_root: str | None, row: int,
                       allow_outside: bool = False, resolver: FolderResolver | None = None) -> Path:
    """A CSV's image path: absolute as is; relative under ``image_root`` when set, else relative
    to the CSV's folder, then to the project root. The error names every place it looked. A path
    outside the project folder is refused unless ``allow_outside``."""
    # os.path on strings: called once per row, where pathlib's parsing took a third of a project load
    if os.path.isabs(rel):
        candidates = [rel]
    elif image_root:
        candidates = [os.path.join(os.fspath(root), image_root, rel)]  # an absolute image_root wins the join
    else:
        candidates = [os.path.join(os.fspath(csv.parent), rel), os.path.join(os.fspath(root), rel)]
    for c in candidates:
        if os.path.isfile(c):
            return check_inside(Path(c), root, allowed=allow_outside, what="image", file=csv, row=row,
                                resolver=resolver)
    for c in candidates:  # only on the error path: a folder or a FIFO by that name is "there" but no image
        if os.path.exists(c):
            what = "a folder" if os.path.isdir(c) else "not a regular file (a pipe, socket or device?)"
            raise ValidationError(f"image {rel} is {what}: {c}", file=str(csv), row=row)
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ValidationError(f"image file not found: {rel} (looked in {looked})", file=str(csv), row=row)


def _load_image_csv(cfg: DataConfig, root: Path, train_file: Path, test_file: Path) -> LoadedData:
    lc, col = cfg.label_column, cfg.image_column
    train_df, test_df = read_table(train_file, lc, (col,)), read_table(test_file, lc, (col,))
    classes, y_train, y_test = _class_index(train_df, test_df, lc, test_file, train_file)
    xs, files, pending = [], [], []
    resolver = FolderResolver()
    for df, f in ((train_df, train_file), (test_df, test_file)):
        if col not in df.columns:
            raise ValidationError(f"image column {col!r} not found (columns: {', '.join(map(str, df.columns))})", file=str(f))
        paths = []
        for r, rel in enumerate(df[col].tolist()):
            if not isinstance(rel, str) or not rel:
                raise ValidationError(f"empty image path in column {col!r}", file=str(f), row=r)
            paths.append(resolve_image_path(rel, f, root, cfg.image_root, r, cfg.allow_outside_paths, resolver))
        expect = tuple(xs[0].shape[1:]) if xs else None
        xs.append(load_split(paths, df[col].tolist(), cfg.preprocessing, [f] * len(paths), list(range(len(paths))),
                             expect, cache=_image_cache(root, "train" if not xs else "test"), pending=pending))
        files.append(paths)
    return LoadedData(xs[0], y_train, xs[1], y_test, classes, train_df, test_df,
                      train_files=files[0], test_files=files[1], image_cache=pending)


def scan_image_folder(folder: Path, classes: list[str] | None = None
                      ) -> tuple[list[str], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(classes, [(file, class)], [(skipped file, why)]) of an ImageFolder tree, in torchvision's
    order. With ``classes`` (the training classes), a class folder outside them is an error.

    Links are followed, but a folder is read once: a link back up the tree (a loop) or to a folder
    already read (another class's images under a second label) is an error naming it. Hidden files
    and folders (``.ipynb_checkpoints``, macOS ``._*`` files), files at the top outside any class
    folder, and anything that is not a regular file (a FIFO would block the reader for ever) are
    skipped, each with its reason."""
    if not folder.is_dir():
        raise ValidationError("image folder not found (expected one sub-folder per class)", file=str(folder))
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ValidationError("no class sub-folders (expected one sub-folder per class, e.g. train/cat/*.png)", file=str(folder))
    if classes is not None:
        extra = [c for c in found if c not in classes]
        if extra:
            raise ValidationError(f"class folder {extra[0]!r} is in test but not in train", file=str(folder / extra[0]))
    samples, skipped = [], []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if not e.is_dir():
            skipped.append((Path(e.path), "outside any class folder"))
    read: dict[str, tuple[str, Path]] = {}  # real folder → (class, the path it was first read as)
    for cls in found:
        n_before = len(samples)
        for dirpath, dirnames, fnames in os.walk(folder / cls, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in read:
                first_cls, first = read[real]
                what = (f"a loop: it leads back to {first}" if first_cls == cls and Path(dirpath).is_relative_to(first)
                        else f"the same folder as {first}, already read as class {first_cls!r}: its images "
                             f"would be read twice" + (" under two labels" if first_cls != cls else ""))
                raise ValidationError(f"this folder (a link?) is {what}; remove the link or move the images",
                                      file=dirpath)
            read[real] = (cls, Path(dirpath))
            hidden = sorted(d for d in dirnames if d.startswith("."))
            skipped.extend((Path(dirpath) / d, "hidden folder") for d in hidden)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # in place: os.walk descends these
            for fname in sorted(fnames):
                path = Path(dirpath) / fname
                if fname.startswith("."):
                    skipped.append((path, "hidden file"))
                elif not fname.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append((path, "not an image file"))
                elif not regular_file(path):
                    skipped.append((path, "not a regular file"))
                else:
                    samples.append((path, cls))
        if len(samples) == n_before:
            raise ValidationError(f"class folder {cls!r} has no images ({', '.join(IMAGE_EXTENSIONS)})",
                                  file=str(folder / cls))
    return found, samples, skipped


def _load_image_folder(cfg: DataConfig, root: Path, train_dir: Path, test_dir: Path) -> LoadedData:
    classes, train_s, skip_train = scan_image_folder(train_dir)
    if len(classes) < 2:
        raise ValidationError(f"the training folder has a single class folder ({classes[0]!r}); classification needs "
                              f"at least two", file=str(train_dir))
    _, test_s, skip_test = scan_image_folder(test_dir, classes)
    index = {c: i for i, c in enumerate(classes)}
    xs, dfs, pending = [], [], []
    resolver = FolderResolver()
    for samples, folder in ((train_s, train_dir), (test_s, test_dir)):
        paths = [check_inside(p, root, allowed=cfg.allow_outside_paths, what="image (a link?)", file=folder,
                              resolver=resolver) for p, _ in samples]
        rel = [_relative(p, root) for p in paths]
        expect = tuple(xs[0].shape[1:]) if xs else None
        # the file is named in the error itself; a row number would be a position, not a line
        xs.append(load_split(paths, rel, cfg.preprocessing, paths, [None] * len(paths), expect,
                             cache=_image_cache(root, "train" if not xs else "test"), pending=pending))
        dfs.append(pd.DataFrame({cfg.image_column: rel, cfg.label_column: [c for _, c in samples]}))
    y_train = torch.tensor([index[c] for _, c in train_s], dtype=torch.long)
    y_test = torch.tensor([index[c] for _, c in test_s], dtype=torch.long)
    skipped = skip_train + skip_test
    warnings = [f"{p}: skipped, {why} ({len(skipped)} skipped in all)" for p, why in skipped]
    return LoadedData(xs[0], y_train, xs[1], y_test, list(classes), dfs[0], dfs[1],
                      train_files=[p for p, _ in train_s], test_files=[p for p, _ in test_s], warnings=warnings,
                      image_cache=pending)


def _relative(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------- tabular
def _load_tabular(cfg: DataConfig, root: Path, train_file: Path, test_file: Path, exclude: set[str]) -> LoadedData:
    t = load_tabular_splits(train_file, test_file, cfg.label_column, cfg.feature_columns, cfg.categorical_columns,
                            exclude, scratch_dir=cache_folder(root))
    n_hot = len(t.feature_names) - len(t.mean)
    # standardised with training statistics only, so test data never leaks into preprocessing
    return LoadedData(torch.from_numpy(t.x_train), torch.from_numpy(t.y_train), torch.from_numpy(t.x_test),
                      torch.from_numpy(t.y_test), t.classes, None, None, feature_columns=t.feature_names,
                      feature_mean=np.concatenate([t.mean, np.zeros(n_hot, np.float32)]),
                      feature_std=np.concatenate([t.std, np.ones(n_hot, np.float32)]), categories=t.categories,
                      table_files=(train_file, test_file), label_column=cfg.label_column)


# ----------------------------------------------------------------------------- text
# texts per tokenize() call when a split is read chunk by chunk (a batch size tokenizers handle well;
# the outputs of one call, not of the whole split, are what memory holds)
TEXT_CHUNK_ROWS = 16384


def _load_text(cfg: DataConfig, root: Path, train_file: Path, test_file: Path, tokenize: Callable | None,
               factory_file: Path) -> LoadedData:
    """Each split read and tokenized chunk by chunk into unlinked scratch maps (the token tensors of a
    large split are not held on the heap, and the raw table is read whole only when asked for).

    The same tensors as one ``tokenize(all texts)`` call: each call's outputs must share their
    trailing shapes; if a tokenizer pads to its batch's longest text and the chunks differ, the split
    is tokenized again in one call (the only way to get what the model was trained on)."""
    if tokenize is None:
        raise ValidationError("format 'text' needs a function tokenize(texts) -> dict of tensors", file=str(factory_file))
    lc, tc = cfg.label_column, cfg.text_column
    if lc == tc:
        raise ValidationError(f"[data] text_column and label_column are both {lc!r}: the model would read its "
                              f"own label", file=str(root / "project.toml"))
    scratch = cache_folder(root)
    labels = FirstSeen()
    x_train = _tokenized_split(train_file, lc, tc, tokenize, factory_file, scratch, lambda lo, v: labels.add(v))
    classes = class_list(labels, lc, train_file)
    index = {c: i for i, c in enumerate(classes)}
    test_codes: list[np.ndarray] = []
    x_test = _tokenized_split(test_file, lc, tc, tokenize, factory_file, scratch,
                              lambda lo, v: test_codes.append(test_class_codes(v, index, test_file, first_row=lo)))
    return LoadedData(x_train, torch.from_numpy(labels.remapped(classes)), x_test,
                      torch.from_numpy(np.concatenate(test_codes)), classes, None, None,
                      table_files=(train_file, test_file), label_column=lc, text_columns=(tc,))


def _text_chunk(df: pd.DataFrame, tc: str, path: Path, lo: int) -> list[str]:
    if tc not in df.columns:
        raise ValidationError(f"text column {tc!r} not found (columns: {', '.join(map(str, df.columns))})", file=str(path))
    texts = df[tc].tolist()
    for r, t in enumerate(texts):
        if isinstance(t, str) and t.strip():
            continue
        if isinstance(t, str) or t is None or (isinstance(t, float) and t != t):
            problem = f"empty text in column {tc!r}"
        else:  # a number, list, dict or bytes: JSON and Parquet keep their types
            problem = f"column {tc!r}: value {str(t)[:40]!r} ({type(t).__name__}) is not text"
        raise ValidationError(problem, file=str(path), row=lo + r)
    return texts


def _tokenized_split(path: Path, lc: str, tc: str, tokenize: Callable, factory_file: Path, scratch: Path,
                     on_labels: Callable[[int, pd.Series], None]) -> TensorDict:
    from engine.storage.arrays import disk_error, scratch_file

    files: dict = {}  # key → (scratch file, trailing shape, dtype)
    n, uneven = 0, False
    try:
        for lo, df in iter_table(path, lc, rows=TEXT_CHUNK_ROWS, text_columns=(tc,)):
            texts = _text_chunk(df, tc, path, lo)
            on_labels(lo, df[lc])
            if uneven:
                continue  # the labels are still checked and coded chunk by chunk
            out = tokenize_texts(tokenize, texts, factory_file).data
            arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in out.items()}
            if files and (set(arrays) != set(files) or any(
                    (a.shape[1:], a.dtype) != files[k][1:] for k, a in arrays.items())):
                uneven = True
                continue
            for k, a in arrays.items():
                if k not in files:
                    files[k] = (scratch_file(scratch, "tokens")[0], a.shape[1:], a.dtype)
                try:
                    files[k][0].write(memoryview(a).cast("B"))
                except OSError as e:
                    raise disk_error(e, scratch, "tokenized texts") from None
            n += len(texts)
        if uneven:  # batch-dependent padding: one call over the whole split, as before
            df = read_table(path, lc, (tc,))
            return tokenize_texts(tokenize, _text_chunk(df, tc, path, 0), factory_file)
        data = {}
        for k, (f, trail, dtype) in files.items():
            f.flush()
            mm = np.memmap(f, dtype=dtype, mode="r+", shape=(n, *trail))
            data[k] = torch.from_numpy(mm)
        return TensorDict(data)
    finally:
        for f, _, _ in files.values():
            f.close()  # a map keeps its own handle; the files were unlinked when made


def tokenize_texts(tokenize: Callable, texts: list[str], factory_file: Path) -> TensorDict:
    """model.py's ``tokenize(texts)`` → a TensorDict with one row per text."""
    try:
        out = tokenize(list(texts))
    except Exception as e:
        raise ValidationError(f"tokenize failed: {type(e).__name__}: {e}", file=str(factory_file)) from None
    if not isinstance(out, dict) or not out:
        raise ValidationError(f"tokenize returned {type(out).__name__}, not a dict of tensors", file=str(factory_file))
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or len(v) != len(texts):
            raise ValidationError(f"tokenize()[{k!r}] must be a tensor with one row per text ({len(texts)})",
                                  file=str(factory_file))
        if v.numel() == 0:
            raise ValidationError(f"tokenize()[{k!r}] has shape {tuple(v.shape)}: no values per text",
                                  file=str(factory_file))
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            r = int((~torch.isfinite(v)).reshape(len(v), -1).any(1).nonzero()[0])
            raise ValidationError(f"tokenize()[{k!r}] holds NaN or infinite values (text {r} of the batch: "
                                  f"{texts[r][:40]!r})", file=str(factory_file))
    return TensorDict(out)


# ----------------------------------------------------------------------------- entry point
def load_data(cfg: DataConfig, root: Path, *, exclude_columns: set[str] = frozenset(),
              tokenize: Callable | None = None, factory_file: Path | None = None) -> LoadedData:
    train_file, test_file = root / cfg.train, root / cfg.test
    for key, path in (("train", train_file), ("test", test_file)):
        check_inside(path, root, allowed=cfg.allow_outside_paths, what=f"[data] {key}", file=root / "project.toml")
    if cfg.image_root:
        check_inside(root / cfg.image_root, root, allowed=cfg.allow_outside_paths, what="[data] image_root",
                     file=root / "project.toml")
    if cfg.format == "images":
        return _load_image_csv(cfg, root, train_file, test_file)
    if cfg.format == "image_folder":
        return _load_image_folder(cfg, root, train_file, test_file)
    if cfg.format == "tabular":
        return _load_tabular(cfg, root, train_file, test_file, set(exclude_columns))
    return _load_text(cfg, root, train_file, test_file, tokenize, factory_file or root / "model.py")


def rows_table(data: LoadedData, split: str, root: Path) -> pd.DataFrame:
    """index, file (image formats; else empty), label: how printed indexes map back to examples."""
    files = data.train_files if split == "train" else data.test_files
    y = data.y_train if split == "train" else data.y_test
    return pd.DataFrame({
        "index": np.arange(len(y)),
        "file": [_relative(p, root) for p in files] if files is not None else [""] * len(y),
        "label": [data.classes[int(i)] for i in y],
    })


def iter_batches(x, batch: int) -> Iterator:
    for lo in range(0, len(x), batch):
        yield x[lo:lo + batch]


def whole(x):
    """``x`` as one in-memory tensor (ImageRows are read whole): only for callers that must hand a
    tensor to code outside Proponent, e.g. a peer library in a benchmark."""
    return x[:] if isinstance(x, ImageRows) else x


def row_blocks(x, rows: int | None = None) -> Iterator[tuple[int, int, Any]]:
    """(lo, hi, x[lo:hi]) over a split: what whole-split computations iterate instead of
    assuming ``x`` is one tensor. Image blocks are bounded in bytes, others are 4096 rows."""
    rows = rows or (x.block_rows() if isinstance(x, ImageRows) else 4096)
    for lo in range(0, len(x), rows):
        hi = min(len(x), lo + rows)
        yield lo, hi, x[lo:hi]


__all__ = ["TensorDict", "DataConfig", "ImagePreprocessing", "LoadedData", "load_data", "read_table", "read_raw_image",
           "resolve_image_path", "scan_image_folder", "rows_table", "take", "input_bytes", "ImageRows", "row_blocks", "whole"]
