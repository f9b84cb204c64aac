"""Proponent's engine: which training examples made the model do this?

>>> from engine import Project, attribute
>>> p = Project.load("sample_projects/digits")
>>> S = attribute(p, method="trak", queries="test")   # [n_test, n_train], positive = proponent
"""
# No thread settings here: importing the engine never changes torch's global state. Each
# workload picks its own intra-op threads (engine.autodiff.threads; PROPONENT_THREADS overrides).
from engine.api import attribute, cached_scores, copy_scores, fit_method
from engine.core.errors import ProponentError, ValidationError
from engine.core.project import ExampleSet, Project
from engine.methods import get_method, list_methods

__all__ = ["Project", "ExampleSet", "attribute", "cached_scores", "copy_scores", "fit_method", "get_method", "list_methods",
           "ProponentError", "ValidationError"]
__version__ = "0.1.0"
