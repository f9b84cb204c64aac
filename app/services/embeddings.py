"""The Embeddings page's data: the engine's 2-D maps (engine.workflows.embeddings) joined with labels,
predictions, flags and self-influence."""
from __future__ import annotations

import numpy as np
import pandas as pd

from engine.core.project import Project
from engine.workflows.embeddings import (  # noqa: F401
    EMBED_MAX_POINTS,
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
