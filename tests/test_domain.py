"""Box validation and sampling; interval bound propagation is sound and exact for one affine layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onlynorm import Box, InvalidDomainError, MLPSpec
from onlynorm.domain import affine_bounds, interval_bounds, resolve_domain

from .conftest import random_mlp


def test_scalar_box_expands_to_target_dimension():
    box = resolve_domain(Box(0.0, 5.0), 3)
    assert box.dim == 3 and torch.equal(box.low, torch.zeros(3, dtype=torch.float64))
    assert resolve_domain(None, 2).to_dict() == {"low": [-1.0, -1.0], "high": [1.0, 1.0]}
    assert resolve_domain((0, 1), 2).dim == 2


@pytest.mark.parametrize(
    "low, high, message",
    [
        (1.0, 1.0, "expected low < high"),
        (2.0, 1.0, "expected low < high"),
        ([0.0, 1.0], [1.0, 1.0], r"coordinate 1"),
        (float("nan"), 1.0, "finite"),
        (0.0, float("inf"), "finite"),
        ([0.0, 0.0], [1.0, 1.0, 1.0], "disagree on the dimension"),
        ([], [], "non-empty"),
    ],
)
def test_bad_boxes_are_refused(low, high, message):
    with pytest.raises(InvalidDomainError, match=message):
        Box(low, high)


def test_wrong_dimension_is_refused():
    with pytest.raises(InvalidDomainError, match="expected a box of dimension 4.*found dimension 3"):
        resolve_domain(Box([0, 0, 0], [1, 1, 1]), 4)


def test_samples_lie_in_the_box_and_hit_faces_and_vertices():
    box = Box([0.0, -2.0, 10.0], [5.0, -1.0, 11.0])
    x = box.sample(4000, seed=3)
    assert x.shape == (4000, 3) and bool(box.contains(x).all())
    on_vertex = ((x == box.low) | (x == box.high)).all(dim=1)
    assert int(on_vertex.sum()) >= 1000
    assert torch.equal(x, box.sample(4000, seed=3))
    assert not torch.equal(x, box.sample(4000, seed=4))


@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 1000))
def test_affine_bounds_are_attained_at_vertices(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    b = torch.randn(m, generator=gen, dtype=torch.float64)
    lo = torch.randn(n, generator=gen, dtype=torch.float64)
    hi = lo + torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    zmin, zmax = affine_bounds(W, lo, hi, b)
    # brute force over all vertices of the box
    corners = torch.cartesian_prod(*[torch.stack([lo[j], hi[j]]) for j in range(n)]).reshape(-1, n)
    z = corners @ W.T + b
    torch.testing.assert_close(zmin, z.min(dim=0).values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zmax, z.max(dim=0).values, rtol=1e-12, atol=1e-12)
    pmin, pmax = affine_bounds(W, lo, lo, b)  # a point box: one value, no rounding spread
    assert torch.equal(pmin, pmax)
    torch.testing.assert_close(pmin, W @ lo + b, rtol=1e-13, atol=1e-13)


def test_interval_bounds_contain_every_sampled_activation():
    spec = MLPSpec.from_module(random_mlp([4, 8, 8, 3], seed=5))
    box = Box(-0.5, 2.0, dim=4)
    boxes = interval_bounds(spec, box)
    assert len(boxes) == spec.depth + 1
    h = box.sample(5000, seed=0)
    for i, (w, b) in enumerate(zip(spec.weights, spec.biases)):
        lo, hi = boxes[i]
        assert bool(((h >= lo - 1e-12) & (h <= hi + 1e-12)).all())
        h = torch.nn.functional.linear(h, w, b)
        if i < spec.depth - 1:
            h = torch.relu(h)
    lo, hi = boxes[-1]
    assert bool(((h >= lo - 1e-12) & (h <= hi + 1e-12)).all())
