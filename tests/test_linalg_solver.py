"""The mixed-precision solve: same answer as a plain float64 LU, float64 accuracy, honest fallbacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onlynorm.errors import SingularSystemError
from onlynorm.linalg import compose, khatri_rao_system, khatri_rao_system_transposed, solve_khatri_rao


def _system(m, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    N = m * n
    A = torch.randn(N, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(m, N, generator=g, dtype=torch.float64) / N**0.5
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * scale
    return A, B, W


def test_transposed_assembly_is_the_system_in_column_major_order():
    A, B, _ = _system(3, 4, 0)
    Mt = khatri_rao_system_transposed(A, B, torch.float64)
    assert torch.equal(Mt.T, khatri_rao_system(A, B))
    assert Mt.is_contiguous()  # row-major Mᵀ = column-major M: what getrf factors in place


@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-6, 1.0, 1e6]))
def test_mixed_precision_matches_float64_lu(m, n, seed, scale):
    A, B, W = _system(m, n, seed, scale)
    mixed = solve_khatri_rao(A, B, W)
    plain = solve_khatri_rao(A, B, W, precision="float64")
    reference = torch.linalg.solve(khatri_rao_system(A, B), W.T.reshape(-1))
    assert mixed.relative_residual <= 1e-12
    assert mixed.relative_residual <= max(100 * plain.relative_residual, 1e-13)  # float64-LU quality
    cond = float(torch.linalg.cond(khatri_rao_system(A, B)))
    # forward error of γ is bounded by cond × backward error
    rel_forward = float((mixed.gamma - reference).norm() / reference.norm())
    assert rel_forward <= cond * 1e-13 + 1e-13


def test_mixed_precision_is_used_and_refines_in_few_steps():
    A, B, W = _system(24, 24, 1)
    sol = solve_khatri_rao(A, B, W)
    assert sol.precision == "mixed" and 1 <= sol.steps <= 10
    assert float((compose(B, sol.gamma, A) - W).abs().max()) <= 1e-12 * float(W.abs().max())


def test_ill_conditioned_system_falls_back_to_float64():
    A, B, W = _system(6, 6, 2)
    # two nearly equal columns of M = Aᵀ ⊙ B: cond(M) ~ 1e9 ≫ 1/eps32, float32 refinement cannot converge
    A[5] = A[4] + 1e-9 * A[3]
    B[:, 5] = B[:, 4] + 1e-9 * B[:, 3]
    sol = solve_khatri_rao(A, B, W)
    assert sol.precision == "float64"
    assert float((compose(B, sol.gamma, A) - W).abs().max()) <= 1e-5


def test_exactly_singular_system_is_refused_on_every_path():
    A, B, W = _system(3, 3, 3)
    A[5], B[:, 5] = A[4], B[:, 4]
    for precision in ("auto", "float64"):
        with pytest.raises(SingularSystemError, match="singular"):
            solve_khatri_rao(A, B, W, precision=precision)
    with pytest.raises(SingularSystemError, match="singular"):
        solve_khatri_rao(A.float(), B.float(), W.float())


def test_float32_network_gets_gamma_solved_in_float64_then_rounded():
    A, B, W = _system(5, 4, 4)
    sol = solve_khatri_rao(A.float(), B.float(), W.float())
    exact = solve_khatri_rao(A.float().double(), B.float().double(), W.float().double())
    assert sol.gamma.dtype == torch.float32
    assert torch.equal(sol.gamma, exact.gamma.float())  # one rounding of the float64 solution
    assert sol.relative_residual < 1e-5


def test_batched_solver_matches_one_solve_per_block():
    from onlynorm.linalg import solve_khatri_rao_batched

    gen = torch.Generator().manual_seed(7)
    T, m, k = 6, 4, 2
    A = torch.randn(T, m * k, k, generator=gen, dtype=torch.float64)
    B = torch.randn(T, m, m * k, generator=gen, dtype=torch.float64)
    W = torch.randn(T, m, k, generator=gen, dtype=torch.float64)
    gamma, residual, rcond, _ = solve_khatri_rao_batched(A, B, W, max_bytes=2 * (m * k) ** 2 * 8)  # 3 chunks
    for t in range(T):
        single = solve_khatri_rao(A[t], B[t], W[t], precision="float64")
        torch.testing.assert_close(gamma[t], single.gamma, rtol=1e-9, atol=1e-12)
        assert float(residual[t]) == pytest.approx(single.residual, abs=1e-12)
    assert bool((rcond > 0).all())
    A[3, 5], B[3, :, 5] = A[3, 4], B[3, :, 4]
    with pytest.raises(SingularSystemError, match="block 3"):
        solve_khatri_rao_batched(A, B, W)
