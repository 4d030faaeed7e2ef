"""LayerNorm-only fitting of transformers: the chunked normal equations equal those of the whole ``jacfwd``
Jacobian (float32 and float64, any chunking), ``auto`` spends its budget without overrunning it, and no method
returns parameters worse on the held-out data than the ones it started from."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jacfwd

import onlynorm
from onlynorm.demos.transformer import DigitsTransformer
from onlynorm.fit.transformer import _layer_norm_names
from onlynorm.fit.transformer_jacobian import activation_bytes, chunk_plan, normal_equations


def _problem(dtype: torch.dtype, d: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = DigitsTransformer(d=d, heads=2, layers=1).to(dtype).eval()
    x = torch.rand(6, 8, 8, dtype=dtype)
    net = onlynorm.with_norms(model, example_input=x[:2])
    names = _layer_norm_names(net)
    params = dict(net.named_parameters())
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names]) + 0.1 * torch.randn(sum(sizes), dtype=dtype)

    def f(vec, *call):
        chunks = {n: c.reshape(params[n].shape) for n, c in zip(names, vec.split(sizes))}
        return functional_call(net, chunks, call)

    want = torch.randn(6, 10, dtype=dtype)
    return f, theta, x, want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=3, deadline=None)
@given(share=st.sampled_from([0.3, 1.0, 2.5]), split=st.integers(1, 5))
def test_chunked_normal_equations_equal_the_whole_jacobian(dtype, share, split):
    f, theta, x, want = _problem(dtype)
    jac = jacfwd(lambda v: (f(v, x) - want).reshape(-1))(theta).to(torch.float64)
    r = (f(theta, x) - want).reshape(-1).detach().to(torch.float64)
    row_bytes = activation_bytes(f, theta, (x,))
    # a chunk of a third of the tangents of one row, all tangents of one row, or all tangents of two rows
    cap = int(share * theta.numel()) * row_bytes
    pieces = [((x[:split],), want[:split]), ((x[split:],), want[split:])]
    eq = normal_equations(f, theta, pieces, max_bytes=cap, row_bytes=row_bytes)
    assert eq is not None and eq.chunks >= 2
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = float(jac.abs().max()) ** 2 * jac.shape[0]
    assert float((eq.jtj - jac.T @ jac).abs().max()) <= tol * scale
    assert float((eq.jtr - jac.T @ r).abs().max()) <= tol * scale
    assert eq.rr == pytest.approx(float(r @ r), rel=tol)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 300), params=st.integers(1, 700), row_bytes=st.integers(1, 10**6), cap=st.integers(1, 10**9))
def test_chunk_plan_stays_within_the_cap(rows, params, row_bytes, cap):
    n_rows, n_tan = chunk_plan(rows, params, row_bytes, cap)
    assert 1 <= n_rows <= rows and 1 <= n_tan <= params
    assert n_rows * n_tan * row_bytes <= max(cap, row_bytes)  # one (row, tangent) is the least a pass can do
    assert n_rows == 1 or n_tan == params


def test_a_passed_deadline_begins_no_chunk():
    f, theta, x, want = _problem(torch.float64)
    assert normal_equations(f, theta, [((x,), want)], deadline=time.perf_counter() - 1.0) is None


def _fit_case(dtype: torch.dtype):
    torch.manual_seed(3)
    base = DigitsTransformer(d=8, heads=2, layers=1).to(dtype).eval()
    target = DigitsTransformer(d=8, heads=2, layers=1).to(dtype).eval()  # unrelated: not reachable exactly
    x = torch.rand(48, 8, 8, dtype=dtype)
    return onlynorm.with_norms(base, example_input=x[:2]), target, [x[:32], x[32:]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auto_spends_its_budget_without_overrunning_it(dtype):
    net, target, data = _fit_case(dtype)
    onlynorm.fit_norms(net, target, data, method="auto", budget_seconds=0.5)  # torch's lazy imports of first use
    f, theta, x, want = _problem(dtype)
    normal_equations(f, theta, [((x[:1],), want[:1])])
    budget = 3.0  # the fixed costs (copy, targets, one row's Jacobian: ~0.3 s here) well inside it
    tic = time.perf_counter()
    _, report = onlynorm.fit_norms(net, target, data, method="auto", budget_seconds=budget)
    elapsed = time.perf_counter() - tic
    assert 0.9 * budget <= elapsed <= 1.05 * budget
    assert report.final_error < report.initial_error


@pytest.mark.parametrize("method", ["auto", "gauss-newton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_never_worse_than_the_start_on_held_out_data(method, dtype):
    net, target, data = _fit_case(dtype)
    held = data[-1]
    budget = 0.6 if method == "auto" else None
    fitted, report = onlynorm.fit_norms(net, target, data, method=method, budget_seconds=budget, steps=3)
    with torch.no_grad():
        want = target(held)
        start, end = (float((m(held) - want).norm() / want.norm()) for m in (net, fitted))
    assert end <= start
    assert report.final_error == pytest.approx(end, rel=1e-6) and report.initial_error == pytest.approx(start, rel=1e-6)
    frozen = [p.clone() for p in net.frozen_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, fitted.frozen_parameters()))
