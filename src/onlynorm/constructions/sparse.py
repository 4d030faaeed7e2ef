"""Sparse random networks: the width construction with i.i.d. Bernoulli(``p``) masks on every frozen
weight matrix. The masks are part of the frozen network — zeros stay zero.

With masks, whether a layer's Khatri–Rao system ``Aᵀ ⊙ B`` is invertible depends (with probability one) only on
the sparsity pattern. Its *structural rank* (maximum bipartite matching of the pattern) is checked before the LU: a
pattern-singular system can never be solved, whatever the values, and is reported with the layer, the rank
deficit and a denser ``p`` to try. The paper shows ``p = Θ(√(log d / d))`` suffices with high probability, so the
frozen network has ``Õ(d²√d)`` nonzeros — ``O(√d)`` times the target's ``d²`` parameters. Measured, the 50%
threshold is ``≈ 2 log d / d`` (``onlynorm experiment sparse-threshold``, docs/RESULTS.md): ``Õ(d²)`` nonzeros.
Here ``d = max(m, n)`` in the logarithm and ``d = min(m, n)`` in the denominator (:func:`suggested_density`).

This module is the worked example of docs/ARCHITECTURE.md ("Adding a construction"): it reuses the width
construction's plan and pair solve, overrides ``build_stages`` to mask the frozen weights, and hooks ``precheck``.

>>> from torch import nn
>>> import onlynorm
>>> g = nn.Sequential(nn.Linear(6, 6)).double()
>>> f = onlynorm.reconstruct(g, method="sparse", density=0.8, seed=0)
>>> f.summary().frozen_nonzeros < f.summary().frozen_parameters
True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InvalidOptionError, SingularSystemError
from ..linalg import consistent_solution, kr_pattern, structural_rank, vec
from ..nets.normnet import NormNet
from ..nets.stage import Stage
from ..options import OptionSpec
from ..targets.mlp import MLPSpec
from .base import MARGIN, random_norm_linear, register
from .plan import Plan
from .width import WidthConstruction, pair_plan, pair_widths

__all__ = ["SparseConstruction", "SparsePatternError", "suggested_density"]


class SparsePatternError(SingularSystemError):
    """The sparsity pattern of a layer makes its Khatri–Rao system singular for *every* choice of values."""

    def __init__(self, message: str, *, layer: int, rank: int | None, size: int, density: float, suggestion: float):
        super().__init__(message, layer=layer, rank=rank, size=size)
        self.density = density
        self.suggestion = suggestion


def suggested_density(m: int, n: int, current: float) -> float:
    """A density that likely makes an ``m × n`` layer's system invertible: ``3 · log(max(m, n)) / min(m, n)``
    (1.5× the measured 50% threshold ``2 log d / d`` of ``onlynorm experiment sparse-threshold``, see
    docs/RESULTS.md; the all-zero row that breaks a system is a coupon-collector event over the ``max(m, n)``
    units of the wider side, seen by each of the ``min(m, n)`` narrower ones), and at least 1.5× the density
    that failed.

    >>> round(suggested_density(8, 8, 0.1), 3)
    0.78
    """
    return min(1.0, max(1.5 * current, 3.0 * math.log(max(m, n, 2)) / max(min(m, n), 2)))


DENSITY = OptionSpec(
    "density",
    float,
    min_val=0.0,
    include_min=False,
    max_val=1.0,
    help="Bernoulli density p of the frozen weights (required)",
)


@register
class SparseConstruction(WidthConstruction):
    name = "sparse"
    cost = (
        "width construction with Bernoulli(p) frozen weights: depth 2L, width m·n, ~p·(width nonzeros); exact "
        "when the pattern allows (checked), else a clear error"
    )
    options = (DENSITY, MARGIN)
    needs_options = True

    def plan(self, target: MLPSpec, options: dict[str, Any]) -> Plan:
        if options.get("density") is None:
            raise InvalidOptionError("density: method 'sparse' needs density=p (0 < p ≤ 1), e.g. density=0.3")
        return pair_plan(self.name, target, pair_widths(target, None))

    def recorded_plan(self, net: NormNet, target: MLPSpec) -> Plan:
        return pair_plan(self.name, target, pair_widths(target, None))

    def build_stages(
        self, plan: Plan, target: MLPSpec, gen: torch.Generator, *, dtype: torch.dtype, device, options: dict[str, Any]
    ) -> list[Stage]:
        """The width stages, each frozen weight masked by Bernoulli(p); ``1/√p`` keeps the variance of the dense
        ``N(0, 1/fan_in)`` init. Per pair, both weights are drawn before both masks, from one generator stream:
        that order is part of what a seed means, and changing it would change every seeded network."""
        p = float(options["density"])
        stages: list[Stage] = []
        for step in plan.steps:
            pair = [
                random_norm_linear(fan_in, fan_out, relu, gen, dtype=dtype, device=device)
                for (fan_in, fan_out), relu in zip(step.shapes, step.relu)
            ]
            for stage in pair:
                weight = stage.linear.weight
                mask = torch.rand(tuple(weight.shape), generator=gen, dtype=torch.float64) < p
                with torch.no_grad():
                    weight.mul_((mask / math.sqrt(p)).to(dtype=dtype, device=device))
            stages += pair
        return stages

    def precheck(self, net: NormNet, layer: int, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> None:
        """Refuse a pattern-singular system before factorising it — unless this W happens to lie in the range of
        the singular system (then the solver's consistent fallback reaches it exactly)."""
        size = A.shape[0]
        if size != B.shape[0] * A.shape[1]:
            return
        rank = structural_rank(kr_pattern(A, B))
        if rank < size and consistent_solution(A, B, W, vec(W)) is None:
            raise self._singular(net, layer, rank, "for every choice of values (its sparsity pattern)")

    def solve(self, net: NormNet, target: MLPSpec, domain, *, progress=None, plan=None) -> NormNet:
        try:
            return super().solve(net, target, domain, progress=progress, plan=plan)
        except SparsePatternError:
            raise
        except SingularSystemError as exc:  # numerically singular although structurally fine
            raise self._singular(net, exc.layer if exc.layer is not None else 0, None, "numerically") from None

    @staticmethod
    def _singular(net: NormNet, layer: int, rank: int | None, why: str) -> SparsePatternError:
        first, second = net.layers[2 * layer], net.layers[2 * layer + 1]
        A, B = first.linear.weight, second.linear.weight
        m, n, size = B.shape[0], A.shape[1], A.shape[0]
        density = net.meta.options.get("density")
        p = float(density) if isinstance(density, (int, float)) else float("nan")
        suggestion = suggested_density(m, n, p if p == p else 0.1)
        deficit = "" if rank is None else f", rank {rank} of {size} (deficit {size - rank})"
        return SparsePatternError(
            f"layer {layer}: the {size}×{size} Khatri–Rao system of the sparse network is singular {why}{deficit} "
            f"at density {p:g}; the target is not expressible — try density={suggestion:.2g} or another seed",
            layer=layer,
            rank=rank,
            size=size,
            density=p,
            suggestion=suggestion,
        )
