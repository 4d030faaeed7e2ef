"""Theorem 1: the width construction reproduces any ReLU MLP on its box, changing only γ and β."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import onlynorm
from onlynorm import Box, MLPSpec, NormLinear

from .conftest import random_mlp


def _independent_forward(net: onlynorm.NormNet, x: torch.Tensor) -> torch.Tensor:
    """Evaluate a width NormNet from its raw tensors: relu(γ ⊙ (x Aᵀ) + β) per stage, no BatchNorm module."""
    h = x
    for stage in net.layers:
        z = h @ stage.linear.weight.T * stage.norm.weight + stage.norm.bias
        h = torch.relu(z) if stage.relu else z
    return h


@st.composite
def targets_and_boxes(draw, max_width=6, max_depth=4):
    depth = draw(st.integers(1, max_depth))
    dims = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    n = dims[0]
    low = torch.tensor(draw(st.lists(st.floats(-5, 4, allow_nan=False), min_size=n, max_size=n)), dtype=torch.float64)
    span = torch.tensor(draw(st.lists(st.floats(0.01, 6), min_size=n, max_size=n)), dtype=torch.float64)
    return dims, Box(low, low + span), draw(st.integers(0, 2**16))


@given(targets_and_boxes())
def test_exact_on_random_rectangular_targets_and_boxes(case):
    dims, box, seed = case
    g = random_mlp(dims, seed=seed)
    f = onlynorm.reconstruct(g, domain=box, seed=seed)
    x = box.sample(2000, seed=seed)
    with torch.no_grad():
        gx, fx, fx_independent = g(x), f(x), _independent_forward(f, x)
    scale = max(float(gx.abs().max()), 1e-3)
    assert float((fx - gx).abs().max()) <= 1e-9 * scale
    # the module's forward and an independent evaluation from the raw tensors agree within the certified
    # floating-point evaluation bound (a large γ amplifies rounding, so a fixed 1e-12 would be wrong)
    rounding = onlynorm.verify(f, g, samples=1, certify=True).rounding_bound
    assert float((fx - fx_independent).abs().max()) <= 2 * rounding
    assert f.summary().exact is True


@pytest.mark.parametrize("dims", [pytest.param([32, 32, 32, 32, 32, 32, 32], marks=pytest.mark.heavy), [32, 16, 32, 8]])
def test_width_32_depth_6_on_1e5_samples_of_an_asymmetric_box(dims):
    g = random_mlp(dims, seed=7)
    box = Box(0.0, 5.0)
    f = onlynorm.reconstruct(g, domain=box, seed=1)
    report = onlynorm.verify(f, g, domain=box, samples=100_000, seed=2)
    assert report.max_rel_error <= 1e-9, report
    assert report.passed and report.samples == 100_000


def test_only_gamma_and_beta_change_bit_for_bit():
    g = random_mlp([5, 7, 4], seed=3)
    frozen = onlynorm.random_normnet(g, seed=11)
    solved = onlynorm.solve_norms(frozen, g, Box(-2.0, 3.0))
    norm_ids = {id(p) for p in solved.norm_parameters()}
    before, after = frozen.state_dict(), solved.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    norm_keys = {k for k, p in solved.named_parameters() if id(p) in norm_ids}
    assert changed and changed <= norm_keys  # γ and β of BatchNorm only
    for k in before.keys() - norm_keys:  # frozen weights and every buffer: bit-for-bit
        assert torch.equal(before[k], after[k]), k
    assert all(not p.requires_grad for p in solved.frozen_parameters())
    # the frozen input network was not modified in place
    assert all(torch.equal(p, torch.ones_like(p)) for p in frozen.norm_parameters()[0::2])


@pytest.mark.parametrize(
    "init",
    [
        lambda w, g: w.copy_(torch.distributions.Laplace(0.0, 1.0).sample(w.shape).to(w)),
        lambda w, g: w.uniform_(-1, 1, generator=g),
        lambda w, g: w.copy_(torch.distributions.StudentT(3.0).sample(w.shape).to(w)),
        lambda w, g: w.copy_(torch.rand(w.shape, generator=g, dtype=w.dtype) + 0.5),  # all positive
    ],
)
def test_user_reinitialised_frozen_weights(init):
    torch.manual_seed(0)
    g = random_mlp([4, 6, 3], seed=4)
    frozen = onlynorm.random_normnet(g, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for w in frozen.frozen_parameters():
            init(w, gen)
    solved = onlynorm.solve_norms(frozen, g)
    report = onlynorm.verify(solved, g, samples=5000)
    assert report.passed, report
    for a, b in zip(frozen.frozen_parameters(), solved.frozen_parameters()):
        assert torch.equal(a, b)


def test_hand_built_pretrained_network_without_meta_is_treated_as_width():
    g = random_mlp([3, 5, 2], seed=8)
    pretrained = random_mlp([3, 15, 5, 10, 2], seed=9)  # "pretrained" weights to reuse as frozen A, B
    linears = [m for m in pretrained if isinstance(m, torch.nn.Linear)]
    stages = [NormLinear(3, 15), NormLinear(15, 5), NormLinear(5, 10), NormLinear(10, 2, relu=False)]
    with torch.no_grad():
        for stage, lin in zip(stages, linears):
            stage.linear.weight.copy_(lin.weight)
    net = onlynorm.NormNet(stages)
    solved = onlynorm.solve_norms(net, g)
    assert solved.method == "width" and solved.summary().target_parameters == 3 * 5 + 5 + 5 * 2 + 2
    assert net.meta.method is None and net.meta.solve is None  # the caller's network is untouched
    assert onlynorm.verify(solved, g, samples=5000).passed


def test_frozen_network_of_the_wrong_shape_is_refused():
    g = random_mlp([3, 5, 2], seed=8)
    other = onlynorm.random_normnet(random_mlp([3, 4, 2]), seed=0)
    with pytest.raises(onlynorm.InvalidNetworkError, match=r"built for a target of dims \[3, 4, 2\].*\[3, 5, 2\]"):
        onlynorm.solve_norms(other, g)


def test_non_finite_frozen_weights_are_refused():
    g = random_mlp([3, 5, 2], seed=8)
    frozen = onlynorm.random_normnet(g)
    with torch.no_grad():
        frozen.layers[1].linear.weight[0, 0] = float("nan")
    with pytest.raises(onlynorm.InvalidNetworkError, match="NaN/Inf"):
        onlynorm.solve_norms(frozen, g)


def test_architecture_numbers():
    g = random_mlp([4, 6, 3], seed=1)
    f = onlynorm.reconstruct(g)
    s = f.summary()
    assert s.widths == [24, 6, 18, 3] and s.depth == 4
    assert s.frozen_parameters == 4 * 24 + 24 * 6 + 6 * 18 + 18 * 3
    assert s.tunable_parameters == 2 * (24 + 6 + 18 + 3)
    assert s.target_parameters == MLPSpec.from_module(g).num_parameters
    # Theorem 1 tunes exactly one γ per target weight in the first layer of each pair
    assert sum(st.norm.weight.numel() for st in f.layers[0::2]) == sum(
        w.numel() for w in MLPSpec.from_module(g).weights
    )


def test_float32_reconstruction_is_accurate_to_single_precision():
    g = random_mlp([4, 6, 3], seed=2)
    f = onlynorm.reconstruct(g, dtype=torch.float32)
    assert f.dtype == torch.float32
    report = onlynorm.verify(f, g, samples=5000)
    assert report.tolerance == 1e-4 and report.passed, report


def test_unknown_method_and_option_are_refused():
    g = random_mlp([2, 3, 1])
    with pytest.raises(onlynorm.OnlyNormError, match="method: expected one of .*found 'widht'"):
        onlynorm.reconstruct(g, method="widht")
    with pytest.raises(onlynorm.OnlyNormError, match=r"unknown option\(s\) \['rnak'\]"):
        onlynorm.reconstruct(g, rnak=3)
