"""Theorem 1 — the width construction: depth ``2L``, width ``m_i · n_i``.

Each target layer ``(W, b)`` with ``W ∈ R^{m×n}`` becomes two frozen layers::

    u = relu(Γ₁ A x + β₁)        A ∈ R^{N×n}, N = m·n
    y = relu(Γ₂ B u + β₂)        B ∈ R^{m×N}     (no ReLU after the last target layer)

1. ``γ₁`` solves the Khatri–Rao system ``B Γ₁ A = W``; ``γ₂ = 1``.
2. ``β₁ = −min_{h ∈ [l, u]} Γ₁ A h + margin`` (IBP box of the layer's input), so every unit of ``u`` is active and
   ``u = Γ₁ A x + β₁`` is affine on the reachable set.
3. ``β₂ = b − B β₁`` cancels the offset: the pair computes ``relu(W x + b)`` exactly.

Option ``hidden=N`` (int or per-layer list) changes the pair's width: ``N < m·n`` gives the least-squares
``γ₁`` (best reachable ``W``, reported as approximate), ``N > m·n`` the minimum-norm one.

>>> from torch import nn
>>> import onlynorm
>>> g = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
>>> f = onlynorm.reconstruct(g, method="width")
>>> f.summary().widths
[12, 4, 8, 2]
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch

from ..certify import CertifyResult, certify_blocks
from ..domain import Box, interval_bounds
from ..nets.linear import NormLinear
from ..nets.normnet import NormNet
from ..options import OptionSpec
from ..targets.mlp import MLPSpec
from .base import MARGIN, Construction, Progress, begin_solve, finish_solve, per_layer, register
from .pair import solve_pair
from .plan import Plan, PlanStep

__all__ = ["WidthConstruction", "pair_widths", "pair_plan"]

HIDDEN = OptionSpec(
    "hidden",
    int,
    min_val=1,
    per_layer=True,
    help="hidden width N of each pair; N < m·n gives least squares, N > m·n minimum norm",
)


def pair_widths(target: MLPSpec, hidden: int | list[int] | None) -> list[int]:
    """Hidden width ``N_i`` of each pair: ``m_i · n_i`` by default, or as requested."""
    if hidden is None:
        return [w.shape[0] * w.shape[1] for w in target.weights]
    return per_layer(hidden, target.depth)


def pair_plan(method: str, target: MLPSpec, widths: list[int]) -> Plan:
    """Two NormLinear stages per target layer: ``n → N_i`` (linear regime) and ``N_i → m`` (ReLU but last)."""
    steps = []
    for i, (w, N) in enumerate(zip(target.weights, widths)):
        m, n = w.shape
        steps.append(
            PlanStep(
                layer=i,
                stages=(2 * i, 2 * i + 1),
                shapes=((n, N), (N, m)),
                relu=(True, i < target.depth - 1),
                linear_regime=(0,),
            )
        )
    return Plan(method, tuple(steps))


@register
class WidthConstruction(Construction):
    name = "width"
    cost = "Theorem 1: two layers per target layer (depth 2L), width m·n; exact; one (mn)×(mn) solve per layer"
    options = (HIDDEN, MARGIN)

    def plan(self, target: MLPSpec, options: dict[str, Any]) -> Plan:
        return pair_plan(self.name, target, pair_widths(target, options.get("hidden")))

    def recorded_plan(self, net: NormNet, target: MLPSpec) -> Plan:
        """A width network's hidden widths are read from the network itself (a hand-built one records none)."""
        layers = list(net.layers)
        if len(layers) == 2 * target.depth and all(isinstance(s, NormLinear) for s in layers):
            widths = [cast(NormLinear, layers[2 * i]).linear.out_features for i in range(target.depth)]
        else:
            widths = pair_widths(target, None)
        return pair_plan(self.name, target, widths)

    def precheck(self, net: NormNet, layer: int, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> None:
        """Hook run before each layer's solve (the sparse construction checks its pattern here)."""

    def systems(self, net: NormNet, target: MLPSpec) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The Khatri–Rao systems ``(label, A, B, W)`` this network must solve for ``target``."""
        plan = self.plan_of(net, target)
        out = []
        for step, W in zip(plan.steps, target.weights):
            first, second = plan.stages(net, step)
            out.append((f"layer {step.layer}", first.linear.weight, second.linear.weight, W.to(net.dtype)))
        return out

    def certify(self, net: NormNet, target: MLPSpec, domain: Box) -> CertifyResult:
        """Every first-of-pair unit is proven active on the box; see :mod:`onlynorm.certify`."""
        return certify_blocks(net, target, domain, self.matched(net, target)[1])

    def estimate_bytes(self, target: MLPSpec, dtype: torch.dtype, *, plan: Plan | None = None, **options: Any) -> int:
        """Peak of the solve: the largest ``(m·n) × N`` system in float64 (the in-place LU fallback; the usual
        mixed-precision path needs half), twice for least squares (LAPACK's copy), plus the frozen network."""
        plan = plan if plan is not None else self.plan(target, options)
        item = torch.empty((), dtype=dtype).element_size()
        network = sum(a * b for step in plan.steps for a, b in step.shapes) * item
        systems = [
            w.numel() * step.widths[0] * 8 * (1 if step.widths[0] == w.numel() else 2)
            for w, step in zip(target.weights, plan.steps)
        ]
        return max(systems) + network

    def solve(
        self, net: NormNet, target: MLPSpec, domain: Box, *, progress: Progress | None = None, plan: Plan | None = None
    ) -> NormNet:
        plan = self.matched(net, target, plan)[0]
        spec, out, margin = begin_solve(net, target)
        boxes = interval_bounds(spec, domain)
        records, notes = [], []
        for step, W, b, (lo, hi) in zip(plan.steps, spec.weights, spec.biases, boxes):
            i = step.layer
            first, second = plan.stages(out, step)
            record = solve_pair(
                first, second, W, b, lo, hi, margin=margin, layer=i, precheck=functools.partial(self.precheck, net, i)
            )
            records.append(record)
            if not record.exact:
                notes.append(
                    f"layer {i}: hidden width {step.widths[0]} < m·n = {W.numel()}; least-squares γ reaches "
                    f"relative weight error {record.relative_residual:.2e} (approximate)"
                )
            if progress is not None:
                progress(i + 1, spec.depth, f"layer {i}: {record.kind} solve of size {step.widths[0]}")
        return finish_solve(out, records, notes, domain)
