"""Low rank: width ``~ d·r`` instead of ``d²``.

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

from typing import Any

import torch

from ..certify import CertifyResult, certify_blocks
from ..domain import Box, affine_bounds, interval_bounds
from ..linalg import compose, relative_residual, solve_khatri_rao
from ..nets.normnet import NormNet
from ..nets.records import SolveRecord
from ..options import OptionSpec
from ..targets.mlp import MLPSpec
from .base import (
    MARGIN,
    Construction,
    Progress,
    begin_solve,
    finish_solve,
    per_layer,
    register,
    safe_margin,
    weight_scale,
)
from .pair import solve_pair
from .plan import Plan, PlanStep

__all__ = ["LowRankConstruction", "numerical_rank", "balanced_factors"]

RANK = OptionSpec(
    "rank", int, min_val=1, per_layer=True, help="rank r of each layer's factorisation (default: the numerical rank)"
)


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
    if k < r:  # requested rank above min(m, n): pad with zero directions (still exact)
        U = torch.cat([U, U.new_zeros(U.shape[0], r - k)], dim=1)
        V = torch.cat([V, V.new_zeros(r - k, V.shape[1])], dim=0)
    tail = S[k:]
    total = float(torch.linalg.norm(S))
    rel = float(torch.linalg.norm(tail)) / total if total > 0 else 0.0
    return U, V, rel, float(tail[0]) if tail.numel() else 0.0


def layer_ranks(target: MLPSpec, rank: int | list[int] | None) -> list[int]:
    if rank is None:
        return [numerical_rank(w) for w in target.weights]
    return per_layer(rank, target.depth)


@register
class LowRankConstruction(Construction):
    name = "lowrank"
    cost = "two pairs per target layer (depth 4L), width max(r·n, m·r); exact for rank-r layers, else best rank r"
    options = (RANK, MARGIN)

    def plan(self, target: MLPSpec, options: dict[str, Any]) -> Plan:
        """Per layer of rank ``r``: stages ``n → r·n → r`` (the pair for V) and ``r → m·r → m`` (the pair for U);
        the first three stages stay in the linear regime."""
        return self._plan(target, layer_ranks(target, options.get("rank")))

    def _plan(self, target: MLPSpec, ranks: list[int]) -> Plan:
        steps = []
        for i, (w, r) in enumerate(zip(target.weights, ranks)):
            m, n = w.shape
            steps.append(
                PlanStep(
                    layer=i,
                    stages=tuple(range(4 * i, 4 * i + 4)),
                    shapes=((n, r * n), (r * n, r), (r, m * r), (m * r, m)),
                    relu=(True, True, True, i < target.depth - 1),
                    linear_regime=(0, 1, 2),
                    details={"rank": r},
                )
            )
        return Plan(self.name, tuple(steps))

    def recorded_plan(self, net: NormNet, target: MLPSpec) -> Plan:
        """The ranks are read from the network (stage 4i+1 has r units): it may have been built with any."""
        layers = list(net.layers)
        ranks = [
            getattr(getattr(layers[4 * i + 1], "linear", None), "out_features", 1) if 4 * i + 1 < len(layers) else 1
            for i in range(target.depth)
        ]
        return self._plan(target, [int(r) for r in ranks])

    def build(self, target: MLPSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        net = super().build(target, seed=seed, dtype=dtype, device=device, **options)
        net.meta["ranks"] = layer_ranks(target, net.meta.options.get("rank"))
        return net

    def estimate_bytes(self, target: MLPSpec, dtype: torch.dtype, *, plan: Plan | None = None, **options: Any) -> int:
        plan = plan if plan is not None else self.plan(target, options)
        sizes = [max(step.widths[0], step.widths[2]) for step in plan.steps]
        return max(s * s for s in sizes) * 8 + sum(2 * s * max(w.shape) for s, w in zip(sizes, target.weights)) * 8

    def systems(self, net: NormNet, target: MLPSpec):
        out = []
        plan = self.plan_of(net, target)
        for step, W in zip(plan.steps, target.weights):
            U, V, _, _ = balanced_factors(W.to(net.dtype), step.details["rank"])
            s = plan.stages(net, step)
            out += [
                (f"layer {step.layer} V", s[0].linear.weight, s[1].linear.weight, V),
                (f"layer {step.layer} U", s[2].linear.weight, s[3].linear.weight, U),
            ]
        return out

    def approximations(self, net: NormNet, target: MLPSpec) -> list[str]:
        """Layers whose rank exceeds the network's ``r``: the systems reach the best rank-``r`` factors, not ``W``."""
        out = []
        for step, W in zip(self.plan_of(net, target).steps, target.weights):
            r = step.details["rank"]
            _, _, rel_err, sigma_next = balanced_factors(W.to(torch.float64), r)
            if not (rel_err == 0.0 or rel_err <= 1e3 * torch.finfo(torch.float64).eps):
                out.append(
                    f"layer {step.layer}: rank {r} < rank of W — only the best rank-{r} weight is reachable "
                    f"(relative error {rel_err:.2e}, σ_{r + 1} = {sigma_next:.2e})"
                )
        return out

    def solve(
        self, net: NormNet, target: MLPSpec, domain: Box, *, progress: Progress | None = None, plan: Plan | None = None
    ) -> NormNet:
        plan = self.matched(net, target, plan)[0]
        spec, out, margin = begin_solve(net, target)
        boxes = interval_bounds(spec, domain)
        records, notes = [], []
        for step, W, b, (lo, hi) in zip(plan.steps, spec.weights, spec.biases, boxes):
            i, r = step.layer, step.details["rank"]
            s0, s1, s2, s3 = plan.stages(out, step)
            U, V, rel_err, sigma_next = balanced_factors(W, r)
            sol_v = solve_khatri_rao(s0.linear.weight, s1.linear.weight, V, layer=i)
            sol_u = solve_khatri_rao(s2.linear.weight, s3.linear.weight, U, layer=i)
            # pair V: v = V̂ h + c, with c chosen so v > 0 on the box (the next pair's input stays linear)
            V_hat = compose(s1.linear.weight, sol_v.gamma, s0.linear.weight)
            vmin, vmax = affine_bounds(V_hat, lo, hi)
            c = -vmin + safe_margin(vmin, vmax, margin, weight_scale(V_hat, lo, hi))
            solve_pair(s0, s1, V, c, lo, hi, margin=margin, layer=i, solution=sol_v)
            # pair U on v ∈ [vmin + c, vmax + c]: y = Û v + (b − Û c) = Û V̂ h + b, every offset cancelled
            U_hat = compose(s3.linear.weight, sol_u.gamma, s2.linear.weight)
            solve_pair(s2, s3, U, b - U_hat @ c, vmin + c, vmax + c, margin=margin, layer=i, solution=sol_u)
            residual, relative = relative_residual(U_hat @ V_hat, W)
            exact = rel_err == 0.0 or rel_err <= 1e3 * torch.finfo(W.dtype).eps
            records.append(
                SolveRecord(
                    layer=i,
                    kind="lowrank",
                    residual=residual,
                    relative_residual=relative,
                    exact=exact,
                    precision=f"{sol_v.precision}+{sol_u.precision}",
                    details={"rank": r, "truncation_error": rel_err, "sigma_next": sigma_next},
                )
            )
            if not exact:
                notes.append(
                    f"layer {i}: rank {r} < rank of W; best rank-{r} weight has relative error "
                    f"{rel_err:.2e} (σ_{r + 1} = {sigma_next:.2e}) — approximate"
                )
            if progress is not None:
                progress(
                    i + 1, spec.depth, f"layer {i}: rank {r}, systems of size {step.widths[0]} and {step.widths[2]}"
                )
        return finish_solve(out, records, notes, domain)

    def certify(self, net: NormNet, target: MLPSpec, domain: Box) -> CertifyResult:
        return certify_blocks(net, target, domain, self.matched(net, target)[1])
