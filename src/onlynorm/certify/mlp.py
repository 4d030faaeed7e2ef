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
1e-4 where 1e-12 is observed). Each stage's own rounding ``e_k`` likewise reaches the block's output through the exact
remaining map ``S_k = Γ_K A_K ⋯ Γ_{k+1} A_{k+1}`` (:class:`BlockBound`), and is bounded at the magnitudes the
stage's input actually reaches *together* (an affine function of ``h`` on the linear regime, maximised in one
interval step) instead of each unit's own worst case. The activity proof leaves room for a coarser bound of the
same errors, so the computed network follows the linear branch as well. Any magnitude that may reach the
format's range (``finfo.max``) means no bound holds (:class:`~onlynorm.certify.core.Overflow`): not certified.
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
from .core import (
    U_XP,
    XP,
    CertifyResult,
    Overflow,
    affine_interval,
    final_result,
    gamma_n,
    matmul_xp,
    to_xp,
    unit_roundoff,
)

__all__ = ["certify_blocks", "propagate_distance", "certify_result", "start_rounding"]


def start_rounding(net: NormNet, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rounding of ``f``'s input: points of the float64 box are cast to the network's dtype (exact in float64)."""
    if net.dtype == torch.float64:
        return np.zeros(lo.shape)
    return unit_roundoff(net.dtype) * np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)


def certify_blocks(net: NormNet, spec: MLPSpec, box: Box, nodes: Sequence[Node]) -> CertifyResult:
    """Certify a chain of blocks of linear stages: ``nodes`` (:func:`onlynorm.nets.match.match`) pair each target
    layer with the stages realising it, each read through its affine view."""
    blocks = list(walk_nodes(nodes))
    if len(blocks) != spec.depth:
        raise InvalidNetworkError(f"expected {spec.depth} blocks for a {spec.depth}-layer target, found {len(blocks)}")
    lo, hi = to_xp(box.low), to_xp(box.high)
    err = np.zeros_like(lo)  # e_i: bound on |ĥ_i − h_i| in exact arithmetic
    round_f = start_rounding(net, lo, hi)  # rounding of f's evaluation (in its dtype) so far
    round_g = np.zeros(lo.shape)  # rounding of g's float64 evaluation so far
    notes: list[str] = []
    certified = True
    overflow = Overflow(net.dtype)
    overflow.check(np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64))  # the input, cast to f's dtype
    for i, (node, W_t, b_t) in enumerate(zip(blocks, spec.weights, spec.biases)):
        stages = [stage.affine(f"layer {i}, stage {path_label(path)}") for stage, path in zip(node.stages, node.paths)]
        indices = [path_label(path) for path in node.paths]
        if not all(isinstance(s, AffineView) and s.geometry is None for s in stages):
            raise InvalidNetworkError(
                f"layer {i}: certification expects linear stages, found {[type(s).__name__ for s in node.stages]}"
            )
        for k, stage in enumerate(stages[:-1]):
            if not stage.relu:
                raise InvalidNetworkError(f"layer {i}: linear-regime stage {indices[k]} has no ReLU")
        is_last = i == spec.depth - 1
        if stages[-1].relu == is_last:
            raise InvalidNetworkError(f"layer {i}: ReLU placement of the block does not mirror the target")
        block = BlockBound(stages, lo, hi, round_f, overflow)
        for k, (margin, off) in block.activity.items():
            certified = False
            notes.append(
                f"layer {i}, stage {indices[k]}: {off} unit(s) may switch off on the box (min pre-activation "
                f"{margin:.3e} ≤ 0): not in the linear regime everywhere"
            )
        W, b = to_xp(W_t), to_xp(b_t)
        round_f = block.rounding()  # after the target's ReLU too (1-Lipschitz)
        err, round_g = propagate_distance(
            err, round_g, block.P, block.P_err, block.q, block.q_err, W, b, (lo, hi), overflow
        )
        lo, hi = block.out_lo, block.out_hi
        if not is_last:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
    notes += overflow.notes()
    return certify_result(certified and not overflow.hit, err, round_f, round_g, notes)


class BlockBound:
    """One block ``x_k = relu?(Γ_k A_k x_{k−1} + β_k)``, ``k = 1..K``, on the input box ``[lo, hi]``, with ``f``'s
    incoming evaluation error ``|h̃ − ĥ| ≤ delta``.

    Exact map: every stage is affine on the box (linear regime, proven by :attr:`activity`), ``x_k = P_k h + q_k``
    (composed in extended precision, ``P_err``/``q_err`` bounding that composition's own rounding).

    Rounding: ``f`` evaluates stage ``k`` at its computed input ``x̃_{k−1}`` with error
    ``|e_k| ≤ γ_{n_k+2}(u_f) (|Γ_k A_k| |x̃_{k−1}| + |β_k|) + (n_k + 2) η`` (``η`` the smallest normal number: an
    underflowing, or flushed, product or scaling). The error at the block's output is, *exactly*,

        x̃_K − x_K = P_K (h̃ − ĥ) + Σ_k S_k e_k,     S_k = Γ_K A_K ⋯ Γ_{k+1} A_{k+1}   (S_K = I),

    so it is bounded through the exact composed maps ``|P_K|`` and ``|S_k|`` (keeping the Khatri–Rao
    cancellations) rather than through ``|Γ_K A_K| ⋯ |Γ_{k+1} A_{k+1}|``. And ``|x̃_{k−1}| ≤ x_{k−1}(h) + d_{k−1}``
    with ``x_{k−1}(h) = P_{k−1} h + q_{k−1}`` *affine* on the box (positive there: linear regime) and ``d_{k−1}`` a
    (coarser) bound on its own evaluation error, so the whole bound is an affine function of ``h`` plus a
    constant: its maximum over the box is taken in one exact interval step — the magnitudes actually reachable
    together, not the sum of each unit's worst case. Rows whose stage is not proven positive, and input
    coordinates of either sign, fall back to the constant ``max |x|``.
    """

    def __init__(self, stages: Sequence[AffineView], lo, hi, delta: np.ndarray, overflow: Overflow):
        self.lo, self.hi, self.delta = lo, hi, delta
        u_f, eta = overflow.u, overflow.eta
        n = lo.shape[0]
        self.mag_in = mag_in = np.maximum(np.abs(lo), np.abs(hi))
        P, q = np.eye(n, dtype=XP), np.zeros(n, dtype=XP)  # the block so far: h ↦ P h + q
        P_err, q_err = np.zeros_like(P), np.zeros_like(q)  # bounds on |fl(P) − P|, |fl(q) − q|
        # |x̃_0| ≤ X h + c: coordinates ≥ 0 on the box are their own magnitude, others are bounded by max |h|
        nonneg = lo >= 0
        X, c = np.diag(nonneg.astype(XP)), np.where(nonneg, 0, mag_in).astype(XP) + delta.astype(XP)
        c_mag = mag_in.astype(np.float64) + delta  # the constant bound max |x̃_0|
        crude = np.zeros(n)  # coarse bound on the rounding made inside the block so far (|Γ_k A_k| chains)
        self.G: list[np.ndarray] = []
        self.E: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per stage: affine part, constant, crude
        self.activity: dict[int, tuple[float, int]] = {}
        d_prev = delta  # bound on |x̃_{k−1} − x_{k−1}|
        for k, stage in enumerate(stages):
            gam, A, beta = to_xp(stage.gamma), to_xp(stage.weight), to_xp(stage.beta)
            G = gam.reshape(-1, 1) * A  # only in bounds: widened by its own rounding (one XP product per entry)
            G_abs = np.abs(G) * (1 + 2 * U_XP)
            width_in = G.shape[1]
            g_k = gamma_n(width_in + 2, u_f)
            overflow.check(np.abs(A).astype(np.float64) @ c_mag, np.abs(gam).astype(np.float64), np.abs(beta))
            # the exact composition x_k = Γ_k A_k (P h + q) + β_k, with compensated products (matmul_xp) and γ
            # applied after A, so the only roundings are the products' (AP_err) and two scalings per entry
            AP, AP_err = matmul_xp(A, P)
            Aq, Aq_err = matmul_xp(A, q)
            A_abs = np.abs(A)
            P = gam.reshape(-1, 1) * AP
            P_err = np.abs(gam).reshape(-1, 1) * (AP_err + A_abs @ P_err) + 2 * U_XP * np.abs(P)
            q1 = gam * Aq
            q = q1 + beta
            q_err = np.abs(gam) * (Aq_err + A_abs @ q_err) + 2 * U_XP * (np.abs(q1) + np.abs(q))
            stage_lo, stage_hi = affine_interval(P, lo, hi, q)
            slack = P_err @ mag_in + q_err + gamma_n(n + 2, U_XP) * (np.abs(P) @ mag_in + np.abs(q))
            x_mag = np.maximum(np.abs(stage_lo), np.abs(stage_hi)) + slack
            pos = (stage_lo - slack) > 0  # units proven positive on the box: |x_k| = x_k = P_k h + q_k there
            X_new = np.where(pos[:, None], P, 0)
            c_new = np.where(pos, q + P_err @ mag_in + q_err, x_mag)
            # f's rounding at this stage, at its computed input: γ_{n+2} |Γ A| |x̃_{k−1}| (the dot product and
            # the scaling by γ) + u |Γ A x̃_{k−1} + β| (adding β rounds relative to the *result*, not to |β|:
            # the offsets cancel) + an underflow floor; |Γ A x̃ + β| ≤ |x_k| + |Γ A| d_{k−1}
            floor = (width_in + 2) * eta
            G64 = G_abs.astype(np.float64)
            gd = G_abs @ d_prev.astype(XP)
            e_aff = g_k * (G_abs @ X) + u_f * X_new
            e_const = g_k * (G_abs @ c) + u_f * (c_new + gd) + floor
            e_crude = g_k * (G64 @ c_mag) + u_f * (x_mag.astype(np.float64) + gd.astype(np.float64)) + floor
            self.G.append(G)
            self.E.append((e_aff, e_const, e_crude))
            prop = (np.abs(P) + P_err).astype(np.float64) @ delta
            crude = G64 @ crude + e_crude
            if k < len(stages) - 1:
                # the minimum is exact for P h + q; allow for rounding in P, q and in forming the bound itself —
                # and for f's own evaluation error, so the *computed* network takes the linear branch too
                low = stage_lo - slack - (prop + crude).astype(XP)
                if (low <= 0).any():
                    self.activity[k] = (float(low.min()), int((low <= 0).sum()))
            # the next stage's input: |x̃_k| ≤ P_k h + q_k + d_k on units proven positive, max |x̃_k| elsewhere
            d_prev = prop + crude
            c_mag = x_mag.astype(np.float64) + d_prev
            X, c = X_new, c_new + d_prev.astype(XP)
        self.P, self.q, self.P_err, self.q_err = P, q, P_err, q_err
        self.out_lo, self.out_hi = stage_lo, stage_hi
        self.crude = crude

    def rounding(self) -> np.ndarray:
        """``max_box |x̃_K − x_K|`` per output unit: ``(|P_K| + P_err) δ + max_h Σ_k |S_k| (E_k h + e_k)``."""
        m = self.P.shape[0]
        S = np.eye(m, dtype=XP)  # S_k = Γ_K A_K ⋯ Γ_{k+1} A_{k+1}, from the last stage backwards
        S_err = np.zeros_like(S)
        M = np.zeros((m, self.lo.shape[0]), dtype=XP)
        const = (np.abs(self.P) + self.P_err).astype(XP) @ self.delta.astype(XP)
        majorant = np.zeros(m, dtype=XP)  # bounds every term of the sum (for the slack)
        for G, (E_aff, e_const, e_crude) in zip(reversed(self.G), reversed(self.E)):
            S_use = np.abs(S) + S_err
            M = M + np.abs(S) @ E_aff
            const = const + S_use @ e_const + S_err @ (np.abs(E_aff) @ self.mag_in)
            majorant = majorant + S_use @ (np.abs(E_aff) @ self.mag_in + e_const + e_crude.astype(XP))
            width = G.shape[0]
            gw = gamma_n(width + 1, U_XP)
            S_err = (S_err @ np.abs(G) + gw * (np.abs(S) @ np.abs(G))) * (1 + gw)
            S = S @ G
        _, top = affine_interval(M, self.lo, self.hi, const)
        # the extended-precision rounding of this very computation, relative to a bound of every term in it
        slack = gamma_n(2 * sum(G.shape[1] for G in self.G) + 8, U_XP) * (len(self.G) + 2) * majorant
        return np.maximum(top + slack, 0).astype(np.float64)


def propagate_distance(err, round_g, P, P_err, q, q_err, W, b, box, overflow: Overflow | None = None):
    """One target layer of the distance bound and of g's own float64 rounding.

    The realised layer is ``P ĥ + q`` and the target's ``W h + b``, so
    ``|(P ĥ + q) − (W h + b)| ≤ |(P − W) ĥ + (q − b)| + |W| |ĥ − h|``: the first term's maximum over the box of
    ``ĥ`` is one exact interval step on the affine map ``ΔW ĥ + Δb`` (its signs cancel, unlike
    ``|ΔW| a + |Δb|``), widened by the rounding in ``P, q`` (``P_err``, ``q_err``) and by this computation's own.
    ``g`` evaluates ``W h̃ + b`` in float64 at its computed input, ``|h̃| ≤ |ĥ| + e + r_g``."""
    lo, hi = box
    mag_in = np.maximum(np.abs(lo), np.abs(hi))
    n = W.shape[1]
    dW, db = P - W, q - b
    d_lo, d_hi = affine_interval(dW, lo, hi, db)
    widen = P_err @ mag_in + q_err + gamma_n(n + 3, U_XP) * (np.abs(dW) @ mag_in + np.abs(db) + np.abs(P) @ mag_in)
    g_in = (mag_in + err).astype(np.float64) + round_g  # |h̃| of g: ĝ's range, its distance to g, g's rounding
    err = (np.maximum(np.abs(d_lo), np.abs(d_hi)) + widen + np.abs(W) @ err) * (1 + gamma_n(n + 2, U_XP))
    W64 = np.abs(W).astype(np.float64)
    b64 = np.abs(b).astype(np.float64)
    if overflow is not None:
        overflow.check_g(W64 @ g_in, b64)
    round_g = (W64 @ round_g + gamma_n(n + 2) * (W64 @ g_in + b64)) * (1 + gamma_n(n + 2))
    return err, round_g


def certify_result(certified: bool, err, round_f, round_g, notes: list[str]) -> CertifyResult:
    """The final result; a non-finite bound is never certified."""
    return final_result(certified, float(err.max()), float((round_f + round_g).max()), notes)
