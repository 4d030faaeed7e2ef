"""Low rank (DESIGN §3.3): width ``~ d·r`` instead of ``d²``.

Factor each target weight ``W = U V`` (``U ∈ R^{m×r}``, ``V ∈ R^{r×n}``, balanced from the SVD
``W = P Σ Qᵀ``: ``U = P_r Σ_r^{1/2}``, ``V = Σ_r^{1/2} Q_rᵀ``) and realise each factor with a Khatri–Rao pair::

    u₁ = relu(Γ₁ A₁ h + β₁)    width r·n      B₁ Γ₁ A₁ = V
    v  = relu(Γ₂ B₁ u₁ + β₂)   width r        v = V h + c, c keeps v > 0 on the box (linear regime)
    u₂ = relu(Γ₃ A₂ v + β₃)    width m·r      B₂ Γ₃ A₂ = U
    y  = relu(Γ₄ B₂ u₂ + β₄)   width m        β₄ = b − Û c − B₂ β₃ cancels every offset

Depth 4 per target layer; the widest normalization layer is ``max(r·n, m·r)``. Option ``rank`` (int, or one per
layer; default: the numerical rank ``#{σ_i > max(m, n)·eps·σ_1}``, numpy's ``matrix_rank`` rule). A rank below a
layer's rank gives the best rank-``r`` reconstruction (Eckart–Young), reported as approximate with its error.

>>> import torch, onlynorm
>>> U, V = torch.randn(8, 2, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
>>> g = onlynorm.MLPSpec((U @ V,), (torch.zeros(8, dtype=torch.float64),))
>>> f = onlynorm.reconstruct(g, method="lowrank")
>>> f.summary().widths        # r·n, r, m·r, m with r = 2
[16, 2, 16, 8]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..domain import Box, affine_bounds, interval_bounds
from ..errors import InvalidNetworkError
from ..linalg import compose, solve_khatri_rao
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

__all__ = ["LowRankConstruction", "numerical_rank", "balanced_factors"]


def numerical_rank(W: torch.Tensor) -> int:
    """``#{σ_i > max(m, n) · eps · σ_1}`` (at least 1, so a zero layer still has a path)."""
    s = torch.linalg.svdvals(W.to(torch.float64))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    tol = max(W.shape) * torch.finfo(torch.float64).eps * float(s[0])
    return max(1, int((s > tol).sum()))


def balanced_factors(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``U (m×r), V (r×n)`` with ``U V`` the best rank-``r`` approximation of ``W``; also its relative Frobenius
    error and ``σ_{r+1}`` (0 when exact)."""
    P, S, Qh = torch.linalg.svd(W, full_matrices=False)
    k = min(r, S.numel())
    root = S[:k].sqrt()
    U = P[:, :k] * root
    V = root.unsqueeze(1) * Qh[:k]
    if k < r:   # requested rank above min(m, n): pad with zero directions (still exact)
        U = torch.cat([U, U.new_zeros(U.shape[0], r - k)], dim=1)
        V = torch.cat([V, V.new_zeros(r - k, V.shape[1])], dim=0)
    tail = S[k:]
    total = float(torch.linalg.norm(S))
    rel = float(torch.linalg.norm(tail)) / total if total > 0 else 0.0
    return U, V, rel, float(tail[0]) if tail.numel() else 0.0


def layer_ranks(target: MLPSpec, rank: int | Sequence[int] | None) -> list[int]:
    if rank is None:
        return [numerical_rank(w) for w in target.weights]
    return per_layer_ints("rank", rank, target.depth)


@register
class LowRankConstruction(Construction):
    name = "lowrank"
    cost = "two pairs per target layer (depth 4L), width max(r·n, m·r); exact for rank-r layers, else best rank r"
    options = ("rank", "margin")

    def build(self, target: MLPSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        self.check_options(options)
        ranks = layer_ranks(target, options.get("rank"))
        gen = torch.Generator().manual_seed(int(seed))
        layers = []
        for i, (w, r) in enumerate(zip(target.weights, ranks)):
            m, n = w.shape
            shapes = [(n, r * n, True), (r * n, r, True), (r, m * r, True), (m * r, m, i < target.depth - 1)]
            layers += [random_norm_linear(fan_in, fan_out, relu, gen, dtype=dtype, device=device)
                       for fan_in, fan_out, relu in shapes]
        meta = base_meta(self.name, target, seed, options)
        meta["ranks"] = ranks
        return NormNet(layers, meta=meta)

    def estimate_bytes(self, target: MLPSpec, dtype: torch.dtype, **options: Any) -> int:
        ranks = layer_ranks(target, options.get("rank"))
        sizes = [max(r * w.shape[1], r * w.shape[0]) for w, r in zip(target.weights, ranks)]
        return max(s * s for s in sizes) * 8 + sum(2 * s * max(w.shape) for s, w in zip(sizes, target.weights)) * 8

    def _ranks(self, net: NormNet, target: MLPSpec) -> list[int]:
        layers = list(net.layers)
        if len(layers) != 4 * target.depth or not all(isinstance(s, NormLinear) for s in layers):
            raise InvalidNetworkError(
                f"expected a lowrank network of {4 * target.depth} NormLinear stages for a {target.depth}-layer "
                f"target, found {len(layers)} stages")
        ranks = []
        for i, w in enumerate(target.weights):
            m, n = w.shape
            s = layers[4 * i: 4 * i + 4]
            r = s[1].linear.out_features
            got = [(t.linear.in_features, t.linear.out_features) for t in s]
            want = [(n, r * n), (r * n, r), (r, m * r), (m * r, m)]
            if got != want:
                raise InvalidNetworkError(f"layer {i}: expected lowrank stages {want} for a {m}×{n} layer, found {got}")
            ranks.append(r)
        return ranks

    def systems(self, net: NormNet, target: MLPSpec):
        out = []
        for i, (W, r) in enumerate(zip(target.weights, self._ranks(net, target))):
            U, V, _, _ = balanced_factors(W.to(net.dtype), r)
            s = net.layers[4 * i: 4 * i + 4]
            out += [(f"layer {i} V", s[0].linear.weight, s[1].linear.weight, V),
                    (f"layer {i} U", s[2].linear.weight, s[3].linear.weight, U)]
        return out

    def solve(self, net: NormNet, target: MLPSpec, domain: Box, *, progress: Progress | None = None) -> NormNet:
        ranks = self._ranks(net, target)
        spec, out, margin = begin_solve(net, target)
        boxes = interval_bounds(spec, domain)
        records, notes = [], []
        for i, (W, b, r) in enumerate(zip(spec.weights, spec.biases, ranks)):
            s0, s1, s2, s3 = out.layers[4 * i: 4 * i + 4]
            U, V, rel_err, sigma_next = balanced_factors(W, r)
            A1, B1, A2, B2 = s0.linear.weight, s1.linear.weight, s2.linear.weight, s3.linear.weight
            sol_v = solve_khatri_rao(A1, B1, V, layer=i)
            sol_u = solve_khatri_rao(A2, B2, U, layer=i)
            lo, hi = boxes[i]
            # stage 0: u₁ = Γ₁ A₁ h + β₁ > 0 on the input box
            z1min, z1max = affine_bounds(sol_v.gamma.unsqueeze(1) * A1, lo, hi)
            beta1 = -z1min + safe_margin(z1min, z1max, margin)
            # stage 1: v = V̂ h + c with c = B₁ β₁ + β₂ chosen so v > 0 on the box
            V_hat = compose(B1, sol_v.gamma, A1)
            vmin, vmax = affine_bounds(V_hat, lo, hi)
            c = -vmin + safe_margin(vmin, vmax, margin)
            beta2 = c - B1 @ beta1
            # stage 2: u₂ = Γ₃ A₂ v + β₃ > 0 for v in [vmin + c, vmax + c]
            z3min, z3max = affine_bounds(sol_u.gamma.unsqueeze(1) * A2, vmin + c, vmax + c)
            beta3 = -z3min + safe_margin(z3min, z3max, margin)
            # stage 3: y = Û v + B₂ β₃ + β₄ = Û V̂ h + (Û c + B₂ β₃ + β₄) → offsets cancel
            U_hat = compose(B2, sol_u.gamma, A2)
            beta4 = b - U_hat @ c - B2 @ beta3
            with torch.no_grad():
                for stage, gamma, beta in ((s0, sol_v.gamma, beta1), (s1, None, beta2), (s2, sol_u.gamma, beta3),
                                           (s3, None, beta4)):
                    if gamma is None:
                        stage.norm.weight.fill_(1.0)
                    else:
                        stage.norm.weight.copy_(gamma)
                    stage.norm.bias.copy_(beta)
            realised = U_hat @ V_hat
            scale = float(torch.linalg.norm(W))
            total_rel = float(torch.linalg.norm(realised - W)) / scale if scale > 0 else 0.0
            exact = rel_err == 0.0 or rel_err <= 1e3 * torch.finfo(W.dtype).eps
            records.append({"layer": i, "kind": "lowrank", "rank": r, "residual": float((realised - W).abs().max()),
                            "relative_residual": total_rel, "truncation_error": rel_err,
                            "sigma_next": sigma_next, "exact": exact,
                            "precision": [sol_v.precision, sol_u.precision]})
            if not exact:
                notes.append(f"layer {i}: rank {r} < rank of W; best rank-{r} weight has relative error "
                             f"{rel_err:.2e} (σ_{r + 1} = {sigma_next:.2e}) — approximate")
            if progress is not None:
                progress(i + 1, spec.depth, f"layer {i}: rank {r}, systems of size {A1.shape[0]} and {A2.shape[0]}")
        return finish_solve(out, records, notes, domain)

    def certify(self, net: NormNet, target: MLPSpec, domain: Box):
        from ..certify import certify_blocks

        self._ranks(net, target)
        return certify_blocks(net, target, domain, [[4 * i + k for k in range(4)] for i in range(target.depth)])
