"""The norm-propagating CNN certificate: its operator-norm bounds, its error-free compositions, and the bound it
proves on deep residual networks — each checked against an independent computation (dense operators and their
SVD, exact rational arithmetic, sampled errors)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm.certify.cnn import certify_conv
from onlynorm.certify.compose import compose, compose_vector
from onlynorm.certify.opnorm import SQUARINGS, conv_norm_bound, matrix_norm_bound, pool_lipschitz, spectral_bounds
from onlynorm.constructions.base import get_construction
from onlynorm.constructions.conv import cnn_target
from onlynorm.domain import resolve_domain
from onlynorm.targets.convert import as_target
from onlynorm.targets.layers import Pool

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sigma(M: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(M.double())[0])


def _dense_conv(weight: torch.Tensor, hw, stride, padding, dilation) -> torch.Tensor:
    """The convolution as an explicit matrix (columns: the operator applied to each basis image)."""
    c_in = weight.shape[1]
    n = c_in * hw[0] * hw[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *hw)
    return F.conv2d(basis, weight, None, stride, padding, dilation).reshape(n, -1).T


@SETTINGS
@given(
    p=st.integers(1, 12),
    q=st.integers(1, 12),
    scale=st.sampled_from([1e-150, 1e-3, 1.0, 1e5, 1e150]),
    seed=st.integers(0, 10**6),
)
def test_spectral_bound_is_an_upper_bound_within_its_stated_factor(p, q, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(p, q, generator=gen, dtype=torch.float64) * scale
    bound = matrix_norm_bound(M)
    sigma = _sigma(M)
    factor = min(p, q) ** (1 / 2 ** (SQUARINGS + 2))
    assert sigma * (1 - 1e-12) <= bound <= sigma * factor * (1 + 1e-9)


@SETTINGS
@given(p=st.integers(1, 8), q=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_spectral_bound_covers_every_matrix_within_the_error(p, q, seed):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(3, p, q, generator=gen, dtype=torch.float64)
    E = torch.rand(3, p, q, generator=gen, dtype=torch.float64) * 0.1
    bounds = spectral_bounds(M, E)
    for _ in range(20):  # sign patterns at the corners of the error box are where the norm grows most
        D = E * torch.sign(torch.randn(3, p, q, generator=gen, dtype=torch.float64))
        for b in range(3):
            assert _sigma(M[b] + D[b]) <= float(bounds[b])


@SETTINGS
@given(
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 4),
    k=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 10**6),
)
def test_conv_norm_bound_exceeds_the_dense_operators_norm(c_in, c_out, k, hw, stride, padding, dilation, seed):
    assume(hw[0] + 2 * padding >= dilation * (k - 1) + 1 and hw[1] + 2 * padding >= dilation * (k - 1) + 1)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64)
    sigma = _sigma(_dense_conv(w, hw, (stride,) * 2, (padding,) * 2, (dilation,) * 2))
    bound = conv_norm_bound(w, hw, (padding,) * 2, (dilation,) * 2, (stride,) * 2)
    assert sigma * (1 - 1e-12) <= bound
    # honest about tightness: never worse than Schur's test on |K| (what the interval bounds pay per layer)
    schur = (w.abs().sum(dim=(1, 2, 3)).max() * w.abs().sum(dim=(0, 2, 3)).max()).sqrt()
    assert bound <= float(schur) * (1 + 1e-6)


def test_conv_norm_bound_is_tight_on_a_large_image():
    """On a 24×24 image the circular embedding loses little: within 5 % of the dense operator's norm."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    sigma = _sigma(_dense_conv(w, (24, 24), (1, 1), (1, 1), (1, 1)))
    bound = conv_norm_bound(w, (24, 24), (1, 1))
    assert sigma <= bound <= 1.05 * sigma


@pytest.mark.parametrize(
    "layer",
    [
        Pool("avg", (2, 2), (2, 2)),
        Pool("avg", (3, 3), (1, 1), (1, 1), count_include_pad=False),
        Pool("avg", (3, 3), (2, 2), (1, 1), count_include_pad=True),
        Pool("max", (2, 2), (2, 2)),
        Pool("max", (3, 3), (1, 1), (1, 1)),
    ],
)
def test_pooling_lipschitz_bound(layer):
    shape = (2, 6, 6)
    lip = pool_lipschitz(layer, shape)
    if layer.mode == "avg":  # linear: its dense operator's norm
        n = 2 * 36
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        P = layer.forward(basis).reshape(n, -1).T
        assert _sigma(P) <= lip <= _sigma(P) * 1.5
    else:  # 1-Lipschitz per window: sampled ratios stay below, and a window-overlap case reaches above 1
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for _ in range(200):
            a, b = torch.randn(2, 1, *shape, generator=gen, dtype=torch.float64)
            worst = max(worst, float((layer.forward(a) - layer.forward(b)).norm() / (a - b).norm()))
        assert worst <= lip
        assert lip == pytest.approx(1.0 if layer.stride == (2, 2) else 3.0, rel=1e-9)


def _exact_product(B, g, A, i, j) -> Fraction:
    return sum(
        (Fraction(float(B[i, k])) * Fraction(float(g[k])) * Fraction(float(A[k, j])) for k in range(B.shape[1])),
        Fraction(0),
    )


@SETTINGS
@given(
    m=st.integers(1, 4),
    blocks=st.integers(1, 3),
    rows=st.integers(1, 5),
    cols=st.integers(1, 3),
    spread=st.sampled_from([1.0, 1e8]),
    seed=st.integers(0, 10**6),
)
def test_compose_is_bounded_against_exact_rationals(m, blocks, rows, cols, spread, seed):
    """Block-diagonal and dense kernels, with heavy cancellation (entries spread over 16 orders): the composed
    value is within its bound of the exact product, and the bound is relative to the result, not to |B||γ||A|."""
    gen = torch.Generator().manual_seed(seed)
    n, k = blocks * rows, blocks * cols
    A = torch.zeros(n, k, dtype=torch.float64)
    for t in range(blocks):
        A[t * rows : (t + 1) * rows, t * cols : (t + 1) * cols] = torch.randn(rows, cols, generator=gen).double()
    B = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64) * spread ** torch.rand(n, generator=gen).double()
    for kernel in (A, A + 1e-3):  # block-diagonal, then dense
        C, E = compose(B, g, kernel)
        for i in range(m):
            for j in range(k):
                exact = _exact_product(B, g, kernel, i, j)
                assert abs(Fraction(float(C[i, j])) - exact) <= Fraction(float(E[i, j]))
        majorant = (B.abs() * g.abs()) @ kernel.abs()
        assert bool((E <= 4 * 2**-53 * C.abs() + 1e-28 * majorant + 1e-290).all())
    v = torch.randn(n, generator=gen, dtype=torch.float64) * spread
    c, e = compose_vector(B, v)
    for i in range(m):
        exact = sum((Fraction(float(B[i, q])) * Fraction(float(v[q])) for q in range(n)), Fraction(0))
        assert abs(Fraction(float(c[i])) - exact) <= Fraction(float(e[i]))


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def _deep_resnet(blocks: int, c: int = 3) -> nn.Module:
    torch.manual_seed(blocks)
    layers = [nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), *[_Block(c) for _ in range(blocks)]]
    return nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(c * 9, 3)).double().eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_bounds_make_a_deep_residual_certificate_tight(dtype):
    """Six residual blocks: the interval bound grows ×(fan-in) per block, the norm-propagated one by the layers'
    2-norms. Both are proofs (the sampled error stays below each); with norms the bound is far smaller."""
    g = _deep_resnet(6)
    box = onlynorm.Box(0.0, 1.0)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(1, 6, 6), domain=box, seed=0, dtype=dtype)
    report = onlynorm.verify(f, g, samples=500, certify=True)
    assert report.certified and report.passed
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    spec = cnn_target(as_target(g, (1, 6, 6))).to(dtype=torch.float64)
    nodes = get_construction("conv_deep").matched(f, spec)[1]
    full = resolve_domain(box, spec.in_features)
    with_norms = certify_conv(f, spec, full, nodes)
    intervals = certify_conv(f, spec, full, nodes, norm_bounds=False)
    assert with_norms.certified and intervals.certified
    assert with_norms.bound == pytest.approx(report.certified_bound)
    assert with_norms.bound <= intervals.bound and with_norms.rounding_bound <= intervals.rounding_bound
    assert with_norms.bound * 10 < intervals.bound  # 27× measured at float64; grows per block


def test_norm_bounds_hold_on_a_tampered_but_certifiable_network():
    """A γ moved by 1e-6 after the solve: the network is certifiable but no longer exact; the certified distance
    must cover the sampled error (the bound is a proof about the stored parameters, not the intended ones)."""
    g = _deep_resnet(3)
    box = onlynorm.Box(0.0, 1.0)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(1, 6, 6), domain=box, seed=1)
    norm = next(m for m in f.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        norm.weight[0] += 1e-6
    report = onlynorm.verify(f, g, samples=2000, certify=True, tolerance=1.0)
    assert report.certified
    assert report.max_abs_error > 1e-9  # the edit is visible ...
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound  # ... and covered
