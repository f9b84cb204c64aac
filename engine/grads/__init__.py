"""Shared gradient, projection and curvature machinery (every method reuses it)."""
from .features import featurize, project_gradients
from .measurement import correct_class_margin, correct_class_probability, example_loss
from .per_example import GradientComputer, resolve_device
from .projection import (DenseProjector, IdentityProjector, Projector, SparseJLProjector, default_projection_dim,
                         make_projector)

__all__ = ["GradientComputer", "resolve_device", "featurize", "project_gradients", "correct_class_margin",
           "correct_class_probability", "example_loss", "Projector", "IdentityProjector", "DenseProjector",
           "SparseJLProjector", "make_projector", "default_projection_dim"]
