"""Certified equivalence for CNN and residual targets (the conv construction).

Activations are images, so the certificate works with elementwise bounds in float64, layer by layer, following the
target's records and the network's stages together:

* **conv / linear pair** — the first stage's units must be active at every position of the reachable input:
  ``min_{h ∈ box} (γ₁ A * h)(pos) + β₁ > slack`` per channel (one interval step, exact up to the rounding ``slack``).
  Then the pair computes ``Ŵ * h + b̂`` with ``Ŵ = γ₂ ⊙ B Γ₁ A`` and ``b̂ = γ₂ ⊙ B β₁ + β₂``, and the distance to
  the target grows as ``e ← |Ŵ − W| * a + |W| * e + |b̂ − b|`` (``a`` bounds ``|ĥ|``, ``*`` the convolution with the
  layer's geometry; zero padding contributes nothing);
* **ReLU, max pooling, average pooling** are 1-Lipschitz in the max norm per output element, so ``e`` passes through
  the same operation; **Flatten** reshapes it; a **Residual** block adds the body's error to the skip's.

Every quantity computed in floating point carries its rounding bound ``γ_n = n·u/(1 − n·u)`` (composed kernels,
interval steps, which are widened outward), so ``certified_bound`` bounds ``sup_D |f − g|`` in exact arithmetic.
The floating-point evaluation error of ``f`` and ``g`` is bounded separately the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .certify import CertifyResult
from .cnn import ConvNetSpec, box_tensors, interval_step
from .domain import Box
from .errors import InvalidNetworkError

__all__ = ["certify_conv"]

_U = torch.finfo(torch.float64).eps / 2


def _g(n: int) -> float:
    return n * _U / (1 - n * _U)


def _conv(rec: dict, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, None, rec["stride"], rec["padding"], rec["dilation"])


class _State:
    """Bounds carried along: box ``[lo, hi]`` of ĝ's activation, distance ``err`` to g's, rounding of f and g."""

    def __init__(self, lo, hi, err, rf, rg):
        self.lo, self.hi, self.err, self.rf, self.rg = lo, hi, err, rf, rg

    @property
    def mag(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())


def certify_conv(net, spec: ConvNetSpec, box: Box) -> CertifyResult:
    """Certify a network built by the conv construction against its CNN target on ``box``."""
    spec = spec.to(dtype=torch.float64, device="cpu")
    lo, hi = box_tensors(spec, box, torch.float64)
    zero = torch.zeros_like(lo)
    notes: list[str] = []
    state = _walk(spec.layers, list(net.layers),
                  _State(lo, hi, zero, zero.clone(), zero.clone()), notes, prefix="")
    certified = not notes
    if not certified:
        notes.append("not certified: equivalence is only supported by samples")
    bound = float(state.err.max()) if certified else float("inf")
    return CertifyResult(certified=certified, bound=bound, rounding_bound=float((state.rf + state.rg).max()),
                         notes=notes)


def _walk(layers: list[dict], stages: list, st: _State, notes: list[str], prefix: str) -> _State:
    pos = 0
    for index, rec in enumerate(layers):
        kind, where = rec["type"], f"layer {prefix}{index} ({rec['type']})"
        if kind in ("conv", "linear"):
            st = _pair(rec, stages[pos], stages[pos + 1], st, notes, where)
            pos += 2
        elif kind == "residual":
            body = _walk(rec["block"], list(stages[pos].body), st, notes, prefix=f"{prefix}{index}.")
            pos += 1
            lo, hi = interval_step({"type": "relu"}, st.lo + body.lo, st.hi + body.hi)
            widen = 4 * _U * torch.maximum(lo.abs(), hi.abs())
            st = _State(lo - widen, hi + widen, st.err + body.err, st.rf + body.rf + 2 * _U * (st.mag + body.mag),
                        st.rg + body.rg + 2 * _U * (st.mag + body.mag))
        else:
            pos += 1
            lo, hi = interval_step(rec, st.lo, st.hi)
            same = lambda t: _fixed(rec, t)  # noqa: E731 — the op applied to a nonnegative error map
            widen = 4 * _U * torch.maximum(lo.abs(), hi.abs()) if kind == "avgpool" else 0.0
            st = _State(lo - widen, hi + widen, same(st.err), same(st.rf) + widen, same(st.rg) + widen)
    if pos != len(stages):
        raise InvalidNetworkError(f"the network has {len(stages)} stages where the target needs {pos}")
    return st


def _fixed(rec: dict, t: torch.Tensor) -> torch.Tensor:
    """Error maps through parameter-free layers: ReLU leaves them, pooling pools them, Flatten flattens them."""
    kind = rec["type"]
    if kind == "relu":
        return t
    if kind == "flatten":
        return t.flatten(1)
    if kind == "maxpool":
        return F.max_pool2d(t, rec["kernel"], rec["stride"], rec["padding"])
    return F.avg_pool2d(t, rec["kernel"], rec["stride"], rec["padding"],
                        count_include_pad=rec.get("count_include_pad", True))


def _pair(rec: dict, first, second, st: _State, notes: list[str], where: str) -> _State:
    conv = rec["type"] == "conv"
    g1, b1 = first.norm.weight.detach().double().cpu(), first.norm.bias.detach().double().cpu()
    g2, b2 = second.norm.weight.detach().double().cpu(), second.norm.bias.detach().double().cpu()
    if conv:
        A4 = first.conv.weight.detach().double().cpu()
        B = second.conv.weight.detach().double().cpu().flatten(1)
        A = A4.flatten(1)
    else:
        A, B = first.linear.weight.detach().double().cpu(), second.linear.weight.detach().double().cpu()
    W, b = rec["weight"].double(), rec["bias"].double()
    K, N = A.shape[1], A.shape[0]
    GA = g1.unsqueeze(1) * A
    # activity of the first stage, per unit (linear) or per channel over every position (conv)
    if conv:
        GA4 = GA.reshape(A4.shape)
        zmin = _conv(rec, st.lo, GA4.clamp(min=0)) + _conv(rec, st.hi, GA4.clamp(max=0))
        slack = _g(K + 3) * (_conv(rec, st.mag, GA4.abs()) + b1.abs().reshape(1, -1, 1, 1))
        low = (zmin + b1.reshape(1, -1, 1, 1) - slack).amin(dim=(0, 2, 3))
    else:
        lo, hi, mag = st.lo[0], st.hi[0], st.mag[0]
        zmin = GA.clamp(min=0) @ lo + GA.clamp(max=0) @ hi
        low = zmin + b1 - _g(K + 3) * (GA.abs() @ mag + b1.abs())
    off = low <= 0
    if bool(off.any()):
        notes.append(f"{where}: {int(off.sum())} unit(s)/channel(s) of the first stage may switch off on the box "
                     f"(min pre-activation {float(low.min()):.3e} ≤ 0)")
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
        err = _conv(rec, st.mag, dW4) + _conv(rec, st.err, W4) + db.reshape(1, -1, 1, 1)
        u_mag = _conv(rec, st.mag, GA.abs().reshape(A4.shape)) + b1.abs().reshape(1, -1, 1, 1)
        ru = _conv(rec, st.rf, GA.abs().reshape(A4.shape)) + _g(K + 2) * u_mag
        rf = (torch.einsum("oj,bjhw->bohw", g2.abs().unsqueeze(1) * B.abs(), ru + u_mag * _g(N + 2))
              + 2 * _U * b2.abs().reshape(1, -1, 1, 1))
        rg = _conv(rec, st.rg, W4) + _g(K + 2) * (_conv(rec, st.mag, W4) + b.abs().reshape(1, -1, 1, 1))
        lo, hi = _conv_bounds(rec, st.lo, st.hi, W_hat.reshape(W.shape), b_hat)
        widen = _g(K + 2) * (_conv(rec, st.mag, W_hat.abs().reshape(W.shape)) + b_hat.abs().reshape(1, -1, 1, 1))
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


def _conv_bounds(rec, lo, hi, w, b):
    zmin = _conv(rec, lo, w.clamp(min=0)) + _conv(rec, hi, w.clamp(max=0)) + b.reshape(1, -1, 1, 1)
    zmax = _conv(rec, hi, w.clamp(min=0)) + _conv(rec, lo, w.clamp(max=0)) + b.reshape(1, -1, 1, 1)
    return zmin, zmax
