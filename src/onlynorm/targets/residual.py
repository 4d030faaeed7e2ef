"""``Residual(block)``: the basic ResNet pattern ``relu(x + block(x))`` as a small torch module.

>>> import torch
>>> from torch import nn
>>> r = Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)))
>>> r(torch.zeros(1, 2, 5, 5)).shape
torch.Size([1, 2, 5, 5])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``relu(x + block(x))``; ``block`` must preserve the shape of ``x``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.block(x))
