"""Pure tensor-in / tensor-out linear algebra: the Khatri–Rao system at the heart of every construction.

For frozen ``A ∈ R^{N×n}``, ``B ∈ R^{m×N}`` and ``Γ = diag(γ)``::

    vec(B Γ A) = (Aᵀ ⊙ B) γ            (⊙: Khatri–Rao, the column-wise Kronecker product)

so entry ``(i, p)`` of ``B Γ A`` is ``Σ_k B[i,k] γ_k A[k,p]``. ``vec`` stacks columns: row ``p·m + i`` of the
system is target entry ``W[i, p]``. With ``N = m·n`` and continuous random ``A, B`` the system is invertible with
probability one. Nothing here knows about modules; every function is checked against a slow reference in tests.

>>> import torch
>>> A, B = torch.randn(6, 3, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
>>> khatri_rao_system(A, B).shape          # (m·n, N)
torch.Size([6, 6])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import SingularSystemError

__all__ = [
    "khatri_rao",
    "khatri_rao_reference",
    "khatri_rao_system",
    "compose",
    "KRSolution",
    "solve_khatri_rao",
    "kr_pattern",
    "structural_rank",
]


def khatri_rao(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: ``(X ⊙ Y)[a·q + b, k] = X[a, k] · Y[b, k]``.

    ``X`` is ``(p, K)``, ``Y`` is ``(q, K)``, the result ``(p·q, K)``. Batched over leading dimensions.

    >>> khatri_rao(torch.ones(2, 4), torch.ones(3, 4)).shape
    torch.Size([6, 4])
    """
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"khatri_rao: expected equal column counts, found {tuple(X.shape)} and {tuple(Y.shape)}")
    out = X.unsqueeze(-2) * Y.unsqueeze(-3)   # (..., p, q, K): one allocation, no intermediate copy
    return out.reshape(*X.shape[:-2], X.shape[-2] * Y.shape[-2], X.shape[-1])


def khatri_rao_reference(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Slow reference of :func:`khatri_rao`: column ``k`` is ``kron(X[:, k], Y[:, k])``."""
    cols = [torch.kron(X[:, k], Y[:, k]) for k in range(X.shape[1])]
    return torch.stack(cols, dim=1)


def khatri_rao_system(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The system matrix ``M = Aᵀ ⊙ B`` of shape ``(m·n, N)`` with ``M @ γ = vec(B diag(γ) A)``."""
    return khatri_rao(A.transpose(-1, -2), B)


def compose(B: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``B diag(γ) A`` without forming ``diag(γ)`` (batched)."""
    return B @ (gamma.unsqueeze(-1) * A)


def vec(W: torch.Tensor) -> torch.Tensor:
    """Column-stacking ``vec``: ``vec(W)[p·m + i] = W[i, p]`` (batched over leading dimensions)."""
    return W.transpose(-1, -2).reshape(*W.shape[:-2], -1)


@dataclass
class KRSolution:
    """Result of solving ``B diag(γ) A ≈ W``.

    ``residual`` is ``max |B Γ A − W|`` (absolute, entrywise) and ``relative_residual`` is
    ``‖B Γ A − W‖_F / ‖W‖_F``; ``exact`` says the system was square and nonsingular (or consistent).
    """

    gamma: torch.Tensor
    residual: float
    relative_residual: float
    exact: bool
    kind: str  # "square", "least-squares" (N < m·n) or "min-norm" (N > m·n)
    rcond: float | None = None  # cheap reciprocal-condition estimate where available


def _pivot_rcond(LU: torch.Tensor) -> torch.Tensor:
    """``min |U_ii| / max |U_ii|``: a cheap (optimistic) reciprocal condition estimate from an LU factor."""
    d = LU.diagonal(dim1=-2, dim2=-1).abs()
    return d.min(dim=-1).values / d.max(dim=-1).values.clamp_min(torch.finfo(LU.dtype).tiny)


def solve_khatri_rao(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, *, layer: int | None = None,
                     rcond_tol: float | None = None) -> KRSolution:
    """Solve ``B diag(γ) A = W`` for ``γ``: LU when square, least squares when ``N < m·n``, minimum norm when
    ``N > m·n``.

    A square system whose LU has a zero pivot, or whose pivot-ratio estimate falls below ``rcond_tol``
    (default ``N·eps``), raises :class:`SingularSystemError` — a singular system is never silently approximated.
    """
    m, n = W.shape
    N = A.shape[0]
    if A.shape[1] != n or B.shape != (m, N):
        raise ValueError(f"solve_khatri_rao: expected A (N, {n}) and B ({m}, N), found {tuple(A.shape)} and {tuple(B.shape)}")
    M = khatri_rao_system(A, B)
    rhs = vec(W)
    where = "" if layer is None else f"layer {layer}: "
    if N == m * n:
        LU, pivots, info = torch.linalg.lu_factor_ex(M)
        rcond = float(_pivot_rcond(LU))
        tol = N * torch.finfo(M.dtype).eps if rcond_tol is None else rcond_tol
        if int(info) != 0 or not np.isfinite(rcond) or rcond < tol:
            raise SingularSystemError(
                f"{where}Khatri–Rao system of size {N} is singular (pivot ratio {rcond:.1e} < {tol:.1e}); "
                "the frozen network cannot express this layer exactly — use fresh random weights or a denser network",
                layer=layer, size=N)
        gamma = torch.linalg.lu_solve(LU, pivots, rhs.unsqueeze(-1)).squeeze(-1)
        kind, exact = "square", True
    else:
        driver = "gelsd" if M.device.type == "cpu" else None
        gamma = torch.linalg.lstsq(M, rhs.unsqueeze(-1), driver=driver).solution.squeeze(-1)
        kind = "least-squares" if N < m * n else "min-norm"
        exact = N > m * n
        rcond = None
    err = compose(B, gamma, A) - W
    residual = float(err.abs().max())
    scale = float(torch.linalg.norm(W))
    relative = float(torch.linalg.norm(err)) / scale if scale > 0 else residual
    if kind == "least-squares":
        exact = relative <= 1e3 * torch.finfo(W.dtype).eps
    return KRSolution(gamma=gamma, residual=residual, relative_residual=relative, exact=exact, kind=kind, rcond=rcond)


def kr_pattern(A_mask: torch.Tensor | np.ndarray, B_mask: torch.Tensor | np.ndarray):
    """Sparsity pattern of ``Aᵀ ⊙ B`` as a scipy CSR matrix of shape ``(m·n, N)`` (rows ``p·m + i``).

    Built column by column from the nonzeros of ``A[k, :]`` and ``B[:, k]``: ``O(nnz)`` time and memory.
    """
    import scipy.sparse as sp

    A_np = np.asarray(A_mask.cpu() if isinstance(A_mask, torch.Tensor) else A_mask) != 0
    B_np = np.asarray(B_mask.cpu() if isinstance(B_mask, torch.Tensor) else B_mask) != 0
    N, n = A_np.shape
    m = B_np.shape[0]
    rows, cols = [], []
    for k in range(N):
        ps = np.flatnonzero(A_np[k])
        is_ = np.flatnonzero(B_np[:, k])
        if ps.size and is_.size:
            r = (ps[:, None] * m + is_[None, :]).reshape(-1)
            rows.append(r)
            cols.append(np.full(r.size, k))
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
    else:
        r = c = np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(m * n, N))


def structural_rank(pattern) -> int:
    """Structural rank: the size of a maximum bipartite matching between rows and nonzero columns.

    It bounds the rank of every matrix with this pattern and equals the rank of a generic one (the "Boolean
    determinant" argument), so ``structural_rank(kr_pattern(A, B)) < m·n`` proves the system singular for every
    choice of the nonzero values.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import structural_rank as _srank

    if isinstance(pattern, torch.Tensor):
        pattern = pattern.detach().cpu().numpy()
    mat = sp.csr_matrix(pattern != 0 if isinstance(pattern, np.ndarray) else pattern)
    if mat.shape[0] == 0 or mat.shape[1] == 0:
        return 0
    return int(_srank(mat))
