"""``T`` Khatri–Rao systems with one matrix: the solve of a *tied* layer (every block shares one frozen draw).

When all blocks of a layer share ``(A, B)``, block ``t``'s system ``B diag(γ_t) A = W_t`` has the same matrix
``M = Aᵀ ⊙ B`` for every ``t``: one LU of ``M`` and a solve with ``T`` right-hand sides,
``Γ = M⁻¹ [vec W_1 … vec W_T]``. Invertibility is the almost-sure condition of one block.

Which factorisation: a float64 LU costs ``⅔N³ + 2N²T`` flops; a float32 LU refined in float64
(:func:`onlynorm.linalg.solve_khatri_rao`'s path) costs about ``⅓N³`` (at float32 speed) plus, per refinement step,
a float32 solve and a float64 residual ``B Γ_t A`` for all ``T`` blocks (``≈ 3N²T``). With ~3 steps the mixed path
only pays when ``N ≳ 20 T``; ``precision="auto"`` picks by that count, and falls back to the float64 LU whenever
refinement stalls.

>>> import torch
>>> A, B = torch.randn(6, 2, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
>>> W = torch.randn(4, 3, 2, dtype=torch.float64)                  # T = 4 blocks, one (A, B)
>>> sol = solve_khatri_rao_shared(A, B, W)
>>> sol.gamma.shape, bool(sol.residual.max() < 1e-10), sol.precision
(torch.Size([4, 6]), True, 'float64')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SingularSystemError
from .finite import all_finite
from .linalg import _LowPrecisionLU, _pivot_rcond, _system_norm, khatri_rao_system_transposed, vec

__all__ = ["SharedSolution", "solve_khatri_rao_shared", "compose_shared", "shared_error"]


@dataclass
class SharedSolution:
    """``gamma`` ``(T, N)`` (rounded to ``hold``, the dtype the network stores it in); ``residual`` the max-abs
    distance of ``B Γ_t A`` to ``W_t`` per block ``(T,)`` and ``error_norm`` ``‖[B Γ_t A − W_t]_t‖_F`` over all
    blocks, both of that rounded ``γ``; ``rcond`` the pivot ratio of the one LU; ``precision`` ``"float64"`` or
    ``"mixed"`` (``steps`` refinement steps)."""

    gamma: torch.Tensor
    residual: torch.Tensor
    error_norm: float
    rcond: float
    precision: str
    steps: int = 0


def compose_shared(B: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``B diag(γ_t) A`` for every row ``γ_t`` of ``gamma`` ``(T, N)``: one GEMM ``B [Γ_1 A … Γ_T A]``, ``(T, m, k)``."""
    T, (N, k) = gamma.shape[0], A.shape
    GA = gamma.unsqueeze(-1) * A  # (T, N, k)
    return (B @ GA.transpose(0, 1).reshape(N, T * k)).reshape(B.shape[0], T, k).transpose(0, 1)


def shared_error(B: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``E = [B Γ_1 A − W_1 … B Γ_T A − W_T]`` as ``(m, T, k)`` in one fused GEMM ``addmm(−W, B, G)`` with
    ``G[u, (t, j)] = γ_t[u] A[u, j]`` — the exactness check of every block at the cost of one ``N × N × T·k``
    product (no ``(T, m, k)`` copy of the realised weights, no second pass to subtract)."""
    (N, k), T, m = A.shape, gamma.shape[0], B.shape[0]
    G = torch.empty(N, T, k, dtype=A.dtype, device=A.device)  # the blocks side by side, row-major
    torch.mul(gamma.T.unsqueeze(-1), A.unsqueeze(1), out=G)
    Wm = W.transpose(0, 1).reshape(m, T * k)  # a view when W is the (m, T, k) layout read as (T, m, k)
    return torch.addmm(Wm, B, G.view(N, T * k), beta=-1).view(m, T, k)


def solve_khatri_rao_shared(
    A: torch.Tensor,
    B: torch.Tensor,
    W: torch.Tensor,
    *,
    layer: int | None = None,
    precision: str = "auto",
    max_refinement: int = 10,
    hold: torch.dtype = torch.float64,
) -> SharedSolution:
    """Solve ``B diag(γ_t) A = W_t`` for ``t = 1..T`` with one factorisation of ``M = Aᵀ ⊙ B``.

    ``A`` is ``(N, k)``, ``B`` ``(m, N)``, ``W`` ``(T, m, k)`` with ``N = m·k``; everything is computed in float64,
    ``γ`` is rounded once to ``hold`` and its residual checked (one GEMM, :func:`shared_error`).
    A singular ``M`` raises :class:`SingularSystemError` (pivot ratio below ``N·eps``).
    """
    N, k = A.shape
    m = B.shape[0]
    T = W.shape[0]
    if B.shape != (m, N) or W.shape != (T, m, k) or N != m * k:
        raise ValueError(
            f"solve_khatri_rao_shared: expected A (m·k, k), B (m, m·k), W (T, m, k), found "
            f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(W.shape)}"
        )
    if precision not in {"auto", "float64", "mixed"}:
        raise ValueError(
            f"solve_khatri_rao_shared: precision must be 'auto', 'float64' or 'mixed', found {precision!r}"
        )
    A, B, W = A.double(), B.double(), W.double()
    rhs = vec(W).mT  # (N, T), column t is vec W_t: column-major, the layout LAPACK solves in (no copy)
    gamma, rcond, used, steps = None, 0.0, "float64", 0
    if precision == "mixed" or (precision == "auto" and N > 20 * T):
        gamma, rcond, steps = _mixed(A, B, W, rhs.contiguous(), max_refinement)
        used = "mixed"
    if gamma is None:
        gamma, rcond = _float64(A, B, rhs, layer)
        used = "float64"
    if hold != torch.float64:
        gamma = gamma.to(hold).double()  # the γ the network will hold: its residual is the one reported
    E = shared_error(B, gamma, A, W)
    residual = torch.maximum(-E.amin(dim=(0, 2)), E.amax(dim=(0, 2)))  # max |E| per block without an |E| copy
    if not all_finite(residual):
        raise SingularSystemError(
            f"{_where(layer)}shared Khatri–Rao solve of size {N} produced non-finite γ; check the frozen weights",
            layer=layer,
            size=N,
        )
    return SharedSolution(gamma, residual, float(torch.linalg.vector_norm(E)), rcond, used, steps)


def _where(layer: int | None) -> str:
    return "" if layer is None else f"layer {layer}: "


def _float64(A, B, rhs: torch.Tensor, layer) -> tuple[torch.Tensor, float]:
    """One float64 LU of ``M`` and the ``T`` solves: ``(Γ (T, N), pivot ratio)``.

    torch's LAPACK (MKL on the CPU wheels) for both, on every device: mixing it with scipy's OpenBLAS in one solve
    leaves two thread pools spinning on the same cores, which made each small torch op after the LU take
    milliseconds on a 2-core machine."""
    N = A.shape[0]
    Mt = khatri_rao_system_transposed(A, B, torch.float64)  # row-major Mᵀ = column-major M
    LU, pivots, _ = torch.linalg.lu_factor_ex(Mt.mT)
    del Mt
    rcond = _pivot_rcond(LU)
    if not rcond >= N * torch.finfo(torch.float64).eps:
        raise SingularSystemError(
            f"{_where(layer)}the shared Khatri–Rao system of size {N} is singular (pivot ratio {rcond:.1e}); "
            "use fresh random weights",
            layer=layer,
            size=N,
        )
    return torch.linalg.lu_solve(LU, pivots, rhs).mT, rcond


def _mixed(A, B, W, rhs: torch.Tensor, max_steps: int) -> tuple[torch.Tensor | None, float, int]:
    """Float32 LU + float64 refinement of all ``T`` columns at once (each scaled to O(1) before the float32
    solve); ``(Γ, pivot ratio, steps)``, or ``Γ = None`` when the LU or the refinement of any column fails."""
    eps = torch.finfo(torch.float64).eps
    lu = _LowPrecisionLU(khatri_rao_system_transposed(A, B, torch.float32))
    if not lu.rcond > 0:
        return None, 0.0, 0
    norm_M = _system_norm(A, B)
    norm_w = torch.linalg.norm(rhs, dim=0)
    gamma = torch.zeros_like(rhs)  # (N, T)
    r, last = rhs, torch.full_like(norm_w, float("inf"))
    step = 0
    for step in range(max_steps + 1):
        r_norm = torch.linalg.norm(r, dim=0)
        done = r_norm <= 4 * eps * norm_w
        if bool(done.all()) or not bool((r_norm <= 0.5 * last).any()) or step == max_steps:
            break
        last = r_norm
        scale = torch.where(r_norm > 0, r_norm, torch.ones_like(r_norm))
        gamma = gamma + lu.solve(r / scale).to(torch.float64) * scale
        r = rhs - vec(compose_shared(B, gamma.T, A)).T
    r_norm = torch.linalg.norm(r, dim=0)
    backward = r_norm / (norm_M * torch.linalg.norm(gamma, dim=0) + norm_w).clamp_min(1e-300)
    ok = all_finite(backward) and bool((backward <= 64 * eps).all())
    return (gamma.T.contiguous() if ok else None), lu.rcond, step
