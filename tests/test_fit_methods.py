"""fit_norms on tiny random networks: each method, auto, the held-out guarantee, budgets, bad data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import Box, InvalidDomainError, MemoryBudgetError, OnlyNormError, fit_norms
from onlynorm.fit.data import relative_rms
from onlynorm.fit.jacobian import NormFunction
from onlynorm.fit.layerwise import function_space_gamma

from .conftest import random_mlp


def _frozen_equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.frozen_parameters(), b.frozen_parameters()))


def test_layerwise_is_exact_where_the_network_has_capacity():
    g = random_mlp([3, 4, 2], seed=3)
    frozen = onlynorm.random_normnet(g, seed=1)
    net, report = fit_norms(frozen, g, Box(-1.0, 2.0), method="layerwise")
    assert report.final_error < 1e-9 and report.exact
    assert onlynorm.verify(net, g, domain=Box(-1.0, 2.0), samples=5000).max_rel_error < 1e-9
    assert _frozen_equal(net, frozen)
    assert not torch.equal(net.norm_parameters()[0], frozen.norm_parameters()[0])


def test_layerwise_is_exact_on_a_cnn_normnet():
    g = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    frozen = onlynorm.random_normnet(g, in_shape=(1, 4, 4), seed=0)
    net, report = fit_norms(frozen, g, Box(0.0, 1.0), method="layerwise", samples=512)
    assert report.final_error < 1e-9
    x = Box(0.0, 1.0, dim=16).sample(300, seed=5).reshape(-1, 1, 4, 4)
    assert relative_rms(net(x), g(x)) < 1e-9


def test_auto_uses_the_closed_form_at_full_width():
    g = random_mlp([4, 5, 3], seed=2)
    net, report = fit_norms(onlynorm.random_normnet(g, seed=0), g, Box(-1.0, 1.0))
    assert [p.name for p in report.phases] == ["exact"]
    assert report.final_error < 1e-9 and net.meta["solve"]["exact"]


def test_auto_below_the_width_improves_on_the_layerwise_start():
    g = random_mlp([4, 6, 3], seed=5)
    frozen = onlynorm.random_normnet(g, hidden=[4, 4], seed=1)
    net, report = fit_norms(frozen, g, Box(-1.0, 1.0), samples=256, steps=10)
    names = [p.name for p in report.phases]
    assert names == ["layerwise", "gauss-newton"]
    assert report.phase("gauss-newton").error_after < report.phase("layerwise").error_after
    assert report.phase("layerwise").error_after < report.initial_error
    assert _frozen_equal(net, frozen)


@pytest.mark.parametrize("start", ["identity", "layerwise"])
def test_gauss_newton_never_increases_the_held_out_error(start):
    g = random_mlp([3, 5, 2], seed=7)
    frozen = onlynorm.random_normnet(g, hidden=[3, 3], seed=2)
    if start == "layerwise":
        frozen, _ = fit_norms(frozen, g, Box(-1.0, 1.0), method="layerwise", samples=512)
    net, report = fit_norms(frozen, g, Box(-1.0, 1.0), method="gauss-newton", samples=256, steps=15)
    phase = report.phase("gauss-newton")
    assert phase.history[0] == pytest.approx(report.initial_error)
    assert all(b <= a for a, b in zip(phase.history, phase.history[1:]))
    assert phase.error_after <= phase.error_before
    assert phase.error_after == pytest.approx(relative_rms(net(_held(g, 256)), g(_held(g, 256))))


def _held(g, samples):  # the held-out points fit_norms draws from a box (seed 0)
    return Box(-1.0, 1.0, dim=g[0].in_features).sample(max(8, samples // 2), seed=7919)


def test_gauss_newton_goes_block_wise_within_a_small_memory_budget():
    g = random_mlp([3, 4, 2], seed=1)
    frozen = onlynorm.random_normnet(g, hidden=[4, 4], seed=0)
    budget = 60_000  # bytes: below the all-parameter Jacobian of 512 rows, above one layer's
    net, report = fit_norms(
        frozen, g, Box(-1.0, 1.0), method="gauss-newton", memory_budget=budget, samples=512, steps=6
    )
    phase = report.phase("gauss-newton")
    assert phase.details["layout"] == "block-wise" and phase.details["blocks"] == 2
    assert 0 < phase.details["largest_jacobian_bytes"] <= budget
    assert phase.error_after < phase.error_before
    with pytest.raises(MemoryBudgetError, match="budget"):
        fit_norms(frozen, g, Box(-1.0, 1.0), method="gauss-newton", memory_budget=100, samples=64)


def test_budget_stops_gauss_newton_and_adam_early():
    g = random_mlp([5, 8, 4], seed=4)
    frozen = onlynorm.random_normnet(g, hidden=[10, 10], seed=0)
    _, free = fit_norms(frozen, g, Box(-1.0, 1.0), method="adam", steps=20, samples=64)
    _, capped = fit_norms(frozen, g, Box(-1.0, 1.0), method="adam", steps=100_000, budget_seconds=0.05, samples=64)
    assert free.iterations == 20 and 0 < capped.iterations < 100_000
    _, capped_gn = fit_norms(frozen, g, Box(-1.0, 1.0), method="gauss-newton", budget_seconds=1e-6, samples=64)
    assert capped_gn.iterations <= 1


def test_exact_refuses_a_network_without_capacity():
    g = random_mlp([3, 4, 2], seed=0)
    with pytest.raises(OnlyNormError, match="cannot express"):
        fit_norms(onlynorm.random_normnet(g, hidden=[3, 3]), g, Box(-1.0, 1.0), method="exact")


@pytest.mark.parametrize(
    "data, match",
    [
        (torch.zeros(20, 4, dtype=torch.float64), "shape"),
        (torch.zeros(3, 3, dtype=torch.float64), "at least"),
        (torch.full((20, 3), float("nan"), dtype=torch.float64), "finite"),
        (torch.zeros(20, 3, dtype=torch.int64), "floating-point"),
        ([[0.0, 0.0, 0.0]] * 20, "Box to sample"),
    ],
)
def test_bad_data_is_refused_with_a_clear_message(data, match):
    g = random_mlp([3, 4, 2], seed=0)
    with pytest.raises(OnlyNormError, match=match) as info:
        fit_norms(onlynorm.random_normnet(g), g, data)
    assert "\n" not in str(info.value) and "expected" in str(info.value)


def test_bad_options_and_box_are_refused():
    g = random_mlp([3, 4, 2], seed=0)
    frozen = onlynorm.random_normnet(g)
    with pytest.raises(InvalidDomainError, match="dimension 3"):
        fit_norms(frozen, g, Box(-1.0, 1.0, dim=5))
    with pytest.raises(OnlyNormError, match="method"):
        fit_norms(frozen, g, Box(-1.0, 1.0), method="sgd")
    with pytest.raises(OnlyNormError, match="budget_seconds"):
        fit_norms(frozen, g, Box(-1.0, 1.0), budget_seconds=-1)
    with pytest.raises(OnlyNormError, match="NormNet"):
        fit_norms(g, g, Box(-1.0, 1.0))


def test_tensor_data_is_split_and_fitted():
    g = random_mlp([3, 6, 2], seed=9)
    x = torch.rand(400, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    net, report = fit_norms(onlynorm.random_normnet(g, hidden=[6, 6]), g, x, steps=5)
    assert report.held_out_samples == 80 and report.train_samples == 320
    assert report.final_error < report.initial_error


def test_function_space_gamma_solves_the_normal_equations():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    H = torch.randn(200, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
    T = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    Hc, Tc = H - H.mean(0), T - T.mean(0)
    S = Hc.T @ Hc
    G = (B.T @ B) * (A @ S @ A.T)  # G_jl = (b_jᵀ b_l)(a_jᵀ S a_l)
    r = torch.stack([B[:, j] @ (Tc.T @ (Hc @ A[j])) for j in range(5)])
    assert torch.allclose(function_space_gamma(A, B, H, T), torch.linalg.solve(G, r), atol=1e-10)


def test_forward_and_reverse_jacobians_agree_on_a_cnn():
    g = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).double()
    net = onlynorm.random_normnet(g, in_shape=(1, 4, 4), seed=0)
    fn = NormFunction(net)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J_f = fn.jacobian(fn.vector(), x, mode="forward")
    J_r = fn.jacobian(fn.vector(), x, mode="reverse")
    assert J_f.shape == (12, fn.size) and torch.allclose(J_f, J_r, atol=1e-12)
    # finite differences on one γ
    eps, k = 1e-6, 3
    theta = fn.vector()
    bump = theta.clone()
    bump[k] += eps
    with torch.no_grad():
        fd = (fn(bump, x) - fn(theta, x)).reshape(-1) / eps
    assert torch.allclose(J_f[:, k], fd, atol=1e-5)


def test_jacobian_scratch_estimate_counts_every_position_of_a_cnn():
    """The chunk size bounding the vmapped intermediates must count a conv stage's C·H·W outputs, not only its C
    channels (the old estimate, input + 4·widest·stages, was 64 + 4·8·7 = 288 floats here: ~20× too few, and a
    Jacobian of a 32-channel digits CNN took 0.5 GB above a 256 MB scratch budget)."""
    c = 8
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * 4 * 4, 3),
    ).double()
    net = onlynorm.with_norms(model, in_shape=(1, 8, 8))
    fn = NormFunction(net)
    x = torch.rand(10, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # stage outputs on one sample: conv+BN 8·8·8, ReLU 8·8·8, pool 8·4·4, conv+BN 8·4·4, ReLU, Flatten, linear 3
    outputs = 2 * c * 64 + 4 * c * 16 + 3
    assert fn.floats_per_sample(x) == 64 + 2 * outputs
    # chunking by the estimate changes nothing in the result: a scratch of one sample per chunk vs one chunk
    for mode in ("forward", "reverse"):
        tiny = fn.jacobian(fn.vector(), x, mode=mode, scratch_bytes=1)
        whole = fn.jacobian(fn.vector(), x, mode=mode, scratch_bytes=1 << 40)
        assert tiny.shape == (30, fn.size) and torch.allclose(tiny, whole, atol=1e-12)
