"""Pretrained stages: a frozen pretrained ``Linear``/``Conv2d`` (bias included) followed by a tunable BatchNorm
(what :func:`onlynorm.with_norms` builds)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import conv2d_config, make_batchnorm
from .onnx_graph import OnnxGraph, batchnorm, conv, linear
from .stage import Stage, StageLayout, register_stage

__all__ = ["PretrainedStage", "PretrainedLinear", "PretrainedConv2d", "norm_stats"]


class PretrainedStage(Stage):
    """A frozen pretrained layer (with its bias) followed by a tunable BatchNorm; no ReLU of its own."""

    layer: Any  # nn.Linear or nn.Conv2d
    norm: _BatchNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer(x))

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        if isinstance(self.layer, nn.Conv2d):
            return batchnorm(g, self.norm, conv(g, self.layer, x, example.shape))
        return batchnorm(g, self.norm, linear(g, self.layer, x))

    def layout(self) -> StageLayout:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return StageLayout(type(self), (layer.in_channels, layer.out_channels), False)
        return StageLayout(type(self), (layer.in_features, layer.out_features), False)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``(layer(x) − μ) / √var``: what γ multiplies."""
        z = self.layer(x)
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean, var = norm_stats(self.norm)
        return (z - mean.reshape(shape)) / torch.sqrt(var.reshape(shape))


@register_stage
class PretrainedLinear(PretrainedStage):
    kind = "pretrained_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.float64, device=None):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device).requires_grad_(False)
        self.norm = make_batchnorm(out_features, dtype=dtype, device=device)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.layer.in_features,
            "out_features": self.layer.out_features,
            "bias": self.layer.bias is not None,
        }


@register_stage
class PretrainedConv2d(PretrainedStage):
    kind = "pretrained_conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups: int = 1,
        bias: bool = True,
        *,
        dtype=torch.float64,
        device=None,
    ):
        super().__init__()
        self.layer = nn.Conv2d(
            in_channels,
            out_channels,
            tuple(kernel_size),
            stride=tuple(stride),
            padding=tuple(padding),
            dilation=tuple(dilation),
            groups=groups,
            bias=bias,
            dtype=dtype,
            device=device,
        ).requires_grad_(False)
        self.norm = make_batchnorm(out_channels, dims=2, dtype=dtype, device=device)

    def config(self) -> dict[str, Any]:
        c = self.layer
        return {**conv2d_config(c), "groups": c.groups, "bias": c.bias is not None}


def norm_stats(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The running mean and variance buffers (always present: make_batchnorm tracks running statistics)."""
    mean, var = norm.running_mean, norm.running_var
    assert mean is not None and var is not None
    return mean, var
