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
from .onnx_graph import OnnxGraph, batchnorm, keep_lead
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
        """``x ↦ BN(x Aᵀ) Bᵀ`` with the dense ``A, B`` (:meth:`dense`); an input of any rank is flattened to rows
        and its leading sizes (possibly dynamic) restored, as ``forward`` does."""
        a, b = self.dense()
        rows = x if example.dim() == 2 else g.node("Reshape", [x, g.ints("rows", [-1, self.in_features])], "rows")
        y = self._lower_rows(g, g.node("MatMul", [rows, g.const("factor_a", a.t())], "factor_a"), b)
        return y if example.dim() == 2 else keep_lead(g, y, x, [self.out_features])

    def _lower_rows(self, g: OnnxGraph, z: str, b: torch.Tensor) -> str:
        """``BN(z) Bᵀ`` for ``z`` the ``(rows, S·T·N)`` products with ``A``."""
        return g.node("MatMul", [batchnorm(g, self.norm, z), g.const("factor_b", b.t())], "factor_b")

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
        """``Gather`` of ``Aᵀ``'s rows (``onehot(idx) Aᵀ``, exactly), then the BatchNorm and ``Bᵀ``."""
        a, b = self.dense()
        z = g.node("Gather", [g.const("factor_a", a.t()), x], "token", axis=0)
        rows = g.node("Reshape", [z, g.ints("rows", [-1, a.shape[0]])], "rows")
        return keep_lead(g, self._lower_rows(g, rows, b), x, [self.out_features], drop=0)


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
        """``BN(Aᵀ) Bᵀ`` (row ``l`` the map of ``e_l``) reshaped to the table's shape; ``x`` is not read."""
        a, b = self.dense()
        y = self._lower_rows(g, g.const("factor_a", a.t().contiguous()), b)
        return g.node("Reshape", [y, g.ints("shape", self.shape)], "table")
