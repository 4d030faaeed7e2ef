"""Factorised linear stages: a target's linear map ``W ∈ R^{m×n}`` realised as ``Σ B diag(γ) A`` between two frozen
random maps, with a BatchNorm's ``γ, β`` between them and nothing else (no ReLU: the branch is linear).

The blocked form splits the input into ``T = ⌈n/k⌉`` blocks of ``k`` features and the output into ``S = ⌈m/r⌉`` blocks
of ``r``: ``y_{I_s} = Σ_t B_{st} (γ_{st} ⊙ (A_{st} x_{J_t}) + β_{st})`` with ``A_{st} ∈ R^{N×k}``, ``B_{st} ∈ R^{r×N}``,
``N = r·k`` — each block one square Khatri–Rao system ``B_{st} diag(γ_{st}) A_{st} = W[I_s, J_t]``. ``k = n, r = m``
is the width construction's one system of size ``m·n``. Features past ``n`` (outputs past ``m``) are zero padding.

``tied=True``: every block shares one frozen pair ``A ∈ R^{N×k}``, ``B ∈ R^{r×N}`` (stored once, as ``(1, 1, N, k)``
and ``(1, 1, r, N)``), so ``y_{I_s} = B Σ_t (γ_{st} ⊙ (A x_{J_t}) + β_{st})``: the products ``A x_{J_t}`` are shared
by every output block and the readout runs once per output block instead of once per block — the same function as
the untied sum, with one Khatri–Rao matrix ``Aᵀ ⊙ B`` for all ``S·T`` systems (one LU per map).

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

from ..errors import FileFormatError
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
    ``(S, T, N, k)`` and ``B`` ``(S, T, r, N)`` — ``(1, 1, N, k)`` and ``(1, 1, r, N)`` when ``tied``, one pair
    shared by every block (:meth:`factors` gives the per-block view either way) — ``γ, β`` from one BatchNorm1d of
    width ``S·T·N``."""

    kind = "factorised_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int | None = None,
        out_block: int | None = None,
        *,
        tied: bool = False,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if tied not in (True, False):  # 0 and 1 too (the option's integer form)
            raise ValueError(f"{type(self).__name__}: tied must be True or False, found {tied!r}")
        self.tied = bool(tied)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block = min(int(block or in_features), self.in_features)
        self.out_block = min(int(out_block or out_features), self.out_features)
        s, t = math.ceil(self.out_features / self.out_block), math.ceil(self.in_features / self.block)
        n = self.out_block * self.block
        self._blocks = (s, t)
        draws = (1, 1) if self.tied else (s, t)
        self.A = _frozen((*draws, n, self.block), dtype, device)
        self.B = _frozen((*draws, self.out_block, n), dtype, device)
        self.norm = make_batchnorm(s * t * n, dtype=dtype, device=device)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> Stage:
        if config.get("tied", False) not in (True, False):
            raise FileFormatError(
                f"stage {cls.kind!r}: config field 'tied' must be true or false, found {config['tied']!r}; the "
                "architecture description is corrupt — re-create the file"
            )
        return cls(**config, dtype=dtype, device=device)

    @property
    def blocks(self) -> tuple[int, int]:
        """``(S, T)``: output and input blocks."""
        return self._blocks

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` per block, ``(S, T, N, k)`` and ``(S, T, r, N)``: the frozen tensors themselves, or (tied)
        views of the one shared pair expanded over the blocks (no copy)."""
        s, t = self.blocks
        return self.A.expand(s, t, *self.A.shape[2:]), self.B.expand(s, t, *self.B.shape[2:])

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
        if self.tied:
            return self._tied_forward(flat).reshape(*lead, self.out_features)
        z = torch.einsum("mtk,stjk->mstj", flat.reshape(-1, t, k), self.A).reshape(-1, s * t * n)
        z = normalize(self.norm, z, inplace=not torch.is_grad_enabled())
        y = torch.einsum("mstj,stij->msi", z.reshape(-1, s, t, n), self.B).reshape(-1, s * self.out_block)
        return y[:, : self.out_features].reshape(*lead, self.out_features)

    def _tied_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """The tied sum on padded rows ``(R, T·k)``: ``z_t = A x_{J_t}`` once (``(R, T, N)``), repeated for every
        output block only where the BatchNorm needs it (``(R, S·T·N)``), ``u_s = Σ_t BN(z)_{st}``, ``y_s = B u_s``:
        ``Σ_t B v_t = B Σ_t v_t``, the untied function with ``T`` times fewer readout products."""
        s, t = self.blocks
        n, k = self.system_size, self.block
        z = flat.reshape(-1, t, k) @ self.A[0, 0].T
        # contiguous: one copy per output block (reshape may keep a stride-0 view, which BN's in-place form refuses)
        z = z.unsqueeze(1).expand(-1, s, t, n).contiguous().view(-1, s * t * n)
        z = normalize(self.norm, z, inplace=not torch.is_grad_enabled())
        y = (z.reshape(-1, s, t, n).sum(2) @ self.B[0, 0].T).reshape(-1, s * self.out_block)
        return y[:, : self.out_features]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as dense matrices ``(S·T·N, n)`` and ``(m, S·T·N)`` (zeros off the blocks)."""
        s, t = self.blocks
        n, k, r = self.system_size, self.block, self.out_block
        A, B = self.factors()
        a = torch.zeros(s, t, n, t, k, dtype=A.dtype, device=A.device)
        b = torch.zeros(s, r, s, t, n, dtype=B.dtype, device=B.device)
        for i in range(s):
            for j in range(t):
                a[i, j, :, j] = A[i, j]
                b[i, :, i, j] = B[i, j]
        a = a.reshape(s * t * n, t * k)[:, : self.in_features]
        return a, b.reshape(s * r, s * t * n)[: self.out_features]

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "block": self.block,
            "out_block": self.out_block,
        }
        return out | self._tied_config()

    def _tied_config(self) -> dict[str, Any]:
        """``{"tied": True}`` for a tied stage; nothing otherwise (untied files stay as they were)."""
        return {"tied": True} if self.tied else {}

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
        if self.tied:
            return self._lower_tied_rows(g, rows)
        blocks = g.node("Reshape", [rows, g.ints("blocks", [-1, 1, t, 1, k])], "blocks")
        z = g.node("MatMul", [blocks, g.const("factor_a", self.A.detach().transpose(2, 3).contiguous())], "factor_a")
        z = batchnorm(g, self.norm, g.node("Reshape", [z, g.ints("rows", [-1, s * t * n])], "rows"))
        z = g.node("Reshape", [z, g.ints("blocks", [-1, s, 1, t * n])], "blocks")
        b = self.B.detach().permute(0, 1, 3, 2).reshape(s, t * n, r)  # (S, T, r, N) → (S, T·N, r)
        y = g.node("MatMul", [z, g.const("factor_b", b.contiguous())], "factor_b")
        y = g.node("Reshape", [y, g.ints("rows", [-1, s * r])], "rows")
        return y if s * r == self.out_features else slice_last(g, y, slice(0, self.out_features))

    def _lower_tied_rows(self, g: OnnxGraph, rows: str) -> str:
        """:meth:`_tied_forward` on padded rows: ``MatMul`` of ``(R, T, k)`` by the shared ``Aᵀ`` ``(k, N)``,
        ``Expand`` over the ``S`` output blocks, the BatchNorm on ``(R, S·T·N)``, ``ReduceSum`` over ``T``,
        ``MatMul`` by the shared ``Bᵀ`` ``(N, r)``, the first ``m`` of the ``S·r`` outputs."""
        s, t = self.blocks
        n, k, r = self.system_size, self.block, self.out_block
        blocks = g.node("Reshape", [rows, g.ints("blocks", [-1, 1, t, k])], "blocks")
        z = g.node("MatMul", [blocks, g.const("factor_a", self.A.detach()[0, 0].T.contiguous())], "factor_a")
        if s > 1:
            z = g.node("Expand", [z, g.ints("out_blocks", [1, s, 1, 1])], "out_blocks")
        z = batchnorm(g, self.norm, g.node("Reshape", [z, g.ints("rows", [-1, s * t * n])], "rows"))
        z = g.node("Reshape", [z, g.ints("blocks", [-1, s, t, n])], "blocks")
        z = g.node("ReduceSum", [z, g.ints("axes", [2])], "block_sum", keepdims=0)
        y = g.node("MatMul", [z, g.const("factor_b", self.B.detach()[0, 0].T.contiguous())], "factor_b")
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
        details = (("block", self.block), ("tied", self.tied))
        return StageLayout(type(self), (self.in_features, self.out_features), False, details)

    def extra_repr(self) -> str:
        tied = ", tied" if self.tied else ""
        return f"{self.in_features}→{self.out_features}, blocks={self.blocks}, N={self.system_size}{tied}"


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
        tied: bool = False,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        self.shape = [int(v) for v in shape]
        d = self.shape[-1] if self.shape else 1
        rows = max(1, math.prod(self.shape) // max(d, 1))
        super().__init__(rows, d, block, out_block, tied=tied, dtype=dtype, device=device)

    def forward(self) -> torch.Tensor:  # type: ignore[override]
        eye = torch.eye(self.in_features, dtype=self.A.dtype, device=self.A.device)
        return super().forward(eye).reshape(self.shape)

    def config(self) -> dict[str, Any]:
        return {"shape": self.shape, "block": self.block, "out_block": self.out_block} | self._tied_config()

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """The factorised map of the identity's rows (``onehot(Range(n))``) reshaped to the table's shape; ``x``
        is not read."""
        eye = self._one_hot_rows(g, self._classes(g))
        return g.node("Reshape", [self._lower_rows(g, eye), g.ints("shape", self.shape)], "table")
