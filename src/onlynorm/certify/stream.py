"""Certificate of the deep construction: residual streams with skip connections.

Every branch unit ``Γ_t A_t x_{J_t} + β_t`` is proven positive on the box (one interval step per branch), so each
target layer computes ``relu(γ_out ⊙ Σ_t B_t (Γ_t A_t x_{J_t} + β_t) + β_out)`` — an affine map ``P x + q``
composed in extended precision; the distance to ``g`` then follows as for blocks (:mod:`onlynorm.certify.mlp`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..domain import Box
from ..errors import InvalidNetworkError
from ..nets.match import Node, Realised, walk_nodes
from ..nets.normnet import NormNet
from ..nets.views import BranchStreamView
from ..targets.mlp import MLPSpec
from .core import U_XP, XP, CertifyResult, Overflow, affine_interval, gamma_n, to_xp, unit_roundoff
from .mlp import certify_result, propagate_distance, start_rounding

__all__ = ["certify_residual_streams"]


def certify_residual_streams(net: NormNet, spec: MLPSpec, box: Box, nodes: Sequence[Node]) -> CertifyResult:
    """Certify the deep construction: every branch unit ``Γ_t A_t x_{J_t} + β_t`` is proven positive on the box
    (one interval step per branch), so each layer computes ``relu(γ_out ⊙ Σ_t B_t (Γ_t A_t x_{J_t} + β_t) + β_out)``,
    an affine map ``P x + q`` composed in extended precision; the distance to ``g`` then follows as for blocks."""
    u_f = unit_roundoff(net.dtype)
    lo, hi = to_xp(box.low), to_xp(box.high)
    err = np.zeros_like(lo)
    round_f = start_rounding(net, lo, hi)
    round_g = np.zeros(lo.shape)
    notes: list[str] = []
    certified = True
    overflow = Overflow(net.dtype)
    overflow.check(np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64))  # the input, cast to f's dtype
    streams = [_stream_view(node) for node in walk_nodes(nodes)]
    for i, (stage, W_t, b_t) in enumerate(zip(streams, spec.weights, spec.biases)):
        W, b = to_xp(W_t), to_xp(b_t)
        m, n = W.shape
        mag_in = np.maximum(np.abs(lo), np.abs(hi))
        g_out, b_out = to_xp(stage.gamma), to_xp(stage.beta)
        P = np.zeros((m, n), dtype=XP)
        P_err = np.zeros_like(P)
        s_offset = np.zeros(m, dtype=XP)
        s_offset_abs = np.zeros(m, dtype=XP)
        s_mag = np.zeros(m, dtype=XP)  # bound on |s| for rounding (at the computed inputs)
        round_s = np.zeros(m)  # rounding made in this layer (f's incoming error: |P| δ below)
        delta = round_f
        for t, part in enumerate(stage.branches):
            branch, J = part.branch, part.inputs
            if not branch.relu or branch.geometry is not None:
                raise InvalidNetworkError(f"layer {i}, block {t}: expected a linear branch ending in a ReLU")
            GA = to_xp(branch.gamma).reshape(-1, 1) * to_xp(branch.weight)
            beta = to_xp(branch.beta)
            Bt = to_xp(part.readout)
            k = GA.shape[1]
            u_lo, u_hi = affine_interval(GA, lo[J], hi[J], beta)
            GA64 = np.abs(GA).astype(np.float64)
            prop_u = GA64 @ delta[J]  # f's incoming error, through Γ_t A_t
            x_in = mag_in[J].astype(np.float64) + delta[J]  # |x̃| of f at this branch's input
            overflow.check(
                np.abs(to_xp(branch.weight)).astype(np.float64) @ x_in,
                np.abs(to_xp(branch.gamma)).astype(np.float64),
                np.abs(beta).astype(np.float64),
            )
            round_u = gamma_n(k + 2, u_f) * (GA64 @ x_in + np.abs(beta).astype(np.float64)) + (k + 2) * overflow.eta
            slack = gamma_n(k + 2, U_XP) * (np.abs(GA) @ mag_in[J] + np.abs(beta)) + (prop_u + round_u).astype(XP)
            off = u_lo <= slack
            if off.any():
                certified = False
                notes.append(
                    f"layer {i}, block {t}: {int(off.sum())} unit(s) may switch off on the box (min "
                    f"pre-activation {float((u_lo - slack).min()):.3e} ≤ 0)"
                )
            BGA = Bt @ GA
            P[:, J] = BGA
            P_err[:, J] = gamma_n(GA.shape[0] + 1, U_XP) * (np.abs(Bt) @ np.abs(GA))
            s_offset += Bt @ beta
            s_offset_abs += np.abs(Bt) @ np.abs(beta)
            u_mag = np.maximum(np.abs(u_lo), np.abs(u_hi)) + (prop_u + round_u).astype(XP)
            s_mag += np.abs(Bt) @ u_mag
            round_s = round_s + np.abs(Bt).astype(np.float64) @ round_u
        n_terms = stage.branches[0].branch.weight.shape[0] + len(stage.branches) + 2
        overflow.check(s_mag.astype(np.float64), np.abs(g_out).astype(np.float64), np.abs(b_out).astype(np.float64))
        round_s = round_s + gamma_n(n_terms, u_f) * s_mag.astype(np.float64) + n_terms * overflow.eta
        P = g_out.reshape(-1, 1) * P
        P_err = np.abs(g_out).reshape(-1, 1) * P_err + gamma_n(1, U_XP) * np.abs(P)
        q = g_out * s_offset + b_out
        q_err = gamma_n(len(stage.branches) + n_terms, U_XP) * (np.abs(g_out) * s_offset_abs + np.abs(b_out))
        # the incoming error through the layer's exact map P (linear regime), plus this layer's own rounding
        round_f = (
            (np.abs(P) + P_err).astype(np.float64) @ delta
            + np.abs(g_out).astype(np.float64) * round_s
            + gamma_n(2, u_f) * (np.abs(g_out) * (s_mag + round_s) + np.abs(b_out)).astype(np.float64)
        )
        err, round_g = propagate_distance(err, round_g, P, P_err, q, q_err, W, b, (lo, hi), overflow)
        lo, hi = affine_interval(P, lo, hi, q)
        if i < spec.depth - 1:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
    notes += overflow.notes()
    return certify_result(certified and not overflow.hit, err, round_f, round_g, notes)


def _stream_view(node: Realised) -> BranchStreamView:
    view = node.stages[0].affine(node.where) if len(node.stages) == 1 else None
    if not isinstance(view, BranchStreamView):
        raise InvalidNetworkError(
            f"{node.where}: the deep certificate expects one residual stream per layer, found "
            f"{', '.join(type(s).__name__ for s in node.stages)}"
        )
    return view
