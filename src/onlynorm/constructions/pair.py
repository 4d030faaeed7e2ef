"""The pair solve shared by the width, sparse, lowrank and conv constructions.

A *pair* is two frozen maps with a normalization after each: ``u = relu(Γ₁ A h + β₁)``, ``y = Γ₂ B u + β₂``.
With every unit of ``u`` active on the reachable inputs ``h ∈ [lo, hi]`` it computes ``B Γ₁ A h + B β₁ + β₂``, so

1. ``γ₁`` solves the Khatri–Rao system ``B Γ₁ A = W`` (:func:`~onlynorm.linalg.solve_khatri_rao`),
2. ``β₁ = −min_{h ∈ [lo, hi]} Γ₁ A h + margin`` keeps every unit of ``u`` active (linear regime),
3. ``γ₂ = 1`` and ``β₂ = b − B β₁`` cancel the offset: the pair computes ``W h + b`` exactly.

>>> import torch
>>> from onlynorm.nets import NormLinear
>>> from onlynorm.constructions.base import random_norm_linear
>>> gen = torch.Generator().manual_seed(0)
>>> first = random_norm_linear(2, 6, True, gen, dtype=torch.float64, device=None)
>>> second = random_norm_linear(6, 3, False, gen, dtype=torch.float64, device=None)
>>> W, b = torch.randn(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
>>> lo, hi = -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
>>> record = solve_pair(first, second, W, b, lo, hi, margin=1e-3, layer=0)
>>> x = lo.unsqueeze(0)                            # a batch of one point: a vertex of the box
>>> record.exact, bool((second(first(x)) - (x @ W.T + b)).abs().max() < 1e-12)
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..domain import affine_bounds
from ..linalg import KRSolution, solve_khatri_rao
from ..nets.linear import NormLinear
from ..nets.records import SolveRecord
from .base import safe_margin, weight_scale

__all__ = ["pair_offsets", "set_norms", "solve_pair", "record_of"]


def pair_offsets(
    zmin: torch.Tensor,
    zmax: torch.Tensor,
    B: torch.Tensor,
    b: torch.Tensor,
    margin: float,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``β₁ = −zmin + slack`` (every unit active over ``[zmin, zmax]``, see :func:`safe_margin`; ``scale`` its
    per-unit weight scale) and ``β₂ = b − B β₁``. ``B`` is the second map as a matrix (a 1×1 conv's weight
    flattened to ``c_out × N``)."""
    beta1 = -zmin + safe_margin(zmin, zmax, margin, scale)
    return beta1, b - B @ beta1


def set_norms(stage: torch.nn.Module, gamma: torch.Tensor | None, beta: torch.Tensor) -> None:
    """Write ``γ`` (``None``: 1) and ``β`` into ``stage.norm`` without recording autograd history."""
    norm = stage.get_submodule("norm")
    assert isinstance(norm, _BatchNorm)
    with torch.no_grad():
        if gamma is None:
            norm.weight.fill_(1.0)
        else:
            norm.weight.copy_(gamma)
        norm.bias.copy_(beta)


def record_of(sol: KRSolution, layer: int, **details) -> SolveRecord:
    """The typed record of one Khatri–Rao solve."""
    return SolveRecord(
        layer=layer,
        kind=sol.kind,
        residual=sol.residual,
        relative_residual=sol.relative_residual,
        exact=sol.exact,
        rcond=sol.rcond,
        precision=sol.precision,
        steps=sol.steps,
        details=details,
    )


def solve_pair(
    first: NormLinear,
    second: NormLinear,
    W: torch.Tensor,
    b: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    margin: float,
    layer: int,
    solution: KRSolution | None = None,
    precheck: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> SolveRecord:
    """Set the norms of a NormLinear pair so it computes ``W h + b`` for every ``h ∈ [lo, hi]`` (steps 1–3 above).

    ``solution`` passes a γ₁ already solved (lowrank needs it before it can choose ``b``); ``precheck(A, B, W)`` runs
    before the solve (the sparse construction refuses pattern-singular systems there).
    """
    A, B = first.linear.weight, second.linear.weight
    if solution is None:
        if precheck is not None:
            precheck(A, B, W)
        solution = solve_khatri_rao(A, B, W, layer=layer)
    GA = solution.gamma.unsqueeze(1) * A
    zmin, zmax = affine_bounds(GA, lo, hi)
    beta1, beta2 = pair_offsets(zmin, zmax, B, b, margin, weight_scale(GA, lo, hi))
    set_norms(first, solution.gamma, beta1)
    set_norms(second, None, beta2)
    return record_of(solution, layer)
