"""Examples as pictures: crisp upscaled PNGs and data URIs for cards."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from engine.core.project import Project


def example_array(project: Project, split: str, index: int) -> np.ndarray:
    ds = project.train_dataset if split == "train" else project.test_dataset
    return ds.x[int(index)].numpy()


def image_png(project: Project, split: str, index: int, size: int = 112) -> bytes | None:
    """A crisp PNG of an image example, upscaled with nearest-neighbour; None for tabular data and text.
    The original pixels of the file, not the resized/normalised input the model sees."""
    if project.data_format != "images":
        return None
    raw = project.raw_image(split, index)
    if raw is None:
        return array_png(example_array(project, split, index), size)
    grey = raw.mode in ("1", "L", "LA", "I", "I;16", "F")
    return array_png(np.asarray(raw.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0, size)


def array_png(arr: np.ndarray, size: int = 112) -> bytes:
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


def example_text(project: Project, split: str, index: int) -> str | None:
    """A text example's text (None for other projects)."""
    return project.text(split, index)


def example_texts(project: Project, split: str, indices) -> list[str]:
    return [project.text(split, int(i)) or "" for i in indices]


def example_row(project: Project, split: str, index: int) -> dict:
    """A tabular example's raw values (for row cards)."""
    df = project.train_df if split == "train" else project.test_df
    return {str(k): v for k, v in df.iloc[int(index)].to_dict().items()}
