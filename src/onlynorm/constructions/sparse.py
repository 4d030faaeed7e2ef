"""Sparse random networks (DESIGN §3.5): the width construction with i.i.d. Bernoulli(``p``) masks on every frozen
weight matrix. The masks are part of the frozen network — zeros stay zero.

Whether a layer's Khatri–Rao system ``Aᵀ ⊙ B`` is invertible now depends (with probability one) only on the
sparsity pattern. Its *structural rank* (maximum bipartite matching of the pattern) is checked before the LU: a
pattern-singular system can never be solved, whatever the values, and is reported with the layer, the rank
deficit and a denser ``p`` to try. The paper shows ``p = Θ(√(log d / d))`` suffices with high probability, so the
frozen network has ``Õ(d²√d)`` nonzeros — ``O(√d)`` times the target's ``d²`` parameters. Measured, the 50%
threshold is ``≈ 2 log d / d`` (``onlynorm experiment sparse-threshold``, docs/RESULTS.md): ``Õ(d²)`` nonzeros.

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

from ..errors import OnlyNormError, SingularSystemError
from ..linalg import kr_pattern, structural_rank
from ..normnet import NormNet
from ..target import MLPSpec
from .base import base_meta, random_norm_linear, register
from .width import WidthConstruction

__all__ = ["SparseConstruction", "SparsePatternError", "suggested_density"]


class SparsePatternError(SingularSystemError):
    """The sparsity pattern of a layer makes its Khatri–Rao system singular for *every* choice of values."""

    def __init__(self, message: str, *, layer: int, rank: int | None, size: int, density: float, suggestion: float):
        super().__init__(message, layer=layer, rank=rank, size=size)
        self.density = density
        self.suggestion = suggestion


def suggested_density(m: int, n: int, current: float) -> float:
    """A density that likely makes an ``m × n`` layer's system invertible: ``3 · log d / d`` with ``d = min(m, n)``
    (1.5× the measured 50% threshold ``2 log d / d`` of ``onlynorm experiment sparse-threshold``, see
    docs/RESULTS.md), and at least 1.5× the density that failed."""
    d = max(min(m, n), 2)
    return min(1.0, max(1.5 * current, 3.0 * math.log(max(m, n, 2)) / d))


@register
class SparseConstruction(WidthConstruction):
    name = "sparse"
    cost = ("width construction with Bernoulli(p) frozen weights: depth 2L, width m·n, ~p·(width nonzeros); exact "
            "when the pattern allows (checked), else a clear error")
    options = ("density", "margin")

    def build(self, target: MLPSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        self.check_options(options)
        p = options.get("density")
        if p is None:
            raise OnlyNormError("method 'sparse' needs density=p (0 < p ≤ 1), e.g. density=0.3")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
            raise OnlyNormError(f"density: expected a probability in (0, 1], found {p!r}")
        p = float(p)
        gen = torch.Generator().manual_seed(int(seed))
        layers = []
        for i, w in enumerate(target.weights):
            m, n = w.shape
            pair = [random_norm_linear(n, m * n, True, gen, dtype=dtype, device=device),
                    random_norm_linear(m * n, m, i < target.depth - 1, gen, dtype=dtype, device=device)]
            for stage in pair:   # Bernoulli(p) mask; 1/√p keeps the variance of the dense N(0, 1/fan_in) init
                weight = stage.linear.weight
                mask = torch.rand(weight.shape, generator=gen, dtype=torch.float64) < p
                with torch.no_grad():
                    weight.mul_((mask / math.sqrt(p)).to(dtype=dtype, device=device))
            layers += pair
        return NormNet(layers, meta=base_meta(self.name, target, seed, {**options, "density": p}))

    def precheck(self, net: NormNet, layer: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Refuse a pattern-singular system before factorising it."""
        size = A.shape[0]
        if size != B.shape[0] * A.shape[1]:
            return
        rank = structural_rank(kr_pattern(A, B))
        if rank < size:
            raise self._singular(net, layer, rank, "for every choice of values (its sparsity pattern)")

    def solve(self, net: NormNet, target: MLPSpec, domain, *, progress=None) -> NormNet:
        try:
            return super().solve(net, target, domain, progress=progress)
        except SparsePatternError:
            raise
        except SingularSystemError as exc:   # numerically singular although structurally fine
            raise self._singular(net, exc.layer if exc.layer is not None else 0, None, "numerically") from None

    @staticmethod
    def _singular(net: NormNet, layer: int, rank: int | None, why: str) -> SparsePatternError:
        A, B = net.layers[2 * layer].linear.weight, net.layers[2 * layer + 1].linear.weight
        m, n, size = B.shape[0], A.shape[1], A.shape[0]
        p = float(net.meta.get("options", {}).get("density", float("nan")))
        suggestion = suggested_density(m, n, p if p == p else 0.1)
        deficit = "" if rank is None else f", rank {rank} of {size} (deficit {size - rank})"
        return SparsePatternError(
            f"layer {layer}: the {size}×{size} Khatri–Rao system of the sparse network is singular {why}{deficit} "
            f"at density {p:g}; the target is not expressible — try density={suggestion:.2g} or another seed",
            layer=layer, rank=rank, size=size, density=p, suggestion=suggestion)
