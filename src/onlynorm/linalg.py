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

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import structural_rank as _srank

from .errors import SingularSystemError
from .linalg_refine import BatchLU, refine

__all__ = [
    "khatri_rao",
    "relative_residual",
    "blockwise_residual",
    "khatri_rao_reference",
    "khatri_rao_system",
    "compose",
    "KRSolution",
    "solve_khatri_rao",
    "khatri_rao_system_transposed",
    "solve_khatri_rao_batched",
    "BatchedSolution",
    "kr_pattern",
    "structural_rank",
    "consistent_solution",
    "vec",
]


def khatri_rao(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: ``(X ⊙ Y)[a·q + b, k] = X[a, k] · Y[b, k]``.

    ``X`` is ``(p, K)``, ``Y`` is ``(q, K)``, the result ``(p·q, K)``. Batched over leading dimensions.

    >>> khatri_rao(torch.ones(2, 4), torch.ones(3, 4)).shape
    torch.Size([6, 4])
    """
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(f"khatri_rao: expected equal column counts, found {tuple(X.shape)} and {tuple(Y.shape)}")
    out = X.unsqueeze(-2) * Y.unsqueeze(-3)  # (..., p, q, K): one allocation, no intermediate copy
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


def relative_residual(realised: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """``(max |Ŵ − W|, ‖Ŵ − W‖_F / ‖W‖_F)`` — the one definition of a solve's error (absolute if ``W = 0``).

    >>> W = torch.eye(2, dtype=torch.float64)
    >>> absolute, relative = relative_residual(W + 1e-3, W)
    >>> round(absolute, 12), round(relative, 12)          # max |ΔW| and √4·1e-3 / √2
    (0.001, 0.001414213562)
    """
    err = (realised - target).to(torch.float64)
    absolute = float(err.abs().max()) if err.numel() else 0.0
    scale = float(torch.linalg.norm(target.to(torch.float64)))
    frob = float(torch.linalg.norm(err))
    return absolute, (frob / scale if scale > 0 else frob)


def blockwise_residual(
    max_abs: Iterable[torch.Tensor | float], norms: Iterable[torch.Tensor | float], target: torch.Tensor
) -> tuple[float, float]:
    """:func:`relative_residual`'s pair for a weight solved in blocks, from each block's ``max |r|`` and ``‖r‖_F``
    (the solves already hold them): ``(max over blocks, √(Σ ‖r_t‖_F²) / ‖W‖_F)`` — absolute if ``W = 0``.

    >>> W = torch.eye(2, dtype=torch.float64)
    >>> absolute, relative = blockwise_residual([torch.tensor([1e-3], dtype=torch.float64), 1e-3], [1e-3, 1e-3], W)
    >>> round(absolute, 12), round(relative, 12)          # the same numbers as relative_residual(W + 1e-3·I, W)
    (0.001, 0.001)
    """
    absolute = max((float(torch.as_tensor(m, dtype=torch.float64).max()) for m in max_abs), default=0.0)
    squares = sum(float((torch.as_tensor(n, dtype=torch.float64) ** 2).sum()) for n in norms)
    scale = float(torch.linalg.vector_norm(target.to(torch.float64)))
    return absolute, (squares**0.5 / scale if scale > 0 else squares**0.5)


@dataclass
class KRSolution:
    """Result of solving ``B diag(γ) A ≈ W``.

    ``residual`` is ``max |B Γ A − W|`` (absolute, entrywise) and ``relative_residual`` is
    ``‖B Γ A − W‖_F / ‖W‖_F`` (``‖B Γ A − W‖_F`` when ``W = 0``), both from :func:`relative_residual`;
    ``exact`` says the system was square and nonsingular (or consistent).
    ``precision`` tells how the square case was solved: ``"mixed"`` (float32 LU + float64 refinement, ``steps``
    refinement steps) or ``"float64"`` (plain LU; the fallback when refinement stalls).
    """

    gamma: torch.Tensor
    residual: float
    relative_residual: float
    exact: bool
    kind: str  # "square", "least-squares" (N < m·n), "min-norm" (N > m·n), "singular-consistent" (W in range)
    rcond: float | None = None  # cheap reciprocal-condition estimate (pivot ratio) where available
    precision: str = "float64"
    steps: int = 0


def _pivot_rcond(LU: torch.Tensor) -> float:
    """``min |U_ii| / max |U_ii|``: a cheap (optimistic) reciprocal condition estimate from an LU factor."""
    d = LU.diagonal(dim1=-2, dim2=-1).abs()
    top = float(d.max())
    return float(d.min()) / top if top > 0 and np.isfinite(top) else 0.0


def khatri_rao_system_transposed(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Mᵀ`` (shape ``(N, n·m)``, row-major) built with one multiplication into a fresh buffer.

    A row-major ``Mᵀ`` *is* ``M`` in column-major order — the layout LAPACK's ``getrf`` factors in place — so
    no transposed copy of the ``N × N`` matrix is ever made: ``Mᵀ[k, p·m + i] = A[k, p] · B[i, k]``.
    """
    N, n = A.shape
    m = B.shape[0]
    Mt = torch.empty(N, n, m, dtype=dtype, device=A.device)
    torch.mul(A.to(dtype).unsqueeze(2), B.to(dtype).T.unsqueeze(1), out=Mt)
    return Mt.view(N, n * m)


class _LowPrecisionLU:
    """An LU factorisation of ``M`` in float32, factored in place; ``solve(r)`` returns ``M⁻¹ r`` in float32.

    On the CPU scipy's ``sgetrf`` overwrites the buffer (no copy: peak memory is the float32 matrix, half the
    float64 system); elsewhere torch's LU is used.
    """

    def __init__(self, Mt: torch.Tensor):
        self.device = Mt.device
        if Mt.device.type == "cpu":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # exactly singular → zero pivot, judged by the caller
                self._lu, self._piv = scipy.linalg.lu_factor(Mt.numpy().T, overwrite_a=True, check_finite=False)
            self.rcond = _pivot_rcond(torch.from_numpy(self._lu))
        else:
            self._lu, self._piv, _ = torch.linalg.lu_factor_ex(Mt.mT)
            self.rcond = _pivot_rcond(self._lu)

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        r32 = r.to(torch.float32)
        if self.device.type == "cpu":
            x = scipy.linalg.lu_solve((self._lu, self._piv), r32.numpy(), check_finite=False)
            return torch.from_numpy(x)
        return torch.linalg.lu_solve(self._lu, self._piv, r32.unsqueeze(-1)).squeeze(-1)


def _system_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """``‖Aᵀ ⊙ B‖_F = sqrt(Σ_k ‖A[k,:]‖² ‖B[:,k]‖²)`` without forming the matrix."""
    return float(torch.sqrt(((A * A).sum(1) * (B * B).sum(0)).sum()))


def _refine(A, B, rhs, lu: _LowPrecisionLU, max_steps: int) -> tuple[torch.Tensor, int, bool]:
    """Mixed-precision iterative refinement: ``γ ← γ + M⁻¹(vec W − M γ)`` with ``M⁻¹`` from the float32 LU and
    the residual in float64. ``M γ`` is ``vec(B diag(γ) A)`` — ``O(m·n·N)`` work, no float64 ``M`` needed.

    Refines while each step at least halves the residual (or until it is a few ulps of ``vec W``), keeping the best
    iterate; converged means a normwise backward error ``‖r‖ / (‖M‖ ‖γ‖ + ‖vec W‖)`` of at most ``64·eps`` —
    what a float64 LU achieves.
    """
    eps = torch.finfo(torch.float64).eps
    norm_M, norm_w = _system_norm(A, B), float(torch.linalg.norm(rhs))
    gamma = torch.zeros_like(rhs)
    best, best_norm = gamma, float("inf")
    r = rhs
    for step in range(max_steps + 1):
        r_norm = float(torch.linalg.norm(r))
        if not np.isfinite(r_norm):
            break
        improved = r_norm <= 0.5 * best_norm
        if r_norm < best_norm:
            best, best_norm = gamma, r_norm
        if r_norm <= 4 * eps * norm_w or not improved or step == max_steps:
            break
        # scale so the float32 solve sees an O(1) right-hand side (no underflow as r shrinks)
        correction = lu.solve(r / r_norm).to(rhs.device, torch.float64) * r_norm
        gamma = gamma + correction
        r = rhs - vec(compose(B, gamma, A))
    backward = best_norm / (norm_M * float(torch.linalg.norm(best)) + norm_w) if norm_w > 0 else 0.0
    return best, step, bool(np.isfinite(best_norm) and backward <= 64 * eps)


def _float64_lu_solve(A, B, rhs, where: str, layer, rcond_tol) -> tuple[torch.Tensor, float]:
    N = A.shape[0]
    Mt = khatri_rao_system_transposed(A, B, torch.float64)
    if Mt.device.type == "cpu":  # factor in place: peak memory is the float64 matrix itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lu, piv = scipy.linalg.lu_factor(Mt.numpy().T, overwrite_a=True, check_finite=False)
        LU = torch.from_numpy(lu)
        pivots = torch.from_numpy(piv.astype(np.int32) + 1)  # LAPACK's 1-based pivots, as torch expects
        info = 0
    else:
        LU, pivots, info = torch.linalg.lu_factor_ex(Mt.mT)
    rcond = _pivot_rcond(LU)
    tol = N * torch.finfo(torch.float64).eps if rcond_tol is None else rcond_tol
    if int(info) != 0 or rcond < tol:
        raise SingularSystemError(
            f"{where}Khatri–Rao system of size {N} is singular (pivot ratio {rcond:.1e} < {tol:.1e}); "
            "the frozen network cannot express this layer exactly — use fresh random weights or a denser network",
            layer=layer,
            size=N,
        )
    return torch.linalg.lu_solve(LU, pivots, rhs.unsqueeze(-1)).squeeze(-1), rcond


def _lstsq(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares γ of ``M γ ≈ rhs`` (SVD-based ``gelsd`` on the CPU: rank-deficient ``M`` is
    handled, not just full-rank tall or wide ones)."""
    driver = "gelsd" if M.device.type == "cpu" else None
    return torch.linalg.lstsq(M, rhs.unsqueeze(-1), driver=driver).solution.squeeze(-1)


def consistent_solution(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """The minimum-norm γ of ``B diag(γ) A = W`` if it reaches ``W`` to ``1e3·eps`` relative, else ``None``."""
    gamma = _lstsq(khatri_rao_system(A, B), rhs)
    scale = float(torch.linalg.norm(W))
    err = float(torch.linalg.norm(compose(B, gamma, A) - W))
    return gamma if err <= 1e3 * torch.finfo(W.dtype).eps * max(scale, 1e-300) else None


def solve_khatri_rao(
    A: torch.Tensor,
    B: torch.Tensor,
    W: torch.Tensor,
    *,
    layer: int | None = None,
    rcond_tol: float | None = None,
    precision: str = "auto",
    max_refinement: int = 30,
) -> KRSolution:
    """Solve ``B diag(γ) A = W`` for ``γ``: LU when square, least squares when ``N < m·n``, minimum norm when
    ``N > m·n``.

    Square float64 systems use ``precision="auto"``: float32 LU (about twice as fast as float64, half the memory)
    refined to float64 accuracy, falling back to a float64 LU when refinement stalls (very ill-conditioned
    ``M``). ``precision="float64"`` forces the plain float64 LU. A singular square system — zero pivot, or pivot
    ratio below ``rcond_tol`` (default ``N·eps``) in the float64 LU — raises :class:`SingularSystemError`; it is
    never silently approximated.

    >>> A, B = torch.randn(6, 3, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    >>> W = torch.randn(2, 3, dtype=torch.float64)
    >>> sol = solve_khatri_rao(A, B, W)
    >>> sol.kind, bool((compose(B, sol.gamma, A) - W).abs().max() < 1e-12)
    ('square', True)
    """
    m, n = W.shape
    N = A.shape[0]
    if A.shape[1] != n or B.shape != (m, N):
        raise ValueError(
            f"solve_khatri_rao: expected A (N, {n}) and B ({m}, N), found {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if precision not in {"auto", "float64"}:
        raise ValueError(f"solve_khatri_rao: precision must be 'auto' or 'float64', found {precision!r}")
    if W.dtype != torch.float64:
        return _solve_in_float64_and_round(
            A, B, W, layer=layer, rcond_tol=rcond_tol, precision=precision, max_refinement=max_refinement
        )
    rhs = vec(W)
    where = "" if layer is None else f"layer {layer}: "
    rcond, steps, used = None, 0, "float64"
    if N == m * n:
        kind = "square"
        gamma, rcond, steps = (None, None, 0) if precision == "float64" else _mixed_solve(A, B, rhs, max_refinement)
        if gamma is not None:
            used = "mixed"
        else:
            gamma, rcond, kind = _float64_solve_or_consistent(A, B, W, rhs, where, layer, rcond_tol)
    else:
        gamma = _lstsq(khatri_rao_system(A, B), rhs)
        kind = "least-squares" if N < m * n else "min-norm"
    residual, relative = relative_residual(compose(B, gamma, A), W)
    # a non-square kind is exact when the residual says so, for both shapes: a wide system with rank-deficient
    # frozen weights (brought by the user) can miss W just like a tall one
    exact = kind == "square" or relative <= 1e3 * torch.finfo(W.dtype).eps
    if not np.isfinite(residual):
        raise SingularSystemError(
            f"{where}Khatri–Rao solve of size {N} produced non-finite γ; the system is singular "
            "or overflowed — check the frozen weights",
            layer=layer,
            size=N,
        )
    return KRSolution(
        gamma=gamma,
        residual=residual,
        relative_residual=relative,
        exact=exact,
        kind=kind,
        rcond=rcond,
        precision=used,
        steps=steps,
    )


def _solve_in_float64_and_round(A, B, W, **options) -> KRSolution:
    """:func:`solve_khatri_rao` for a lower-precision ``W``: γ is solved in float64 and rounded once to ``W``'s
    dtype — the solve costs the same and γ is as accurate as the network's dtype can hold. The residuals are those
    of the rounded γ (composed in float64), so they describe the γ the network will hold."""
    sol = solve_khatri_rao(A.double(), B.double(), W.double(), **options)
    rounded = sol.gamma.to(W.dtype)
    realised = compose(B.double(), rounded.double(), A.double())
    sol.gamma = rounded
    sol.residual, sol.relative_residual = relative_residual(realised, W.double())
    return sol


def _mixed_solve(A, B, rhs, max_refinement: int) -> tuple[torch.Tensor | None, float | None, int]:
    """A square system by float32 LU refined to float64 accuracy: ``(γ, pivot ratio, refinement steps)``.

    ``γ`` and the ratio are ``None`` when the float32 LU has a zero pivot or refinement stalls (a very
    ill-conditioned ``M``): the caller then factors in float64. The float32 factor is freed on return, before that
    float64 factor is allocated.
    """
    lu = _LowPrecisionLU(khatri_rao_system_transposed(A, B, torch.float32))
    if not lu.rcond > 0:
        return None, None, 0
    gamma, steps, converged = _refine(A, B, rhs, lu, max_refinement)
    return (gamma, lu.rcond, steps) if converged else (None, None, steps)


def _float64_solve_or_consistent(A, B, W, rhs, where: str, layer, rcond_tol) -> tuple[torch.Tensor, float, str]:
    """A square system by float64 LU: ``(γ, pivot ratio, kind)``, kind ``"square"``.

    A singular system can still reach this particular ``W`` (``W`` in the range of ``M``, e.g. a target that shares
    directions with the frozen weights): then the minimum-norm γ is exact, not an approximation, and is returned
    with kind ``"singular-consistent"`` and ratio 0. Anything else stays a refusal (:class:`SingularSystemError`).
    """
    try:
        gamma, rcond = _float64_lu_solve(A, B, rhs, where, layer, rcond_tol)
        return gamma, rcond, "square"
    except SingularSystemError:
        consistent = consistent_solution(A, B, W, rhs)
        if consistent is None:
            raise
        return consistent, 0.0, "singular-consistent"


def kr_pattern(A_mask: torch.Tensor | np.ndarray, B_mask: torch.Tensor | np.ndarray):
    """Sparsity pattern of ``Aᵀ ⊙ B`` as a scipy CSR matrix of shape ``(m·n, N)`` (rows ``p·m + i``).

    Built column by column from the nonzeros of ``A[k, :]`` and ``B[:, k]``: ``O(nnz)`` time and memory.
    """

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

    if isinstance(pattern, torch.Tensor):
        pattern = pattern.detach().cpu().numpy()
    mat = sp.csr_matrix(pattern != 0 if isinstance(pattern, np.ndarray) else pattern)
    if mat.shape[0] == 0 or mat.shape[1] == 0:
        return 0
    return int(_srank(mat))


class BatchedSolution(NamedTuple):
    """:func:`solve_khatri_rao_batched`'s result: ``gamma`` ``(T, N)``; per system ``residual = max |W_t − Ŵ_t|`` and
    ``residual_norm = ‖W_t − Ŵ_t‖_F`` of the realised ``Ŵ_t = B_t diag(γ_t) A_t`` (computed below the rounding of
    ``γ``, not in plain float64), and ``rcond``, the pivot-ratio condition estimate."""

    gamma: torch.Tensor
    residual: torch.Tensor
    rcond: torch.Tensor
    residual_norm: torch.Tensor


def solve_khatri_rao_batched(
    A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, *, layer: int | None = None, max_bytes: int = 256 << 20
) -> BatchedSolution:
    """Solve the ``T`` square systems ``B_t diag(γ_t) A_t = W_t`` at once: an LU per system, then refinement on an
    error-free residual (:func:`onlynorm.linalg_refine.refine`), which brings the realised ``B_t diag(γ_t) A_t``
    down to the rounding of ``γ`` itself instead of ``u·|B||γ||A|``.

    ``A`` is ``(T, N, k)``, ``B`` is ``(T, m, N)``, ``W`` is ``(T, m, k)`` with ``N = m·k``. Batches are chunked so at
    most ``max_bytes`` of system matrices exist at a time. Returns a :class:`BatchedSolution`: ``γ`` ``(T, N)``, the
    max-abs and Frobenius residual of each system (computed accurately, not in plain float64) and its pivot-ratio
    condition estimate. A singular system raises :class:`SingularSystemError` naming the block.

    >>> A, B = torch.randn(5, 6, 2, dtype=torch.float64), torch.randn(5, 3, 6, dtype=torch.float64)
    >>> W = torch.randn(5, 3, 2, dtype=torch.float64)
    >>> sol = solve_khatri_rao_batched(A, B, W)
    >>> sol.gamma.shape, bool(sol.residual.max() < 1e-10), bool((sol.residual_norm >= sol.residual).all())
    (torch.Size([5, 6]), True, True)
    """
    T, N, k = A.shape
    m = B.shape[1]
    if B.shape != (T, m, N) or W.shape != (T, m, k) or N != m * k:
        raise ValueError(
            f"solve_khatri_rao_batched: expected A (T, m·k, k), B (T, m, m·k), W (T, m, k), found "
            f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(W.shape)}"
        )
    chunk = max(1, max_bytes // max(1, N * N * A.element_size()))
    gammas, residuals, rconds, norms = [], [], [], []
    where = "" if layer is None else f"layer {layer}, "
    for start in range(0, T, chunk):
        a, b, w = A[start : start + chunk], B[start : start + chunk], W[start : start + chunk]
        lu = BatchLU(khatri_rao_system(a, b))
        rcond = lu.rcond
        bad = ~(rcond >= N * torch.finfo(A.dtype).eps)
        if bool(bad.any()):
            t = start + int(torch.nonzero(bad)[0])
            raise SingularSystemError(
                f"{where}block {t}: Khatri–Rao system of size {N} is singular (pivot ratio "
                f"{float(rcond[t - start]):.1e}); use fresh random weights",
                layer=layer,
                size=N,
            )
        # the LU's γ, then refinement on an error-free residual (:mod:`onlynorm.linalg_refine`): a float64
        # residual cannot see below u·|B||γ||A|, the cancellation factor times float64's rounding
        gamma, residual, norm = refine(a, b, w, lu.solve(vec(w)), lu)
        gammas.append(gamma)
        residuals.append(residual)
        rconds.append(rcond)
        norms.append(norm)
    return BatchedSolution(torch.cat(gammas), torch.cat(residuals), torch.cat(rconds), torch.cat(norms))
