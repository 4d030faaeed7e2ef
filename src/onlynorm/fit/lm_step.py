"""One Levenberg–Marquardt step from the normal equations, optionally with geodesic acceleration, within a deadline.

With scaled residuals ``r(θ)``, their Jacobian ``J``, ``D = diag(JᵀJ)`` and damping ``λ``, the step's velocity is::

    (JᵀJ + λ D) v = −Jᵀ r

and ``θ + v`` is taken when it lowers ``‖r‖²`` (otherwise ``λ`` grows ×4 and the step is retried from the same
normal equations). **Geodesic acceleration** (Transtrum & Sethna, *Improvements to the Levenberg–Marquardt
algorithm for nonlinear least-squares minimization*, 2012) adds the second-order correction of the path along
``v``: with the second directional derivative of the residual by a finite difference along ``v`` (step ``h``)::

    r_vv ≈ (2/h) · ((r(θ + h v) − r(θ)) / h − J v),     (JᵀJ + λ D) a = −Jᵀ r_vv,

the candidate is ``θ + v + a/2``, accepted only when ``2‖a‖_D / ‖v‖_D ≤ α`` (the correction is small next to the
velocity: the quadratic model is trusted) and it lowers ``‖r‖²``; otherwise ``λ`` grows (or, with ``fallback``,
the plain ``θ + v`` is tried at the same ``λ``). It costs one residual evaluation and one
triangular solve per try (the Cholesky factor is shared); the Jacobian is kept for ``J v`` and ``Jᵀ r_vv``.

**Deadline.** The tries of one step are not begun past ``deadline`` once one try has been timed (a converged block
can run ~18 tries of growing ``λ`` before giving up — many times an ordinary step): the step then returns no
candidate and says it ran out of time.

>>> import torch
>>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
>>> r0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
>>> residual = lambda th: r0 + J @ th          # a linear model: one undamped step solves it
>>> theta = torch.zeros(2, dtype=torch.float64)
>>> step = damped_step(residual, theta, float(r0 @ r0), J.T @ J, J.T @ r0, 1e-9, jac=J, geodesic=True)
>>> bool(torch.allclose(J.T @ residual(step.candidate), torch.zeros(2, dtype=torch.float64), atol=1e-6))
True
>>> step.accelerated                            # the residual is linear: the acceleration is (numerically) zero
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["damped_step", "Step", "LAMBDA_START", "LAMBDA_MAX", "GEODESIC_ALPHA", "GEODESIC_H"]

LAMBDA_START = 1e-3
LAMBDA_MAX = 1e8
#: geodesic acceleration: the largest accepted 2‖a‖/‖v‖ (Transtrum–Sethna suggest α ≈ 0.75)
GEODESIC_ALPHA = 0.75
#: geodesic acceleration: the finite-difference step along v (relative to v)
GEODESIC_H = 0.1


@dataclass
class Step:
    """What :func:`damped_step` did: the candidate (``None`` when no ``λ`` lowered the loss or time ran out), the
    ``λ`` for the next step, tries, rejected tries, whether the accepted candidate is accelerated, and whether the
    deadline stopped the tries."""

    candidate: torch.Tensor | None
    lam: float
    evaluations: int
    rejected: int
    accelerated: bool = False
    out_of_time: bool = False


def _solve(L: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(rhs.unsqueeze(1), L)[:, 0]


def _acceleration(residual, theta, res0, v, J, L, diag, h) -> tuple[torch.Tensor, float]:
    """``(a, 2‖a‖_D / ‖v‖_D)``: the geodesic acceleration along ``v`` by a one-sided finite difference."""
    r_h = residual(theta + h * v)
    r_vv = (2.0 / h) * ((r_h - res0) / h - J @ v)
    a = _solve(L, -(J.T @ r_vv))
    nv = float(torch.sqrt((diag * v * v).sum()))
    ratio = 2.0 * float(torch.sqrt((diag * a * a).sum())) / max(nv, 1e-300)
    return a, ratio


def damped_step(
    residual: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    loss: float,
    JtJ: torch.Tensor,
    g: torch.Tensor,
    lam: float,
    *,
    deadline: float | None = None,
    jac: torch.Tensor | None = None,
    geodesic: bool = False,
    res0: torch.Tensor | None = None,
    fallback: bool = False,
) -> Step:
    """One damped step from the normal equations ``JᵀJ, g = Jᵀr`` at ``θ`` (float64): see the module docstring.

    ``residual(θ)`` returns ``r(θ)`` (float64, ``θ`` float64). ``geodesic=True`` needs ``jac`` (``J``, float64)
    and ``res0`` (``r(θ)``; computed when not given); ``fallback=True`` tries the plain ``θ + v`` at the same ``λ``
    where the acceleration test fails, instead of damping more. The returned ``λ`` is a third of the one that
    worked.
    """
    diag = JtJ.diagonal().clamp_min(1e-12 * float(JtJ.diagonal().max().clamp_min(1e-300)))
    if geodesic and jac is None:
        raise ValueError("damped_step: geodesic=True needs the Jacobian (jac=)")
    if geodesic and res0 is None:
        res0 = residual(theta)
    evaluations = rejected = 0
    slowest = 0.0
    while lam <= LAMBDA_MAX:
        if deadline is not None and evaluations and time.perf_counter() + slowest > deadline:
            return Step(None, lam, evaluations, rejected, out_of_time=True)
        t0 = time.perf_counter()
        evaluations += 1
        try:
            L = torch.linalg.cholesky(JtJ + torch.diag(lam * diag))
            v = _solve(L, -g)
        except RuntimeError:  # not positive definite in floating point: damp more
            lam *= 4
            continue
        accelerated = False
        step = v
        if geodesic:
            a, ratio = _acceleration(residual, theta, res0, v, jac, L, diag, GEODESIC_H)
            if math.isfinite(ratio) and ratio <= GEODESIC_ALPHA:
                step, accelerated = v + 0.5 * a, True
            elif not fallback:  # the path bends too much: damp more (Transtrum–Sethna)
                rejected += 1
                lam *= 4
                slowest = max(slowest, time.perf_counter() - t0)
                continue
            # fallback: the plain velocity at this λ (across a ReLU kink the finite difference is not a curvature)
        cand = theta + step
        new_res = residual(cand)
        new_loss = float(new_res @ new_res)
        slowest = max(slowest, time.perf_counter() - t0)
        if math.isfinite(new_loss) and new_loss < loss:
            return Step(cand, max(lam / 3, 1e-9), evaluations, rejected, accelerated)
        rejected += 1
        lam *= 4
    return Step(None, lam, evaluations, rejected)
