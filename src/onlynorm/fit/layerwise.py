"""Layer-wise closed form with sequential error propagation (as GPTQ/OBC do for quantization).

Pairs are fitted in order, each to the *target* layer's output given the *reconstructed* network's actual input
on the data (not the target's input), so errors made upstream are compensated downstream. For a pair
``y = Γ₂ B relu(Γ₁ A h + β₁) + β₂`` whose hidden units stay active, ``y`` is affine in ``γ₁``:
``y = B Γ₁ A h + c``. With ``h̃, t̃`` the centred inputs (conv: patches) and target pre-activations, the
function-space least squares over the data::

    min_γ Σ_x ‖B Γ A h̃(x) − t̃(x)‖²  =  min_γ ‖(B Γ A − W*) S^{1/2}‖_F² + const,
    S = Σ h̃ h̃ᵀ,   W* = (Σ t̃ h̃ᵀ) S⁺

(its normal equations are ``G γ = r`` with ``G_{jl} = (b_jᵀ b_l)(a_jᵀ S a_l)``) is solved in square-root form —
the Khatri–Rao system of ``A S^{1/2}`` and ``B``, by an SVD-based least squares — so its conditioning is not
squared. ``β₁`` keeps every unit active on the data (and on the box's interval bounds when the data is a box);
``γ₂, β₂`` come from one 1-D regression per output unit. For a :func:`with_norms` network each unit's
``γ, β`` is the 1-D regression of the target's pre-activation on the unit's normalised pre-activation.

Where the network can express the target (``N ≥ m·n`` and data spanning the input), this is exact.

>>> import torch, onlynorm
>>> from torch import nn
>>> g = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
>>> net, report = onlynorm.fit_norms(onlynorm.random_normnet(g), g, onlynorm.Box(-1, 1), method="layerwise")
>>> report.final_error < 1e-9
True
"""

from __future__ import annotations

import time

import torch

from ..constructions.base import safe_margin
from ..domain import affine_bounds
from ..linalg import khatri_rao_system, vec
from ..nets.linear import NormLinear
from ..nets.normnet import NormNet
from ..targets.layers import Conv, pair
from .data import FitData, relative_rms
from .report import Phase
from .segments import Segment, patches, pre_norm, rows, segments, weight_matrix

__all__ = ["fit_layerwise", "function_space_gamma", "DEFAULT_SLACK"]

#: β₁ slack relative to each unit's range on the data (free: β₂ cancels it)
DEFAULT_SLACK = 0.05


def function_space_gamma(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``argmin_γ Σ_rows ‖B diag(γ) A h̃ − t̃‖²`` (centred rows of ``H`` and ``T``), minimum norm; float64.

    >>> A, B = torch.randn(6, 2, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    >>> gamma = torch.randn(6, dtype=torch.float64)
    >>> H = torch.randn(50, 2, dtype=torch.float64)
    >>> T = H @ (B @ (gamma[:, None] * A)).T + 1.0
    >>> bool(torch.allclose(function_space_gamma(A, B, H, T), gamma))
    True
    """
    A, B, H, T = (t.to(torch.float64) for t in (A, B, H, T))
    Hc, Tc = H - H.mean(0), T - T.mean(0)
    S, C = Hc.T @ Hc, Hc.T @ Tc
    s, U = torch.linalg.eigh(S)
    keep = s > max(float(s.max()), 0.0) * 1e-13 * S.shape[0]
    if not bool(keep.any()):
        return torch.zeros(A.shape[0], dtype=torch.float64)
    U, root = U[:, keep], s[keep].sqrt()
    A2 = (A @ U) * root  # A S^{1/2}
    W2 = (C.T @ U) / root  # W* S^{1/2}
    M = khatri_rao_system(A2, B)
    return torch.linalg.lstsq(M, vec(W2).unsqueeze(1), driver="gelsd").solution[:, 0]


def _regress(v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column: ``t ≈ γ v + β`` by least squares (γ = 1 where ``v`` is constant)."""
    vm, tm = v.mean(0), t.mean(0)
    vc = v - vm
    var = (vc * vc).sum(0)
    cov = (vc * (t - tm)).sum(0)
    flat = var <= 1e-24 * var.max().clamp_min(1e-300)
    gamma = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, torch.ones_like(var), var))
    return gamma, tm - gamma * vm


def _set(norm, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    with torch.no_grad():
        norm.weight.copy_(gamma.to(norm.weight))
        norm.bias.copy_(beta.to(norm.bias))


def fit_layerwise(
    net: NormNet, spec, data: FitData, *, slack: float = DEFAULT_SLACK, progress=None, resample=None
) -> Phase:
    """Fit ``net``'s γ, β in place, pair by pair (see the module docstring); returns the phase record.

    ``resample`` (a ``torch.Generator``): each layer's least squares use a fresh random half of the rows (the
    errors still propagate through all of them) — a different start for every draw, used by ``auto``'s restarts."""
    start = time.perf_counter()
    before = data.held_out_error(net)
    segs = segments(net, spec)
    h, ht = data.x_train, data.x_train
    bounds = None
    if data.source == "box" and all(s.kind != "unit" for s in segs):  # interval bounds of the box, stage by stage
        shape = (1, *h.shape[1:])
        bounds = (data.box.low.to(h).reshape(shape), data.box.high.to(h).reshape(shape))
    fits: list[float] = []
    fitted = [s for s in segs if s.kind != "op"]
    with torch.no_grad():
        for seg in segs:
            if seg.kind == "op":
                h, ht = seg.stages[0](h), seg.target_out(ht)
                if bounds is not None:
                    bounds = (seg.stages[0](bounds[0]), seg.stages[0](bounds[1]))  # monotone maps
                continue
            t_full = seg.target_out(ht)
            T = rows(t_full).to(torch.float64)
            pick = _half(T.shape[0], resample)
            if seg.kind == "unit":
                stage = seg.stages[0]
                v = rows(stage.normalized(h)).to(torch.float64)
                gamma, beta = _regress(v, T) if pick is None else _regress(v[pick], T[pick])
                _set(stage.norm, gamma, beta)
                h = stage(h)
                fits.append(relative_rms(rows(h), T))
            else:
                h, pre, bounds = _fit_pair(seg, h, T, bounds, slack, pick)
                fits.append(relative_rms(pre, T))
            ht = torch.relu(t_full) if seg.relu_after else t_full
            if progress is not None:
                progress(len(fits), len(fitted), f"layer-wise: layer {len(fits) - 1} fitted (rel error {fits[-1]:.2e})")
    after = data.held_out_error(net)
    return Phase(
        "layerwise",
        before,
        after,
        time.perf_counter() - start,
        len(fitted),
        details={"layer_train_errors": fits, "slack": slack},
    )


def _first_range(first, gamma: torch.Tensor, A: torch.Tensor, bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of ``γ ⊙ (A h)`` per unit over the interval bounds of ``h`` (conv: over every position)."""
    lo, hi = (b.to(torch.float64) for b in bounds)
    if isinstance(first, NormLinear):
        return affine_bounds(gamma[:, None] * A, lo[0], hi[0])
    weight = gamma.reshape(-1, 1, 1, 1) * first.conv.weight.to(torch.float64)
    zmin, zmax = _geometry(first.conv, weight).bounds(lo, hi, use_bias=False)
    return zmin.amin(dim=(0, 2, 3)), zmax.amax(dim=(0, 2, 3))


def _geometry(conv: torch.nn.Conv2d, weight: torch.Tensor) -> Conv:
    """A typed conv layer with ``conv``'s stride, padding and dilation and the given kernel (its interval bounds)."""
    return Conv(weight, weight.new_zeros(weight.shape[0]), pair(conv.stride), pair(conv.padding), pair(conv.dilation))


def _stage_bounds(stage, bounds):
    """Interval bounds after a NormLinear/NormConv2d stage (its γ, β set): ``γ ⊙ (A h) + β``, then its ReLU."""
    lo, hi = bounds
    gamma, beta = stage.norm.weight.detach(), stage.norm.bias.detach()
    if isinstance(stage, NormLinear):
        zmin, zmax = affine_bounds(gamma[:, None] * stage.linear.weight, lo[0], hi[0], beta)
        zmin, zmax = zmin[None], zmax[None]
    else:
        zmin, zmax = _geometry(stage.conv, gamma.reshape(-1, 1, 1, 1) * stage.conv.weight).bounds(
            lo, hi, use_bias=False
        )
        zmin, zmax = zmin + beta.reshape(1, -1, 1, 1), zmax + beta.reshape(1, -1, 1, 1)
    return (zmin.clamp(min=0), zmax.clamp(min=0)) if stage.relu else (zmin, zmax)


def _half(n: int, gen) -> torch.Tensor | None:
    """A random half of ``n`` rows (at least 2), or ``None`` (all rows) without a generator."""
    return None if gen is None else torch.randperm(n, generator=gen)[: max(2, n // 2)]


def _fit_pair(seg: Segment, h: torch.Tensor, T: torch.Tensor, bounds, slack: float, pick=None):
    first, second = seg.stages
    A, B = weight_matrix(first).to(torch.float64), weight_matrix(second).to(torch.float64)
    H = patches(first, h).to(torch.float64)
    gamma = function_space_gamma(A, B, H, T) if pick is None else function_space_gamma(A, B, H[pick], T[pick])
    z = H @ (gamma[:, None] * A).T
    zmin, zmax = z.min(0).values, z.max(0).values
    if bounds is not None:
        bmin, bmax = _first_range(first, gamma, A, bounds)
        zmin, zmax = torch.minimum(zmin, bmin), torch.maximum(zmax, bmax)
    beta1 = -zmin + safe_margin(zmin, zmax, slack)
    _set(first.norm, gamma, beta1)
    u = first(h)
    v = rows(pre_norm(second, u)).to(torch.float64)
    gamma2, beta2 = _regress(v, T) if pick is None else _regress(v[pick], T[pick])
    _set(second.norm, gamma2, beta2)
    out = second.norm(pre_norm(second, u))
    if bounds is not None:
        bounds = _stage_bounds(second, _stage_bounds(first, bounds))
    return (torch.relu(out) if second.relu else out), rows(out).to(torch.float64), bounds
