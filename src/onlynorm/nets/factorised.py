"""Factorised linear stages: a target's linear map ``W ∈ R^{m×n}`` realised as ``Σ B diag(γ) A`` between two frozen
random maps, with a BatchNorm's ``γ, β`` between them and nothing else (no ReLU: the branch is linear).

The blocked form splits the input into ``T = ⌈n/k⌉`` blocks of ``k`` features and the output into ``S = ⌈m/r⌉`` blocks
of ``r``: ``y_{I_s} = Σ_t B_{st} (γ_{st} ⊙ (A_{st} x_{J_t}) + β_{st})`` with ``A_{st} ∈ R^{N×k}``, ``B_{st} ∈ R^{r×N}``,
``N = r·k`` — each block one square Khatri–Rao system ``B_{st} diag(γ_{st}) A_{st} = W[I_s, J_t]``. ``k = n, r = m``
is the width construction's one system of size ``m·n``. Features past ``n`` (outputs past ``m``) are zero padding.

* :class:`FactorisedLinear` — ``x ↦ W x + b`` on the last dimension;
* :class:`FactorisedEmbedding` — ``idx ↦ W[idx]``, the map of the one-hot token;
* :class:`FactorisedTable` — a learned tensor ``P`` (positional embeddings): row ``l`` is the map of ``e_l``.

>>> stage = FactorisedLinear(5, 3, block=2)
>>> stage(torch.zeros(2, 7, 5, dtype=torch.float64)).shape, stage.blocks, stage.system_size
(torch.Size([2, 7, 3]), (1, 3), 6)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import make_batchnorm, normalize
from .onnx_graph import OnnxGraph, batchnorm, keep_lead, slice_last
from .onnx_seq_graph import elem_type
from .stage import Stage, StageLayout, register_stage

__all__ = ["FactorisedLinear", "FactorisedEmbedding", "FactorisedTable"]


def _frozen(shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


@register_stage
class FactorisedLinear(Stage):
    """``x ↦ Σ_{s,t} B_{st}(γ_{st} ⊙ (A_{st} x_{J_t}) + β_{st})`` on the last dimension of ``x``; frozen ``A``
    ``(S, T, N, k)`` and ``B`` ``(S, T, r, N)``, ``γ, β`` from one BatchNorm1d of width ``S·T·N``."""

    kind = "factorised_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int | None = None,
        out_block: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block = min(int(block or in_features), self.in_features)
        self.out_block = min(int(out_block or out_features), self.out_features)
        s, t = math.ceil(self.out_features / self.out_block), math.ceil(self.in_features / self.block)
        n = self.out_block * self.block
        self.A = _frozen((s, t, n, self.block), dtype, device)
        self.B = _frozen((s, t, self.out_block, n), dtype, device)
        self.norm = make_batchnorm(s * t * n, dtype=dtype, device=device)

    @property
    def blocks(self) -> tuple[int, int]:
        """``(S, T)``: output and input blocks."""
        return int(self.A.shape[0]), int(self.A.shape[1])

    @property
    def system_size(self) -> int:
        return int(self.A.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, t = self.blocks
        n, k = self.system_size, self.block
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if t * k != self.in_features:
            flat = F.pad(flat, (0, t * k - self.in_features))
        z = torch.einsum("mtk,stjk->mstj", flat.reshape(-1, t, k), self.A).reshape(-1, s * t * n)
        z = normalize(self.norm, z, inplace=not torch.is_grad_enabled())
        y = torch.einsum("mstj,stij->msi", z.reshape(-1, s, t, n), self.B).reshape(-1, s * self.out_block)
        return y[:, : self.out_features].reshape(*lead, self.out_features)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as dense matrices ``(S·T·N, n)`` and ``(m, S·T·N)`` (zeros off the blocks)."""
        s, t = self.blocks
        n, k, r = self.system_size, self.block, self.out_block
        a = torch.zeros(s, t, n, t, k, dtype=self.A.dtype, device=self.A.device)
        b = torch.zeros(s, r, s, t, n, dtype=self.B.dtype, device=self.B.device)
        for i in range(s):
            for j in range(t):
                a[i, j, :, j] = self.A[i, j]
                b[i, :, i, j] = self.B[i, j]
        a = a.reshape(s * t * n, t * k)[:, : self.in_features]
        return a, b.reshape(s * r, s * t * n)[: self.out_features]

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "block": self.block,
            "out_block": self.out_block,
        }

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """The blocked products as ``forward`` computes them: rows ``(R, n)`` (an input of any rank is flattened
        and its leading, possibly dynamic, sizes restored) padded to ``T·k``, ``MatMul`` of ``(R, 1, T, 1, k)`` by
        ``A`` as ``(S, T, k, N)``, the BatchNorm on ``(R, S·T·N)``, ``MatMul`` of ``(R, S, 1, T·N)`` by ``B`` as
        ``(S, T·N, r)``, the first ``m`` of the ``S·r`` outputs. The initializers are the frozen ``A, B`` themselves
        (no dense zero-padded copies)."""
        rows = x if example.dim() == 2 else g.node("Reshape", [x, g.ints("rows", [-1, self.in_features])], "rows")
        y = self._lower_rows(g, rows)
        return y if example.dim() == 2 else keep_lead(g, y, x, [self.out_features])

    def _lower_rows(self, g: OnnxGraph, rows: str) -> str:
        s, t = self.blocks
        n, k, r = self.system_size, self.block, self.out_block
        if t * k != self.in_features:
            rows = g.node("Pad", [rows, g.ints("pads", [0, 0, 0, t * k - self.in_features])], "pad")
        blocks = g.node("Reshape", [rows, g.ints("blocks", [-1, 1, t, 1, k])], "blocks")
        z = g.node("MatMul", [blocks, g.const("factor_a", self.A.detach().transpose(2, 3).contiguous())], "factor_a")
        z = batchnorm(g, self.norm, g.node("Reshape", [z, g.ints("rows", [-1, s * t * n])], "rows"))
        z = g.node("Reshape", [z, g.ints("blocks", [-1, s, 1, t * n])], "blocks")
        b = self.B.detach().permute(0, 1, 3, 2).reshape(s, t * n, r)  # (S, T, r, N) → (S, T·N, r)
        y = g.node("MatMul", [z, g.const("factor_b", b.contiguous())], "factor_b")
        y = g.node("Reshape", [y, g.ints("rows", [-1, s * r])], "rows")
        return y if s * r == self.out_features else slice_last(g, y, slice(0, self.out_features))

    def _classes(self, g: OnnxGraph) -> str:
        """``Range(n)``: the int64 ids ``0 … n−1``."""
        bounds = [g.const(h, torch.tensor(v)) for h, v in (("zero", 0), ("n", self.in_features), ("one", 1))]
        return g.node("Range", bounds, "classes")

    def _one_hot_rows(self, g: OnnxGraph, idx: str) -> str:
        """``onehot(idx)`` as ``(R, n)`` rows of the network's dtype (``Equal`` with ``Range(n)``, ``Cast``)."""
        flat = g.node("Reshape", [idx, g.ints("rows", [-1, 1])], "ids")
        hot = g.node("Equal", [flat, self._classes(g)], "one_hot")
        return g.node("Cast", [hot], "one_hot", to=elem_type(self.A.dtype))

    def layout(self) -> StageLayout:
        return StageLayout(type(self), (self.in_features, self.out_features), False, (("block", self.block),))

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, blocks={self.blocks}, N={self.system_size}"


@register_stage
class FactorisedEmbedding(FactorisedLinear):
    """``idx ↦ W[idx]``: :class:`FactorisedLinear` of the one-hot token (``in_features`` = vocabulary size)."""

    kind = "factorised_embedding"

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(F.one_hot(idx, self.in_features).to(self.A.dtype))

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """The one-hot rows of the token ids (as ``forward``), the factorised map, the ids' shape restored."""
        return keep_lead(g, self._lower_rows(g, self._one_hot_rows(g, x)), x, [self.out_features], drop=0)


@register_stage
class FactorisedTable(FactorisedLinear):
    """A learned tensor of ``shape``: row ``l`` of its ``(rows, d)`` form is the map of ``e_l``; takes no input."""

    kind = "factorised_table"

    def __init__(
        self,
        shape: list[int],
        block: int | None = None,
        out_block: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        self.shape = [int(v) for v in shape]
        d = self.shape[-1] if self.shape else 1
        super().__init__(max(1, math.prod(self.shape) // max(d, 1)), d, block, out_block, dtype=dtype, device=device)

    def forward(self) -> torch.Tensor:  # type: ignore[override]
        eye = torch.eye(self.in_features, dtype=self.A.dtype, device=self.A.device)
        return super().forward(eye).reshape(self.shape)

    def config(self) -> dict[str, Any]:
        return {"shape": self.shape, "block": self.block, "out_block": self.out_block}

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """The factorised map of the identity's rows (``onehot(Range(n))``) reshaped to the table's shape; ``x``
        is not read."""
        eye = self._one_hot_rows(g, self._classes(g))
        return g.node("Reshape", [self._lower_rows(g, eye), g.ints("shape", self.shape)], "table")
