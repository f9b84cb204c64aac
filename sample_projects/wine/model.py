"""A small MLP for the wine sample: 13 features → 32 hidden (tanh) → 3 classes. 547 parameters."""
from torch import nn


def build(input_shape, num_classes):
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, num_classes))
