"""Image stages: ``NormConv2d`` (a frozen conv and a BatchNorm2d), ``FixedOp`` (a parameter-free layer copied from
the target) and ``ResidualStage`` (a skip connection around stage lists)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .stage import STAGES, ModuleSeq, Stage, conv2d_config, frozen_module, make_batchnorm, register_stage

__all__ = ["NormConv2d", "FixedOp", "ResidualStage"]


@register_stage
class NormConv2d(Stage):
    """``relu?(γ ⊙ (A * x) + β)``: a frozen bias-free ``Conv2d`` and a ``BatchNorm2d`` (per-channel γ, β)."""

    kind = "norm_conv2d"
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


@register_stage
class ResidualStage(Stage):
    """``relu(body(x) + shortcut(x))`` with ``body``/``shortcut`` lists of stages (an empty shortcut is the
    identity skip; a projection shortcut is mirrored stage by stage like the body)."""

    kind = "residual"
    body: ModuleSeq[Stage]
    shortcut: ModuleSeq[Stage]

    def __init__(self, body: list, shortcut: list | None = None, *, dtype=torch.float64, device=None):
        super().__init__()
        make = lambda b: b if isinstance(b, nn.Module) else _stage_from_config(b, dtype, device)  # noqa: E731
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
        cfg: dict[str, Any] = {"body": [{"kind": s.kind, **s.config()} for s in self.body]}
        if len(self.shortcut):
            cfg["shortcut"] = [{"kind": s.kind, **s.config()} for s in self.shortcut]
        return cfg

    def depth(self) -> int:
        return max(sum(s.depth() for s in self.body), sum(s.depth() for s in self.shortcut))


def _stage_from_config(cfg: dict, dtype, device) -> Stage:
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}")
    return STAGES[kind].from_config(cfg, dtype=dtype, device=device)
