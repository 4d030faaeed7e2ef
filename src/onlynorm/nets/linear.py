"""``NormLinear``: the basic stage, ``relu?(γ ⊙ (A x) + β)`` with a frozen bias-free ``A``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .stage import Stage, frozen_module, make_batchnorm, register_stage

__all__ = ["NormLinear"]


@register_stage
class NormLinear(Stage):
    """``y = relu(γ ⊙ (A x) + β)`` with frozen ``A`` (``nn.Linear`` without bias) and ``γ, β`` from BatchNorm1d."""

    kind = "norm_linear"
    linear: nn.Linear
    norm: _BatchNorm

    def __init__(
        self,
        in_features: int,
        out_features: int,
        relu: bool = True,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.linear = frozen_module(nn.Linear, in_features, out_features, dtype=dtype, device=device)
        self.norm = make_batchnorm(out_features, dtype=dtype, device=device)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.linear(x))
        return torch.relu(z) if self.relu else z

    def config(self) -> dict[str, Any]:
        return {"in_features": self.linear.in_features, "out_features": self.linear.out_features, "relu": self.relu}

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def extra_repr(self) -> str:
        return f"relu={self.relu}"
