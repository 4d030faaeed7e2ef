"""Certified equivalence for CNN and residual targets (the conv and conv_deep constructions).

Activations are images, so the certificate works with elementwise bounds in float64, layer by layer, following the
target's records and the network's stages together:

* **conv / linear pair** — the first stage's units must be active at every position of the reachable input:
  ``min_{h ∈ box} (γ₁ A * h)(pos) + β₁ > slack`` per channel (one interval step, exact up to the rounding ``slack``).
  Then the pair computes ``Ŵ * h + b̂`` with ``Ŵ = γ₂ ⊙ B Γ₁ A`` and ``b̂ = γ₂ ⊙ B β₁ + β₂``, and the distance to
  the target grows as ``e ← |Ŵ − W| * a + |W| * e + |b̂ − b|`` (``a`` bounds ``|ĥ|``, ``*`` the convolution with the
  layer's geometry; zero padding contributes nothing);
* **ReLU, max pooling, average pooling** are 1-Lipschitz in the max norm per output element, so ``e`` passes through
  the same operation; **Flatten** reshapes it; a **Residual** block adds the body's error to the shortcut's (the
  identity, or a projection walked like the body).

A conv_deep stream ``γ_out ⊙ Σ_t B_t relu(Γ_t A_t * x_{J_t} + β_t) + β_out`` is the same two-stage form with the
branch kernels ``A_t`` placed block-diagonally in one kernel ``A``, so both constructions share one certificate.

Every quantity computed in floating point carries its rounding bound ``γ_n = n·u/(1 − n·u)`` (composed kernels,
interval steps, which are widened outward), so ``certified_bound`` bounds ``sup_D |f − g|`` in exact arithmetic.
The floating-point evaluation error of ``f`` and ``g`` is bounded separately the same way.
"""

from __future__ import annotations

import torch

from .certify import CertifyResult
from .cnn import ConvNetSpec, box_tensors
from .cnn_layers import ResidualBlock
from .domain import Box
from .errors import InvalidNetworkError

__all__ = ["certify_conv"]

_U = torch.finfo(torch.float64).eps / 2


def _g(n: int) -> float:
    return n * _U / (1 - n * _U)


def _conv(layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return layer.apply(x, w)


class _State:
    """Bounds carried along: box ``[lo, hi]`` of ĝ's activation, distance ``err`` to g's, rounding of f and g."""

    def __init__(self, lo, hi, err, rf, rg):
        self.lo, self.hi, self.err, self.rf, self.rg = lo, hi, err, rf, rg

    @property
    def mag(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())


def certify_conv(net, spec: ConvNetSpec, box: Box) -> CertifyResult:
    """Certify a network built by the conv or conv_deep construction against its CNN target on ``box``."""
    if net.dtype != torch.float64:
        # this certificate's bound on f's evaluation error uses float64's unit roundoff; a float32 CNN would get a
        # bound below its real rounding, so it is refused rather than under-bounded (MLP certificates do float32)
        return CertifyResult(
            certified=False,
            bound=float("inf"),
            rounding_bound=float("inf"),
            notes=[
                f"not certified: the CNN certificate bounds float64 evaluation only; this network "
                f"is {str(net.dtype).removeprefix('torch.')} — certify a float64 copy "
                "(net.double()) for the exact-arithmetic bound"
            ],
        )
    spec = spec.to(dtype=torch.float64, device="cpu")
    lo, hi = box_tensors(spec, box, torch.float64)
    zero = torch.zeros_like(lo)
    notes: list[str] = []
    state = _walk(spec.layers, list(net.layers), _State(lo, hi, zero, zero.clone(), zero.clone()), notes, prefix="")
    certified = not notes
    if not certified:
        notes.append("not certified: equivalence is only supported by samples")
    bound = float(state.err.max()) if certified else float("inf")
    return CertifyResult(
        certified=certified, bound=bound, rounding_bound=float((state.rf + state.rg).max()), notes=notes
    )


def _walk(layers, stages: list, st: _State, notes: list[str], prefix: str) -> _State:
    from .constructions.conv import ResidualStage
    from .constructions.conv_deep import ConvStream

    pos = 0
    for index, layer in enumerate(layers):
        where = f"layer {prefix}{index} ({layer.type})"
        if pos >= len(stages):
            raise InvalidNetworkError(f"the network has {len(stages)} stages where the target needs more")
        if layer.has_weights:
            stage = stages[pos]
            paired = isinstance(stage, ConvStream) and stage.paired
            if isinstance(stage, ConvStream):
                factors = _stream_factors(stage)
                pos += 1
            else:
                factors = _pair_factors(stage, stages[pos + 1])
                pos += 2
            st = _affine(layer, *factors, st, notes, where, paired=paired)
        elif isinstance(layer, ResidualBlock):
            stage = stages[pos]
            if not isinstance(stage, ResidualStage):
                raise InvalidNetworkError(f"{where}: expected a residual stage, found {type(stage).__name__}")
            body = _walk(layer.body, list(stage.body), st, notes, prefix=f"{prefix}{index}.body.")
            skip = _walk(layer.shortcut, list(stage.shortcut), st, notes, prefix=f"{prefix}{index}.shortcut.")
            pos += 1
            lo, hi = (skip.lo + body.lo).clamp(min=0), (skip.hi + body.hi).clamp(min=0)
            widen = 4 * _U * torch.maximum(lo.abs(), hi.abs())
            mags = 2 * _U * (skip.mag + body.mag)
            st = _State(lo - widen, hi + widen, skip.err + body.err, skip.rf + body.rf + mags, skip.rg + body.rg + mags)
        else:
            pos += 1
            lo, hi = layer.bounds(st.lo, st.hi)
            widen = 4 * _U * torch.maximum(lo.abs(), hi.abs()) if layer.type == "avgpool" else 0.0
            st = _State(
                lo - widen,
                hi + widen,
                layer.error_map(st.err),
                layer.error_map(st.rf) + widen,
                layer.error_map(st.rg) + widen,
            )
    if pos != len(stages):
        raise InvalidNetworkError(f"the network has {len(stages)} stages where the target needs {pos}")
    return st


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().cpu()


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


def _affine(layer, A4, g1, b1, B, g2, b2, st: _State, notes: list[str], where: str, paired: bool = False) -> _State:
    """One target Conv/Linear realised as ``γ₂ ⊙ B relu(γ₁ ⊙ A h + β₁) + β₂`` (conv: ``A`` a kernel); with
    ``paired`` as ``γ₂ ⊙ B (relu(v) − relu(−v)) + β₂ = γ₂ ⊙ B v + β₂`` for every ``v`` — no activity condition
    (``relu(a) − relu(−a) = a`` holds exactly in floating point too)."""
    conv = layer.type == "conv"
    W, b = layer.weight.double(), layer.bias.double()
    A = A4.flatten(1)
    K, N = A.shape[1], A.shape[0]
    GA = g1.unsqueeze(1) * A
    if not paired:
        _check_activity(conv, layer, A4, GA, b1, K, st, notes, where)
    # the realised affine map Ŵ = γ₂ ⊙ B Γ₁ A, b̂ = γ₂ ⊙ B β₁ + β₂, with bounds on the rounding made forming them
    W_hat = g2.unsqueeze(1) * (B @ GA)
    W_err = _g(N + 3) * (g2.abs().unsqueeze(1) * (B.abs() @ GA.abs()))
    b_hat = g2 * (B @ b1) + b2
    b_err = _g(N + 3) * (g2.abs() * (B.abs() @ b1.abs()) + b2.abs())
    dW = (W_hat - W.flatten(1)).abs() * (1 + 2 * _U) + W_err
    db = (b_hat - b).abs() * (1 + 2 * _U) + b_err
    # f's own float64 evaluation of the two stages, and g's of its layer
    if conv:
        dW4, W4 = dW.reshape(W.shape), W.abs()
        err = _conv(layer, st.mag, dW4) + _conv(layer, st.err, W4) + db.reshape(1, -1, 1, 1)
        u_mag = _conv(layer, st.mag, GA.abs().reshape(A4.shape)) + b1.abs().reshape(1, -1, 1, 1)
        ru = _conv(layer, st.rf, GA.abs().reshape(A4.shape)) + _g(K + 2) * u_mag
        rf = torch.einsum(
            "oj,bjhw->bohw", g2.abs().unsqueeze(1) * B.abs(), ru + u_mag * _g(N + 2)
        ) + 2 * _U * b2.abs().reshape(1, -1, 1, 1)
        rg = _conv(layer, st.rg, W4) + _g(K + 2) * (_conv(layer, st.mag, W4) + b.abs().reshape(1, -1, 1, 1))
        lo, hi = layer.bounds(st.lo, st.hi, weight=W_hat.reshape(W.shape), use_bias=False)
        lo, hi = lo + b_hat.reshape(1, -1, 1, 1), hi + b_hat.reshape(1, -1, 1, 1)
        widen = _g(K + 2) * (_conv(layer, st.mag, W_hat.abs().reshape(W.shape)) + b_hat.abs().reshape(1, -1, 1, 1))
    else:
        err = (dW @ st.mag[0] + W.abs() @ st.err[0] + db)[None]
        u_mag_lin = GA.abs() @ st.mag[0] + b1.abs()
        ru = GA.abs() @ st.rf[0] + _g(K + 2) * u_mag_lin
        rf = ((g2.abs().unsqueeze(1) * B.abs()) @ (ru + _g(N + 2) * u_mag_lin) + 2 * _U * b2.abs())[None]
        rg = (W.abs() @ st.rg[0] + _g(K + 2) * (W.abs() @ st.mag[0] + b.abs()))[None]
        lo = (W_hat.clamp(min=0) @ st.lo[0] + W_hat.clamp(max=0) @ st.hi[0] + b_hat)[None]
        hi = (W_hat.clamp(min=0) @ st.hi[0] + W_hat.clamp(max=0) @ st.lo[0] + b_hat)[None]
        widen = (_g(K + 2) * (W_hat.abs() @ st.mag[0] + b_hat.abs()))[None]
    err = err * (1 + _g(K + 2))
    return _State(lo - widen, hi + widen, err, rf, rg)


def _check_activity(conv: bool, layer, A4, GA, b1, K: int, st: _State, notes: list[str], where: str) -> None:
    """The first stage must stay active: per unit (linear) or per channel over every position (conv)."""
    if conv:
        GA4 = GA.reshape(A4.shape)
        zmin = _conv(layer, st.lo, GA4.clamp(min=0)) + _conv(layer, st.hi, GA4.clamp(max=0))
        slack = _g(K + 3) * (_conv(layer, st.mag, GA4.abs()) + b1.abs().reshape(1, -1, 1, 1))
        low = (zmin + b1.reshape(1, -1, 1, 1) - slack).amin(dim=(0, 2, 3))
    else:
        lo, hi, mag = st.lo[0], st.hi[0], st.mag[0]
        zmin = GA.clamp(min=0) @ lo + GA.clamp(max=0) @ hi
        low = zmin + b1 - _g(K + 3) * (GA.abs() @ mag + b1.abs())
    off = low <= 0
    if bool(off.any()):
        notes.append(
            f"{where}: {int(off.sum())} unit(s)/channel(s) of the first stage may switch off on the box "
            f"(min pre-activation {float(low.min()):.3e} ≤ 0)"
        )
