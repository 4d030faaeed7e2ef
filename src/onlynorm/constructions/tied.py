"""``deep, tied=1``: every block of a layer shares one frozen draw ``(A, B)`` — its build and its solve.

The frozen network is still random, but with weight sharing across the blocks of a layer (one draw per layer
instead of one per block: *not* the i.i.d. network of the theorem, which ``tied=0``, the default, builds). Every
block's system ``B diag(γ_t) A = W[:, J_t]`` then has the same Khatri–Rao matrix, so a layer is **one LU** and a
solve with ``T`` right-hand sides (:func:`onlynorm.linalg_tied.solve_khatri_rao_shared`); invertibility is the same
almost-sure condition as for one block. The smaller last block (``k ∤ n``) has its own draw and its own system.
"""

from __future__ import annotations

import torch

from ..errors import InvalidNetworkError
from ..linalg import blockwise_residual
from ..linalg_tied import SharedSolution, solve_khatri_rao_shared
from ..nets.conv_stream import grouped_conv
from ..nets.records import SolveRecord
from ..nets.tied import TiedResidualStream
from ..nets.tied_conv import TiedConvStream
from ..options import OptionSpec
from ..targets.layers import Conv
from .base import fill_frozen, safe_margin

__all__ = ["TIED", "tied_option", "draw_tied", "solve_tied_stream", "solve_tied_conv"]

#: 0 (default): one i.i.d. draw per block (the theorem's network); 1: one draw per layer shared by every block
TIED = OptionSpec(
    "tied",
    int,
    min_val=0,
    max_val=1,
    help="1: every block of a layer shares one frozen draw (A, B): one LU per layer, frozen weights stored once, "
    "one readout per layer in the forward; 0 (default): an independent draw per block, the theorem's network",
)


def tied_option(options: dict) -> dict:
    """``tied=True/False`` accepted as 1/0 (the option is an integer switch like ``paired``)."""
    if isinstance(options.get("tied"), bool):
        options = {**options, "tied": int(options["tied"])}
    return options


def draw_tied(stage: TiedResidualStream | TiedConvStream, gen: torch.Generator) -> None:
    """The stage's frozen weights: ``A``, ``B`` (and the rest block's pair), one call per tensor."""
    for module in (stage.branch, stage.readout, stage.rest, stage.rest_readout):
        if module is not None:
            fill_frozen(module.weight, gen)


def _solve(A, B, W, layer: int, hold: torch.dtype) -> SharedSolution:
    return solve_khatri_rao_shared(A.detach().double(), B.detach().double(), W.double(), layer=layer, hold=hold)


def _record(layer: int, sols: list[SharedSolution], wanted: torch.Tensor, details: dict) -> SolveRecord:
    """The layer's record from its solves' checks: ``max|Ŵ − W|`` and ``‖Ŵ − W‖_F / ‖W‖_F`` over every block."""
    residual, relative = blockwise_residual([s.residual for s in sols], [s.error_norm for s in sols], wanted)
    return SolveRecord(
        layer=layer,
        kind="shared",
        residual=residual,
        relative_residual=relative,
        exact=True,
        rcond=min(s.rcond for s in sols),
        precision="mixed" if any(s.precision == "mixed" for s in sols) else "float64",
        steps=max(s.steps for s in sols),
        details=details,
    )


def box_offsets(A: torch.Tensor, gamma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, margin: float):
    """``β_t = −min z + slack`` of every block's branch units ``z = Γ_t A x`` over the box ``x ∈ [lo_t, hi_t]``.

    ``A`` is shared, so per unit ``u``: ``z ∈ mid ± half`` with ``mid = γ_tu (A c_t)_u``,
    ``half = |γ_tu| (|A| r_t)_u`` (``c, r`` the centre and radius of block ``t``'s box): three ``(T, k) × (k, N)``
    products for every block at once, no ``(T, N, k)`` tensor of ``Γ_t A``. The slack is
    :func:`~onlynorm.constructions.base.safe_margin`'s, fused (its ``max(spread, |zmin|, |zmax|)`` is
    ``max(2·half, |mid| + half)``): ``margin · max(2·half, |mid| + half, |Γ_t A| (|x| + 1))``, floored by ``margin``
    times the mean spread. ``lo``, ``hi`` ``(T, k)``, ``gamma`` ``(T, N)``; returns ``(T, N)``.

    >>> A, gamma = torch.tensor([[1.0], [-2.0]]), torch.tensor([[1.0, 0.5]])
    >>> box_offsets(A, gamma, torch.tensor([[0.0]]), torch.tensor([[1.0]]), 1e-3)   # z ∈ [0, 1] and [−1, 0]
    tensor([[0.0020, 1.0020]])
    """
    if A.shape[1] == 1:
        return _box_offsets_rank_one(A[:, 0], gamma, lo[:, 0], hi[:, 0], margin)
    g = gamma.abs()
    half = ((hi - lo) / 2 @ A.abs().T).mul_(g)
    mid = ((hi + lo) / 2 @ A.T).mul_(gamma)
    slack = mid.abs().add_(half)
    torch.maximum(slack, ((torch.maximum(lo.abs(), hi.abs()) + 1) @ A.abs().T).mul_(g), out=slack)
    torch.maximum(slack, 2 * half, out=slack)
    floor = _slack_floor(float(half.mean()) if half.numel() else 0.0, margin, A.dtype)
    return slack.mul_(margin).clamp_min_(floor).add_(half).sub_(mid)


def _slack_floor(mean_half: float, margin: float, dtype: torch.dtype) -> float:
    """The least slack of :func:`box_offsets`: ``margin`` times the mean spread ``2·half``, and never below
    ``√tiny`` (a unit whose range is a point still gets a positive margin)."""
    return max(2 * margin * mean_half, torch.finfo(dtype).tiny ** 0.5)


def _box_offsets_rank_one(a: torch.Tensor, gamma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, margin: float):
    """:func:`box_offsets` for one input per block (``k = 1``, the MLP's usual block), in seven passes over
    ``(T, N)`` instead of ~seventeen: with ``P = Γ ⊙ a``, every term is ``|P_tu|`` times a per-block scalar —
    ``mid = P c``, ``half = |P| r``, and the slack's maximum is ``margin · |P| · max(|c| + r, |x| + 1, 2r)``."""
    c, r = (hi + lo) / 2, (hi - lo) / 2
    q = torch.maximum(torch.maximum(c.abs() + r, torch.maximum(lo.abs(), hi.abs()) + 1), 2 * r)
    P = gamma * a
    P_abs = P.abs()
    mean_half = float(P_abs.sum(1) @ r) / P.numel() if P.numel() else 0.0
    beta = torch.mul(P_abs, (margin * q).unsqueeze(1)).clamp_min_(_slack_floor(mean_half, margin, a.dtype))
    return beta.addcmul_(P_abs, r.unsqueeze(1)).addcmul_(P, c.unsqueeze(1), value=-1)


def solve_tied_stream(
    stage: TiedResidualStream, W: torch.Tensor, b: torch.Tensor, lo, hi, margin: float, layer: int
) -> SolveRecord:
    """γ of every block by one shared solve (plus the rest block's), β_t keeping every branch unit active on the
    box, the stream's β cancelling ``Σ_t B β_t``."""
    m, n = W.shape
    k, T, split = stage.block, stage.full, stage.full * stage.block
    W64, lo64, hi64 = W.double(), lo.double(), hi.double()
    parts = [(stage.branch, stage.readout, W64[:, :split].reshape(m, T, k).transpose(0, 1), slice(0, split))]
    if stage.rest is not None and stage.rest_readout is not None:
        parts.append((stage.rest, stage.rest_readout, W64[:, split:].unsqueeze(0), slice(split, n)))
    gammas, betas, sols = [], [], []
    offset = torch.zeros(m, dtype=torch.float64)
    for A_mod, B_mod, Wt, cols in parts:
        sol = _solve(A_mod.weight, B_mod.weight, Wt, layer, W.dtype)  # γ as the network will hold it
        A, B = A_mod.weight.detach().double(), B_mod.weight.detach().double()
        blocks = Wt.shape[0]
        beta = box_offsets(A, sol.gamma, lo64[cols].reshape(blocks, -1), hi64[cols].reshape(blocks, -1), margin)
        offset = offset + B @ beta.sum(0)
        gammas.append(sol.gamma.reshape(-1))
        betas.append(beta.reshape(-1))
        sols.append(sol)
    _set(stage, torch.cat(gammas), torch.cat(betas), b.double() - offset)
    details = {"blocks": len(stage.sizes), "block": k, "tied": 1}
    return _record(layer, sols, W64, details)


def _set(stage, gamma: torch.Tensor, beta: torch.Tensor, beta_out: torch.Tensor) -> None:
    with torch.no_grad():
        stage.branch_norm.weight.copy_(gamma)
        stage.branch_norm.bias.copy_(beta)
        stage.norm.weight.fill_(1.0)
        stage.norm.bias.copy_(beta_out)


def solve_tied_conv(conv: Conv, stage: TiedConvStream, lo, hi, margin: float, index: int, flat: bool) -> SolveRecord:
    """The conv stream's γ by one shared solve per layer (plus the rest block's); β from the box unless paired."""
    W = conv.weight.double()
    c_out, c_in, kh, kw = W.shape
    if (stage.out_channels, stage.in_channels, *stage.geometry["kernel_size"]) != (c_out, c_in, kh, kw):
        raise InvalidNetworkError(
            f"layer {index}: tied_conv_stream {stage.in_channels} → {stage.out_channels} "
            f"{stage.geometry['kernel_size']} does not fit the target kernel {tuple(W.shape)}"
        )
    if flat:
        lo, hi = lo.reshape(1, -1, 1, 1), hi.reshape(1, -1, 1, 1)
    k, T, split = stage.block, stage.full, stage.full * stage.block
    parts = [(stage.branch, stage.readout, W[:, :split].reshape(c_out, T, k * kh * kw).transpose(0, 1), 0, split)]
    if stage.rest is not None and stage.rest_readout is not None:
        parts.append((stage.rest, stage.rest_readout, W[:, split:].flatten(1).unsqueeze(0), split, c_in))
    gammas, betas, sols = [], [], []
    offset = torch.zeros(c_out, dtype=torch.float64)
    for A_mod, B_mod, Wt, c0, c1 in parts:
        sol = _solve(A_mod.weight.flatten(1), B_mod.weight.flatten(1), Wt, index, torch.float64)
        gamma = sol.gamma
        if stage.paired:  # relu(v) − relu(−v) = v for every v: β_t = 0
            beta = torch.zeros_like(gamma)
        else:
            width = k if c0 == 0 else c1 - c0  # full blocks: (T, k, H, W); the rest: (1, r, H, W)
            x_lo = lo[:, c0:c1].reshape(-1, width, *lo.shape[2:])
            x_hi = hi[:, c0:c1].reshape(x_lo.shape)
            beta = _linear_regime_beta(A_mod.weight.detach().double(), gamma, x_lo, x_hi, stage, margin)
        offset = offset + B_mod.weight.detach().double().flatten(1) @ beta.sum(0)
        gammas.append(gamma.reshape(-1))
        betas.append(beta.reshape(-1))
        sols.append(sol)
    _set(stage, torch.cat(gammas), torch.cat(betas), conv.bias.double() - offset)
    details = {"type": "linear" if flat else "conv", "blocks": len(stage.sizes), "block": k, "tied": 1}
    details["size"] = stage.per_block
    return _record(index, sols, W, details)


def _linear_regime_beta(A, gamma, x_lo, x_hi, stage: TiedConvStream, margin: float, budget: int = 256 << 20):
    """``β_t = −min z + slack`` per block and branch channel over every position: the range of ``A * x`` over the
    box (blocks as a batch, in chunks within ``budget`` bytes), scaled by the sign of ``γ_t``."""
    geo = stage._geo()
    pos, neg, mag_k = A.clamp(min=0), A.clamp(max=0), A.abs()
    lmin, umax, smax = [], [], []
    per = max(1, budget // max(1, 4 * A.shape[0] * x_lo[0].numel() * 8))
    for s in range(0, x_lo.shape[0], per):
        lo_c, hi_c = x_lo[s : s + per], x_hi[s : s + per]
        L = grouped_conv(lo_c, pos, 1, *geo) + grouped_conv(hi_c, neg, 1, *geo)
        U = grouped_conv(hi_c, pos, 1, *geo) + grouped_conv(lo_c, neg, 1, *geo)
        mag = torch.maximum(lo_c.abs(), hi_c.abs()) + 1
        lmin.append(L.amin(dim=(2, 3)))
        umax.append(U.amax(dim=(2, 3)))
        smax.append(grouped_conv(mag, mag_k, 1, *geo).amax(dim=(2, 3)))
    l_min, u_max = torch.cat(lmin), torch.cat(umax)
    up = gamma >= 0
    zmin = torch.where(up, gamma * l_min, gamma * u_max)
    zmax = torch.where(up, gamma * u_max, gamma * l_min)
    return -zmin + safe_margin(zmin, zmax, margin, gamma.abs() * torch.cat(smax))
