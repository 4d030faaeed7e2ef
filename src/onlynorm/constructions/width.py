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

from collections.abc import Sequence
from typing import Any

import torch

from ..domain import Box, affine_bounds, interval_bounds
from ..errors import InvalidNetworkError
from ..linalg import solve_khatri_rao
from ..normnet import NormLinear, NormNet
from ..target import MLPSpec
from .base import (
    Construction,
    Progress,
    base_meta,
    begin_solve,
    finish_solve,
    per_layer_ints,
    random_norm_linear,
    register,
    safe_margin,
)

__all__ = ["WidthConstruction", "pair_widths"]

def pair_widths(target: MLPSpec, hidden: int | Sequence[int] | None) -> list[int]:
    """Hidden width ``N_i`` of each pair: ``m_i · n_i`` by default, or as requested."""
    exact = [w.shape[0] * w.shape[1] for w in target.weights]
    if hidden is None:
        return exact
    return per_layer_ints("hidden", hidden, target.depth)


@register
class WidthConstruction(Construction):
    name = "width"
    cost = "Theorem 1: two layers per target layer (depth 2L), width m·n; exact; one (mn)×(mn) solve per layer"
    options = ("hidden", "margin")

    def build(self, target: MLPSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        self.check_options(options)
        widths = pair_widths(target, options.get("hidden"))
        gen = torch.Generator().manual_seed(int(seed))
        layers = []
        for i, (w, N) in enumerate(zip(target.weights, widths)):
            m, n = w.shape
            layers += [random_norm_linear(n, N, True, gen, dtype=dtype, device=device),
                       random_norm_linear(N, m, i < target.depth - 1, gen, dtype=dtype, device=device)]
        return NormNet(layers, meta=base_meta(self.name, target, seed, options))

    def precheck(self, net: NormNet, layer: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Hook run before each layer's solve (the sparse construction checks its pattern here)."""

    def systems(self, net: NormNet, target: MLPSpec) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The Khatri–Rao systems ``(label, A, B, W)`` this network must solve for ``target``."""
        check_width_layout(net, target)
        return [(f"layer {i}", net.layers[2 * i].linear.weight, net.layers[2 * i + 1].linear.weight, W.to(net.dtype))
                for i, W in enumerate(target.weights)]

    def certify(self, net: NormNet, target: MLPSpec, domain: Box):
        """Every first-of-pair unit is proven active on the box; see :mod:`onlynorm.certify`."""
        from ..certify import certify_blocks

        check_width_layout(net, target)
        return certify_blocks(net, target, domain, [[2 * i, 2 * i + 1] for i in range(target.depth)])

    def estimate_bytes(self, target: MLPSpec, dtype: torch.dtype, **options: Any) -> int:
        """Peak of the solve: the largest ``(m·n) × N`` system in float64 (the in-place LU fallback; the usual
        mixed-precision path needs half), twice for least squares (LAPACK's copy), plus the frozen network."""
        widths = pair_widths(target, options.get("hidden"))
        item = torch.empty((), dtype=dtype).element_size()
        network = sum((w.shape[0] + w.shape[1]) * N for w, N in zip(target.weights, widths)) * item
        systems = [w.numel() * N * 8 * (1 if N == w.numel() else 2) for w, N in zip(target.weights, widths)]
        return max(systems) + network

    def solve(self, net: NormNet, target: MLPSpec, domain: Box, *, progress: Progress | None = None) -> NormNet:
        check_width_layout(net, target)
        spec, out, margin = begin_solve(net, target)
        boxes = interval_bounds(spec, domain)
        records, notes = [], []
        for i, (W, b) in enumerate(zip(spec.weights, spec.biases)):
            first, second = out.layers[2 * i], out.layers[2 * i + 1]
            A, B = first.linear.weight, second.linear.weight
            self.precheck(net, i, A, B)
            sol = solve_khatri_rao(A, B, W, layer=i)
            lo, hi = boxes[i]
            zmin, zmax = affine_bounds(sol.gamma.unsqueeze(1) * A, lo, hi)
            beta1 = -zmin + safe_margin(zmin, zmax, margin)
            beta2 = b - B @ beta1
            with torch.no_grad():
                first.norm.weight.copy_(sol.gamma)
                first.norm.bias.copy_(beta1)
                second.norm.weight.fill_(1.0)
                second.norm.bias.copy_(beta2)
            records.append({"layer": i, "kind": sol.kind, "residual": sol.residual,
                            "relative_residual": sol.relative_residual, "rcond": sol.rcond, "exact": sol.exact,
                            "precision": sol.precision, "steps": sol.steps})
            if not sol.exact:
                notes.append(f"layer {i}: hidden width {A.shape[0]} < m·n = {W.numel()}; least-squares γ reaches "
                             f"relative weight error {sol.relative_residual:.2e} (approximate)")
            if progress is not None:
                progress(i + 1, spec.depth, f"layer {i}: {sol.kind} solve of size {A.shape[0]}")
        return finish_solve(out, records, notes, domain)


def check_width_layout(net: NormNet, target: MLPSpec) -> None:
    """The frozen network must be ``2L`` NormLinear stages chaining ``n → N_i → m`` for each target layer."""
    layers = list(net.layers)
    if len(layers) != 2 * target.depth or not all(isinstance(s, NormLinear) for s in layers):
        raise InvalidNetworkError(
            f"expected a width network of {2 * target.depth} NormLinear stages for a {target.depth}-layer target, "
            f"found {len(layers)} stages ({', '.join(type(s).__name__ for s in layers[:4])}...)")
    for i, w in enumerate(target.weights):
        m, n = w.shape
        first, second = layers[2 * i], layers[2 * i + 1]
        N = first.linear.out_features
        if first.linear.in_features != n or second.linear.in_features != N or second.linear.out_features != m:
            raise InvalidNetworkError(
                f"layer {i}: expected a pair {n} → N → {m}, found {first.linear.in_features} → "
                f"{N} → {second.linear.in_features} → {second.linear.out_features}")
        if second.relu != (i < target.depth - 1) or not first.relu:
            raise InvalidNetworkError(f"layer {i}: ReLU placement does not match the width construction")
