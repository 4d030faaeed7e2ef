"""Image stages: ``NormConv2d`` (a frozen conv and a BatchNorm2d), ``FixedOp`` (a parameter-free layer copied from
the target) and ``ResidualStage`` (a skip connection around stage lists).

>>> import torch
>>> block = ResidualStage([NormConv2d(2, 3, (3, 3), padding=(1, 1)), NormConv2d(3, 2, relu=False)])
>>> block(torch.zeros(1, 2, 4, 4, dtype=torch.float64)).shape, sorted(block.stage_lists())
(torch.Size([1, 2, 4, 4]), ['body', 'shortcut'])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import ModuleSeq, conv2d_config, frozen_module, make_batchnorm
from .onnx_graph import OnnxGraph, add_all, batchnorm, conv, pad, relu_if, windows
from .stage import Stage, StageLayout, register_stage, stage_description, stage_from_description
from .views import AffineView, read_conv, read_norm

__all__ = ["NormConv2d", "FixedOp", "ResidualStage"]


@register_stage
class NormConv2d(Stage):
    """``relu?(γ ⊙ (A * x) + β)``: a frozen bias-free ``Conv2d`` and a ``BatchNorm2d`` (per-channel γ, β)."""

    kind = "norm_conv2d"
    pairs_with_next = True
    conv: nn.Conv2d
    norm: _BatchNorm

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        relu: bool = True,
        *,
        dtype: torch.dtype = torch.float64,
        device=None,
    ):
        super().__init__()
        self.conv = frozen_module(
            nn.Conv2d,
            in_channels,
            out_channels,
            tuple(kernel_size),
            stride=tuple(stride),
            padding=tuple(padding),
            dilation=tuple(dilation),
            dtype=dtype,
            device=device,
        )
        self.norm = make_batchnorm(out_channels, dims=2, dtype=dtype, device=device)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.conv(x))
        return torch.relu(z) if self.relu else z

    def config(self) -> dict[str, Any]:
        return {**conv2d_config(self.conv), "relu": self.relu}

    def affine(self, where: str) -> AffineView:
        kernel, geometry = read_conv(self.conv, f"{where} (conv)")
        gamma, beta = read_norm(self.norm, f"{where} (norm)")
        return AffineView(kernel, gamma, beta, self.relu, geometry)

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        return relu_if(g, batchnorm(g, self.norm, conv(g, self.conv, x, example.shape)), self.relu)

    def layout(self) -> StageLayout:
        c = self.conv
        geometry = {k: tuple(int(v) for v in getattr(c, k)) for k in ("kernel_size", "stride", "padding", "dilation")}
        return StageLayout(NormConv2d, (c.in_channels, c.out_channels), self.relu, (("geometry", geometry),))


@register_stage
class FixedOp(Stage):
    """A parameter-free layer copied from the target: ``relu``, ``maxpool``, ``avgpool`` or ``flatten``."""

    kind = "op"

    def __init__(
        self,
        op: str,
        kernel=None,
        stride=None,
        padding=(0, 0),
        count_include_pad: bool = True,
        *,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if op not in ("relu", "maxpool", "avgpool", "flatten"):
            raise ValueError(f"unknown op {op!r}")
        self.op, self.kernel, self.stride, self.padding = op, kernel, stride, padding
        self.count_include_pad = count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "relu":
            return torch.relu(x)
        if self.op == "maxpool":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        if self.op == "avgpool":
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=self.count_include_pad)
        return x.flatten(1)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"op": self.op}
        if self.op in ("maxpool", "avgpool"):
            cfg.update(kernel=list(self.kernel), stride=list(self.stride), padding=list(self.padding))
        if self.op == "avgpool":
            cfg["count_include_pad"] = self.count_include_pad
        return cfg

    def widths(self) -> list[int]:
        return []

    def layout(self) -> StageLayout:
        return StageLayout(FixedOp, details=(("op", self.op),))

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        if self.op == "relu":
            return g.node("Relu", [x])
        if self.op == "flatten":
            return g.node("Flatten", [x], axis=1)
        pool = {"kernel_shape": list(self.kernel), "strides": list(self.stride), "pads": list(self.padding) * 2}
        if self.op == "maxpool":
            return g.node("MaxPool", [x], "maxpool", **pool)
        if not g.lower:
            return g.node("AveragePool", [x], "avgpool", count_include_pad=int(self.count_include_pad), **pool)
        return self._lowered_avgpool(g, x, example)

    def _lowered_avgpool(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """Average pooling as window sums divided by each window's count (float64: see ``OnnxGraph.lower``)."""
        padded = pad(g, x, list(self.padding))
        sums = [w for _, w in windows(g, padded, example.shape, self.kernel, self.stride, self.padding, (1, 1), (2, 3))]
        total = add_all(g, sums, "pool_sum")
        ones = torch.ones(1, 1, *example.shape[-2:], dtype=example.dtype)
        # elements of the input under each window (padding excluded); with count_include_pad, the kernel's area
        counts = F.avg_pool2d(ones, self.kernel, self.stride, self.padding, divisor_override=1)
        if self.count_include_pad:
            counts = torch.full_like(counts, float(self.kernel[0] * self.kernel[1]))
        return g.node("Div", [total, g.const("window_count", counts)], "avgpool")


@register_stage
class ResidualStage(Stage):
    """``relu(body(x) + shortcut(x))`` with ``body``/``shortcut`` lists of stages (an empty shortcut is the
    identity skip; a projection shortcut is mirrored stage by stage like the body)."""

    kind = "residual"
    body: ModuleSeq[Stage]
    shortcut: ModuleSeq[Stage]

    def __init__(self, body: list, shortcut: list | None = None, *, dtype=torch.float64, device=None):
        super().__init__()
        make = lambda b: b if isinstance(b, nn.Module) else stage_from_description(b, dtype=dtype, device=device)  # noqa: E731
        self.body = ModuleSeq([make(b) for b in body])
        self.shortcut = ModuleSeq([make(b) for b in (shortcut or [])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, s = x, x
        for stage in self.body:
            h = stage(h)
        for stage in self.shortcut:
            s = stage(s)
        return torch.relu(s + h)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"body": [stage_description(s) for s in self.body]}
        if len(self.shortcut):
            cfg["shortcut"] = [stage_description(s) for s in self.shortcut]
        return cfg

    def layout(self) -> StageLayout:
        return StageLayout(ResidualStage)  # its stages are laid out in the plan by their own entries

    def stage_lists(self) -> dict[str, list[Stage]]:
        return {"body": list(self.body), "shortcut": list(self.shortcut)}

    def depth(self) -> int:
        return max(sum(s.depth() for s in self.body), sum(s.depth() for s in self.shortcut))

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """``Relu(shortcut(x) + body(x))``, both branches lowered stage by stage (the shortcut may project)."""
        h, s = x, x
        h_value, s_value = example, example
        for stage in self.body:
            h, h_value = stage.lower_onnx(g, h, h_value), stage(h_value)
        for stage in self.shortcut:
            s, s_value = stage.lower_onnx(g, s, s_value), stage(s_value)
        return g.node("Relu", [g.node("Add", [s, h], "skip")])
