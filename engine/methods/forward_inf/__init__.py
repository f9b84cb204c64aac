"""Forward-INF: the method, its mirror engine and calibration of its settings."""
from engine.methods.forward_inf.method import ForwardINF

__all__ = ["ForwardINF"]
