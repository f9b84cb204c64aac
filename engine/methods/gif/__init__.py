"""GIF: generalized influence functions (method, parameter selection and solvers)."""
from engine.methods.gif.method import GIFAttribution

__all__ = ["GIFAttribution"]
