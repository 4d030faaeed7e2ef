"""The Levenberg–Marquardt step (geodesic acceleration against its closed form, the deadline inside a step), the
resampled layer-wise start and auto_config."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import onlynorm
from onlynorm import Box
from onlynorm.errors import InvalidOptionError
from onlynorm.fit.auto_config import auto_config, current
from onlynorm.fit.data import prepare_data
from onlynorm.fit.gauss_newton import fit_gauss_newton
from onlynorm.fit.jacobian import NormFunction
from onlynorm.fit.layerwise import fit_layerwise
from onlynorm.fit.lm_step import GEODESIC_ALPHA, LAMBDA_MAX, damped_step
from onlynorm.fit.restarts import SCREEN_MARGIN, fit_restarts
from onlynorm.targets.convert import as_target

from .conftest import random_mlp


def _quadratic(n: int, p: int, seed: int, curvature: float = 0.3):
    """``r(θ) = c + Aθ + ½ Q(θ, θ)``: its Jacobian ``A + Q(θ, ·)`` and second derivative ``Q(v, v)`` are exact."""
    gen = torch.Generator().manual_seed(seed)
    c, A = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, p, generator=gen, dtype=torch.float64)
    Q = curvature * torch.randn(n, p, p, generator=gen, dtype=torch.float64)
    Q = Q + Q.transpose(1, 2)

    def residual(th):
        return c + A @ th + 0.5 * torch.einsum("ipq,p,q->i", Q, th, th)

    def jacobian(th):
        return A + torch.einsum("ipq,q->ip", Q, th)

    return residual, jacobian, Q


@given(n=st.integers(3, 12), p=st.integers(1, 5), seed=st.integers(0, 10**6), lam=st.floats(1e-3, 10.0))
def test_geodesic_step_is_velocity_plus_half_the_acceleration(n, p, seed, lam):
    assume(n >= p)
    residual, jacobian, Q = _quadratic(n, p, seed)
    theta = 0.1 * torch.randn(p, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    r0, J = residual(theta), jacobian(theta)
    JtJ, g = J.T @ J, J.T @ r0
    # independently: the damped velocity, the exact second directional derivative, the acceleration
    M = JtJ + lam * torch.diag(JtJ.diagonal())
    v = torch.linalg.solve(M, -g)
    a = torch.linalg.solve(M, -(J.T @ torch.einsum("ipq,p,q->i", Q, v, v)))
    D = JtJ.diagonal()
    ratio = 2 * float(torch.sqrt((D * a * a).sum())) / float(torch.sqrt((D * v * v).sum()))
    expected = theta + v + 0.5 * a
    lowers = float(residual(expected).square().sum()) < float(r0 @ r0)
    assume(ratio < 0.9 * GEODESIC_ALPHA and lowers)  # the first try is accepted: compare it
    step = damped_step(residual, theta, float(r0 @ r0), JtJ, g, lam, jac=J, geodesic=True, res0=r0)
    assert step.accelerated and step.evaluations == 1
    torch.testing.assert_close(step.candidate, expected, rtol=1e-8, atol=1e-10)  # finite difference exact here


@given(seed=st.integers(0, 10**6), lam=st.floats(1e-4, 1e-2))
def test_geodesic_fallback_takes_the_plain_step_where_the_path_bends(seed, lam):
    residual, jacobian, Q = _quadratic(8, 3, seed, curvature=3.0)  # strongly curved: the acceleration test fails
    theta = torch.randn(3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    r0, J = residual(theta), jacobian(theta)
    JtJ, g = J.T @ J, J.T @ r0
    M = JtJ + lam * torch.diag(JtJ.diagonal())
    v = torch.linalg.solve(M, -g)
    a = torch.linalg.solve(M, -(J.T @ torch.einsum("ipq,p,q->i", Q, v, v)))
    D = JtJ.diagonal()
    ratio = 2 * float(torch.sqrt((D * a * a).sum())) / float(torch.sqrt((D * v * v).sum()))
    assume(ratio > 1.1 * GEODESIC_ALPHA and float(residual(theta + v).square().sum()) < float(r0 @ r0))
    loss = float(r0 @ r0)
    plain = damped_step(residual, theta, loss, JtJ, g, lam)
    back = damped_step(residual, theta, loss, JtJ, g, lam, jac=J, geodesic=True, res0=r0, fallback=True)
    assert not back.accelerated and back.evaluations == 1
    torch.testing.assert_close(back.candidate, plain.candidate)  # the plain Levenberg–Marquardt step
    torch.testing.assert_close(back.candidate, theta + v)
    strict = damped_step(residual, theta, loss, JtJ, g, lam, jac=J, geodesic=True, res0=r0)
    assert strict.evaluations >= 2 and strict.rejected >= 1  # strict Transtrum–Sethna damps more instead


def test_geodesic_needs_the_jacobian():
    residual, jacobian, _ = _quadratic(5, 2, 0)
    theta = torch.zeros(2, dtype=torch.float64)
    J = jacobian(theta)
    with pytest.raises(ValueError, match="needs the Jacobian"):
        damped_step(residual, theta, 1.0, J.T @ J, J.T @ residual(theta), 1e-3, geodesic=True)


def test_a_step_stops_its_retries_at_the_deadline():
    residual, jacobian, _ = _quadratic(6, 3, 1)
    theta = torch.zeros(3, dtype=torch.float64)
    J = jacobian(theta)
    JtJ, g = J.T @ J, J.T @ residual(theta)
    # loss = -1: no candidate can lower it, so without a deadline every λ up to LAMBDA_MAX is tried
    full = damped_step(residual, theta, -1.0, JtJ, g, 1e-3)
    assert full.candidate is None and not full.out_of_time and full.lam > LAMBDA_MAX and full.evaluations > 10
    late = damped_step(residual, theta, -1.0, JtJ, g, 1e-3, deadline=time.perf_counter() - 1.0)
    assert late.candidate is None and late.out_of_time and late.evaluations == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gauss_newton_with_geodesic_acceleration_lowers_the_error(dtype):
    g = random_mlp([3, 5, 2], seed=3)
    frozen = onlynorm.random_normnet(g, hidden=[4, 4], seed=0).to(dtype)
    spec = as_target(g).to(dtype=dtype)
    data = prepare_data(frozen, spec, Box(-1.0, 1.0), seed=0, train_samples=256, held_samples=128)
    net = frozen.clone()
    phase = fit_gauss_newton(net, data, spec=spec, max_iterations=30, geodesic=True)
    assert phase.details["geodesic"] and phase.details["accelerated"] >= 1
    assert phase.error_after < phase.error_before
    assert phase.error_after == pytest.approx(data.held_out_error(net), rel=1e-6)  # the network holds the result


def test_resampled_layerwise_starts_differ_and_fit():
    g = random_mlp([4, 6, 3], seed=2)
    frozen = onlynorm.random_normnet(g, hidden=[5, 5], seed=0)
    spec = as_target(g)
    data = prepare_data(frozen, spec, Box(-1.0, 1.0), seed=0, train_samples=256, held_samples=128)
    thetas, errors = [], []
    for seed in (1, 2):
        net = frozen.clone()
        phase = fit_layerwise(net, spec, data, resample=torch.Generator().manual_seed(seed))
        thetas.append(torch.cat([p.detach().reshape(-1) for p in net.norm_parameters()]))
        errors.append(phase.error_after)
    assert not torch.allclose(thetas[0], thetas[1])  # another half of the rows per layer: another start
    full = fit_layerwise(frozen.clone(), spec, data)
    assert max(errors) < full.error_before and full.error_after < full.error_before


def test_resampled_layerwise_is_exact_with_capacity():
    g = random_mlp([3, 4, 2], seed=1)
    frozen = onlynorm.random_normnet(g, seed=0)  # the theorem's width: any half of the rows determines γ, β
    spec = as_target(g)
    data = prepare_data(frozen, spec, Box(-1.0, 1.0), seed=0, train_samples=256, held_samples=128)
    phase = fit_layerwise(frozen.clone(), spec, data, resample=torch.Generator().manual_seed(0))
    assert phase.error_after < 1e-9


def test_auto_config_changes_a_block_and_refuses_unknown_fields():
    before = current()
    with auto_config(geodesic=not before.geodesic, starts=("resampled", "identity")) as cfg:
        assert current() is cfg and cfg.geodesic != before.geodesic and cfg.starts == ("resampled", "identity")
        g = random_mlp([3, 5, 2], seed=1)
        _, report = onlynorm.fit_norms(
            onlynorm.random_normnet(g, hidden=[3, 3], seed=0), g, Box(-1.0, 1.0), samples=128, budget_seconds=0.6
        )
        assert report.phase("gauss-newton").details["geodesic"] == cfg.geodesic
        runs = [r for p in report.phases if p.name == "restarts" for r in p.details["runs"]]
        assert {r["start"] for r in runs} <= {"resampled", "identity"}
    assert current() == before
    with pytest.raises(InvalidOptionError, match="expected fields"):
        with auto_config(nonsense=1):
            pass
    with pytest.raises(InvalidOptionError, match="starts must be"):
        with auto_config(starts=("teleport",)):
            pass


def test_screened_restarts_drop_only_the_runs_far_behind_the_best():
    g = random_mlp([4, 6, 3], seed=5)
    frozen = onlynorm.random_normnet(g, hidden=[4, 4], seed=1)
    with auto_config(screen_steps=3):
        _, report = onlynorm.fit_norms(frozen, g, Box(-1.0, 1.0), samples=256, budget_seconds=2.0)
    restarts = report.phase("restarts")
    runs = restarts.details["runs"]
    assert runs, "the budget leaves time for restarts"
    best = restarts.error_before
    for run in runs:
        if run["screened"]:  # stopped after the screening steps, behind the best then by more than the margin
            assert run["steps"] == 3 and run["error"] >= best * (1 + SCREEN_MARGIN)
        best = min(best, run["error"])
    assert restarts.error_after == pytest.approx(best)


@pytest.mark.parametrize(
    ("cycle", "expected"), [(("resampled", "identity"), {"identity"}), (("subsample", "resampled"), set())]
)
def test_short_time_replaces_a_layerwise_start_only_by_a_kind_of_the_configured_cycle(cycle, expected):
    """A layer-wise start the time left cannot hold gives way to the next cheap start of the user's cycle, never
    to a kind the cycle does not name; a cycle of layer-wise starts only then stops instead."""
    g = random_mlp([3, 5, 2], seed=1)
    net = onlynorm.random_normnet(g, hidden=[3, 3], seed=0)
    spec = as_target(g)
    data = prepare_data(net, spec, Box(-1.0, 1.0), seed=0, train_samples=128, held_samples=64)
    identity = NormFunction(net).vector().clone()
    with auto_config(starts=cycle):
        phase = fit_restarts(
            net, spec, data, identity=identity, deadline=time.perf_counter() + 0.5, run_seconds=0.01,
            step_seconds=0.001, layerwise_seconds=1e6, exact_tolerance=0.0, max_iterations=3,
        )  # fmt: skip
    starts = [r["start"] for r in phase.details["runs"]]
    assert set(starts) == expected  # every layer-wise start was too slow: the cycle's cheap start took its turns
    assert bool(starts) == bool(expected) and phase.details["stopped"] == "budget"
