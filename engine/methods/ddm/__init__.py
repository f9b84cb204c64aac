"""DDM: the distilled-datamodel method over synthetic stand-in sets."""
from engine.methods.ddm.method import DDM

__all__ = ["DDM"]
