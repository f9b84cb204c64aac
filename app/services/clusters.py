"""Cluster-level results (DDM and any method of granularity "cluster") for the app's pages.

Plain functions, no Streamlit. A finished cluster run is reloaded through ``engine.api.fit_method``
with the run's stored settings: the method resumes from its cached work folder (clustering,
gradient targets and the distilled synset are on disk), so this takes well under a second on the
sample. Loaded runs are kept in a small in-process cache keyed by project, run key and checkpoints.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image

from app.services.flags import bulk_update
from engine.api import fit_method
from engine.core.data import row_blocks
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods import SIGN_CONVENTION, get_method
from engine.methods.ddm.method import cluster_table, synset_images
from engine.storage.statedb import FLAG_VALUES, StateDB

SIGN_HELP = SIGN_CONVENTION
CLUSTER_HELP = ("Cluster-derived: the method simulates removing a whole cluster of similar training examples; "
                "a cluster's effect is margin(all data) − margin(without the cluster). " + SIGN_CONVENTION)
RESIDUAL_HELP = ("Gradient-matching residual of the cluster's synthetic example (mean over checkpoints of layer-wise "
                 "1 − cosine; 0 = perfect match, 1 = orthogonal). The method's own quality signal: the higher, the "
                 "less the simulated removal of this cluster can be trusted.")
QUALITY_HELP = ("Change in loss on held-out TRAINING rows when the cluster's removal is simulated. Negative: the data "
                "is predicted to get better without the cluster (a candidate data-quality problem).")

_CACHE: "OrderedDict[tuple, ClusterRun]" = OrderedDict()
_LOCK = threading.Lock()
_MAX = 4


@dataclass
class ClusterRun:
    """A fitted cluster method plus what the pages show of it (test queries)."""

    key: str
    method: str
    attributor: object
    table: list[dict]                       # cluster_table rows, most harmful first
    effects: np.ndarray                     # [n_test, K] simulated removal effect on each test query's margin
    by_id: dict = field(default_factory=dict)

    def __post_init__(self):
        self.by_id = {int(r["cluster"]): r for r in self.table}

    @property
    def n_clusters(self) -> int:
        return self.effects.shape[1]


def is_cluster_run(run: dict | None) -> bool:
    """True when the run's method reports cluster-level results (DDM)."""
    if not run:
        return False
    try:
        return getattr(get_method(run["method"]), "granularity", "example") == "cluster"
    except ProponentError:
        return False


def cluster_runs(runs: Iterable[dict]) -> list[dict]:
    return [r for r in runs if is_cluster_run(r)]


def method_description(method: str) -> str:
    cls = get_method(method)
    return f"**{cls.label or cls.name}.** {cls.description}"


def load_cluster_run(project: Project, run: dict, *, cache: bool = True) -> ClusterRun:
    """Reload a finished cluster run (resuming from its cached work) and tabulate its clusters."""
    if not is_cluster_run(run):
        raise ProponentError(f"run {run.get('key')} ({run.get('method')}) has no cluster-level results")
    ck = (str(project.root), run["key"], project.checkpoint_hash(), project.data_hash())
    with _LOCK:
        if cache and ck in _CACHE:
            _CACHE.move_to_end(ck)
            return _CACHE[ck]
        att, key = fit_method(project, run["method"], run.get("settings") or {}, device="cpu")
        if key != run["key"]:
            raise ProponentError(f"run {run['key']} no longer matches this project's data or checkpoints "
                                 f"(its settings now give run {key}); run {run['method']} again on the Attribute page")
        table = cluster_table(att, "test")
        effects = np.asarray(att.cluster_scores("test"), dtype=np.float64)
        cr = ClusterRun(key=key, method=run["method"], attributor=att, table=table, effects=effects)
        if cache:
            _CACHE[ck] = cr
            while len(_CACHE) > _MAX:
                _CACHE.popitem(last=False)
        return cr


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _row(cr: ClusterRun, k: int, effect: float | None = None) -> dict:
    r = cr.by_id[int(k)]
    out = {"cluster": int(k), "class": str(r["class"]), "size": int(r["size"]), "residual": float(r["residual"]),
           "medoid": int(r["medoid"]), "members": list(r["members"])}
    if effect is not None:
        out["effect"] = float(effect)
    return out


def query_clusters(cr: ClusterRun, query: int, k: int = 3) -> dict:
    """The clusters that drive test query ``query``: the ``k`` with the largest positive simulated
    removal effect (proponent clusters) and the ``k`` most negative (opponent clusters)."""
    n_q = cr.effects.shape[0]
    if not 0 <= int(query) < n_q:
        raise ProponentError(f"test query {query} is out of range (0..{n_q - 1})")
    row = cr.effects[int(query)]
    order = np.argsort(-row, kind="stable")
    pro = [int(c) for c in order if row[c] > 0][:k]
    opp = [int(c) for c in order[::-1] if row[c] < 0][:k]
    return {"proponents": [_row(cr, c, row[c]) for c in pro], "opponents": [_row(cr, c, row[c]) for c in opp]}


def query_cluster_frame(qc: dict):
    """One table of a query's proponent and opponent clusters, as the Explore page shows it."""
    rows = []
    for role, key in (("proponent", "proponents"), ("opponent", "opponents")):
        for r in qc[key]:
            rows.append({"role": role, "cluster": r["cluster"], "predicted effect": r["effect"], "size": r["size"],
                         "class": r["class"], "residual": r["residual"], "medoid": r["medoid"]})
    return pd.DataFrame(rows, columns=["role", "cluster", "predicted effect", "size", "class", "residual", "medoid"])


def harmful_clusters(cr: ClusterRun, flags: dict | None = None):
    """The data-quality assessment: clusters whose simulated removal lowers validation loss, most
    harmful (most negative change) first, with how many members are already flagged."""
    flags = flags or {}
    rows = []
    for r in cr.table:  # already sorted by validation_loss_change, ascending
        if not r["harmful"]:
            continue
        n_flag = sum(1 for i in r["members"] if (flags.get(int(i)) or {}).get("flag"))
        rows.append({"cluster": int(r["cluster"]), "class": str(r["class"]), "size": int(r["size"]),
                     "validation loss change": float(r["validation_loss_change"]), "residual": float(r["residual"]),
                     "flagged members": int(n_flag), "medoid": int(r["medoid"])})
    return pd.DataFrame(rows, columns=["cluster", "class", "size", "validation loss change", "residual",
                                       "flagged members", "medoid"])


def cluster_members(cr: ClusterRun, cluster_ids: Iterable[int]) -> list[int]:
    out: set[int] = set()
    for k in cluster_ids:
        if int(k) not in cr.by_id:
            raise ProponentError(f"cluster {k} does not exist in run {cr.key} (0..{cr.n_clusters - 1})")
        out.update(int(i) for i in cr.by_id[int(k)]["members"])
    return sorted(out)


def flag_cluster_members(db: StateDB, cr: ClusterRun, cluster_ids: Iterable[int], flag: str = "mislabeled") -> int:
    """Flag every member of the given clusters (one audit entry each). Returns the count."""
    if flag not in FLAG_VALUES:
        raise ProponentError(f"flag must be one of {', '.join(FLAG_VALUES)}, not {flag!r}")
    members = cluster_members(cr, cluster_ids)
    return bulk_update(db, "train", members, flag=flag, source=f"app-{cr.method}-cluster")


def to_image(arr: np.ndarray, size: int = 96, lo: float = 0.0, hi: float = 1.0):
    """A PIL image of one input (C×H×W or H×W), mapped from [lo, hi] to 0..255 (clipped) and
    upscaled by nearest-neighbour to about ``size`` pixels, like the rest of the app."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    if a.ndim not in (2, 3):
        raise ProponentError(f"cannot show an input of shape {list(np.shape(arr))} as an image")
    a = np.clip((a - lo) / max(1e-12, hi - lo), 0.0, 1.0)
    img = Image.fromarray(np.round(a * 255).astype(np.uint8))
    h, w = a.shape[:2]
    scale = max(1, int(round(size / max(h, w))))
    return img.resize((w * scale, h * scale), Image.NEAREST)


def synset_gallery(project: Project, cr: ClusterRun, size: int = 96) -> list[dict]:
    """One entry per cluster: the distilled synthetic example and its medoid starting point (PIL
    images for image projects, feature vectors otherwise), with class, size and residual. Both
    images share the training data's value range, so they are directly comparable."""
    s = synset_images(cr.attributor)
    shape = list(s["input_shape"])
    images = project.data_format == "images"
    if images:
        blocks = [(float(b.min()), float(b.max())) for _, _, b in row_blocks(project.train_dataset.x)]
        lo, hi = min(b[0] for b in blocks), max(b[1] for b in blocks)
    out = []
    for k in range(len(s["classes"])):
        r = cr.by_id[k]
        e = {"cluster": k, "class": s["class_names"][k], "size": int(s["sizes"][k]),
             "residual": float(s["residual"][k]), "residual_init": float(r["residual_init"]),
             "medoid": int(r["medoid"]), "synthetic": np.asarray(s["x"][k]).reshape(shape),
             "init": np.asarray(s["init"][k]).reshape(shape)}
        if images:
            e["synthetic_image"] = to_image(e["synthetic"], size, lo, hi)
            e["init_image"] = to_image(e["init"], size, lo, hi)
        out.append(e)
    return out
