"""The Embeddings page's data: the engine's 2-D maps (engine.workflows.embeddings) joined with labels,
predictions, flags and self-influence."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from app.services.flags import selection_indices
from engine.core.project import Project
from engine.workflows.embeddings import (  # noqa: F401
    DEFAULT_REDUCER,
    EMBED_MAX_POINTS,
    REDUCERS,
    cached_embedding,
    compute_embedding,
    embedding_path,
    reduce_2d,
)


def embedding_frame(project: Project, emb: dict, colour: str, *, flags: dict | None = None, run: dict | None = None,
                    preds: dict | None = None) -> pd.DataFrame:
    """The scatter's data: x, y, index (customdata), and the colour column."""
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


def _regions(event: Any) -> list[np.ndarray]:
    """The box and lasso outlines of a plotly selection event, as [k, 2] polygons in map coordinates."""
    sel = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    if sel is None:
        return []
    out = []
    for box in (sel.get("box") if isinstance(sel, dict) else getattr(sel, "box", None)) or []:
        (x0, x1), (y0, y1) = box["x"][:2], box["y"][:2]
        out.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
    for lasso in (sel.get("lasso") if isinstance(sel, dict) else getattr(sel, "lasso", None)) or []:
        if len(lasso["x"]) >= 3:
            out.append(np.column_stack([lasso["x"], lasso["y"]]).astype(np.float64))
    return out


def inside_polygon(xy: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """[n] bool: points inside the polygon by the even-odd rule (a crossing count per edge, vectorised
    over points: 1M points × a 300-vertex lasso in about a second, without a plotting library)."""
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    inside = np.zeros(len(xy), bool)
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, 1), np.roll(py, 1)
    for ax, ay, bx, by in zip(px, py, qx, qy):
        crosses = (ay > y) != (by > y)
        if not crosses.any():
            continue
        xc = ax + (y[crosses] - ay) * (bx - ax) / (by - ay)
        inside[np.flatnonzero(crosses)[x[crosses] < xc]] ^= True
    return inside


def selected_rows(event: Any, emb: dict) -> list[int]:
    """Training rows a box or lasso on the map selects: every row of the set inside the outline when
    the map placed them all (``xy_all``), not only the drawn sample; else the drawn points picked."""
    regions = _regions(event) if event is not None else []
    if "xy_all" not in emb or not regions:
        return selection_indices(event)
    mask = np.zeros(len(emb["xy_all"]), bool)
    for poly in regions:
        mask |= inside_polygon(emb["xy_all"], poly)
    return [int(i) for i in np.flatnonzero(mask)]
