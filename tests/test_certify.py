"""Certified equivalence over the whole box: exact reconstructions certify, a switched-off unit does not."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import onlynorm
from onlynorm import Box
from onlynorm.domain import interval_bounds

from .conftest import random_mlp


@given(
    depth=st.integers(1, 3),
    width=st.integers(1, 8),
    seed=st.integers(0, 1000),
    low=st.floats(-3, 2),
    span=st.floats(0.1, 5),
)
def test_exact_reconstructions_certify_with_a_tiny_bound(depth, width, seed, low, span):
    dims = [width] * (depth + 1)
    g = random_mlp(dims, seed=seed)
    box = Box(low, low + span)
    f = onlynorm.reconstruct(g, domain=box, seed=seed)
    report = onlynorm.verify(f, g, domain=box, samples=2000, certify=True)
    assert report.certified is True
    out_scale = max(float(interval_bounds(onlynorm.MLPSpec.from_module(g), box.expand(width))[-1][1].abs().max()), 1.0)
    assert report.certified_bound <= 1e-10 * out_scale
    # the sampled error is consistent with the certificate plus floating-point evaluation
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound


def test_one_unit_switched_off_somewhere_in_the_box_is_not_certified():
    g = random_mlp([3, 4, 2], seed=5)
    box = Box(-1.0, 1.0, dim=3)
    f = onlynorm.reconstruct(g, domain=box)
    first = f.layers[0]
    A, gamma = first.linear.weight, first.norm.weight
    z = gamma.unsqueeze(1) * A
    zmin = z.clamp(min=0) @ box.low + z.clamp(max=0) @ box.high
    with torch.no_grad():  # unit 0 now dips just below zero at one vertex of the box
        first.norm.bias[0] = -zmin[0] - 1e-6
    report = onlynorm.verify(f, g, domain=box, samples=2000, certify=True)
    assert report.certified is False and report.certified_bound == float("inf")
    assert any("layer 0, stage 0: 1 unit(s) may switch off" in n for n in report.notes)


def test_certificate_is_only_for_the_box_it_was_built_for():
    g = random_mlp([3, 5, 2], seed=6)
    f = onlynorm.reconstruct(g, domain=Box(0.0, 1.0))
    assert onlynorm.verify(f, g, samples=500, certify=True).certified
    wider = onlynorm.verify(f, g, domain=Box(-3.0, 4.0), samples=5000, certify=True)
    assert wider.certified is False


def test_approximate_reconstruction_certifies_its_true_distance():
    g = random_mlp([3, 4, 2], seed=7)
    f = onlynorm.reconstruct(g, hidden=[6, 4])  # least squares: not exact
    report = onlynorm.verify(f, g, samples=20_000, certify=True)
    assert report.certified is True  # units stay active; the bound measures the LS error
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    assert report.certified_bound > 1e-6 and not report.passed
    assert report.outcome == "bounded" and report.proven is False  # a bound holds; equality is not claimed
    assert dict(report.rows())["outcome"] == "bounded"


def test_cli_verify_certify(tmp_path, capsys):
    from onlynorm.cli.app import main

    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=8)).save(tmp_path / "t.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "n.safetensors")])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(
            [
                "verify",
                str(tmp_path / "n.safetensors"),
                str(tmp_path / "t.safetensors"),
                "--certify",
                "--samples",
                "1000",
            ]
        )
    out = capsys.readouterr().out
    assert info.value.code == 0 and "a bound holds on the whole box" in out
    assert "outcome" in out and "exact" in out and "]^3" in out and "metadata" in out  # which box, and whence


def _trained_mlp(seed: int = 0, dims=(10, 20, 20, 3), steps: int = 200) -> torch.nn.Sequential:
    """An ordinarily trained float64 MLP (Adam on random data): weights without the structure of random ones."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n, m) in enumerate(zip(dims, dims[1:])):
        layers.append(torch.nn.Linear(n, m, dtype=torch.float64))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    g = torch.nn.Sequential(*layers)
    X = torch.rand(256, dims[0], dtype=torch.float64)
    Y = torch.randn(256, dims[-1], dtype=torch.float64)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(g(X), Y).backward()
        opt.step()
    return g.eval()


@pytest.mark.parametrize(
    "method, options",
    [("width", {}), ("deep", {}), ("lowrank", {"rank": [10, 20, 3]})],
    ids=["width", "deep", "lowrank"],
)
def test_flagship_trained_mlp_is_proven_exact_by_default(method, options):
    """an exact float64 reconstruction of a trained 10→20→20→3 MLP is proven (outcome exact, ok) with
    the default tolerances, and the report names the box and its source."""
    g = _trained_mlp()
    f = onlynorm.reconstruct(g, method=method, domain=Box(0.0, 1.0), seed=0, **options)
    report = onlynorm.verify(f, g, samples=5000, certify=True)
    assert report.outcome == "exact" and report.ok and report.failure() is None, report
    assert report.certified_bound <= report.tolerance * report.max_target_abs
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    assert report.box is not None and "[0, 1]^10" in report.box and "solved on" in report.box
    assert report.condition is not None and report.condition > 1


def test_builtin_demo_is_proven():
    from onlynorm.demos import builtin

    assert builtin.run(seed=0) is True  # it returns report.ok: sampled within tolerance and proven exact


def test_low_rank_below_the_rank_is_never_called_exact():
    """a rank-deficient reconstruction can be certified (a bound holds) but is 'bounded', never
    'exact'; capacity says the target is not exactly expressible."""
    g = random_mlp([6, 6, 2], seed=3)
    f = onlynorm.reconstruct(g, method="lowrank", rank=2, domain=Box(0.0, 1.0), seed=0)
    report = onlynorm.verify(f, g, samples=5000, certify=True)
    assert report.outcome in ("bounded", "not proven") and not report.ok and not report.proven
    cap = onlynorm.capacity(onlynorm.random_normnet(g, method="lowrank", rank=2, seed=0), g)
    assert not cap.expressible and cap.approximations and all(s.expressible for s in cap.systems)
    assert dict(cap.rows())["target"] == "NOT exactly expressible"


def test_compensated_products_are_bounded_against_exact_rationals():
    from fractions import Fraction

    import numpy as np

    from onlynorm.certify.core import XP, matmul_xp

    rng = np.random.default_rng(0)
    A = (rng.standard_normal((4, 200)) * 1e3).astype(XP)
    B = rng.standard_normal((200, 3)).astype(XP)
    B[100:] = -B[:100] * (1 + 1e-9)  # cancelling halves
    C, E = matmul_xp(A, B)
    for i, j in itertools.product(range(4), range(3)):
        exact = sum((Fraction(*a.as_integer_ratio()) * Fraction(*b.as_integer_ratio()) for a, b in zip(A[i], B[:, j])))
        assert abs(Fraction(*C[i, j].as_integer_ratio()) - exact) <= Fraction(*E[i, j].as_integer_ratio())
