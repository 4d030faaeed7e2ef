"""Rigorous upper bounds on the operator 2-norms (Lipschitz constants) of a target's layers.

The norm-propagating certificate (:mod:`onlynorm.certify.cnn`) bounds ``‖ĝ − g‖₂`` layer by layer as
``‖W‖₂ · (error in) + (local error)``; the interval certificate's ``|W| · err`` instead multiplies by the
*absolute* kernel, whose norm exceeds ``‖W‖₂`` by up to the square root of the fan-in per layer — ×10 per
residual block of a ResNet. Everything here is an upper bound proven in floating point:

* **A convolution** with zero padding ``p`` on an ``H × W`` input equals a *circular* convolution on an
  ``(H + p_h) × (W + p_w)`` grid, restricted to the output positions (the zero region absorbs the wrap-around;
  the embedding is an isometry and the restriction and any stride a projection), so its norm is at most the
  circular one's: ``max_ω ‖K̂(ω)‖₂`` over the grid's frequencies, ``K̂(ω) = Σ_{taps} K[:, :, a, b] e^{iθ}``
  (Sedghi, Gupta & Long, *The singular values of convolutional layers*, 2019). The twiddles ``e^{iθ}`` come from
  interval arithmetic (mpmath's ``iv``, 80 bits): their float64 values carry a proven error, not a libm promise.
* **A matrix** (a Linear layer, or one frequency's ``c_out × c_in`` block written as the real ``2c_out × 2c_in``
  matrix ``[[Re, −Im], [Im, Re]]``, which has the same singular values): ``σ_max(M)² = ρ(MᵀM)`` and for every
  ``k``, ``ρ(G)^k ≤ ‖G^k‖_∞`` — so ``G = MᵀM`` is squared ``J`` times (rescaled by exact powers of two) with an
  elementwise bound on every rounding carried along, and ``σ_max ≤ (‖G^{2^J}‖_∞)^{1/2^{J+1}}``; the bound exceeds
  the true norm by at most ``q^{1/2^{J+2}}`` (``q`` the Gram matrix's size: 0.5 % for ``q = 128``, ``J = 8``).
* **Non-negative error kernels** (``|Ŵ − W|``): Schur's test ``‖T‖₂ ≤ √(‖T‖₁ ‖T‖_∞)`` — the largest row and
  column sums, which the kernel's sums bound for every stride and padding.
* **Pooling**: average pooling is linear with non-negative weights (Schur again, with its exact row and column
  sums); max pooling is ``√c``-Lipschitz in the 2-norm, ``c`` the largest number of windows an input lies in.

>>> import torch
>>> W = torch.tensor([[3.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
>>> 3.0 <= matrix_norm_bound(W) < 3.0 * (1 + 1e-2)
True
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from mpmath import iv

from .core import U64, gamma_n

__all__ = [
    "SQUARINGS",
    "matrix_norm_bound",
    "spectral_bounds",
    "conv_norm_bound",
    "schur_bound",
    "pool_lipschitz",
    "norm_up",
    "LayerNorms",
]

#: squarings of the Gram matrix: the bound exceeds σ_max by at most q^(1/2^(J+2)) (0.5 % at q = 128)
SQUARINGS = 8
#: frequencies per batch of the conv bound (keeps the batched Gram matrices to about 256 MiB)
_BATCH_BYTES = 1 << 28


def _up(t: torch.Tensor, n: int) -> torch.Tensor:
    """A float64 sum of ``n`` non-negative terms, widened so that it bounds the exact sum."""
    return t * (1 + 2 * gamma_n(n + 2, U64))


def norm_up(v: torch.Tensor) -> float:
    """An upper bound on the 2-norm of ``v`` (its float64 evaluation widened by its own rounding)."""
    if v.numel() == 0:
        return 0.0
    s = float((v.double() ** 2).sum())
    if not math.isfinite(s):
        return float("inf")
    return math.sqrt(s * (1 + 2 * gamma_n(v.numel() + 2, U64))) * (1 + 4 * U64)


def spectral_bounds(M: torch.Tensor, E: torch.Tensor | None = None, squarings: int = SQUARINGS) -> torch.Tensor:
    """Per matrix of the batch ``M`` (``(..., p, q)``, float64), an upper bound on ``σ_max`` of every matrix within
    ``E`` of it entrywise (``|M_true − M| ≤ E``; ``None``: ``M`` is exact).

    ``G = MᵀM`` (or ``MMᵀ``, the smaller) is squared ``squarings`` times with exact power-of-two rescaling; the
    invariant ``|G^{2^j} 2^{−s_j} − S_j| ≤ E_j`` is kept with ``E_{j+1} = |S|E + E|S| + E² + γ_q |S|²`` (plus an
    underflow allowance), and ``σ_max² = ρ(G) ≤ (2^{s_J} ‖|S_J| + E_J‖_∞)^{1/2^J}``."""
    M = M.double()
    E = torch.zeros_like(M) if E is None else E.double()
    if M.shape[-2] < M.shape[-1]:
        M, E = M.transpose(-1, -2), E.transpose(-1, -2)
    p, q = M.shape[-2], M.shape[-1]
    A = M.abs()
    S = M.transpose(-1, -2) @ M
    ES = _up(A.transpose(-1, -2) @ E + E.transpose(-1, -2) @ A + E.transpose(-1, -2) @ E, 3 * p)
    ES = ES + _up(gamma_n(p + 1, U64) * (A.transpose(-1, -2) @ A), p)
    tiny = torch.finfo(torch.float64).tiny
    s = torch.zeros(M.shape[:-2], dtype=torch.float64)
    for _ in range(squarings):
        peak = (S.abs() + ES).amax(dim=(-2, -1))
        _, e = torch.frexp(peak.clamp(min=tiny))
        e = torch.where(peak > 0, e, torch.zeros_like(e))
        scale = torch.ldexp(torch.ones_like(peak), -e)[..., None, None]  # an exact power of two
        S, ES = S * scale, ES * scale
        s = s + e.double()
        aS = S.abs()
        cross = aS @ ES
        ES_next = cross + cross.transpose(-1, -2) + ES @ ES + gamma_n(q + 1, U64) * (aS @ aS)
        S = S @ S
        ES = _up(ES_next, 4 * q) + 4 * q * tiny  # products that underflow lose at most `tiny` each
        s = 2 * s
    rows = _up((S.abs() + ES).sum(dim=-1), q).amax(dim=-1)
    log2_rho = (torch.log2(rows) + s) / 2**squarings
    bound = torch.exp2(log2_rho / 2) * (1 + 1e-12)  # log2/exp2 are accurate to a few ulp of an O(1) exponent
    bound = torch.where(rows > 0, bound, torch.zeros_like(bound))
    return torch.where(torch.isfinite(bound), bound, torch.full_like(bound, float("inf")))


def matrix_norm_bound(W: torch.Tensor, E: torch.Tensor | None = None) -> float:
    """An upper bound on ``‖W‖₂`` (``W`` a matrix; ``E`` an entrywise error bound on it, if any)."""
    if W.numel() == 0:
        return 0.0
    return float(spectral_bounds(W.double()[None], None if E is None else E.double()[None])[0])


@functools.lru_cache(maxsize=64)
def _twiddles(n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``cos, sin`` of ``2π r / n`` (``r = 0 … n−1``) in float64 and a proven bound on their error (mpmath's
    interval arithmetic at 80 bits contains the true values; the bound is the distance to the interval's far end)."""
    iv.prec = 80
    cos: list[float] = []
    sin: list[float] = []
    err = 0.0
    for r in range(n):
        theta = 2 * iv.pi * iv.mpf(r) / n
        for out, x in ((cos, iv.cos(theta)), (sin, iv.sin(theta))):
            mid = float(x.mid)
            out.append(mid)
            err = max(err, float(abs(x.a - mid)), float(abs(x.b - mid)))
    err = err * (1 + 1e-6) + 1e-300
    return torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64), err


def conv_norm_bound(
    weight: torch.Tensor,
    in_hw: tuple[int, int],
    padding,
    dilation=(1, 1),
    stride=(1, 1),
    error=None,
    *,
    coarse: bool = False,
) -> float:
    """An upper bound on the operator 2-norm of ``conv2d(·, weight, stride, padding, dilation)`` (zero padding) on
    inputs of spatial size ``in_hw``: the circular convolution's ``max_ω ‖K̂(ω)‖₂`` on the
    ``(H + p_h) × (W + p_w)`` grid (module docstring), each frequency bounded by :func:`spectral_bounds`.

    A strided convolution (without dilation) is first written as its polyphase form — a stride-1 *valid*
    convolution with ``c_in·s_h·s_w`` input channels on the ``⌈(H + 2p)/s⌉`` grid of the padded input's phases
    (``y = Σ_φ K_φ * x_φ``): the stride is then exploited instead of bounded by the stride-1 operator's norm.
    ``error``: an entrywise bound on ``|K_true − weight|`` (the bound then holds for every kernel within it);
    ``coarse``: 3 squarings only (at most ``q^{1/32}`` above the norm), for small terms where that is enough."""
    weight = weight.detach().double().cpu()
    error = torch.zeros_like(weight) if error is None else error.detach().double().cpu()
    sh_, sw_ = int(stride[0]), int(stride[1])
    if (sh_, sw_) != (1, 1) and tuple(int(d) for d in dilation) == (1, 1):
        error, _, _ = _polyphase(error, in_hw, padding, (sh_, sw_))
        weight, in_hw, padding = _polyphase(weight, in_hw, padding, (sh_, sw_))
    grid = (in_hw[0] + int(padding[0]), in_hw[1] + int(padding[1]))
    return _circular_norm_bound(weight, error, grid, dilation, coarse)


def _polyphase(weight: torch.Tensor, in_hw, padding, stride) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """``K'[o, (i, φ_h, φ_w), a', b'] = K[o, i, a' s_h + φ_h, b' s_w + φ_w]`` (zero beyond the kernel) and the
    phase grid ``⌈(H + 2p)/s⌉`` with no padding: ``conv(x, K, s, p) = conv(phases(pad(x)), K', 1, 0)``, and the
    zero padding is an isometric embedding, so the second operator's norm bounds the first's."""
    c_out, c_in, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, (int(padding[0]), int(padding[1]))
    kh2, kw2 = -(-kh // sh), -(-kw // sw)
    K = torch.zeros(c_out, c_in, kh2 * sh, kw2 * sw, dtype=weight.dtype)
    K[:, :, :kh, :kw] = weight
    K = K.reshape(c_out, c_in, kh2, sh, kw2, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * sh * sw, kh2, kw2)
    grid = (-(-(in_hw[0] + 2 * ph) // sh), -(-(in_hw[1] + 2 * pw) // sw))
    return K, grid, (0, 0)


def _circular_norm_bound(weight: torch.Tensor, error: torch.Tensor, grid: tuple[int, int], dilation, coarse) -> float:
    """``max_ω`` of the bound on ``‖K̂(ω)‖₂`` over the frequencies of the circular convolution on ``grid``."""
    c_out, c_in, kh, kw = weight.shape
    nh, nw = grid
    ch, sh, dh = _twiddles(nh)
    cw, sw, dw = _twiddles(nw)
    taps = kh * kw
    # twiddle of tap (a, b) at frequency (u, v): e^{2πi(a·d_h·u/n_h + b·d_w·v/n_w)}, a product of two 1-D ones
    ia = (torch.arange(kh)[:, None] * int(dilation[0]) * torch.arange(nh)[None]) % nh  # (kh, nh)
    ib = (torch.arange(kw)[:, None] * int(dilation[1]) * torch.arange(nw)[None]) % nw  # (kw, nw)
    # each component of the product of two unit-modulus numbers known within dh, dw (and rounded once)
    dz = dh + dw + dh * dw + gamma_n(2, U64) * (1 + dh) * (1 + dw)
    K = weight.reshape(c_out, c_in, taps)
    # |K̂_true − K̂| ≤ Σ_taps |K| (dz + γ_taps (1 + dz)) + Σ_taps |ΔK| (1 + dz): the same for every frequency
    E_blk = _up(K.abs().sum(-1) * (dz + gamma_n(taps + 1, U64) * (1 + dz)), taps)
    E_blk = _up(E_blk + error.reshape(c_out, c_in, taps).sum(-1) * (1 + dz), taps + 1)
    E_real = torch.cat([torch.cat([E_blk, E_blk], 1), torch.cat([E_blk, E_blk], 1)], 0)
    per = max(1, _BATCH_BYTES // max(1, 8 * 8 * (2 * c_out) * (2 * c_in) + 8 * 4 * min(c_out, c_in) ** 2 * 4))
    best = 0.0
    # a real kernel has K̂(−ω) = conj K̂(ω), of the same singular values: half of the frequencies suffice
    freqs = [(u, v) for u in range(nh) for v in range(nw) if (u, v) <= ((-u) % nh, (-v) % nw)]
    for start in range(0, len(freqs), per):
        chunk = freqs[start : start + per]
        u = torch.tensor([f[0] for f in chunk])
        v = torch.tensor([f[1] for f in chunk])
        ca, sa = ch[ia[:, u]], sh[ia[:, u]]  # (kh, F)
        cb, sb = cw[ib[:, v]], sw[ib[:, v]]  # (kw, F)
        re = (ca[:, None] * cb[None] - sa[:, None] * sb[None]).reshape(taps, -1)  # (taps, F)
        im = (sa[:, None] * cb[None] + ca[:, None] * sb[None]).reshape(taps, -1)
        Kre = torch.einsum("oit,tf->foi", K, re)
        Kim = torch.einsum("oit,tf->foi", K, im)
        M = torch.cat([torch.cat([Kre, -Kim], 2), torch.cat([Kim, Kre], 2)], 1)
        E = E_real.expand_as(M)
        best = max(best, float(spectral_bounds(M, E, 3).max()) if coarse else _max_refined(M, E, best))
    return best


def _max_refined(M: torch.Tensor, E: torch.Tensor, floor: float) -> float:
    """``max`` over the batch of the fine bound (:data:`SQUARINGS`), computed only where a coarse one (3
    squarings: at most ``q^{1/32}`` above the norm) exceeds the best fine bound so far — every frequency is
    bounded, most of them cheaply."""
    coarse = spectral_bounds(M, E, 3)
    order = torch.argsort(coarse, descending=True)
    best = floor
    for start in range(0, order.numel(), 8):
        idx = order[start : start + 8]
        idx = idx[coarse[idx] > best]
        if idx.numel() == 0:
            break  # sorted: every remaining coarse bound is below the best fine one
        best = max(best, float(spectral_bounds(M[idx], E[idx]).max()))
    return best


def schur_bound(abs_kernel: torch.Tensor) -> float:
    """``√(max row sum · max column sum)`` of the operator of a non-negative kernel (a conv kernel
    ``(c_out, c_in, kh, kw)`` or a matrix): a bound on its 2-norm for every stride and zero padding (each tap
    links an input to at most one output)."""
    K = abs_kernel.detach().double().cpu()
    if K.numel() == 0:
        return 0.0
    dims_row = tuple(range(1, K.dim()))
    dims_col = (0,) + tuple(range(2, K.dim()))
    row = float(_up(K.sum(dim=dims_row), K[0].numel()).max())
    col = float(_up(K.sum(dim=dims_col), K.numel() // K.shape[1]).max())
    return math.sqrt(row * col) * (1 + 4 * U64)


def pool_lipschitz(layer, shape: tuple[int, ...]) -> float:
    """A bound on the 2-norm Lipschitz constant of a pooling layer on inputs of ``shape`` (``(c, H, W)``):
    average pooling by Schur's test on its exact weights, max pooling ``√c_max`` (``c_max`` windows per input)."""
    x = torch.ones((1, *shape), dtype=torch.float64, requires_grad=True)
    if layer.mode == "avg":
        y = F.avg_pool2d(x, layer.kernel, layer.stride, layer.padding, count_include_pad=layer.count_include_pad)
        (col,) = torch.autograd.grad(y.sum(), x)
        row = float(y.detach().max())  # the weights are positive: P·1 is the row sums
        return math.sqrt(row * float(col.max())) * (1 + 1e-12)
    y = F.avg_pool2d(x, layer.kernel, layer.stride, layer.padding, count_include_pad=True, divisor_override=1)
    (count,) = torch.autograd.grad(y.sum(), x)  # windows each input lies in (padding never wins a max)
    return math.sqrt(float(count.max())) * (1 + 1e-12)


class LayerNorms:
    """``‖W‖₂`` bounds of a target's layers, each computed once per input size (a certificate walks a layer once,
    but a test or a benchmark may certify several networks for one target)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, tuple[int, ...]], tuple[object, float]] = {}

    def layer(self, layer, in_hw: tuple[int, ...]) -> float:
        """A bound on the 2-norm of the target layer ``layer`` (a typed Conv or Linear) on inputs of ``in_hw``."""
        key = (id(layer), tuple(in_hw) if layer.type == "conv" else ())
        hit = self._cache.get(key)
        if hit is not None and hit[0] is layer:
            return hit[1]
        if layer.type == "conv":
            value = conv_norm_bound(
                layer.weight, (int(in_hw[0]), int(in_hw[1])), layer.padding, layer.dilation, layer.stride
            )
        else:
            value = matrix_norm_bound(layer.weight)
        self._cache[key] = (layer, value)
        return value

    def difference(self, layer, in_hw: tuple[int, ...], W_hat: torch.Tensor, W_err: torch.Tensor) -> float:
        """A bound on ``‖Ŵ − W‖₂`` for every realised ``Ŵ`` within ``W_err`` of ``W_hat`` (``(c_out, K)``): the
        smaller of Schur's test on the entrywise bound and the operator norm of the computed difference."""
        W = layer.weight.double().reshape(W_hat.shape)
        D = W_hat - W
        E = (W_err + U64 * D.abs()) * (1 + 2 * U64)  # the subtraction rounds once
        schur = schur_bound((D.abs() + E).reshape(layer.weight.shape))
        if layer.type == "conv":
            shape = layer.weight.shape
            spectral = conv_norm_bound(
                D.reshape(shape),
                (int(in_hw[0]), int(in_hw[1])),
                layer.padding,
                layer.dilation,
                layer.stride,
                error=E.reshape(shape),
                coarse=True,  # a term ~1e-12 of the layer's: 16 % slack at most, at 3/8 of the cost
            )
        else:
            spectral = matrix_norm_bound(D, E)
        return min(schur, spectral)
