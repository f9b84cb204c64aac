"""Shared gradient, projection and curvature machinery (every method reuses it)."""
from engine.autodiff.compute import resolve_device
from engine.autodiff.features import featurize, project_gradients
from engine.autodiff.functional import FunctionalModel, ParamLayout, TrackedParameters
from engine.autodiff.measurement import (
    correct_class_margin,
    correct_class_probability,
    example_loss,
)
from engine.autodiff.per_example import GradientComputer
from engine.autodiff.projection import (
    DenseProjector,
    IdentityProjector,
    Projector,
    SparseJLProjector,
    default_projection_dim,
    make_projector,
)

__all__ = ["FunctionalModel", "ParamLayout", "TrackedParameters", "GradientComputer", "resolve_device", "featurize",
           "project_gradients", "correct_class_margin", "correct_class_probability", "example_loss", "Projector", "IdentityProjector", "DenseProjector",
           "SparseJLProjector", "make_projector", "default_projection_dim"]
