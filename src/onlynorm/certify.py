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
error bound of dot products, ``|fl(a·x) − a·x| ≤ γ_n |a|·|x|`` with ``γ_n = n·u / (1 − n·u)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .domain import Box
from .errors import InvalidNetworkError
from .normnet import NormLinear, NormNet
from .target import MLPSpec

__all__ = ["CertifyResult", "certify_equivalence", "certify_blocks", "certify_residual_streams"]

_EPS = torch.finfo(torch.float64).eps / 2   # unit roundoff u of float64 (evaluation of f and g)
# The certificate composes each block's map in extended precision (x87 80-bit on x86-64: u = 2⁻⁶⁴), so the
# rounding made while forming Ŵ is ~2000× below float64's and the bound lands near float64 machine precision.
_XP = np.longdouble
_EPS_XP = float(np.finfo(_XP).eps) / 2


def _gamma(n: int, u: float = _EPS) -> float:
    return n * u / (1 - n * u)


@dataclass
class CertifyResult:
    certified: bool
    bound: float            # sup_D |f − g| in exact arithmetic for the stored parameters (inf if not certified)
    rounding_bound: float   # bound on the floating-point evaluation error of f and g on D
    notes: list[str] = field(default_factory=list)


def certify_equivalence(net: NormNet, spec: MLPSpec, box: Box) -> CertifyResult:
    """Dispatch to the certificate of the construction that built ``net``."""
    from .constructions import get_construction

    return get_construction(net.method).certify(net, spec, box)


def _xp(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy().astype(_XP)


def _bounds(P: np.ndarray, lo: np.ndarray, hi: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.maximum(P, 0), np.minimum(P, 0)
    return pos @ lo + neg @ hi + q, pos @ hi + neg @ lo + q


def certify_blocks(net: NormNet, spec: MLPSpec, box: Box, blocks: list[list[int]]) -> CertifyResult:
    """Certify a chain of :class:`NormLinear` blocks (``blocks[i]`` = stage indices realising target layer i)."""
    if len(blocks) != spec.depth:
        raise InvalidNetworkError(f"expected {spec.depth} blocks for a {spec.depth}-layer target, found {len(blocks)}")
    lo, hi = _xp(box.low), _xp(box.high)
    err = np.zeros_like(lo)             # e_i: bound on |ĥ_i − h_i| in exact arithmetic
    round_f = np.zeros(lo.shape)        # rounding of f's float64 evaluation so far
    round_g = np.zeros(lo.shape)        # rounding of g's float64 evaluation so far
    notes: list[str] = []
    certified = True
    for i, (indices, W_t, b_t) in enumerate(zip(blocks, spec.weights, spec.biases)):
        stages = [net.layers[j] for j in indices]
        if not all(isinstance(s, NormLinear) for s in stages):
            raise InvalidNetworkError(f"layer {i}: certification expects NormLinear stages, found "
                                      f"{[type(s).__name__ for s in stages]}")
        W, b = _xp(W_t), _xp(b_t)
        mag_in = np.maximum(np.abs(lo), np.abs(hi))
        n = W.shape[1]
        P, q = np.eye(n, dtype=_XP), np.zeros(n, dtype=_XP)    # the block so far: h ↦ P h + q
        P_abs = np.eye(n, dtype=_XP)                            # |Γ_k A_k| ⋯ |Γ_1 A_1|, for rounding bounds
        P_err, q_err = np.zeros_like(P), np.zeros_like(q)       # bounds on |fl(P) − P|, |fl(q) − q|
        x_mag = mag_in
        for k, stage in enumerate(stages):
            GA = _xp(stage.norm.weight).reshape(-1, 1) * _xp(stage.linear.weight)
            beta = _xp(stage.norm.bias)
            GA_abs = np.abs(GA)
            width_in = GA.shape[1]
            P_abs = GA_abs @ P_abs
            P_err = GA_abs @ P_err + _gamma(width_in + 1, _EPS_XP) * P_abs
            q_err = GA_abs @ q_err + _gamma(width_in + 2, _EPS_XP) * (GA_abs @ np.abs(q) + np.abs(beta))
            P, q = GA @ P, GA @ q + beta
            # f evaluates this stage in float64: δ_out = |ΓA| δ_in + γ_{n+2}(|ΓA| |x| + |β|)
            round_f = (GA_abs.astype(np.float64) @ round_f
                       + _gamma(width_in + 2) * (GA_abs @ x_mag + np.abs(beta)).astype(np.float64))
            stage_lo, stage_hi = _bounds(P, lo, hi, q)
            x_mag = np.maximum(np.abs(stage_lo), np.abs(stage_hi))
            if k < len(stages) - 1:
                if not stage.relu:
                    raise InvalidNetworkError(f"layer {i}: linear-regime stage {indices[k]} has no ReLU")
                # the minimum is exact for P h + q; allow for rounding in P, q and in forming the bound itself
                slack = P_err @ mag_in + q_err + _gamma(n + 2, _EPS_XP) * (np.abs(P) @ mag_in + np.abs(q))
                off = stage_lo <= slack
                if off.any():
                    certified = False
                    notes.append(f"layer {i}, stage {indices[k]}: {int(off.sum())} unit(s) may switch off on the "
                                 f"box (min pre-activation {float((stage_lo - slack).min()):.3e} ≤ 0): not in the "
                                 "linear regime everywhere")
        is_last = i == spec.depth - 1
        if stages[-1].relu == is_last:
            raise InvalidNetworkError(f"layer {i}: ReLU placement of the block does not mirror the target")
        err, round_g = _propagate(err, round_g, P, P_err, q, q_err, W, b, mag_in)
        lo, hi = stage_lo, stage_hi
        if not is_last:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
    return _result(certified, err, round_f, round_g, notes)


def _propagate(err, round_g, P, P_err, q, q_err, W, b, mag_in):
    """One target layer of the distance bound ``e ← |ΔW| a + |W| e + |Δb|`` (ΔW = P − W, Δb = q − b, including
    the bounds on rounding in P and q) and of g's own float64 rounding."""
    n = W.shape[1]
    dW = np.abs(P - W) * (1 + _gamma(1, _EPS_XP)) + P_err
    db = np.abs(q - b) * (1 + _gamma(1, _EPS_XP)) + q_err
    err = (dW @ mag_in + np.abs(W) @ err + db) * (1 + _gamma(n + 2, _EPS_XP))
    round_g = (np.abs(W).astype(np.float64) @ round_g
               + _gamma(n + 2) * (np.abs(W) @ mag_in + np.abs(b)).astype(np.float64))
    return err, round_g


def _result(certified: bool, err, round_f, round_g, notes: list[str]) -> CertifyResult:
    if not certified:
        notes.append("not certified: equivalence is only supported by samples")
    return CertifyResult(certified=certified, bound=float(err.max()) if certified else float("inf"),
                         rounding_bound=float((round_f + round_g).max()), notes=notes)


def certify_residual_streams(net: NormNet, spec: MLPSpec, box: Box, stages: list) -> CertifyResult:
    """Certify the deep construction: every branch unit ``Γ_t A_t x_{J_t} + β_t`` is proven positive on the box
    (one interval step per branch), so each layer computes ``relu(γ_out ⊙ Σ_t B_t (Γ_t A_t x_{J_t} + β_t) + β_out)``,
    an affine map ``P x + q`` composed in extended precision; the distance to ``g`` then follows as for blocks."""
    lo, hi = _xp(box.low), _xp(box.high)
    err = np.zeros_like(lo)
    round_f = np.zeros(lo.shape)
    round_g = np.zeros(lo.shape)
    notes: list[str] = []
    certified = True
    for i, (stage, W_t, b_t) in enumerate(zip(stages, spec.weights, spec.biases)):
        W, b = _xp(W_t), _xp(b_t)
        m, n = W.shape
        mag_in = np.maximum(np.abs(lo), np.abs(hi))
        g_out, b_out = _xp(stage.norm.weight), _xp(stage.norm.bias)
        P = np.zeros((m, n), dtype=_XP)
        P_err = np.zeros_like(P)
        s_offset = np.zeros(m, dtype=_XP)
        s_offset_abs = np.zeros(m, dtype=_XP)
        s_mag = np.zeros(m, dtype=_XP)            # bound on |s| for rounding
        round_s = np.zeros(m)
        for t, (branch, readout, J) in enumerate(zip(stage.branches, stage.readouts, stage.block_slices())):
            GA = _xp(branch.norm.weight).reshape(-1, 1) * _xp(branch.linear.weight)
            beta = _xp(branch.norm.bias)
            Bt = _xp(readout.weight)
            k = GA.shape[1]
            u_lo, u_hi = _bounds(GA, lo[J], hi[J], beta)
            slack = _gamma(k + 2, _EPS_XP) * (np.abs(GA) @ mag_in[J] + np.abs(beta))
            off = u_lo <= slack
            if off.any():
                certified = False
                notes.append(f"layer {i}, block {t}: {int(off.sum())} unit(s) may switch off on the box (min "
                             f"pre-activation {float((u_lo - slack).min()):.3e} ≤ 0)")
            BGA = Bt @ GA
            P[:, J] = BGA
            P_err[:, J] = _gamma(GA.shape[0] + 1, _EPS_XP) * (np.abs(Bt) @ np.abs(GA))
            s_offset += Bt @ beta
            s_offset_abs += np.abs(Bt) @ np.abs(beta)
            u_mag = np.maximum(np.abs(u_lo), np.abs(u_hi))
            s_mag += np.abs(Bt) @ u_mag
            round_u = (np.abs(GA).astype(np.float64) @ round_f[J]
                       + _gamma(k + 2) * (np.abs(GA) @ mag_in[J] + np.abs(beta)).astype(np.float64))
            round_s = round_s + np.abs(Bt).astype(np.float64) @ round_u
        n_terms = stage.branches[0].linear.out_features + len(stage.branches) + 2
        round_s = round_s + _gamma(n_terms) * s_mag.astype(np.float64)
        P = g_out.reshape(-1, 1) * P
        P_err = np.abs(g_out).reshape(-1, 1) * P_err + _gamma(1, _EPS_XP) * np.abs(P)
        q = g_out * s_offset + b_out
        q_err = _gamma(len(stage.branches) + n_terms, _EPS_XP) * (np.abs(g_out) * s_offset_abs + np.abs(b_out))
        round_f = (np.abs(g_out).astype(np.float64) * round_s
                   + _gamma(2) * (np.abs(g_out) * s_mag + np.abs(b_out)).astype(np.float64))
        err, round_g = _propagate(err, round_g, P, P_err, q, q_err, W, b, mag_in)
        lo, hi = _bounds(P, lo, hi, q)
        if i < spec.depth - 1:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
    return _result(certified, err, round_f, round_g, notes)
