"""Certified equivalence for CNN and residual targets (the conv and conv_deep constructions).

Activations are images, so the certificate carries elementwise bounds (float64 tensors), layer by layer, following
the target's layers and the network's stages together. Four quantities travel along, per activation element:

* ``[lo, hi]`` — the range of the *realised* network ``ĝ`` (exact arithmetic) on the box;
* ``err`` — a bound on ``|ĝ − g|`` (the certified distance to the target);
* ``rf`` — a bound on ``|f̃ − ĝ|``, the rounding of ``f``'s evaluation **in the network's own dtype** (``u_f``:
  float32 networks are bounded in float32), starting from the cast of the float64 input;
* ``rg`` — a bound on ``g``'s own float64 evaluation error.

**A conv / linear pair** ``γ₂ ⊙ B relu(γ₁ ⊙ A * h + β₁) + β₂`` (``*`` the target layer's convolution, ``B`` a 1×1
conv). Its first stage must be active at every position (the linear regime): per channel,
``min_{h ∈ box} (Γ₁A * h + β₁) > slack + |Γ₁A| * rf + local₁`` — the interval minimum is exact up to the rounding
``slack`` of computing it, and the last two terms are ``f``'s own error there, so the *computed* network takes the
linear branch as well. The pair then realises ``Ŵ * h + b̂`` with ``Ŵ = γ₂ ⊙ B Γ₁ A`` and ``b̂ = γ₂ ⊙ B β₁ + β₂``
(``±`` a rigorous bound on forming them), and

* ``err ← |Ŵ − W| * a + |W| * err + |b̂ − b|`` (``a`` bounds ``|ĥ|``; zero padding contributes nothing);
* ``rf ← |Ŵ| * rf + |γ₂||B| local₁ + local₂``: the error ``f`` carries in goes through the exact composed map
  (keeping the Khatri–Rao cancellations), and ``local_k = γ_{n+3}(u_f)(|Γ_kA_k| |x̃| + |β_k|)`` is the rounding of
  stage ``k`` at its computed input ``x̃`` (``|x̃| ≤ a + rf``).

A conv_deep stream ``γ_out ⊙ Σ_t B_t relu(Γ_t A_t * x_{J_t} + β_t) + β_out`` is the same pair with the branch
kernels placed block-diagonally in one kernel ``A``; with ``paired`` branches (``relu(v) − relu(−v) = v``, exactly
in floating point too) no activity condition is needed.

**The same quantities in the 2-norm.** Entrywise, ``err`` grows by ``|W|`` per layer — the absolute kernel, whose
norm exceeds ``‖W‖₂`` by up to √(fan-in): ×10 and more per residual block, 1e11 on a ResNet-20. So each quantity is
also carried as one number bounding its 2-norm over the activation (``E ≥ ‖ĝ − g‖₂``, ``R``, ``Rg``, and ``M ≥
‖ĝ‖₂``), through rigorous operator-norm bounds of the target's layers (:mod:`onlynorm.certify.opnorm`):
``E ← ‖W‖₂ E + ‖(Ŵ − W) ĥ + (b̂ − b)‖₂`` (the last term entrywise as above or ``‖Ŵ − W‖₂ M + ‖b̂ − b‖₂``),
``R ← ‖Ŵ‖₂ R + ‖local‖₂``, the residual sum adding both branches', pooling by its Lipschitz constant. At every
step each form tightens the other (``|δ_i| ≤ ‖δ‖₂``, and ``‖δ‖₂`` ≤ the norm of the entrywise bounds), and the
result reports the smaller. The magnitude ``M`` has a third bound from the box's centre ``c``:
``‖ĝ(x)‖₂ ≤ ‖g̃(c)‖₂ + Rg + E + L ‖x − c‖₂`` with ``L`` the product of the realised layers' norms (the residual sum
adding its branches') — the biases enter once, through ``g̃(c)``, not multiplied through every layer. ``Ŵ`` and ``b̂`` are composed with error-free products (:mod:`onlynorm.certify.compose`):
a plain float64 product's bound carries the Khatri–Rao cancellation factor and would dominate the distance.

**ReLU, max pooling and Flatten** are exact in floating point and 1-Lipschitz per element, so every bound passes
through the same operation. **Average pooling** and the **residual sum** round (``γ_{k+2}`` resp. ``u``, in ``f``'s
dtype for ``rf`` and float64 for the rest). Every quantity the certificate computes itself is widened by its own
float64 rounding, so ``certified_bound`` bounds ``sup_D |f − g|`` in exact arithmetic and ``rounding_bound`` the
evaluation error of ``f`` (its dtype) plus ``g`` (float64). As for every certificate, underflow is assumed not to
occur (subnormal intermediates would add an absolute ~1e-45 (float32) per operation).

The network's stages are paired with the target's layers by the one matcher (:mod:`onlynorm.nets.match`) and read
through their affine views (:mod:`onlynorm.nets.views`: exactly the tensors and module attributes their forward
uses; hooks, biases, other padding modes, ``eps`` or statistics that the views do not model are refused); geometry,
ReLU placement and pooling parameters are checked against the target as the walk goes, so a file whose structure
was edited is refused instead of certified against what it no longer is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..domain import Box
from ..errors import InvalidNetworkError, NotCertifiableError
from ..nets.conv import FixedOp
from ..nets.match import Node, Realised, Skip, path_label
from ..nets.views import UNIT_GEOMETRY, AffineView, StreamView, hook_problem
from ..targets.cnn import ConvNetSpec, box_tensors
from ..targets.layers import Pool
from .compose import compose, compose_vector
from .core import U64, CertifyResult, Overflow, final_result, gamma_n, unit_roundoff
from .opnorm import LayerNorms, norm_up, pool_lipschitz

__all__ = ["certify_conv"]


@dataclass(frozen=True)
class _State:
    """Bounds carried along (see the module docstring); every tensor has the activation's shape, and the four
    floats bound the 2-norms of the same quantities over the whole activation: ``E ≥ ‖ĝ − g‖₂``,
    ``R ≥ ‖f̃ − ĝ‖₂``, ``Rg ≥ ‖g̃ − g‖₂``, ``M ≥ ‖ĝ‖₂`` (:func:`_tighten` lets each form sharpen the other)."""

    lo: torch.Tensor
    hi: torch.Tensor
    err: torch.Tensor
    rf: torch.Tensor
    rg: torch.Tensor
    E: float = math.inf
    R: float = math.inf
    Rg: float = math.inf
    M: float = math.inf
    #: the target's float64 activation at the box's centre, and ``L`` ≥ the Lipschitz constant of ``ĝ`` up to here
    center: torch.Tensor | None = None
    L: float = math.inf

    @property
    def mag(self) -> torch.Tensor:
        """``|ĝ|`` on the box."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def mag_f(self) -> torch.Tensor:
        """``|f̃|``: what ``f`` actually holds, ``ĝ`` plus its evaluation error."""
        return self.mag + self.rf

    @property
    def mag_g(self) -> torch.Tensor:
        """``|g̃|``: the target's exact activation is within ``err`` of ``ĝ``'s, its computed one within ``rg``."""
        return self.mag + self.err + self.rg


def _up(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` widened by the float64 rounding of the ``n``-term sums that computed it (an upper bound stays one)."""
    return t * (1 + gamma_n(n, U64))


def _sum_up(*terms: float) -> float:
    """A float64 sum of non-negative bounds, rounded up."""
    return math.fsum(terms) * (1 + 4 * U64)


def _tighten(st: _State, radius: float) -> _State:
    """Each bound form sharpens the other: an entry is at most the vector's 2-norm (``|δ_i| ≤ ‖δ‖₂``), and the
    2-norm at most the norm of the entrywise bounds. Both stay valid, so the state keeps the smaller of each.
    The magnitude has a third bound from the box's centre ``c``: ``‖ĝ(x)‖ ≤ ‖g̃(c)‖ + Rg + E + L ‖x − c‖`` (``g̃(c)``
    the target's float64 value there, within ``Rg`` of ``g(c)``, itself within ``E`` of ``ĝ(c)``)."""
    M = st.M
    if st.center is not None:
        M = min(M, _sum_up(norm_up(st.center), st.Rg, st.E, st.L * radius))
    err, rf, rg = st.err.clamp(max=st.E), st.rf.clamp(max=st.R), st.rg.clamp(max=st.Rg)
    lo, hi = st.lo.clamp(min=-M, max=M), st.hi.clamp(min=-M, max=M)
    mag = torch.maximum(lo.abs(), hi.abs())
    return _State(
        lo,
        hi,
        err,
        rf,
        rg,
        min(st.E, norm_up(err)),
        min(st.R, norm_up(rf)),
        min(st.Rg, norm_up(rg)),
        min(M, norm_up(mag)),
        st.center,
        st.L,
    )


def certify_conv(net, spec: ConvNetSpec, box: Box, nodes: Sequence[Node], *, norm_bounds: bool = True) -> CertifyResult:
    """Certify a network built by the conv or conv_deep construction against its CNN target on ``box``;
    ``nodes`` pair the target's layers with the network's stages (:func:`onlynorm.nets.match.match`, the plan's).

    >>> import torch
    >>> from torch import nn
    >>> import onlynorm
    >>> g = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).double()
    >>> f = onlynorm.reconstruct(g, in_shape=(1, 3, 3), domain=onlynorm.Box(0.0, 1.0), seed=0, dtype=torch.float32)
    >>> report = onlynorm.verify(f, g, samples=500, certify=True)      # dispatches here
    >>> report.certified, report.max_abs_error <= report.certified_bound + report.rounding_bound
    (True, True)
    >>> report.rounding_bound > 1e-9                                    # bounded in float32, not float64
    True
    """
    u_f = unit_roundoff(net.dtype)
    lo, hi = box_tensors(spec, box, torch.float64)
    zero = torch.zeros_like(lo)
    # f receives the float64 points cast to its dtype: one rounding per coordinate (none for float64)
    cast = zero if net.dtype == torch.float64 else u_f * torch.maximum(lo.abs(), hi.abs())
    notes: list[str] = []
    walker = _Walker(u_f, notes, Overflow(net.dtype), norm_bounds)
    walker.overflow.check(_peak(torch.maximum(lo.abs(), hi.abs())))  # the input, cast to f's dtype
    center = (lo + hi) / 2
    walker.radius = norm_up(torch.maximum(hi - center, center - lo))  # ≥ ‖x − c‖₂ on the box
    start = _State(lo, hi, zero, cast, zero.clone(), center=center, L=1.0)
    state = walker.walk(nodes, walker.tighten(start))
    walker.overflow.check(_peak(state.mag_f))
    walker.overflow.check_g(_peak(state.mag_g))
    hit = walker.overflow.hit
    notes += walker.overflow.notes()
    # the tighter of the interval (entrywise) and the norm-propagated bound, per output entry
    bound = min(_peak(state.err), state.E)
    rounding = min(_peak(state.rf + state.rg), _sum_up(state.R, state.Rg))
    return final_result(not notes and not hit, bound, rounding, notes)


def _peak(t: torch.Tensor) -> float:
    """The largest entry (``inf`` for NaN: an undefined bound is no bound)."""
    if t.numel() == 0:
        return 0.0
    m = float(t.max())
    return m if m == m else float("inf")


class _Walker:
    """One pass over the matched target layers and stages (nested residual blocks included), reading each stage
    through its affine view (:mod:`onlynorm.nets.views`) — never its submodules."""

    def __init__(self, u_f: float, notes: list[str], overflow: Overflow, norm_bounds: bool = True):
        self.u_f, self.notes, self.overflow = u_f, notes, overflow
        self.norms = LayerNorms()
        self.norm_bounds = norm_bounds  # False: the entrywise (interval) bounds alone, for comparison
        self.radius = math.inf  # ‖x − c‖₂ on the box, set by certify_conv

    def tighten(self, st: _State) -> _State:
        return _tighten(st, self.radius) if self.norm_bounds else st

    def walk(self, nodes: Sequence[Node], st: _State) -> _State:
        for node in nodes:
            if isinstance(node, Realised):
                out = self.realised(node, st)
            elif isinstance(node, Skip):
                out = self.residual_sum(self.walk(node.body, st), self.walk(node.shortcut, st))
            else:
                _check_op(node.stage, node.layer, f"stage {path_label(node.path)} ({node.layer.type})")
                out = self.fixed(node.layer, st)
            st = self.tighten(out)
        return st

    def realised(self, node: Realised, st: _State) -> _State:
        """A target Conv/Linear: a conv_deep stream (one stage) or a pair of stages of the conv construction."""
        views = [
            stage.affine(f"{node.where}, stage {path_label(path)}") for stage, path in zip(node.stages, node.paths)
        ]
        if node.relu:
            raise InvalidNetworkError(f"{node.where}: expected the target's ReLU as a copied stage, found it fused")
        if len(views) == 1 and isinstance(views[0], StreamView):
            view = views[0]
            _check_stream(view, node.layer, node.where)
            A = _d(view.kernel).flatten(1) if view.flat else _d(view.kernel)
            factors = (A, _d(view.gamma1), _d(view.beta1), _d(view.readout), _d(view.gamma2), _d(view.beta2))
            return self.affine(node.layer, factors, st, node.where, paired=view.paired)
        if len(views) == 2 and all(isinstance(v, AffineView) for v in views):
            first, second = views
            _check_pair(first, second, node.layer, node.where)
            B = _d(second.weight).flatten(1)
            factors = (_d(first.weight), _d(first.gamma), _d(first.beta), B, _d(second.gamma), _d(second.beta))
            return self.affine(node.layer, factors, st, node.where, paired=False)
        raise InvalidNetworkError(
            f"{node.where}: the CNN certificate models a conv_stream or a pair of conv/linear stages, found "
            f"{', '.join(type(s).__name__ for s in node.stages)}"
        )

    # ------------------------------------------------------------------ parameter-free layers
    def fixed(self, layer, st: _State) -> _State:
        """ReLU, max pooling and Flatten are exact; average pooling rounds (``γ_{k+2}`` of its ``k`` terms).
        In the 2-norm, ReLU and Flatten are 1-Lipschitz, pooling :func:`~onlynorm.certify.opnorm.pool_lipschitz`."""
        lo, hi = layer.bounds(st.lo, st.hi)
        lip = pool_lipschitz(layer, tuple(st.lo.shape[1:])) if isinstance(layer, Pool) else 1.0
        center = None if st.center is None else layer.forward(st.center)
        if not (isinstance(layer, Pool) and layer.mode == "avg"):
            return _State(
                lo,
                hi,
                layer.error_map(st.err),
                layer.error_map(st.rf),
                layer.error_map(st.rg),
                lip * st.E,
                lip * st.R,
                lip * st.Rg,
                lip * st.M,
                center,
                lip * st.L,
            )
        k = layer.kernel[0] * layer.kernel[1]

        def peak(t):  # ≥ any average over a window, whatever the divisor (padding zeros included)
            return F.max_pool2d(t, layer.kernel, layer.stride, layer.padding)

        widen = gamma_n(k + 2, U64) * peak(st.mag)  # the certificate's own float64 averages of lo, hi
        local_f = gamma_n(k + 2, self.u_f) * peak(st.mag_f)
        local_g = gamma_n(k + 2, U64) * peak(st.mag_g)
        grow = 1 + gamma_n(k + 2, U64)
        return _State(
            lo - widen,
            hi + widen,
            _up(layer.error_map(st.err), k + 2),
            _up(layer.error_map(st.rf), k + 2) + local_f,
            _up(layer.error_map(st.rg), k + 2) + local_g,
            lip * st.E * grow,
            _sum_up(lip * st.R * grow, norm_up(local_f)),
            _sum_up(lip * st.Rg * grow, norm_up(local_g)),
            _sum_up(lip * st.M, norm_up(widen)),
            center,
            lip * st.L,
        )

    def residual_sum(self, body: _State, skip: _State) -> _State:
        """``relu(body + shortcut)``: one addition (a rounding ``u`` of the sum in each evaluation), then a ReLU;
        in the 2-norm the two branches' bounds add (the ReLU is 1-Lipschitz)."""
        lo, hi = skip.lo + body.lo, skip.hi + body.hi
        widen = gamma_n(1, U64) * torch.maximum(lo.abs(), hi.abs())
        local_f = self.u_f * (skip.mag_f + body.mag_f)
        local_g = U64 * (skip.mag_g + body.mag_g)
        center = None
        if body.center is not None and skip.center is not None:
            center = torch.relu(body.center + skip.center)
        return _State(
            (lo - widen).clamp(min=0),
            (hi + widen).clamp(min=0),
            _up(skip.err + body.err, 1),
            _up(skip.rf + body.rf, 1) + local_f,
            _up(skip.rg + body.rg, 1) + local_g,
            _sum_up(skip.E, body.E) * (1 + 2 * U64),
            _sum_up(skip.R * (1 + 2 * U64), body.R * (1 + 2 * U64), norm_up(local_f)),
            _sum_up(skip.Rg * (1 + 2 * U64), body.Rg * (1 + 2 * U64), norm_up(local_g)),
            _sum_up(skip.M, body.M, norm_up(widen)),
            center,
            _sum_up(body.L, skip.L),
        )

    # ------------------------------------------------------------------ one target Conv/Linear
    def affine(self, layer, factors, st: _State, where: str, paired: bool) -> _State:
        """Target layer ``W * h + b`` realised as ``γ₂ ⊙ B relu(γ₁ ⊙ A * h + β₁) + β₂`` (``A`` a kernel for a
        conv); with ``paired`` as ``γ₂ ⊙ B (relu(v) − relu(−v)) + β₂ = γ₂ ⊙ B v + β₂`` for every ``v``."""
        A4, g1, b1, B, g2, b2 = factors
        conv = layer.type == "conv"
        W, b = layer.weight.double(), layer.bias.double()
        A = A4.flatten(1)
        N, K = A.shape

        ops = _ConvOps(layer, A4) if conv else _LinearOps()
        op, mix, col = ops.op, ops.mix, ops.col
        u_f, grow = self.u_f, K + N + 8  # the certificate's own sums have at most K + N terms
        GA = g1.unsqueeze(1) * A
        GA_abs, B_abs = GA.abs(), g2.abs().unsqueeze(1) * B.abs()
        # f's first stage at its computed input: the error it carries in, plus its own rounding (local₁)
        local1 = _up(gamma_n(K + 3, u_f) * (op(st.mag_f, GA_abs) + col(b1.abs())), grow)
        pre_err = _up(op(st.rf, GA_abs), grow) + local1
        if not paired:
            self.check_activity(ops, GA, b1, K, st, pre_err, where)
        # the realised affine map Ŵ = γ₂ ⊙ B Γ₁ A, b̂ = γ₂ ⊙ B β₁ + β₂, and bounds on the rounding made forming them
        # composed with error-free products (:mod:`onlynorm.certify.compose`): a plain product's bound would carry
        # the Khatri–Rao cancellation factor |B||Γ₁||A| / |Ŵ| (10²–10⁴) and dominate the distance
        C, C_err = compose(B, g1, A)
        W_hat = g2.unsqueeze(1) * C
        W_err = (g2.abs().unsqueeze(1) * C_err + U64 * W_hat.abs()) * (1 + 2 * U64)
        Bb, Bb_err = compose_vector(B, b1)
        b_hat = g2 * Bb + b2
        b_err = (g2.abs() * Bb_err + U64 * ((g2 * Bb).abs() + b_hat.abs())) * (1 + 2 * U64)
        dW = (W_hat - W.flatten(1)).abs() * (1 + 2 * U64) + W_err
        db = (b_hat - b).abs() * (1 + 2 * U64) + b_err
        err = _up(op(st.mag, dW) + op(st.err, W.flatten(1).abs()) + col(db), grow)
        # f: the error carried in goes through the exact composed map |Ŵ| ≤ |fl(Ŵ)| + W_err; the second stage adds
        # the first's local rounding (through γ₂ B) and its own, at its computed input |ũ| ≤ |Γ₁A| a + |β₁| + pre_err
        u_mag = op(st.mag, GA_abs) + col(b1.abs()) + pre_err
        local2 = gamma_n(N + 3, u_f) * (mix(B_abs, u_mag) + col(b2.abs()))
        # the range condition of the rounding model: every product, partial sum, scaling and offset of f's two
        # stages (in its dtype), and of g's layer (float64), stays below the format's largest finite number
        terms1 = op(st.mag_f, A.abs())
        terms2 = mix(B.abs(), u_mag)
        self.overflow.check(_peak(terms1), _peak(g1.abs()), _peak(b1.abs()))
        self.overflow.check(_peak(terms2), _peak(g2.abs()), _peak(b2.abs()))
        self.overflow.check(_peak(u_mag))
        self.overflow.check_g(_peak(op(st.mag_g, W.flatten(1).abs())), _peak(b.abs()))
        local_f = mix(B_abs, local1) + local2
        rf = _up(op(st.rf, W_hat.abs() + W_err) + local_f, grow)
        # g: its float64 evaluation of W * x + b at its own (computed) input
        W_abs = W.flatten(1).abs()
        local_g = gamma_n(K + 2, U64) * (op(st.mag_g, W_abs) + col(b.abs()))
        rg = _up(op(st.rg, W_abs) + local_g, grow)
        # ĝ's range: an exact interval step for Ŵ, widened by Ŵ's own uncertainty and this step's rounding
        pos, neg = W_hat.clamp(min=0), W_hat.clamp(max=0)
        lo = op(st.lo, pos) + op(st.hi, neg) + col(b_hat)
        hi = op(st.hi, pos) + op(st.lo, neg) + col(b_hat)
        widen = op(st.mag, W_err) + col(b_err) + gamma_n(K + 3, U64) * (op(st.mag, W_hat.abs()) + col(b_hat.abs()))
        # the same four quantities in the 2-norm: the error carried in goes through ‖W‖ (or ‖Ŵ‖ ≤ ‖W‖ + ‖Ŵ − W‖)
        # — the sign cancellations |W| loses — and each layer adds its local error, bounded entrywise above
        if not self.norm_bounds:
            return _State(lo - widen, hi + widen, err, rf, rg)
        norm_W = self.norms.layer(layer, tuple(st.lo.shape[-2:]))
        norm_dW = self.norms.difference(layer, tuple(st.lo.shape[-2:]), W_hat, W_err)
        offsets = norm_up(col(db).expand_as(lo))
        local_e = min(norm_up(_up(op(st.mag, dW) + col(db), grow)), _sum_up(norm_dW * st.M, offsets))
        norm_hat = _sum_up(norm_W, norm_dW)
        center = None if st.center is None else layer.forward(st.center)
        return _State(
            lo - widen,
            hi + widen,
            err,
            rf,
            rg,
            _sum_up(norm_W * st.E, local_e),
            _sum_up(norm_hat * st.R, norm_up(_up(local_f, grow))),
            _sum_up(norm_W * st.Rg, norm_up(_up(local_g, grow))),
            _sum_up(norm_hat * st.M, norm_up(col(b_hat.abs() + b_err).expand_as(lo))),
            center,
            norm_hat * st.L * (1 + 4 * U64),
        )

    def check_activity(self, ops: _LinearOps, GA, b1, K: int, st: _State, pre_err, where: str) -> None:
        """The first stage stays active: per unit (linear) or per channel at every position (conv), with room for
        the rounding of this very interval step and for ``f``'s own error there (``pre_err``)."""
        op, col = ops.op, ops.col
        zmin = op(st.lo, GA.clamp(min=0)) + op(st.hi, GA.clamp(max=0))
        slack = gamma_n(K + 3, U64) * (op(st.mag, GA.abs()) + col(b1.abs()))
        low = ops.channel_min(zmin + col(b1) - slack - pre_err)
        off = low <= 0
        if bool(off.any()):
            self.notes.append(
                f"{where}: {int(off.sum())} unit(s)/channel(s) of the first stage may switch off on the box "
                f"(min pre-activation {float(low.min()):.3e} ≤ 0)"
            )


class _LinearOps:
    """The certificate's four operations on flat features ``(1, n)``: ``op(x, M) = M x`` (the layer's map with any
    matrix), ``mix(M, x) = M x`` (the pair's second map), ``col(v)`` a per-unit vector, ``channel_min`` per unit."""

    def op(self, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        return x @ M.T

    def mix(self, M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ M.T

    def col(self, v: torch.Tensor) -> torch.Tensor:
        return v[None]

    def channel_min(self, t: torch.Tensor) -> torch.Tensor:
        return t.amin(dim=0)


class _ConvOps(_LinearOps):
    """The same on images ``(1, c, H, W)``: ``op`` the target layer's convolution with the kernel ``M`` (rows
    ``c_in·kh·kw``), ``mix`` a 1×1 conv, ``col`` per channel, ``channel_min`` over every position."""

    def __init__(self, layer, A4: torch.Tensor):
        self.layer, self.kernel_shape = layer, tuple(A4.shape[1:])

    def op(self, x, M):
        return self.layer.apply(x, M.reshape(M.shape[0], *self.kernel_shape))

    def mix(self, M, x):
        return torch.einsum("oj,bjhw->bohw", M, x)

    def col(self, v):
        return v.reshape(1, -1, 1, 1)

    def channel_min(self, t):
        return t.amin(dim=(0, 2, 3))


# ---------------------------------------------------------------------- the network's side, checked
def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().cpu()


def _check_pair(first: AffineView, second: AffineView, layer, where: str) -> None:
    """Map types, ReLU placement and geometry of a conv/linear pair must be what the certificate assumes."""
    conv = layer.type == "conv"
    if (first.geometry is None, second.geometry is None) != (not conv, not conv):
        raise InvalidNetworkError(
            f"{where}: expected a pair of {'conv' if conv else 'linear'} stages for the target's {layer.type}"
        )
    if not (first.relu and not second.relu):
        raise InvalidNetworkError(
            f"{where}: expected ReLU after the first stage of the pair only, found relu={first.relu}, {second.relu}"
        )
    if conv:
        if first.geometry != tuple(layer.geometry) or tuple(first.weight.shape[2:]) != tuple(layer.weight.shape[2:]):
            raise InvalidNetworkError(
                f"{where}: the first conv's stride/padding/dilation {first.geometry} differ from the target's "
                f"{tuple(layer.geometry)}"
            )
        if tuple(second.weight.shape[2:]) != (1, 1) or second.geometry != UNIT_GEOMETRY:
            raise InvalidNetworkError(f"{where}: the second conv of the pair must be a plain 1×1 conv")


def _check_stream(view: StreamView, layer, where: str) -> None:
    flat = layer.type == "linear"
    want = UNIT_GEOMETRY if flat else tuple(layer.geometry)
    kernel_ok = tuple(view.kernel.shape[2:]) == ((1, 1) if flat else tuple(layer.weight.shape[2:]))
    if view.flat != flat or view.geometry != want or not kernel_ok:
        raise InvalidNetworkError(
            f"{where}: the conv_stream's geometry {view.geometry} (flat={view.flat}) differs from the target's {want}"
        )


def _check_op(stage, layer, where: str) -> None:
    """A parameter-free stage must compute the target's layer (op and pooling parameters) with no hooks."""
    problem = hook_problem(stage)
    if problem is not None:
        raise NotCertifiableError(f"{where}: {problem}, which the certificate does not model")
    if not isinstance(stage, FixedOp) or stage.op != layer.type:
        raise InvalidNetworkError(f"{where}: expected a {layer.type} stage, found {type(stage).__name__}")
    if isinstance(layer, Pool):
        avg = layer.mode == "avg"  # count_include_pad matters to average pooling only
        found = (tuple(stage.kernel), tuple(stage.stride), tuple(stage.padding), avg and bool(stage.count_include_pad))
        want = (tuple(layer.kernel), tuple(layer.stride), tuple(layer.padding), avg and bool(layer.count_include_pad))
        if found != want:
            raise InvalidNetworkError(f"{where}: pooling (kernel, stride, padding) {found} differs from the target's")
