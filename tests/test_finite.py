"""``all_finite`` against the boolean reference ``torch.isfinite(t).all()``: every dtype, layout and position."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onlynorm.finite import all_finite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    where=st.integers(0, 10**6),
    transpose=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_all_finite_agrees_with_the_boolean_reference(shape, dtype, bad, where, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    if bad is not None and t.numel():
        t.view(-1)[where % t.numel()] = bad
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)  # a non-contiguous view reads the same values
    assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(t) == (bad is None or t.numel() == 0)


def test_integer_boolean_and_grad_tensors():
    assert all_finite(torch.tensor([1, 2, 3]))
    assert all_finite(torch.tensor([True, False]))
    w = torch.tensor([1.0, float("nan")], requires_grad=True)
    assert not all_finite(w)
    assert all_finite(
        torch.tensor(torch.finfo(torch.float64).max, dtype=torch.float64)
    )  # the largest finite value is finite
