"""The optimizers behind :func:`onlynorm.fit.transformer.fit_layer_norms`: Levenberg–Marquardt with chunked normal
equations, Adam with a held-out check, and ``auto`` (their combination within a wall-clock budget).

Levenberg–Marquardt on ``r(θ) = f(θ; X) − y``: the step ``δ`` solves

    (s · J_SᵀJ_S + λ diag(s · J_SᵀJ_S)) δ = −Jᵀr,      s = |rows| / |S|

where ``Jᵀr = ∇ ½‖r‖²`` is exact (one backward pass over all rows) and the curvature ``J_SᵀJ_S`` is formed chunk by
chunk (:mod:`~onlynorm.fit.transformer_jacobian`) on a subset ``S`` of the rows (all of them unless ``auto`` finds
that too slow for its budget; a new random ``S`` each iteration). A step is kept only if the held-out error falls;
a rejected one grows ``λ`` on the same normal equations (no new Jacobian). Every optimizer here returns the best
held-out parameters it saw, so the result is never worse on the held-out data than the start.

``auto`` with a budget ``B``: the time of one row's normal equations measured, Adam (lr 1e-2, the baseline's
settings) for ``ADAM_WARM · B`` as a warm start, then
LM iterations while one is predicted to finish (curvature rows chosen so that one Jacobian costs about
``JACOBIAN_SHARE · B``), then Adam again from the best point for whatever time is left — the whole budget is spent
and not overrun by more than one Adam step or one Jacobian chunk.

>>> f = lambda th, x: x * th[0] + th[1]
>>> x = torch.linspace(0, 1, 8, dtype=torch.float64).reshape(8, 1)
>>> p = Problem(f, [(x[:6],)], [3 * x[:6] + 1], [(x[6:],)], [3 * x[6:] + 1])
>>> start = torch.zeros(2, dtype=torch.float64)
>>> s = levenberg_marquardt(p, State(start, p.held_error(start)), 5, None)
>>> [round(v, 6) for v in s.theta.tolist()], s.best < 1e-9
([3.0, 1.0], True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .transformer_jacobian import MAX_BYTES, activation_bytes, normal_equations

__all__ = ["Problem", "levenberg_marquardt", "adam", "auto", "ADAM_WARM", "JACOBIAN_SHARE"]

ADAM_WARM = 0.5
JACOBIAN_SHARE = 0.1
ADAM_LR = 1e-2
Calls = list[tuple[torch.Tensor, ...]]


@dataclass
class Problem:
    """``f(θ, *call)`` (the network with LayerNorm parameters ``θ``), training and held-out calls with targets."""

    f: Callable[..., torch.Tensor]
    train: Calls
    want: list[torch.Tensor]
    held: Calls
    want_held: list[torch.Tensor]

    def held_error(self, vec: torch.Tensor) -> float:
        """Relative RMS error ``‖f(θ) − y‖ / ‖y‖`` on the held-out calls."""
        with torch.no_grad():
            got = [self.f(vec, *c) for c in self.held]
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, self.want_held))
        den = sum(float((b**2).sum()) for b in self.want_held)
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    def gradient(self, vec: torch.Tensor) -> torch.Tensor:
        """``Jᵀr = ∇ ½‖r‖²`` over all training rows (float64)."""
        v = vec.detach().clone().requires_grad_(True)
        loss = torch.stack([0.5 * ((self.f(v, *c) - w) ** 2).sum() for c, w in zip(self.train, self.want)]).sum()
        (g,) = torch.autograd.grad(loss, v)
        return g.detach().to(torch.float64)

    def rows(self) -> int:
        return sum(int(c[0].shape[0]) for c in self.train)


@dataclass
class State:
    """The best held-out parameters so far and the bookkeeping shared by the phases."""

    theta: torch.Tensor
    best: float
    iterations: int = 0
    history: list[float] = field(default_factory=list)

    def offer(self, vec: torch.Tensor, err: float) -> bool:
        if err < self.best:
            self.theta, self.best = vec.detach().clone(), err
            self.history.append(err)
            return True
        return False


def _curvature_pieces(problem: Problem, rows: int | None, gen: torch.Generator) -> list:
    pieces = list(zip(problem.train, problem.want))
    if rows is None or rows >= problem.rows():
        return pieces
    out = []
    for call, want in pieces:  # the same share of rows from every call, at random
        n = int(call[0].shape[0])
        k = max(1, round(rows * n / problem.rows()))
        idx = torch.randperm(n, generator=gen)[:k]
        out.append((tuple(t[idx] for t in call), want[idx]))
    return out


def levenberg_marquardt(
    problem: Problem,
    state: State,
    steps: int,
    deadline: float | None,
    *,
    curvature_rows: int | None = None,
    max_bytes: int = MAX_BYTES,
    seed: int = 0,
    first_seconds: float = 0.0,
) -> State:
    """Up to ``steps`` LM iterations from ``state.theta``; stops when 8 growing dampings all fail, at an exact fit, or
    when the next iteration (timed as the last one; ``first_seconds`` before any) or its next Jacobian chunk is
    predicted to end after ``deadline``."""
    gen = torch.Generator().manual_seed(seed)
    damping, last = 1e-3, first_seconds
    row_bytes = activation_bytes(problem.f, state.theta, problem.train[0])
    for _ in range(steps):
        if deadline is not None and time.perf_counter() + last > deadline:
            break
        tic = time.perf_counter()
        pieces = _curvature_pieces(problem, curvature_rows, gen)
        eq = normal_equations(
            problem.f, state.theta, pieces, max_bytes=max_bytes, deadline=deadline, row_bytes=row_bytes
        )
        if eq is None:
            break
        scale = problem.rows() / sum(int(c[0].shape[0]) for c, _ in pieces)
        jtj, g = eq.jtj * scale, (eq.jtr if scale == 1 else problem.gradient(state.theta))
        state.iterations += 1
        accepted = False
        for _ in range(8):  # λ grows on the same normal equations
            lhs = jtj + damping * torch.diag(jtj.diagonal().clamp_min(1e-12))
            trial = state.theta + torch.linalg.solve(lhs, -g).to(state.theta.dtype)
            if state.offer(trial, problem.held_error(trial)):
                damping, accepted = max(damping / 3, 1e-9), True
                break
            damping *= 4
            if deadline is not None and time.perf_counter() > deadline:
                break
        last = time.perf_counter() - tic
        if not accepted or state.best <= 1e-13:
            break
    return state


def adam(
    problem: Problem, state: State, steps: int, deadline: float | None, *, lr: float = 1e-2, check_every: int = 20
) -> State:
    """Full-batch Adam (mean-square loss) from ``state.theta``, the held-out error checked every ``check_every`` steps
    and at the end; stops at ``steps`` or before a step predicted (from the mean step so far) to end after the
    deadline."""
    vec = state.theta.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=lr)
    start = time.perf_counter()
    # a held-out evaluation (a forward pass) taken to cost as much per row as a step (forward and backward) per row
    held_share = 1 + sum(int(c[0].shape[0]) for c in problem.held) / problem.rows()
    for k in range(1, steps + 1):
        now = time.perf_counter()
        if deadline is not None and now + (now - start) / max(k - 1, 1) * (k > 1) * held_share > deadline:
            if k == 1:  # no step taken: nothing new to evaluate
                return state
            break
        opt.zero_grad()
        loss = sum(((problem.f(vec, *c) - w) ** 2).mean() for c, w in zip(problem.train, problem.want))
        (loss / len(problem.want)).backward()  # type: ignore[union-attr]
        opt.step()
        state.iterations += 1
        if k % check_every == 0:
            state.offer(vec.detach(), problem.held_error(vec.detach()))
    state.offer(vec.detach(), problem.held_error(vec.detach()))
    return state


def _jacobian_seconds_per_row(problem: Problem, theta: torch.Tensor, max_bytes: int, deadline: float) -> float | None:
    """Time of the normal equations on one training row (what curvature on ``k`` rows costs, ≈ ``k`` times it);
    ``None`` if the deadline came first."""
    call, want = problem.train[0], problem.want[0]
    tic = time.perf_counter()
    eq = normal_equations(
        problem.f, theta, [(tuple(t[:1] for t in call), want[:1])], max_bytes=max_bytes, deadline=deadline
    )
    return None if eq is None else time.perf_counter() - tic


def auto(
    problem: Problem, state: State, steps: int, deadline: float | None, *, max_bytes: int = MAX_BYTES, seed: int = 0
) -> State:
    """Adam warm start, LM, Adam until ``deadline`` (see the module docstring). Without a deadline: LM on all rows
    for ``steps`` iterations, as ``"gauss-newton"``."""
    if deadline is None:
        return levenberg_marquardt(problem, state, steps, None, max_bytes=max_bytes, seed=seed)
    # the probe first: its cost (one row; the first forward-mode pass of a network also pays one-off set-up) is
    # then absorbed by the phases after it, which all stop by prediction
    per_row = _jacobian_seconds_per_row(problem, state.theta, max_bytes, deadline)
    start = time.perf_counter()
    budget = deadline - start
    adam(problem, state, 10**9, start + ADAM_WARM * budget, lr=ADAM_LR)
    if per_row is not None:
        rows = max(1, min(problem.rows(), int(JACOBIAN_SHARE * budget / max(per_row, 1e-9))))
        levenberg_marquardt(
            problem,
            state,
            steps,
            deadline,
            curvature_rows=rows,
            max_bytes=max_bytes,
            seed=seed,
            first_seconds=rows * per_row,
        )
    adam(problem, state, 10**9, deadline, lr=ADAM_LR)
    return state
