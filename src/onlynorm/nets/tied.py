"""``TiedResidualStream``: the deep construction's residual stream with one frozen draw shared by every block.

The ``T = ⌊n/k⌋`` full input blocks share the branch ``A ∈ R^{mk×k}`` and the readout ``B ∈ R^{m×mk}`` (the smaller
last block, when ``k ∤ n``, has its own ``(A', B')``); only ``γ_t, β_t`` differ per block. The forward evaluates the
branches as one matmul over blocks-as-batch and the shared readout once on the sum of the branches
(``Σ_t B u_t = B Σ_t u_t``: the same function). The certificate's view is the untied one with the shared draw
expanded (:class:`~onlynorm.nets.views.BranchStreamView`), so every reader of ``ResidualStream`` reads this too.

>>> import torch
>>> stage = TiedResidualStream(5, 3, block=2)
>>> stage.sizes, [b.inputs for b in stage.affine("stage 0").branches]
([2, 2, 1], [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)])
>>> sum(p.numel() for p in stage.parameters() if not p.requires_grad)   # A 6×2, B 3×6 once; A' 3×1, B' 3×3
42
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import frozen_module, make_batchnorm, normalize
from .onnx_graph import OnnxGraph, batchnorm, matmul, relu_if, slice_last
from .stage import Stage, StageLayout, register_stage
from .stream import block_sizes
from .views import AffineView, BranchStreamView, BranchView, read_linear, read_norm

__all__ = ["TiedResidualStream"]


@register_stage
class TiedResidualStream(Stage):
    """One target layer ``n → m`` of ``deep, tied=1``. State-dict keys: ``branch.weight`` (``A``, shared),
    ``readout.weight`` (``B``, shared), ``rest.weight`` / ``rest_readout.weight`` (the smaller last block, if any),
    ``branch_norm.*`` (``γ_t, β_t`` of every block, block-major), ``norm.*``."""

    kind = "tied_residual_stream"
    branch: nn.Linear
    readout: nn.Linear
    rest: nn.Linear | None
    rest_readout: nn.Linear | None
    branch_norm: _BatchNorm
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
        self.in_features, self.out_features, self.relu = int(in_features), int(out_features), bool(relu)
        self.block = min(int(block), self.in_features)
        self.full = self.in_features // self.block
        m, k, r = self.out_features, self.block, self.in_features % self.block
        self.per_block = m * k
        self.branch = frozen_module(nn.Linear, k, m * k, dtype=dtype, device=device)
        self.readout = frozen_module(nn.Linear, m * k, m, dtype=dtype, device=device)
        self.rest = frozen_module(nn.Linear, r, m * r, dtype=dtype, device=device) if r else None
        self.rest_readout = frozen_module(nn.Linear, m * r, m, dtype=dtype, device=device) if r else None
        self.channels = self.full * m * k + m * r
        self.branch_norm = make_batchnorm(self.channels, dtype=dtype, device=device)
        self.norm = make_batchnorm(m, dtype=dtype, device=device)

    @property
    def sizes(self) -> list[int]:
        """The input block sizes (``k`` … ``k``, the smaller last one): computed, not stored, so cloning a network
        (a deepcopy) does not copy a list of ``⌈n/k⌉`` ints per stage."""
        return block_sizes(self.in_features, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()
        split, lead = self.full * self.block, x.shape[:-1]
        v = self.branch(x[..., :split].reshape(*lead, self.full, self.block)).reshape(*lead, -1)
        if self.rest is not None:
            v = torch.cat([v, self.rest(x[..., split:])], dim=-1)
        u = normalize(self.branch_norm, v, inplace=inplace)
        u = u.relu_() if inplace else torch.relu(u)
        units = self.full * self.per_block
        s = self.readout(u[..., :units].reshape(*lead, self.full, self.per_block).sum(dim=-2))
        if self.rest_readout is not None:
            s = s + self.rest_readout(u[..., units:])
        z = normalize(self.norm, s, inplace=inplace)
        return torch.relu(z) if self.relu else z

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "block": self.block,
            "relu": self.relu,
        }

    def widths(self) -> list[int]:
        return [self.out_features * k for k in self.sizes] + [self.out_features]

    def depth(self) -> int:
        return len(self.sizes) + 1

    def block_slices(self) -> list[slice]:
        """The input features ``J_t`` of each block."""
        starts = [t * self.block for t in range(len(self.sizes))]
        return [slice(s, s + k) for s, k in zip(starts, self.sizes)]

    def unit_slices(self) -> list[slice]:
        """The branch units (``branch_norm`` channels) of each block."""
        starts = [t * self.per_block for t in range(len(self.sizes))]
        return [slice(s, s + self.out_features * k) for s, k in zip(starts, self.sizes)]

    def block_maps(self, t: int) -> tuple[nn.Linear, nn.Linear]:
        """The frozen ``(A, B)`` modules block ``t`` reads (shared by every full block)."""
        if t < self.full:
            return self.branch, self.readout
        assert self.rest is not None and self.rest_readout is not None
        return self.rest, self.rest_readout

    def affine(self, where: str) -> BranchStreamView:
        gamma1, beta1 = read_norm(self.branch_norm, f"{where} (branch norm)")
        branches = []
        for t, (units, part) in enumerate(zip(self.unit_slices(), self.block_slices())):
            A, B = self.block_maps(t)
            name = "shared" if t < self.full else "rest"
            view = AffineView(read_linear(A, f"{where} ({name} branch)"), gamma1[units], beta1[units], True)
            branches.append(BranchView(view, read_linear(B, f"{where} ({name} readout)"), part))
        gamma, beta = read_norm(self.norm, f"{where} (norm)")
        return BranchStreamView(tuple(branches), gamma, beta, self.relu)

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """Blocks as a batch axis: ``Reshape`` to ``(b, T, k)``, one ``MatMul`` by ``Aᵀ``, the branch BatchNorm and
        ``Relu`` on ``(b, T·mk [+ m·r])``, ``ReduceSum`` over the blocks, one ``MatMul`` by ``Bᵀ`` (plus the rest
        block's own pair), the output BatchNorm."""
        split, units = self.full * self.block, self.full * self.per_block
        blocks = g.node("Reshape", [slice_last(g, x, slice(0, split)), g.ints("shape", [-1, self.full, self.block])])
        v = g.node("Reshape", [matmul(g, self.branch.weight, blocks), g.ints("shape", [-1, units])], "branches")
        if self.rest is not None:
            rest = matmul(g, self.rest.weight, slice_last(g, x, slice(split, self.in_features)))
            v = g.node("Concat", [v, rest], "branches", axis=-1)
        u = g.node("Relu", [batchnorm(g, self.branch_norm, v)])
        per = g.node("Reshape", [slice_last(g, u, slice(0, units)), g.ints("shape", [-1, self.full, self.per_block])])
        total = g.node("ReduceSum", [per, g.ints("axes", [1])], "block_sum", keepdims=0)
        s = matmul(g, self.readout.weight, total)
        if self.rest_readout is not None:
            rest_u = slice_last(g, u, slice(units, self.channels))
            s = g.node("Add", [s, matmul(g, self.rest_readout.weight, rest_u)], "stream")
        return relu_if(g, batchnorm(g, self.norm, s), self.relu)

    def layout(self) -> StageLayout:
        return StageLayout(
            TiedResidualStream, (self.in_features, self.out_features), self.relu, (("block", int(self.block)),)
        )
