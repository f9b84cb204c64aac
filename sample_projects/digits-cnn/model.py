"""A small CNN for the 8×8 digits: two 3×3 conv layers, max pooling, a linear head (9,930 parameters)."""
from torch import nn


def build(input_shape, num_classes):
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (input_shape[1] // 2) * (input_shape[2] // 2), num_classes))
