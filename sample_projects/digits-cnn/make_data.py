"""Materialise the digits-cnn sample: the same data as the digits sample (8×8 digits with planted
label flips and leaks recorded in truth.json), reusing digits' make_data; only the model differs."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def materialise(root: Path, **kw) -> dict:
    from engine.core.samples import SAMPLES_ROOT

    src = SAMPLES_ROOT / "digits" / "make_data.py"
    spec = importlib.util.spec_from_file_location("_proponent_sample_digits_data", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.materialise(Path(root), **kw)
