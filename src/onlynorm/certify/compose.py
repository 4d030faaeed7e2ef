"""The realised weights ``Ŵ = B diag(γ) A`` of a layer, composed with error-free transformations.

A plain float64 product carries the bound ``γ_n |B| |γ| |A|``, and for the constructions ``|B||γ||A|`` exceeds
``|Ŵ|`` by the Khatri–Rao cancellation factor (10²–10⁴ on a ResNet's layers): the rounding bound of forming ``Ŵ``
would be ~10³× the true ``|Ŵ − W|`` and dominate the certified distance. Here every product ``B_{oi} γ_i A_{ij}``
is split exactly (Dekker/Veltkamp ``TwoProduct``) and summed with ``TwoSum`` (Ogita, Rump & Oishi's Dot2, as if in
twice float64's precision), so the bound is ``u|Ŵ| + 3γ_{n+2}² |B||γ||A|`` — relative to the result.

The kernels of the deep construction are block-diagonal (each branch reads its own input channels): the
composition runs per block, ``Ŵ[:, C_t] = B[:, R_t] diag(γ_{R_t}) A[R_t, C_t]``, batched over blocks of equal
size, so the work is that of the blocks, not of the dense ``N × K`` kernel. Larger products than
:data:`BUDGET` fall back to the plain float64 product and its bound.

>>> import torch
>>> B, g = torch.ones(1, 3, dtype=torch.float64), torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
>>> A = torch.tensor([[1e16], [1.0], [1e16]], dtype=torch.float64)   # 1e16 + 1 − 1e16 = 1
>>> ((B * g) @ A).item()                                              # a plain product loses the 1
0.0
>>> C, E = compose(B, g, A)
>>> C.item(), bool(E.item() < 1e-13)
(1.0, True)
"""

from __future__ import annotations

import torch

from ..linalg_exact import tree_sum, two_product, two_sum
from .core import U64, gamma_n

__all__ = ["compose", "compose_vector", "BUDGET"]

#: multiply-adds above which the composition is one plain float64 product with the γ_n bound
BUDGET = 400_000_000


def _dot2(Bs: torch.Tensor, gs: torch.Tensor, As: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``Bs diag(gs) As`` (``(T, m, n)``, ``(T, n)``, ``(T, n, k)``) by Dot2 over ``n``, and its bound."""
    n = Bs.shape[-1]
    s = torch.zeros(Bs.shape[0], Bs.shape[1], As.shape[2], dtype=torch.float64)
    c = torch.zeros_like(s)
    for i in range(n):
        p1, e1 = two_product(Bs[:, :, i], gs[:, i : i + 1])  # (T, m): B γ, exactly p1 + e1
        a = As[:, i : i + 1, :]  # (T, 1, k)
        p2, e2 = two_product(p1[:, :, None], a)
        s, q = two_sum(s, p2)
        c = c + (q + e2 + e1[:, :, None] * a)  # e1·a rounds, but it is u-small: in the bound below
    C = s + c
    majorant = (Bs.abs() * gs.abs()[:, None, :]) @ As.abs()
    g = gamma_n(n + 2, U64)
    E = (U64 * C.abs() * (1 + 2 * U64) + 3 * g * g * majorant) * (1 + gamma_n(n + 2, U64)) + 1e-300
    return C, E


def _blocks(A: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``(rows, cols)`` of the blocks of a block-diagonal ``A`` (rows with the same column support), or None when
    two supports overlap (then ``A`` is treated as one dense block)."""
    support = A != 0
    live = support.any(dim=1)
    if not bool(live.any()):
        return []
    patterns, which = torch.unique(support[live], dim=0, return_inverse=True)
    if bool((patterns.sum(dim=0) > 1).any()):  # a column read by two patterns: not block-diagonal
        return None
    rows = live.nonzero().flatten()
    return [(rows[which == p], patterns[p].nonzero().flatten()) for p in range(patterns.shape[0])]


def compose(B: torch.Tensor, g: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, E)``: ``C`` the float64 value of ``B diag(g) A`` (``(m, n)``, ``(n,)``, ``(n, k)``) and ``E`` an
    entrywise bound on ``|C − B diag(g) A|`` (exact product of the given float64 values)."""
    B, g, A = B.double().cpu(), g.double().cpu(), A.double().cpu()
    m, n, k = B.shape[0], B.shape[1], A.shape[1]
    blocks = _blocks(A) if n * k <= 50_000_000 else None
    work = sum(len(r) * m * len(c) for r, c in blocks) if blocks is not None else m * n * k
    if blocks is None or work > BUDGET or n == 0:
        majorant = (B.abs() * g.abs()) @ A.abs()
        C = (B * g) @ A
        E = gamma_n(n + 2, U64) * majorant * (1 + gamma_n(n + 2, U64)) + 1e-300
        return C, E
    C = torch.zeros(m, k, dtype=torch.float64)
    E = torch.zeros(m, k, dtype=torch.float64)
    by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for rows, cols in blocks:
        by_shape.setdefault((len(rows), len(cols)), []).append((rows, cols))
    for group in by_shape.values():
        Bs = torch.stack([B[:, rows] for rows, _ in group])
        gs = torch.stack([g[rows] for rows, _ in group])
        As = torch.stack([A[rows][:, cols] for rows, cols in group])
        Cs, Es = _dot2(Bs, gs, As)
        for t, (_, cols) in enumerate(group):
            C[:, cols], E[:, cols] = Cs[t], Es[t]
    E = E + 1e-300  # columns no row touches are exactly 0
    return C, E


def compose_vector(B: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, e)``: ``c`` the float64 value of ``B v`` and ``|c − B v| ≤ e`` — every product split exactly
    (``TwoProduct``) and the ``2n`` pieces of each row summed by a tree of ``TwoSum`` (every level exact; the
    ``log₂ n`` levels of rounding errors, ``u``-small, are summed last)."""
    B, v = B.double().cpu(), v.double().cpu()
    p, e = two_product(B, v[None, :])
    head, tail, tail_abs = tree_sum(torch.cat([p, e], dim=1))
    c = head + tail
    n = 2 * p.shape[1]  # more than the number of rounding errors the tree kept
    bound = U64 * c.abs() * (1 + 2 * U64) + gamma_n(n + 2, U64) * tail_abs * (1 + gamma_n(n + 2, U64))
    return c, bound + 1e-300
