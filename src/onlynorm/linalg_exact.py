"""Error-free transformations: the product ``B diag(γ) A`` as if computed in twice float64's precision.

The constructions' realised weights ``Ŵ = B diag(γ) A`` are sums of ``N`` products that cancel: ``|B||γ||A|``
exceeds ``|Ŵ|`` by the Khatri–Rao cancellation factor (10²–10⁴ on a ResNet's layers). A float64 product then
carries an error ``~u·|B||γ||A|`` — so a float64 residual ``W − B diag(γ) A`` cannot see past it, and iterative
refinement driven by it stalls at a ``γ`` whose true error ``|Ŵ − W|`` is that large. Here every product is split
exactly (Dekker/Veltkamp ``TwoProduct``: ``a·b = p + e``) and the products' sum formed from error-free slices
(Ozaki's splitting: products of the slices are exact float64 GEMMs), so the result is an unevaluated sum
``hi + lo`` about 2⁻⁷⁵ of the row-by-column scale from the exact product, and the residual ``(W − hi) − lo`` is
accurate down to the rounding of ``γ`` itself: refinement on it (:mod:`onlynorm.linalg_refine`) reaches a ``γ``
whose realised weights are far closer to ``W`` than the float64 LU's. :func:`tree_sum` (a pairwise tree of
``TwoSum``, Ogita, Rump & Oishi, *Accurate sum and dot product*, 2005) serves the certificate's rigorous bounds.

Overflow and underflow are assumed not to occur (the splitter needs ``|a| < 2⁹⁹⁶``).

>>> import torch
>>> B, g = torch.ones(1, 1, 3, dtype=torch.float64), torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
>>> A = torch.tensor([[[1e16], [1.0], [1e16]]], dtype=torch.float64)   # 1e16 + 1 − 1e16 = 1
>>> float(B @ (g.unsqueeze(-1) * A))                                      # a plain product loses the 1
0.0
>>> hi, lo = compose_compensated(B, g, A)
>>> float(hi + lo)
1.0
"""

from __future__ import annotations

import torch

__all__ = [
    "two_sum",
    "two_product",
    "tree_sum",
    "CompensatedProduct",
    "compose_compensated",
    "compose_accurate",
    "residual_compensated",
]

_SPLIT = float(2**27 + 1)  # Veltkamp's splitter for float64 (two 26-bit halves)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s + e = a + b`` exactly, ``s = fl(a + b)`` (Knuth's branch-free TwoSum)."""
    s = a + b
    z = s - a
    return s, (a - (s - z)) + (b - z)


def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = _SPLIT * a
    hi = c - (c - a)
    return hi, a - hi


def two_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p + e = a·b`` exactly, ``p = fl(a·b)`` (Dekker's product with Veltkamp's split; no FMA needed)."""
    p = a * b
    a1, a2 = _split(a)
    b1, b2 = _split(b)
    return p, a2 * b2 - (((p - a1 * b1) - a2 * b1) - a1 * b2)


def tree_sum(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over the last dimension by a pairwise tree of :func:`two_sum`: ``(head, tail, tail_abs)`` with
    ``head + (exact sum of the rounding errors) = Σ terms`` exactly; ``tail`` is the float64 sum of those errors
    (``u``-small next to the terms) and ``tail_abs`` the sum of their magnitudes (for a bound on ``tail``'s own
    rounding: at most ``γ_n · tail_abs``, ``n`` the number of error terms, ``< 2·(last dimension)``)."""
    tail = torch.zeros(terms.shape[:-1], dtype=terms.dtype, device=terms.device)
    tail_abs = torch.zeros_like(tail)
    while terms.shape[-1] > 1:
        if terms.shape[-1] % 2:
            terms = torch.cat([terms, torch.zeros_like(terms[..., :1])], dim=-1)
        terms, err = two_sum(terms[..., 0::2], terms[..., 1::2])
        tail = tail + err.sum(dim=-1)
        tail_abs = tail_abs + err.abs().sum(dim=-1)
    head = terms[..., 0] if terms.shape[-1] else tail.clone()
    return head, tail, tail_abs


def _ozaki_split(X: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = hi + rest`` exactly, per row (the last dimension is the one summed over, of length ``n``): ``hi`` keeps
    the leading ``53 − β`` bits of the row's largest entry, ``β = ⌈(53 + log₂ n)/2⌉`` — so a product of two such
    slices summed over ``n`` terms is exact in float64 whatever the order (Ozaki, Ogita, Oishi & Rump, *Error-free
    transformations of matrix multiplication*, 2012): ``hi = fl(fl(X + σ) − σ)``, ``σ = 2^β · 2^⌈log₂ max|row|⌉``."""
    beta = (53 + max(1, int(n) - 1).bit_length() + 1) // 2
    peak = X.abs().amax(dim=-1, keepdim=True)
    _, e = torch.frexp(peak)  # peak < 2^e
    sigma = torch.where(peak > 0, torch.ldexp(torch.ones_like(peak), e + beta), torch.zeros_like(peak))
    hi = (X + sigma) - sigma
    return hi, X - hi


#: entries of ``B`` split at a time (a chunk and its slices stay in cache; no full-size copies of ``B``)
_CHUNK = 1 << 20


class CompensatedProduct:
    """``B diag(γ) A`` for a batch ``B`` (``(T, m, N)``, float64) and any ``γ`` (``(T, N)``), ``A``
    (``(T, N, k)``), as an unevaluated sum ``hi + lo`` within about ``2⁻⁷⁵ · N · max_n |B_in| · max_n |γ_n A_nj|``
    of the exact entry ``(i, j)`` (the slices are cut relative to a row's largest entry; measured ≤ 2⁻⁸⁰·N·… in
    ``tests/test_linalg_exact.py``, which asserts 2⁻⁷⁴).

    ``γA = P + E`` exactly (:func:`two_product`); ``B`` and ``P`` are each split into two error-free slices and a
    rest (:func:`_ozaki_split`). The three slice products ``B₁P₁, B₁P₂, B₂P₁`` are exact float64 GEMMs; the rest
    (``B₁P_r + B₂(P₂ + P_r) + B_r P + B E``) is ~2⁻²² of the row-by-column scale and carries float64's rounding
    on that. So the cost is a handful of GEMMs, not ``T·m·N`` scalar TwoProducts; ``B`` is split chunk by chunk over
    ``T`` (in cache, no full-size copies)."""

    def __init__(self, B: torch.Tensor):
        self.B, self.n = B, B.shape[-1]
        self.per = max(1, _CHUNK // max(1, B.shape[-2] * B.shape[-1]))

    def __call__(self, gamma: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        his, los = [], []
        for start in range(0, self.B.shape[0], self.per):
            part = slice(start, start + self.per)
            hi, lo = self._chunk(self.B[part], gamma[part], A[part])
            his.append(hi)
            los.append(lo)
        return torch.cat(his), torch.cat(los)

    def _chunk(self, B: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B1, rest = _ozaki_split(B, self.n)
        B2, Br = _ozaki_split(rest, self.n)
        P, E = two_product(gamma.unsqueeze(-1), A)  # (t, N, k): γA exactly
        P1, rest = _ozaki_split(P.transpose(-1, -2), self.n)  # per column of P: along the summed dimension
        P2, Pr = _ozaki_split(rest, self.n)
        P1, P2, Pr = P1.transpose(-1, -2), P2.transpose(-1, -2), Pr.transpose(-1, -2)
        hi = B1 @ P1
        lo = (B1 @ P2 + B2 @ P1) + (B1 @ Pr + B2 @ (P2 + Pr) + Br @ P + B @ E)
        return hi, lo


def compose_compensated(B: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hi + lo ≈ B diag(γ) A`` (batched: ``(T, m, N)``, ``(T, N)``, ``(T, N, k)`` → ``(T, m, k)`` twice), as if
    computed in about twice float64's precision (:class:`CompensatedProduct`)."""
    return CompensatedProduct(B)(gamma, A)


def compose_accurate(B: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``B diag(γ) A`` rounded once (``fl(hi + lo)``, within ``u|Ŵ|`` plus :class:`CompensatedProduct`'s error) for
    float64 data — what a solve record compares with ``W``, so that it reports the realised weights' error and not
    the ``u·|B||γ||A|`` of a plain product. Batched as :func:`compose_compensated`; unbatched ``(m, N)``, ``(N,)``,
    ``(N, k)`` too. Narrower dtypes are composed in float64 (their products are exact there)."""
    batched = B.dim() == 3
    if not batched:
        B, gamma, A = B.unsqueeze(0), gamma.unsqueeze(0), A.unsqueeze(0)
    B, gamma, A = B.double(), gamma.double(), A.double()
    hi, lo = compose_compensated(B, gamma, A)
    out = hi + lo
    return out if batched else out[0]


def residual_compensated(
    A: torch.Tensor, B: torch.Tensor | CompensatedProduct, gamma: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """``W − B diag(γ) A`` accurate to about ``u·|W − B diag(γ) A|`` plus :class:`CompensatedProduct`'s error (batched as
    :func:`compose_compensated`; pass a :class:`CompensatedProduct` to reuse ``B``'s split): ``W − hi`` is exact
    when ``hi`` is within a factor 2 of ``W`` (Sterbenz), so the only rounding left is that of subtracting ``lo``."""
    product = B if isinstance(B, CompensatedProduct) else CompensatedProduct(B)
    hi, lo = product(gamma, A)
    return (W - hi) - lo
