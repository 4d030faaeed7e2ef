"""Certified equivalence over the *whole* box, not samples.

A constructed network is a chain of *blocks*, one per target layer. Inside a block every stage but the last is
meant to stay in its linear regime (all its ReLU units active); then the block computes the affine map

    ĥ ↦ Ŵ ĥ + b̂,     Ŵ = Γ_k A_k ⋯ Γ_1 A_1,     b̂ = the composed offsets,

followed by the target's ReLU. The certificate has two parts:

1. **Activity.** For each linear-regime stage, its pre-activation is an affine function ``P h + q`` of the block's
   input ``h``; its minimum over the block's input box is computed in one interval step (exact for an affine map)
   and must be positive, with room for the rounding of that very computation. Input boxes come from interval
   bound propagation through the *realised* network ``ĝ`` (weights ``Ŵ_i``, biases ``b̂_i``). If every unit is
   proven active, ``f ≡ ĝ`` on the box in exact arithmetic.
2. **Distance to the target.** With ``ΔW_i = Ŵ_i − W_i`` and ``Δb_i = b̂_i − b_i`` (including a rigorous bound
   on the rounding made while forming them) and ``a_i`` a bound on ``|ĥ_i|`` from the boxes, ReLU being
   1-Lipschitz gives ``e_{i+1} = |ΔW_i| a_i + |W_i| e_i + |Δb_i|`` with ``e_0 = 0``, and
   ``sup_D |f − g| ≤ max e_L`` — the ``certified_bound``.

Floating-point evaluation of ``f`` and ``g`` is bounded separately (``rounding_bound``) by the standard forward
error bound of dot products, ``|fl(a·x) − a·x| ≤ γ_n |a|·|x|`` with ``γ_n = n·u / (1 − n·u)`` (``u`` of the network's
dtype for ``f``). The error ``δ`` that ``f`` carries into a block is propagated through the block's *exact* composed
map: on the linear regime the block is affine, so ``block(x̃) − block(x) = P (x̃ − x)`` and contributes ``|P| δ`` —
``|P| ≈ |W|`` — instead of ``|B| |Γ A| δ``, which would lose every cancellation of the Khatri–Rao factors (bounds of
1e-4 where 1e-12 is observed). The rounding made inside the block (``local``) is bounded stage by
stage at the computed inputs, and the activity proof leaves room for both, so the computed network follows the
linear branch as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..domain import Box
from ..errors import InvalidNetworkError
from ..nets.match import Node, path_label, walk_nodes
from ..nets.normnet import NormNet
from ..nets.views import AffineView
from ..targets.mlp import MLPSpec
from .core import U_XP, XP, CertifyResult, affine_interval, final_result, gamma_n, to_xp, unit_roundoff

__all__ = ["certify_blocks", "propagate_distance", "certify_result", "start_rounding"]


def start_rounding(net: NormNet, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rounding of ``f``'s input: points of the float64 box are cast to the network's dtype (exact in float64)."""
    if net.dtype == torch.float64:
        return np.zeros(lo.shape)
    return unit_roundoff(net.dtype) * np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)


def certify_blocks(net: NormNet, spec: MLPSpec, box: Box, nodes: Sequence[Node]) -> CertifyResult:
    """Certify a chain of blocks of linear stages: ``nodes`` (:func:`onlynorm.nets.match.match`) pair each target
    layer with the stages realising it, each read through its affine view."""
    u_f = unit_roundoff(net.dtype)
    blocks = list(walk_nodes(nodes))
    if len(blocks) != spec.depth:
        raise InvalidNetworkError(f"expected {spec.depth} blocks for a {spec.depth}-layer target, found {len(blocks)}")
    lo, hi = to_xp(box.low), to_xp(box.high)
    err = np.zeros_like(lo)  # e_i: bound on |ĥ_i − h_i| in exact arithmetic
    round_f = start_rounding(net, lo, hi)  # rounding of f's evaluation (in its dtype) so far
    round_g = np.zeros(lo.shape)  # rounding of g's float64 evaluation so far
    notes: list[str] = []
    certified = True
    for i, (node, W_t, b_t) in enumerate(zip(blocks, spec.weights, spec.biases)):
        stages = [stage.affine(f"layer {i}, stage {path_label(path)}") for stage, path in zip(node.stages, node.paths)]
        indices = [path_label(path) for path in node.paths]
        if not all(isinstance(s, AffineView) and s.geometry is None for s in stages):
            raise InvalidNetworkError(
                f"layer {i}: certification expects linear stages, found {[type(s).__name__ for s in node.stages]}"
            )
        W, b = to_xp(W_t), to_xp(b_t)
        mag_in = np.maximum(np.abs(lo), np.abs(hi))
        n = W.shape[1]
        P, q = np.eye(n, dtype=XP), np.zeros(n, dtype=XP)  # the block so far: h ↦ P h + q
        P_abs = np.eye(n, dtype=XP)  # |Γ_k A_k| ⋯ |Γ_1 A_1|, for rounding bounds
        P_err, q_err = np.zeros_like(P), np.zeros_like(q)  # bounds on |fl(P) − P|, |fl(q) − q|
        x_mag = mag_in
        # Rounding of f, split in two (see the module docstring): ``delta`` is the error f carries into this block;
        # inside the linear regime it propagates through the exact composed map P (|P| δ — not |B||ΓA| δ, which
        # would lose every cancellation), while ``local`` is the rounding made inside the block.
        delta = round_f
        local = np.zeros(n)
        prop = delta
        for k, stage in enumerate(stages):
            GA = to_xp(stage.gamma).reshape(-1, 1) * to_xp(stage.weight)
            beta = to_xp(stage.beta)
            GA_abs = np.abs(GA)
            width_in = GA.shape[1]
            P_abs = GA_abs @ P_abs
            P_err = GA_abs @ P_err + gamma_n(width_in + 1, U_XP) * P_abs
            q_err = GA_abs @ q_err + gamma_n(width_in + 2, U_XP) * (GA_abs @ np.abs(q) + np.abs(beta))
            P, q = GA @ P, GA @ q + beta
            # f evaluates this stage in its dtype at its computed input, which lies within prop + local of the
            # exact one: local_k = |ΓA| local_{k-1} + γ_{n+2}(|ΓA| (|x| + prop + local_{k-1}) + |β|)
            GA64 = GA_abs.astype(np.float64)
            local = GA64 @ local + gamma_n(width_in + 2, u_f) * (
                GA64 @ (x_mag.astype(np.float64) + prop + local) + np.abs(beta).astype(np.float64)
            )
            prop = (np.abs(P) + P_err).astype(np.float64) @ delta
            stage_lo, stage_hi = affine_interval(P, lo, hi, q)
            x_mag = np.maximum(np.abs(stage_lo), np.abs(stage_hi))
            if k < len(stages) - 1:
                if not stage.relu:
                    raise InvalidNetworkError(f"layer {i}: linear-regime stage {indices[k]} has no ReLU")
                # the minimum is exact for P h + q; allow for rounding in P, q and in forming the bound itself —
                # and for f's own evaluation error, so the *computed* network takes the linear branch too
                slack = P_err @ mag_in + q_err + gamma_n(n + 2, U_XP) * (np.abs(P) @ mag_in + np.abs(q))
                off = stage_lo <= slack + (prop + local).astype(XP)
                if off.any():
                    certified = False
                    notes.append(
                        f"layer {i}, stage {indices[k]}: {int(off.sum())} unit(s) may switch off on the "
                        f"box (min pre-activation {float((stage_lo - slack).min()):.3e} ≤ 0): not in the "
                        "linear regime everywhere"
                    )
        is_last = i == spec.depth - 1
        if stages[-1].relu == is_last:
            raise InvalidNetworkError(f"layer {i}: ReLU placement of the block does not mirror the target")
        round_f = prop + local  # after the target's ReLU too (1-Lipschitz)
        err, round_g = propagate_distance(err, round_g, P, P_err, q, q_err, W, b, mag_in)
        lo, hi = stage_lo, stage_hi
        if not is_last:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
    return certify_result(certified, err, round_f, round_g, notes)


def propagate_distance(err, round_g, P, P_err, q, q_err, W, b, mag_in):
    """One target layer of the distance bound ``e ← |ΔW| a + |W| e + |Δb|`` (ΔW = P − W, Δb = q − b, including
    the bounds on rounding in P and q) and of g's own float64 rounding."""
    n = W.shape[1]
    dW = np.abs(P - W) * (1 + gamma_n(1, U_XP)) + P_err
    db = np.abs(q - b) * (1 + gamma_n(1, U_XP)) + q_err
    err = (dW @ mag_in + np.abs(W) @ err + db) * (1 + gamma_n(n + 2, U_XP))
    round_g = np.abs(W).astype(np.float64) @ round_g + gamma_n(n + 2) * (np.abs(W) @ mag_in + np.abs(b)).astype(
        np.float64
    )
    return err, round_g


def certify_result(certified: bool, err, round_f, round_g, notes: list[str]) -> CertifyResult:
    """The final result; a non-finite bound is never certified."""
    return final_result(certified, float(err.max()), float((round_f + round_g).max()), notes)
