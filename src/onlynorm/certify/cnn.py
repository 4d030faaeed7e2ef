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

**ReLU, max pooling and Flatten** are exact in floating point and 1-Lipschitz per element, so every bound passes
through the same operation. **Average pooling** and the **residual sum** round (``γ_{k+2}`` resp. ``u``, in ``f``'s
dtype for ``rf`` and float64 for the rest). Every quantity the certificate computes itself is widened by its own
float64 rounding, so ``certified_bound`` bounds ``sup_D |f − g|`` in exact arithmetic and ``rounding_bound`` the
evaluation error of ``f`` (its dtype) plus ``g`` (float64). As for every certificate, underflow is assumed not to
occur (subnormal intermediates would add an absolute ~1e-45 (float32) per operation).

The network's stages are checked against the target as the walk goes — kind, geometry, ReLU placement, pooling
parameters — so a file whose structure was edited is refused instead of certified against what it no longer is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..domain import Box
from ..errors import InvalidNetworkError
from ..targets.cnn import ConvNetSpec, box_tensors
from ..targets.layers import Pool, ResidualBlock
from .core import U64, CertifyResult, final_result, gamma_n, unit_roundoff

__all__ = ["certify_conv"]


@dataclass(frozen=True)
class _State:
    """Bounds carried along (see the module docstring); every tensor has the activation's shape."""

    lo: torch.Tensor
    hi: torch.Tensor
    err: torch.Tensor
    rf: torch.Tensor
    rg: torch.Tensor

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


def certify_conv(net, spec: ConvNetSpec, box: Box) -> CertifyResult:
    """Certify a network built by the conv or conv_deep construction against its CNN target on ``box``.

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
    spec = spec.to(dtype=torch.float64, device="cpu")
    lo, hi = box_tensors(spec, box, torch.float64)
    zero = torch.zeros_like(lo)
    # f receives the float64 points cast to its dtype: one rounding per coordinate (none for float64)
    cast = zero if net.dtype == torch.float64 else u_f * torch.maximum(lo.abs(), hi.abs())
    notes: list[str] = []
    walker = _Walker(u_f, notes)
    state = walker.walk(spec.layers, list(net.layers), _State(lo, hi, zero, cast, zero.clone()), prefix="")
    return final_result(not notes, float(state.err.max()), float((state.rf + state.rg).max()), notes)


class _Walker:
    """One walk over the target's layers and the network's stages (nested residual blocks included)."""

    def __init__(self, u_f: float, notes: list[str]):
        self.u_f, self.notes = u_f, notes

    def walk(self, layers, stages: list, st: _State, prefix: str) -> _State:
        pos = 0
        for index, layer in enumerate(layers):
            where = f"layer {prefix}{index} ({layer.type})"
            if pos >= len(stages):
                raise InvalidNetworkError(f"{where}: the network has {len(stages)} stages where the target needs more")
            stage = stages[pos]
            kind = getattr(stage, "kind", type(stage).__name__)
            if layer.has_weights and kind == "conv_stream":
                _check_stream(stage, layer, where)
                st = self.affine(layer, _stream_factors(stage), st, where, paired=bool(stage.paired))
                pos += 1
            elif layer.has_weights:
                if pos + 1 >= len(stages):
                    raise InvalidNetworkError(f"{where}: expected a pair of stages, the network ends")
                _check_pair(stage, stages[pos + 1], layer, where)
                st = self.affine(layer, _pair_factors(stage, stages[pos + 1]), st, where, paired=False)
                pos += 2
            elif isinstance(layer, ResidualBlock):
                if kind != "residual":
                    raise InvalidNetworkError(f"{where}: expected a residual stage, found {kind}")
                body = self.walk(layer.body, list(stage.body), st, prefix=f"{prefix}{index}.body.")
                skip = self.walk(layer.shortcut, list(stage.shortcut), st, prefix=f"{prefix}{index}.shortcut.")
                st = self.residual_sum(body, skip)
                pos += 1
            else:
                _check_op(stage, layer, where)
                st = self.fixed(layer, st)
                pos += 1
        if pos != len(stages):
            raise InvalidNetworkError(f"the network has {len(stages)} stages where the target needs {pos}")
        return st

    # ------------------------------------------------------------------ parameter-free layers
    def fixed(self, layer, st: _State) -> _State:
        """ReLU, max pooling and Flatten are exact; average pooling rounds (``γ_{k+2}`` of its ``k`` terms)."""
        lo, hi = layer.bounds(st.lo, st.hi)
        if not (isinstance(layer, Pool) and layer.mode == "avg"):
            return _State(lo, hi, layer.error_map(st.err), layer.error_map(st.rf), layer.error_map(st.rg))
        k = layer.kernel[0] * layer.kernel[1]

        def peak(t):  # ≥ any average over a window, whatever the divisor (padding zeros included)
            return F.max_pool2d(t, layer.kernel, layer.stride, layer.padding)

        widen = gamma_n(k + 2, U64) * peak(st.mag)  # the certificate's own float64 averages of lo, hi
        return _State(
            lo - widen,
            hi + widen,
            _up(layer.error_map(st.err), k + 2),
            _up(layer.error_map(st.rf), k + 2) + gamma_n(k + 2, self.u_f) * peak(st.mag_f),
            _up(layer.error_map(st.rg), k + 2) + gamma_n(k + 2, U64) * peak(st.mag_g),
        )

    def residual_sum(self, body: _State, skip: _State) -> _State:
        """``relu(body + shortcut)``: one addition (a rounding ``u`` of the sum in each evaluation), then a ReLU."""
        lo, hi = skip.lo + body.lo, skip.hi + body.hi
        widen = gamma_n(1, U64) * torch.maximum(lo.abs(), hi.abs())
        return _State(
            (lo - widen).clamp(min=0),
            (hi + widen).clamp(min=0),
            _up(skip.err + body.err, 1),
            _up(skip.rf + body.rf, 1) + self.u_f * (skip.mag_f + body.mag_f),
            _up(skip.rg + body.rg, 1) + U64 * (skip.mag_g + body.mag_g),
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
        W_hat = g2.unsqueeze(1) * (B @ GA)
        W_err = gamma_n(N + 3, U64) * (B_abs @ GA_abs)
        b_hat = g2 * (B @ b1) + b2
        b_err = gamma_n(N + 3, U64) * (B_abs @ b1.abs() + b2.abs())
        dW = (W_hat - W.flatten(1)).abs() * (1 + 2 * U64) + W_err
        db = (b_hat - b).abs() * (1 + 2 * U64) + b_err
        err = _up(op(st.mag, dW) + op(st.err, W.flatten(1).abs()) + col(db), grow)
        # f: the error carried in goes through the exact composed map |Ŵ| ≤ |fl(Ŵ)| + W_err; the second stage adds
        # the first's local rounding (through γ₂ B) and its own, at its computed input |ũ| ≤ |Γ₁A| a + |β₁| + pre_err
        u_mag = op(st.mag, GA_abs) + col(b1.abs()) + pre_err
        local2 = gamma_n(N + 3, u_f) * (mix(B_abs, u_mag) + col(b2.abs()))
        rf = _up(op(st.rf, W_hat.abs() + W_err) + mix(B_abs, local1) + local2, grow)
        # g: its float64 evaluation of W * x + b at its own (computed) input
        W_abs = W.flatten(1).abs()
        rg = _up(op(st.rg, W_abs) + gamma_n(K + 2, U64) * (op(st.mag_g, W_abs) + col(b.abs())), grow)
        # ĝ's range: an exact interval step for Ŵ, widened by Ŵ's own uncertainty and this step's rounding
        pos, neg = W_hat.clamp(min=0), W_hat.clamp(max=0)
        lo = op(st.lo, pos) + op(st.hi, neg) + col(b_hat)
        hi = op(st.hi, pos) + op(st.lo, neg) + col(b_hat)
        widen = op(st.mag, W_err) + col(b_err) + gamma_n(K + 3, U64) * (op(st.mag, W_hat.abs()) + col(b_hat.abs()))
        return _State(lo - widen, hi + widen, err, rf, rg)

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


def _geometry(conv) -> tuple:
    return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)


def _check_pair(first, second, layer, where: str) -> None:
    """Kinds, ReLU placement and geometry of a conv/linear pair must be what the certificate assumes."""
    want = "norm_conv2d" if layer.type == "conv" else "norm_linear"
    kinds = (getattr(first, "kind", type(first).__name__), getattr(second, "kind", type(second).__name__))
    if kinds != (want, want):
        raise InvalidNetworkError(f"{where}: expected a pair of {want} stages, found {kinds[0]}, {kinds[1]}")
    if not (bool(first.relu) and not bool(second.relu)):
        raise InvalidNetworkError(
            f"{where}: expected ReLU after the first stage of the pair only, found relu={first.relu}, {second.relu}"
        )
    if layer.type == "conv":
        found = _geometry(first.conv)
        if found != tuple(layer.geometry) or first.conv.groups != 1:
            raise InvalidNetworkError(
                f"{where}: the first conv's stride/padding/dilation {found} differ from the target's "
                f"{tuple(layer.geometry)}"
            )
        c = second.conv
        if (tuple(c.kernel_size), _geometry(c), c.groups) != ((1, 1), ((1, 1), (0, 0), (1, 1)), 1):
            raise InvalidNetworkError(f"{where}: the second conv of the pair must be a plain 1×1 conv")
        if first.conv.bias is not None or c.bias is not None:
            raise InvalidNetworkError(f"{where}: the frozen convs of the pair must be bias-free")
    elif first.linear.bias is not None or second.linear.bias is not None:
        raise InvalidNetworkError(f"{where}: the frozen linear maps of the pair must be bias-free")


def _check_stream(stage, layer, where: str) -> None:
    flat = layer.type == "linear"
    geometry = (stage.geometry["stride"], stage.geometry["padding"], stage.geometry["dilation"])
    want = ((1, 1), (0, 0), (1, 1)) if flat else tuple(layer.geometry)
    if bool(stage.flat) != flat or tuple(tuple(g) for g in geometry) != tuple(tuple(g) for g in want):
        raise InvalidNetworkError(
            f"{where}: the conv_stream's geometry {geometry} (flat={stage.flat}) differs from the target's {want}"
        )


def _check_op(stage, layer, where: str) -> None:
    """A parameter-free stage must compute the target's layer (op and pooling parameters)."""
    kind = getattr(stage, "kind", type(stage).__name__)
    if kind != "op" or stage.op != layer.type:
        raise InvalidNetworkError(f"{where}: expected a {layer.type} stage, found {getattr(stage, 'op', kind)}")
    if isinstance(layer, Pool):
        avg = layer.mode == "avg"  # count_include_pad matters to average pooling only
        found = (tuple(stage.kernel), tuple(stage.stride), tuple(stage.padding), avg and bool(stage.count_include_pad))
        want = (tuple(layer.kernel), tuple(layer.stride), tuple(layer.padding), avg and bool(layer.count_include_pad))
        if found != want:
            raise InvalidNetworkError(f"{where}: pooling (kernel, stride, padding) {found} differs from the target's")


def _pair_factors(first, second):
    """``(A, γ₁, β₁, B, γ₂, β₂)`` of a conv (or linear) pair of the conv construction."""
    lin = getattr(first, "linear", None)
    if lin is not None:
        A, B = _d(lin.weight), _d(second.linear.weight)
    else:
        A, B = _d(first.conv.weight), _d(second.conv.weight).flatten(1)
    return A, _d(first.norm.weight), _d(first.norm.bias), B, _d(second.norm.weight), _d(second.norm.bias)


def _stream_factors(stage):
    """The same factors for a conv_deep stream: its grouped branches as one block-diagonal kernel."""
    A = _d(stage.dense_branch())
    if stage.flat:
        A = A.flatten(1)
    return (
        A,
        _d(stage.branch_norm.weight),
        _d(stage.branch_norm.bias),
        _d(stage.readout.weight).flatten(1),
        _d(stage.norm.weight),
        _d(stage.norm.bias),
    )
