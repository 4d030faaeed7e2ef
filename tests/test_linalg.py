"""The Khatri–Rao kernels against slow references and against B diag(γ) A formed by plain matrix products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onlynorm.errors import SingularSystemError
from onlynorm.linalg import (
    compose,
    khatri_rao,
    khatri_rao_reference,
    khatri_rao_system,
    kr_pattern,
    relative_residual,
    solve_khatri_rao,
    structural_rank,
    vec,
)

sizes = st.integers(min_value=1, max_value=6)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(p=sizes, q=sizes, k=sizes, seed=st.integers(0, 10_000))
def test_khatri_rao_matches_columnwise_kron(p, q, k, seed):
    X, Y = _rand(p, k, seed=seed), _rand(q, k, seed=seed + 1)
    assert torch.equal(khatri_rao(X, Y), khatri_rao_reference(X, Y))


@given(m=sizes, n=sizes, N=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_system_times_gamma_is_vec_of_B_Gamma_A(m, n, N, seed):
    A, B, gamma = _rand(N, n, seed=seed), _rand(m, N, seed=seed + 1), _rand(N, seed=seed + 2)
    explicit = B @ torch.diag(gamma) @ A  # the definition, by matrix products
    torch.testing.assert_close(compose(B, gamma, A), explicit, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(khatri_rao_system(A, B) @ gamma, vec(explicit), rtol=1e-12, atol=1e-12)
    # vec stacks columns: entry (i, p) sits at p·m + i
    assert vec(explicit)[(n - 1) * m + (m - 1)] == explicit[m - 1, n - 1]


def test_batched_khatri_rao_matches_unbatched():
    X, Y = _rand(3, 4, 5, seed=1), _rand(3, 2, 5, seed=2)
    batched = khatri_rao(X, Y)
    for b in range(3):
        assert torch.equal(batched[b], khatri_rao_reference(X[b], Y[b]))


@given(m=st.integers(1, 5), n=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_square_solve_reaches_any_target(m, n, seed):
    N = m * n
    A, B, W = _rand(N, n, seed=seed), _rand(m, N, seed=seed + 1), _rand(m, n, seed=seed + 2)
    sol = solve_khatri_rao(A, B, W)
    assert sol.kind == "square" and sol.exact
    err = (B @ torch.diag(sol.gamma) @ A - W).abs().max()
    assert err <= 1e-9 * max(1.0, float(W.abs().max()))
    # two evaluation orders of B Γ A differ by rounding, which scales with |B| |Γ| |A| (large γ: ill-conditioned M)
    rounding = 2 * (N + 2) * torch.finfo(torch.float64).eps * float(((B.abs() * sol.gamma.abs()) @ A.abs()).max())
    assert abs(sol.residual - float(err)) <= rounding + 1e-15


def test_least_squares_is_the_best_reachable_weight():
    m, n, N = 4, 5, 9
    A, B, W = _rand(N, n, seed=3), _rand(m, N, seed=4), _rand(m, n, seed=5)
    sol = solve_khatri_rao(A, B, W)
    assert sol.kind == "least-squares" and not sol.exact
    reference = np.linalg.lstsq(khatri_rao_system(A, B).numpy(), vec(W).numpy(), rcond=None)[0]
    np.testing.assert_allclose(sol.gamma.numpy(), reference, rtol=1e-8, atol=1e-10)
    assert sol.relative_residual > 1e-3  # 9 unknowns cannot fit 20 equations


def test_min_norm_solution_above_m_times_n():
    m, n, N = 2, 3, 15
    A, B, W = _rand(N, n, seed=6), _rand(m, N, seed=7), _rand(m, n, seed=8)
    sol = solve_khatri_rao(A, B, W)
    assert sol.kind == "min-norm" and sol.exact
    M = khatri_rao_system(A, B)
    torch.testing.assert_close(M @ sol.gamma, vec(W), rtol=1e-10, atol=1e-10)
    # minimum norm: γ lies in the row space of M (orthogonal to its null space)
    null = torch.linalg.svd(M, full_matrices=True).Vh[m * n :]
    assert float((null @ sol.gamma).abs().max()) < 1e-10


def test_singular_square_system_is_refused():
    m, n = 2, 2
    A, B = _rand(4, n, seed=9), _rand(m, 4, seed=10)
    A[3] = A[2]  # two identical rows of A and columns of B make two columns of M equal
    B[:, 3] = B[:, 2]
    with pytest.raises(SingularSystemError, match="singular") as info:
        solve_khatri_rao(A, B, _rand(m, n, seed=11), layer=3)
    assert info.value.layer == 3 and "layer 3" in str(info.value)


def test_structural_rank_bounds_the_rank_of_every_matrix_with_the_pattern():
    # Entries of Aᵀ ⊙ B are products sharing factors, so the structural rank is an upper bound (tight in practice).
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        m, n = 3, 3
        A_mask = torch.rand(m * n, n, generator=gen) < 0.5
        B_mask = torch.rand(m, m * n, generator=gen) < 0.5
        pattern = kr_pattern(A_mask, B_mask)
        dense_pattern = khatri_rao_system(A_mask.double(), B_mask.double()) != 0
        assert np.array_equal(pattern.toarray() != 0, dense_pattern.numpy())
        generic = khatri_rao_system(A_mask * _rand(m * n, n, seed=trial), B_mask * _rand(m, m * n, seed=trial + 99))
        assert int(torch.linalg.matrix_rank(generic)) <= structural_rank(pattern) <= m * n


@pytest.mark.parametrize(
    "m, n, N, dtype, precision",
    [
        (2, 3, 6, torch.float64, "auto"),  # square, mixed precision
        (2, 3, 6, torch.float64, "float64"),  # square, plain float64 LU
        (2, 3, 6, torch.float32, "auto"),  # solved in float64, γ rounded to float32
        (4, 5, 9, torch.float64, "auto"),  # least squares
        (2, 3, 15, torch.float64, "auto"),  # minimum norm
    ],
)
@pytest.mark.parametrize("zero_target", [False, True])
def test_solve_residuals_are_the_records_definition(m, n, N, dtype, precision, zero_target):
    A, B = _rand(N, n, seed=12).to(dtype), _rand(m, N, seed=13).to(dtype)
    W = torch.zeros(m, n, dtype=dtype) if zero_target else _rand(m, n, seed=14).to(dtype)
    sol = solve_khatri_rao(A, B, W, precision=precision)
    realised = compose(B.double(), sol.gamma.double(), A.double())
    assert (sol.residual, sol.relative_residual) == relative_residual(realised, W.double())
    if zero_target:  # γ = 0 realises W = 0 exactly: no error, and no division by ‖W‖ = 0
        assert sol.exact and sol.residual == 0.0 and sol.relative_residual == 0.0


def test_zero_target_realised_inexactly_reports_the_absolute_frobenius_error(monkeypatch):
    # γ = 0 realises W = 0 exactly, so the inexact case is simulated: the realised weight carries an error E
    import onlynorm.linalg as linalg

    m, n, N = 2, 3, 4  # least squares: compose is used only for the realised weight
    error = torch.zeros(m, n, dtype=torch.float64)
    error[0, 0], error[1, 2] = 3e-3, -4e-3
    exact_compose = linalg.compose
    monkeypatch.setattr(linalg, "compose", lambda B, gamma, A: exact_compose(B, gamma, A) + error)
    sol = solve_khatri_rao(_rand(N, n, seed=15), _rand(m, N, seed=16), torch.zeros(m, n, dtype=torch.float64))
    assert relative_residual(error, torch.zeros(m, n, dtype=torch.float64)) == (4e-3, 5e-3)
    assert (sol.residual, sol.relative_residual) == (4e-3, 5e-3)  # ‖E‖_F, not max |E|, and no division by 0
