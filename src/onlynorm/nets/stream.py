"""``ResidualStream``: one target layer of the deep construction — branches on input blocks, a residual stream.

>>> import torch
>>> stage = ResidualStream(5, 3, block=2)
>>> stage.sizes, [b.inputs for b in stage.affine("stage 0").branches]
([2, 2, 1], [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .linear import NormLinear
from .modules import ModuleSeq, frozen_module, make_batchnorm
from .onnx_graph import OnnxGraph, add_all, batchnorm, matmul, relu_if, slice_last
from .stage import Stage, StageLayout, register_stage
from .views import BranchStreamView, BranchView, read_linear, read_norm

__all__ = ["ResidualStream", "block_sizes"]


def block_sizes(n: int, k: int) -> list[int]:
    """``[k, k, …, n mod k]``: sizes of the input blocks ``J_t``."""
    return [k] * (n // k) + ([n % k] if n % k else [])


@register_stage
class ResidualStream(Stage):
    """One target layer of the deep construction: ``T`` branches reading input blocks, a residual stream of width
    ``m``, and an output BatchNorm (+ ReLU). State-dict keys: ``branches.t.*``, ``readouts.t.weight``, ``norm.*``."""

    kind = "residual_stream"
    branches: ModuleSeq[NormLinear]
    readouts: ModuleSeq[nn.Linear]
    norm: _BatchNorm

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int = 1,
        relu: bool = True,
        *,
        dtype: torch.dtype = torch.float64,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.block, self.relu = in_features, out_features, block, bool(relu)
        self.sizes = block_sizes(in_features, block)
        self.branches = ModuleSeq(
            NormLinear(k, out_features * k, relu=True, dtype=dtype, device=device) for k in self.sizes
        )
        self.readouts = ModuleSeq(
            frozen_module(nn.Linear, out_features * k, out_features, dtype=dtype, device=device) for k in self.sizes
        )
        self.norm = make_batchnorm(out_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.new_zeros(*x.shape[:-1], self.out_features)
        start = 0
        for branch, readout, k in zip(self.branches, self.readouts, self.sizes):
            s = s + readout(branch(x[..., start : start + k]))  # skip connection: every block reads x
            start += k
        z = self.norm(s)
        return torch.relu(z) if self.relu else z

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "block": self.block,
            "relu": self.relu,
        }

    def widths(self) -> list[int]:
        return [b.linear.out_features for b in self.branches] + [self.out_features]

    def depth(self) -> int:
        return len(self.branches) + 1

    def block_slices(self) -> list[slice]:
        out, start = [], 0
        for k in self.sizes:
            out.append(slice(start, start + k))
            start += k
        return out

    def affine(self, where: str) -> BranchStreamView:
        branches = tuple(
            BranchView(branch.affine(f"{where} branch {t}"), read_linear(readout, f"{where} readout {t}"), part)
            for t, (branch, readout, part) in enumerate(zip(self.branches, self.readouts, self.block_slices()))
        )
        gamma, beta = read_norm(self.norm, f"{where} (norm)")
        return BranchStreamView(branches, gamma, beta, self.relu)

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        terms = [
            matmul(g, readout.weight, branch.lower_onnx(g, slice_last(g, x, part), example[..., part]))
            for branch, readout, part in zip(self.branches, self.readouts, self.block_slices())
        ]
        return relu_if(g, batchnorm(g, self.norm, add_all(g, terms, "stream")), self.relu)

    def layout(self) -> StageLayout:
        return StageLayout(
            ResidualStream, (self.in_features, self.out_features), self.relu, (("block", int(self.block)),)
        )
