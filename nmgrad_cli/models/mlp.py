"""``mlp``: a 3-layer perceptron on 8x8 digits, 64 -> 256 -> 256 -> 10, in-place ReLUs."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 256, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, I)
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))  # (B, n_classes)


def mlp(n_classes: int = 10, in_shape: tuple[int, ...] = (1, 8, 8), **_info) -> MLP:
    """The built-in ``mlp`` model for the data's ``in_shape`` and ``n_classes``."""
    return MLP(math.prod(in_shape), 256, n_classes)
