"""``NormLinear``: the basic stage, ``relu?(γ ⊙ (A x) + β)`` with a frozen bias-free ``A``.

>>> import torch
>>> stage = NormLinear(3, 2, relu=False)
>>> view = stage.affine("stage 0")          # what the certificate reads: A, γ, β, the ReLU
>>> view.weight.shape, view.relu, stage.layout().shape
(torch.Size([2, 3]), False, (3, 2))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import frozen_module, make_batchnorm
from .onnx_graph import OnnxGraph, batchnorm, linear, relu_if
from .stage import Stage, StageLayout, register_stage
from .views import AffineView, read_linear, read_norm

__all__ = ["NormLinear"]


@register_stage
class NormLinear(Stage):
    """``y = relu(γ ⊙ (A x) + β)`` with frozen ``A`` (``nn.Linear`` without bias) and ``γ, β`` from BatchNorm1d."""

    kind = "norm_linear"
    pairs_with_next = True
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

    def affine(self, where: str) -> AffineView:
        gamma, beta = read_norm(self.norm, f"{where} (norm)")
        return AffineView(read_linear(self.linear, f"{where} (linear)"), gamma, beta, self.relu)

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        return relu_if(g, batchnorm(g, self.norm, linear(g, self.linear, x)), self.relu)

    def layout(self) -> StageLayout:
        return StageLayout(NormLinear, (self.linear.in_features, self.linear.out_features), self.relu)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def extra_repr(self) -> str:
        return f"relu={self.relu}"
