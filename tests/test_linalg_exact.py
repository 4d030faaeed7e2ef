"""Error-free transformations and refinement on an accurate residual, checked against exact rational arithmetic.

Every reference here is computed with :class:`fractions.Fraction` from the float64 values themselves, so "exact"
means exact — no float64 reference that shares the rounding being tested.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from onlynorm.errors import SingularSystemError
from onlynorm.linalg import khatri_rao_system, solve_khatri_rao_batched, vec
from onlynorm.linalg_exact import _ozaki_split, compose_compensated, tree_sum, two_product, two_sum
from onlynorm.linalg_refine import BatchLU, accurate_residual, refine

U = Fraction(1, 2**53)
finite = st.floats(min_value=-1e150, max_value=1e150, allow_nan=False, allow_infinity=False)


def exact_entry(B, g, A, t, i, j) -> Fraction:
    """``(B_t diag(g_t) A_t)_ij`` in rationals."""
    return sum(
        (
            Fraction(B[t, i, n].item()) * Fraction(g[t, n].item()) * Fraction(A[t, n, j].item())
            for n in range(B.shape[2])
        ),
        Fraction(0),
    )


def wide_range(shape, spread, gen):
    """Normal entries times log-normal magnitudes: many binades at once, as a cancelling construction has."""
    return torch.randn(shape, dtype=torch.float64, generator=gen) * torch.exp(
        spread * torch.randn(shape, dtype=torch.float64, generator=gen)
    )


@given(finite, finite)
def test_two_sum_and_two_product_are_exact(a, b):
    assume(a == 0 or b == 0 or 1e-280 < abs(a * b) < 1e290)  # no overflow or underflow (of the error term too)
    ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    s, e = two_sum(ta, tb)
    assert Fraction(s.item()) + Fraction(e.item()) == Fraction(a) + Fraction(b)
    assert s.item() == a + b
    p, e = two_product(ta, tb)
    assert Fraction(p.item()) + Fraction(e.item()) == Fraction(a) * Fraction(b)
    assert p.item() == a * b


@given(st.lists(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False), min_size=0, max_size=40))
def test_tree_sum_keeps_every_rounding_error(values):
    terms = torch.tensor(values, dtype=torch.float64).reshape(1, -1)
    head, tail, tail_abs = tree_sum(terms)
    exact = sum((Fraction(v) for v in values), Fraction(0))
    # head + (the exact sum of the kept errors) is the exact sum; tail is that sum rounded, within γ_n · tail_abs
    n = 2 * max(1, len(values))
    slack = Fraction(n, 1) * U / (1 - n * U) * Fraction(tail_abs.item())
    assert abs(Fraction(head.item()) + Fraction(tail.item()) - exact) <= slack


@given(st.integers(1, 300), st.integers(0, 2**31 - 1), st.floats(0.0, 4.0))
def test_ozaki_split_is_exact_and_its_slices_multiply_exactly(n, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    X = wide_range((3, n), spread, gen)
    hi, rest = _ozaki_split(X, n)
    assert torch.equal(hi + rest, X)  # hi + rest is X exactly (the subtraction is exact: Sterbenz)
    for row in range(3):
        assert all(
            Fraction(h) + Fraction(r) == Fraction(x)
            for h, r, x in zip(hi[row].tolist(), rest[row].tolist(), X[row].tolist())
        )
    # a product of two first slices summed over n terms is exact in float64, in any order
    Y = wide_range((3, n), spread, gen)
    hy, _ = _ozaki_split(Y, n)
    product = hi @ hy.T
    for i in range(3):
        for j in range(3):
            exact = sum((Fraction(a) * Fraction(b) for a, b in zip(hi[i].tolist(), hy[j].tolist())), Fraction(0))
            assert Fraction(product[i, j].item()) == exact


@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 80),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 3.0),
    st.integers(-8, 8),
)
def test_compensated_product_is_within_its_stated_bound_of_the_exact_product(T, m, N, k, seed, spread, power):
    gen = torch.Generator().manual_seed(seed)
    B, A = wide_range((T, m, N), spread, gen), wide_range((T, N, k), spread, gen)
    g = wide_range((T, N), spread, gen) * 10.0**power
    hi, lo = compose_compensated(B, g, A)
    P = g.unsqueeze(-1) * A
    plain = B @ P
    for t in range(T):
        for i in range(m):
            for j in range(k):
                exact = exact_entry(B, g, A, t, i, j)
                scale = N * Fraction(B[t, i].abs().max().item()) * Fraction(P[t, :, j].abs().max().item())
                err = abs(Fraction(hi[t, i, j].item()) + Fraction(lo[t, i, j].item()) - exact)
                assert err <= Fraction(1, 2**74) * scale, (float(err), float(scale))
                # and it is never worse than the plain float64 product, beyond the last bit of the result
                assert err <= abs(Fraction(plain[t, i, j].item()) - exact) + U * abs(exact) + Fraction(1, 2**74) * scale


def test_compensated_product_recovers_what_cancellation_hides():
    # 1e16 + 1 − 1e16: a float64 product loses the 1; across chunk boundaries too (more blocks than one chunk holds)
    T = 3000
    B = torch.ones(T, 1, 3, dtype=torch.float64)
    g = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64).repeat(T, 1)
    A = torch.tensor([[1e16], [1.0], [1e16]], dtype=torch.float64).repeat(T, 1, 1)
    assert float((B @ (g.unsqueeze(-1) * A)).abs().max()) == 0.0
    hi, lo = compose_compensated(B, g, A)
    assert torch.equal(hi + lo, torch.ones(T, 1, 1, dtype=torch.float64))


def exact_residual_max(A, B, g, W) -> list[Fraction]:
    return [
        max(
            abs(Fraction(W[t, i, j].item()) - exact_entry(B, g, A, t, i, j))
            for i in range(B.shape[1])
            for j in range(A.shape[2])
        )
        for t in range(A.shape[0])
    ]


def exact_solution(A, B, W, t) -> list[Fraction]:
    """The exact γ of ``B_t diag(γ) A_t = W_t`` by Gaussian elimination over the rationals."""
    M = [[Fraction(v) for v in row] for row in khatri_rao_system(A[t : t + 1], B[t : t + 1])[0].tolist()]
    rhs = [Fraction(v) for v in vec(W[t : t + 1])[0].tolist()]
    n = len(M)
    for c in range(n):
        p = next(r for r in range(c, n) if M[r][c] != 0)
        M[c], M[p], rhs[c], rhs[p] = M[p], M[c], rhs[p], rhs[c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            if f:
                M[r] = [a - f * b for a, b in zip(M[r], M[c])]
                rhs[r] -= f * rhs[c]
    x = [Fraction(0)] * n
    for r in reversed(range(n)):
        x[r] = (rhs[r] - sum(M[r][c] * x[c] for c in range(r + 1, n))) / M[r][r]
    return x


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1), st.floats(0.0, 2.0))
def test_refinement_lands_at_the_rounding_of_the_exact_solution(T, m, k, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    N = m * k
    A, B = wide_range((T, N, k), spread, gen), wide_range((T, m, N), spread, gen)
    W = torch.randn(T, m, k, dtype=torch.float64, generator=gen)
    lu = BatchLU(khatri_rao_system(A, B))
    assume(bool((lu.rcond > 1e-8).all()))  # well-posed systems; singular ones are refused elsewhere
    lu_gamma = lu.solve(vec(W))
    gamma, reported, reported_norm = refine(A, B, W, lu_gamma, lu)
    before, after = exact_residual_max(A, B, lu_gamma, W), exact_residual_max(A, B, gamma, W)
    for t in range(T):
        assert after[t] <= before[t]  # a correction is kept only where it helps
        # the reported ‖r‖_F is that of the exact residual of the returned γ (a sum of squares of exact entries)
        squares = sum(
            (Fraction(W[t, i, j].item()) - exact_entry(B, gamma, A, t, i, j)) ** 2 for i in range(m) for j in range(k)
        )
        # every entry is within the compensated product's bound of the exact one, so the norm within √(m·k) of it
        entry_error = N * float(B[t].abs().max()) * float((gamma[t].unsqueeze(-1) * A[t]).abs().max()) * 2.0**-74
        exact_norm = float(squares) ** 0.5
        assert abs(reported_norm[t].item() - exact_norm) <= 8 * float(U) * exact_norm + (m * k) ** 0.5 * entry_error
        assert reported_norm[t] >= reported[t] * (1 - 1e-9)  # ‖r‖_F ≥ max |r|
        # the reported residual is the exact one, to the compensated product's accuracy
        scale = N * Fraction(B[t].abs().max().item()) * Fraction((gamma[t].unsqueeze(-1) * A[t]).abs().max().item())
        assert abs(Fraction(reported[t].item()) - after[t]) <= 8 * U * after[t] + Fraction(1, 2**74) * scale
        # and within a few roundings of γ* (the exact solution, rounded to float64)
        star = torch.tensor([float(x) for x in exact_solution(A, B, W, t)], dtype=torch.float64)
        rounded = exact_residual_max(A[t : t + 1], B[t : t + 1], star[None], W[t : t + 1])[0]
        majorant = max(float(v) for v in ((B[t].abs() * star.abs()) @ A[t].abs()).flatten())  # what one ulp of γ moves
        assert after[t] <= 4 * rounded + 4 * N * U * Fraction(majorant)


def test_refinement_beats_the_plain_lu_on_cancelling_systems():
    # a construction's system (Gaussian A, B/√N, a target block W): |B||γ||A| is ~20× |W|, and the plain LU's
    # realised weights are off by u·|B||γ||A| — the refined ones by the rounding of γ
    gen = torch.Generator().manual_seed(0)
    T, m, k = 2, 8, 8
    N = m * k
    A = torch.randn(T, N, k, dtype=torch.float64, generator=gen)
    B = torch.randn(T, m, N, dtype=torch.float64, generator=gen) / N**0.5
    W = torch.randn(T, m, k, dtype=torch.float64, generator=gen)
    lu = BatchLU(khatri_rao_system(A, B))
    lu_gamma = lu.solve(vec(W))
    gamma, _, _ = refine(A, B, W, lu_gamma, lu)
    before, after = exact_residual_max(A, B, lu_gamma, W), exact_residual_max(A, B, gamma, W)
    assert sum(before) > 4 * sum(after), (sum(map(float, before)), sum(map(float, after)))


def test_float32_residual_is_the_exact_residual_of_the_float32_data():
    gen = torch.Generator().manual_seed(5)
    A, B = torch.randn(2, 6, 2, generator=gen).float(), torch.randn(2, 3, 6, generator=gen).float()
    g, W = torch.randn(2, 6, generator=gen).float(), torch.randn(2, 3, 2, generator=gen).float()
    r = accurate_residual(A, B, g, W)
    assert r.dtype == torch.float64
    for t in range(2):
        for i in range(3):
            for j in range(2):
                exact = Fraction(W[t, i, j].item()) - exact_entry(B, g, A, t, i, j)
                assert abs(Fraction(r[t, i, j].item()) - exact) <= Fraction(1, 2**45)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_solver_reports_the_accurate_residual_in_every_dtype(dtype):
    gen = torch.Generator().manual_seed(11)
    T, m, k = 5, 3, 2
    A, B = torch.randn(T, m * k, k, generator=gen).to(dtype), torch.randn(T, m, m * k, generator=gen).to(dtype)
    W = torch.randn(T, m, k, generator=gen).to(dtype)
    gamma, residual, rcond, _ = solve_khatri_rao_batched(A, B, W)
    assert gamma.dtype == dtype and residual.dtype == dtype and bool((rcond > 0).all())
    exact = exact_residual_max(A.double(), B.double(), gamma.double(), W.double())
    for t in range(T):
        assert abs(Fraction(residual[t].item()) - exact[t]) <= Fraction(1, 2**20) * exact[t] + Fraction(1, 2**300)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert float(residual.max()) < tol


def test_batch_lu_solves_like_torch_and_marks_singular_systems():
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(4, 6, 6, dtype=torch.float64, generator=gen)
    M[2, :, 0] = 0.0  # a zero column: singular
    rhs = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    lu = BatchLU(M)
    assert float(lu.rcond[2]) == 0.0 and bool((lu.rcond[[0, 1, 3]] > 0).all())
    x = lu.solve(rhs)
    assert bool(x[2].isnan().all())
    for t in (0, 1, 3):
        torch.testing.assert_close(x[t], torch.linalg.solve(M[t], rhs[t]), rtol=1e-10, atol=1e-12)
    A, B = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    A[1, :, 0] = 0.0  # block 1's system loses a column of the Khatri–Rao matrix
    with pytest.raises(SingularSystemError, match="block 1"):
        solve_khatri_rao_batched(A, B, torch.randn(3, 2, 2, dtype=torch.float64))
