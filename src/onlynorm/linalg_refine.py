"""LU factors of a batch of square Khatri–Rao systems, kept for iterative refinement on an accurate residual.

A float64 LU solve of ``B diag(γ) A = W`` is backward stable, yet the realised ``B diag(γ) A`` differs from ``W``
by about ``u·|B||γ||A|`` — the Khatri–Rao cancellation factor (10²–10⁴ on a ResNet's layers) times float64's
rounding. A residual computed in float64 carries an error of that very size, so refinement on it stalls there.
:func:`refine` computes the residual with error-free products (:func:`onlynorm.linalg_exact.residual_compensated`)
and corrects ``γ ← γ + M⁻¹ r`` with the same factors: the realised weights then land where the rounding of ``γ``
itself puts them — on the demo's ResNet-20 the sampled error drops 17× and the certificate's distance bound 50×
(``benchmarks/certify_resnet.py``, docs/RESULTS.md §8). For float32 systems the residual of the float32 data is
computed in float64 (every product exact, the sums 2⁻²⁹ finer).

>>> import torch
>>> from onlynorm.linalg import khatri_rao_system, vec
>>> A, B = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 2, 6, dtype=torch.float64)
>>> W = torch.randn(2, 2, 3, dtype=torch.float64)
>>> lu = BatchLU(khatri_rao_system(A, B))
>>> gamma, residual, norm = refine(A, B, W, lu.solve(vec(W)), lu)
>>> bool(residual.max() < 1e-13), bool((norm >= residual).all())
(True, True)
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from .linalg_exact import CompensatedProduct, residual_compensated

__all__ = ["BatchLU", "accurate_residual", "refine", "REFINEMENT_STEPS"]

#: at most this many corrections (each is kept only where it lowers a system's residual; refinement stops early
#: once no system's residual halves — one step reaches γ's rounding on a ResNet-20's layers)
REFINEMENT_STEPS = 3


class BatchLU:
    """LU factors of each ``N × N`` system of a batch ``M`` (``(T, N, N)``), their pivot ratios
    ``min |U_ii| / max |U_ii|`` (``rcond``; 0 for a zero pivot) and :meth:`solve` with any right-hand sides.

    Why not ``torch.linalg.lu_factor_ex`` on a CPU batch: in torch 2.13 (CPU, MKL), after
    ``torch.set_num_threads(...)`` a batched LU of e.g. 192 matrices of 192×192 silently returns garbage pivots
    with ``info = 0``. One LAPACK call per system (scipy) costs microseconds of overhead and is always right; other
    devices use torch's batched LU."""

    def __init__(self, M: torch.Tensor):
        self.dtype, self.device = M.dtype, M.device
        self.cpu = M.device.type == "cpu"
        if self.cpu:
            self.factors = []
            rconds = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in range(M.shape[0]):
                    lu, piv = scipy.linalg.lu_factor(M[t].numpy(), check_finite=False)
                    d = np.abs(np.diagonal(lu))
                    top = d.max()
                    rconds.append(float(d.min() / top) if top > 0 and np.isfinite(top) else 0.0)
                    self.factors.append((lu, piv))
            self.rcond = torch.tensor(rconds, dtype=M.dtype)
        else:
            self.LU, self.pivots, info = torch.linalg.lu_factor_ex(M)
            d = self.LU.diagonal(dim1=-2, dim2=-1).abs()
            ratio = d.min(dim=-1).values / d.max(dim=-1).values.clamp_min(1e-300)
            self.rcond = torch.where(info == 0, ratio, torch.zeros_like(ratio))

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``M_t⁻¹ rhs_t`` per system (``(T, N)``); NaN for a system with a zero pivot."""
        rhs = rhs.to(self.dtype)
        if not self.cpu:
            return torch.linalg.lu_solve(self.LU, self.pivots, rhs.unsqueeze(-1)).squeeze(-1)
        out = torch.empty(rhs.shape, dtype=self.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t, factor in enumerate(self.factors):
                if self.rcond[t] > 0:
                    out[t] = torch.from_numpy(scipy.linalg.lu_solve(factor, rhs[t].numpy(), check_finite=False))
                else:
                    out[t] = float("nan")
        return out


def accurate_residual(
    A: torch.Tensor, B: torch.Tensor | CompensatedProduct, gamma: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """``W − B diag(γ) A`` (batched ``(T, m, k)``) below the rounding of ``γ``: compensated for float64 data (``B``
    may be given as its :class:`~onlynorm.linalg_exact.CompensatedProduct`), computed in float64 for narrower
    dtypes (products of float32 values are exact there)."""
    if A.dtype == torch.float64:
        return residual_compensated(A, B, gamma, W)
    assert isinstance(B, torch.Tensor)
    A64, B64, g64, W64 = A.double(), B.double(), gamma.double(), W.double()
    return W64 - B64 @ (g64.unsqueeze(-1) * A64)


def refine(
    A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, gamma: torch.Tensor, lu: BatchLU, steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``steps`` corrections ``γ ← γ + M⁻¹ r`` on the accurate residual ``r`` (:func:`accurate_residual`),
    each kept per system only where it lowers ``max |r|``, stopping once no system's ``max |r|`` halves; returns
    ``γ``, each system's ``max |r|`` and its ``‖r‖_F`` (of the returned ``γ``: what a solve record reports, with no
    second composition of ``B diag(γ) A``)."""
    steps = REFINEMENT_STEPS if steps is None else steps
    product = CompensatedProduct(B) if A.dtype == torch.float64 else B  # B's split, made once
    r = accurate_residual(A, product, gamma, W)
    best = r.abs().amax(dim=(-2, -1))
    for _ in range(steps):
        # vec stacks columns: row p·m + i of the system is entry (i, p)
        delta = lu.solve(r.transpose(-1, -2).reshape(r.shape[0], -1))
        candidate = gamma + delta.to(gamma.dtype)
        r_new = accurate_residual(A, product, candidate, W)
        norm = r_new.abs().amax(dim=(-2, -1))
        better = norm < best  # NaN (a singular system) is never better
        halved = bool((norm < 0.5 * best).any())
        gamma = torch.where(better[:, None], candidate, gamma)
        r = torch.where(better[:, None, None], r_new, r)
        best = torch.where(better, norm, best)
        if not halved:  # the rounding of γ is reached: a further step would cost a residual for nothing
            break
    return gamma, best.to(A.dtype), torch.linalg.vector_norm(r, dim=(-2, -1)).to(A.dtype)
