"""Models for the 8×8 digits sample: a small MLP (default) and a small CNN."""
import torch
from torch import nn


def build(input_shape, num_classes):
    """MLP: 64 pixels → 64 hidden (ReLU) → classes. 4,810 parameters."""
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, num_classes))


def build_cnn(input_shape, num_classes):
    """A small CNN: two 3×3 conv layers, global average pooling, a linear head."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (input_shape[1] // 2) * (input_shape[2] // 2), num_classes))
