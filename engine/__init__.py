"""Proponent's engine: which training examples made the model do this?

>>> from engine import Project, attribute
>>> p = Project.load("sample_projects/digits")
>>> S = attribute(p, method="trak", queries="test")   # [n_test, n_train], positive = proponent
"""
import os as _os

import torch as _torch

# Small models on a shared 2-core machine run far faster on one intra-op thread (measured:
# 0.17 ms vs 87 ms per SGD step of the digits MLP with another process busy). Users with
# big models set PROPONENT_THREADS or OMP_NUM_THREADS.
if "PROPONENT_THREADS" in _os.environ or "OMP_NUM_THREADS" not in _os.environ:
    _torch.set_num_threads(int(_os.environ.get("PROPONENT_THREADS", "1")))

from engine.api import attribute, cached_scores, fit_method
from engine.core.errors import ProponentError, ValidationError
from engine.core.project import ExampleSet, Project
from engine.methods import get_method, list_methods

__all__ = ["Project", "ExampleSet", "attribute", "cached_scores", "fit_method", "get_method", "list_methods",
           "ProponentError", "ValidationError"]
__version__ = "0.1.0"
