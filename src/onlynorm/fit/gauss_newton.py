"""Levenberg–Marquardt (damped Gauss–Newton) on all γ, β over sampled points.

With residuals ``r(θ) = (f(X; θ) − g(X)) / ‖g(X)‖`` on the training rows and ``J = ∂r/∂θ`` (``torch.func``, see
:mod:`onlynorm.fit.jacobian`), each step solves::

    (JᵀJ + λ diag(JᵀJ)) δ = −Jᵀ r

and is taken when the training loss falls (otherwise ``λ`` grows and the step is retried from the same Jacobian).
A step is **kept only if the held-out error falls** below the best seen: the network returned is the one with the
lowest held-out error (early stopping: the run ends after ``patience`` steps without a new best, at convergence,
at the deadline, or once ``patience`` steps per block have lowered the best held-out error by less than
``min_gain`` in all (``auto``: ``MIN_GAIN`` = 0.1 %) — a crawl that ``auto``'s restarts spend better). The held-out error of the result is therefore never above the one it started from. (Refusing
every step that does not lower the held-out error stalls Levenberg–Marquardt early, in a worse minimum.)

**Memory.** The Jacobian of all parameters has ``rows·m × P`` entries. When it (with its ``P × P`` normal matrix)
would exceed the budget — a quarter of :func:`onlynorm.constructions.memory.memory_limit` unless given — the parameters are
split into blocks (one target layer's norms each) and the steps cycle through the blocks; a block that still does
not fit uses fewer rows. No Jacobian above the budget is ever formed; the phase records the largest one.

>>> import torch, onlynorm
>>> from torch import nn
>>> g = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
>>> frozen = onlynorm.random_normnet(g, hidden=4, seed=0)
>>> net, report = onlynorm.fit_norms(frozen, g, onlynorm.Box(-1, 1), method="gauss-newton")
>>> report.final_error < report.initial_error
True
"""

from __future__ import annotations

import time

import torch
from torch.func import vjp

from ..constructions.memory import format_bytes, memory_limit
from ..errors import MemoryBudgetError
from ..nets.normnet import NormNet
from .data import FitData
from .jacobian import NormFunction, choose_mode, jacobian_bytes
from .lm_step import LAMBDA_START, damped_step
from .report import Phase
from .segments import segments

__all__ = ["fit_gauss_newton", "parameter_blocks", "plan_blocks", "auto_rows", "LEAN_ROWS"]

#: converged when ``patience`` accepted steps (per block) lowered the best held-out error by less than this fraction
MIN_GAIN = 1e-3
#: a lower-precision Jacobian (``jacobian_dtype``) is used only while the best held-out error is above this
LOW_PRECISION_ABOVE = 1e-5
#: ``rows=LEAN_ROWS``: 8 equations per parameter (256–1024 rows) instead of 16 (at least 1024)
LEAN_ROWS = -1
#: auto steps with lean rows from this many norm parameters on (there the Jacobian and normal equations dominate a
#: step: at d = 16, N = m·n/2, 576 parameters, 256 rows take 4× the steps of 1024 in the same time, to a lower error)
LEAN_FROM = 128
#: a step is begun only if this many times the slowest step so far still fits before the deadline: on a shared
#: machine one step can take twice the slowest before it (measured: 1.23× a 0.3-s budget whose steps took ≤ 0.05 s)
STEP_SAFETY = 1.5
#: float32 Jacobians: ``JᵀJ`` as a float32 product, ``Jᵀr`` by a float64 backward pass, from this many parameters
FLOAT32_PRODUCT_FROM = 80


def auto_rows(parameters: int, lean_from: int = LEAN_FROM) -> int | None:
    """The ``rows`` ``auto`` passes: lean from ``lean_from`` parameters on, the default otherwise."""
    return LEAN_ROWS if parameters >= lean_from else None


def parameter_blocks(net: NormNet, spec=None) -> list[list[str]]:
    """γ, β names grouped by target layer: a construction pair (or with_norms stage) per block when the network can
    be walked next to the target, else one block per top-level stage."""
    norm_ids = {id(p) for p in net.norm_parameters()}
    names = [k for k, p in net.named_parameters() if id(p) in norm_ids]
    stage_of = {k: int(k.split(".")[1]) for k in names}
    group = {i: i for i in set(stage_of.values())}
    if spec is not None:
        try:
            index = {id(s): i for i, s in enumerate(net.layers)}
            for seg in segments(net, spec):
                ids = [index[id(s)] for s in seg.stages]
                for i in ids:
                    group[i] = ids[0]
        except Exception:  # any layout the walker does not know: one block per stage
            pass
    blocks: dict[int, list[str]] = {}
    for k in names:
        blocks.setdefault(group[stage_of[k]], []).append(k)
    return [blocks[i] for i in sorted(blocks)]


def plan_blocks(blocks: list[list[str]], sizes: dict[str, int], rows: int, outputs: int, budget: int):
    """``[(names, rows)]``: all parameters at once if their Jacobian fits ``budget``, else one block at a time
    (with fewer rows where even a block does not fit)."""
    every = [k for b in blocks for k in b]
    total = sum(sizes[k] for k in every)
    if jacobian_bytes(rows, outputs, total) <= budget:
        return [(every, rows)], "full"
    plan = []
    for b in blocks:
        p = sum(sizes[k] for k in b)
        r = rows
        while r > 1 and jacobian_bytes(r, outputs, p) > budget:
            r //= 2
        if jacobian_bytes(r, outputs, p) > budget:
            raise MemoryBudgetError(
                f"gauss-newton: even one sample's Jacobian for a block of {p} norm parameters needs "
                f"{format_bytes(jacobian_bytes(1, outputs, p))}, above the budget {format_bytes(budget)}; raise the "
                "memory budget or use method='adam'",
                needed_bytes=jacobian_bytes(1, outputs, p),
                limit_bytes=budget,
            )
        plan.append((b, r))
    return plan, "block-wise"


def fit_gauss_newton(
    net: NormNet,
    data: FitData,
    *,
    spec=None,
    deadline: float | None = None,
    max_iterations: int = 300,
    rows: int | None = None,
    memory_budget: int | None = None,
    seed: int = 0,
    progress=None,
    patience: int = 10,
    step_seconds: float = 0.0,
    min_gain: float = 0.0,
    jacobian_dtype: torch.dtype | None = None,
    geodesic: bool | str = False,
) -> Phase:
    """Improve ``net``'s γ, β in place by Levenberg–Marquardt until converged, ``max_iterations`` accepted steps or
    ``deadline`` (a ``time.perf_counter()`` value); returns the phase record. ``step_seconds`` is the expected cost
    of one step (a step that would end after the deadline is not started); its ``details`` say why the run stopped
    (``"converged"``, ``"steps"``, ``"budget"`` or ``"exact"``) and what a step cost (``"step_seconds"``). ``min_gain`` > 0 (``auto`` passes ``MIN_GAIN``) also ends a crawl (see the module docstring).
    ``jacobian_dtype=torch.float32`` forms the Jacobians of a float64 network in float32 (on a float32 copy; the
    normal equations, residuals and the kept parameters stay float64). ``geodesic=True`` adds geodesic acceleration
    to every step (:mod:`onlynorm.fit.lm_step`); ``geodesic="fallback"`` takes the plain step where the acceleration
    test fails.

    **Deadline.** A step is not begun when ``STEP_SAFETY`` (1.5) times the slowest step so far (``step_seconds`` at
    first) would end after the deadline, and a step's own retries of growing ``λ`` stop at the deadline (``stopped = "budget"``); only the
    first step of a run without an estimate is begun unconditionally."""
    flags = {p: p.requires_grad for p in net.parameters()}
    for p in flags:  # Jacobians come from torch.func; no autograd graph on the network's own tensors
        p.requires_grad_(False)
    try:
        return _run(
            net,
            data,
            spec,
            deadline,
            max_iterations,
            rows,
            memory_budget,
            seed,
            progress,
            patience,
            step_seconds,
            (min_gain, jacobian_dtype, geodesic),
        )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _run(
    net, data, spec, deadline, max_iterations, rows, memory_budget, seed, progress, patience, step_seconds, options
) -> Phase:
    """The Levenberg–Marquardt loop: cycle through the blocks of the plan, take each damped step that lowers the
    training loss, keep the parameters with the lowest held-out error, stop at convergence, ``patience`` or the
    deadline; returns the phase record (the network holds the kept parameters)."""
    start = time.perf_counter()
    before = data.held_out_error(net)
    every = NormFunction(net)
    outputs, rows, pick = _training_rows(net, data, every.size, rows, seed)
    budget = memory_budget if memory_budget is not None else memory_limit(net.device)[0] // 4
    sizes = dict(zip(every.names, every.sizes))
    plan, layout = plan_blocks(parameter_blocks(net, spec), sizes, rows, outputs, budget)
    fns = [(NormFunction(net, names), r) for names, r in plan]
    min_gain, jacobian_dtype, geodesic = options
    low = net.clone().to(jacobian_dtype) if jacobian_dtype not in (None, net.dtype) else None
    jacs = [fn if low is None else NormFunction(low, fn.names) for fn, _r in fns]
    low_all = NormFunction(low) if low is not None else None
    lambdas = [LAMBDA_START] * len(fns)
    history = [before]
    accepted = rejected = evaluations = 0
    largest = 0
    mode_used = set()
    stalled = 0
    stopped, step_times = "steps", list[float]()
    b = -1
    best_held, best_theta = before, every.vector().clone()
    kept = accelerated = 0
    while accepted < max_iterations:
        step_start = time.perf_counter()
        if deadline is not None and step_start + STEP_SAFETY * max([step_seconds] + step_times) > deadline:
            stopped = "budget"
            break
        b = (b + 1) % len(fns)
        fn, r = fns[b]
        jac = jacs[b] if best_held > LOW_PRECISION_ABOVE else fn  # near exact: full-precision Jacobians
        if low_all is not None and len(fns) > 1:  # the other blocks of the low-precision copy follow the network
            low_all.assign(every.vector())
        step, mode = _block_step(
            fn, jac, data.x_train[pick[:r]], data.y_train[pick[:r]], outputs, lambdas[b], deadline, geodesic
        )
        mode_used.add(mode)
        largest = max(largest, jacobian_bytes(r, outputs, fn.size))
        lambdas[b] = step.lam
        evaluations, rejected = evaluations + step.evaluations, rejected + step.rejected
        if step.candidate is not None:
            fn.assign(step.candidate)
            accelerated += step.accelerated
            new_held = data.held_out_error(net)
            if new_held < best_held:
                best_held, best_theta = new_held, every.vector().clone()
                kept += 1
            accepted += 1
            history.append(best_held)
            stalled = 0 if new_held <= best_held else stalled + 1
            if progress is not None:
                progress(accepted, max_iterations, f"gauss-newton: step {accepted}, held-out rel RMS {best_held:.3e}")
        elif step.out_of_time:
            stopped = "budget"
            break
        else:  # no step lowers the training loss: this block has converged
            stalled += patience
            lambdas[b] = LAMBDA_START
        step_times.append(time.perf_counter() - step_start)
        window = patience * len(fns)
        crawling = len(history) > window and history[-1] > (1 - min_gain) * history[-1 - window]
        if best_held < 1e-13 or stalled >= window or crawling:
            stopped = "exact" if best_held < 1e-13 else "converged"
            break
    every.assign(best_theta)
    notes = [] if layout == "full" else [_block_note(every.size, budget, len(fns))]
    return Phase(
        "gauss-newton",
        before,
        best_held,
        time.perf_counter() - start,
        accepted,
        notes=notes,
        history=history,
        details={
            "stopped": stopped,
            "step_seconds": max(step_times) if step_times else step_seconds,
            "layout": layout,
            "jacobian_dtype": str(low.dtype if low is not None else net.dtype).replace("torch.", ""),
            "blocks": len(fns),
            "rows": rows,
            "rejected": rejected,
            "kept": kept,
            "geodesic": geodesic,
            "accelerated": accelerated,
            "evaluations": evaluations,
            "jacobian_mode": sorted(mode_used),
            "largest_jacobian_bytes": largest,
            "memory_budget_bytes": budget,
        },
    )


def _block_note(parameters: int, budget: int, blocks: int) -> str:
    return (
        f"gauss-newton: Jacobian of all {parameters} norm parameters exceeds the memory budget "
        f"{format_bytes(budget)}; stepped block-wise over {blocks} blocks"
    )


def _block_step(fn: NormFunction, jac: NormFunction, x, y, outputs: int, lam: float, deadline, geodesic):
    """The normal equations of one block at its current γ, β and a damped step from them: ``(Step, mode)``."""
    scale = float(torch.linalg.vector_norm(y.to(torch.float64))) or 1.0
    theta = fn.vector().to(torch.float64)
    mode = choose_mode(fn.size, outputs)
    loss, JtJ, g, res, J = _normal_equations(fn, theta, x, y, scale, mode, jac, keep=bool(geodesic))
    dtype = fn.params[0].dtype

    def residual(th: torch.Tensor) -> torch.Tensor:
        return _scaled_residual(fn, th.to(dtype), x, y, scale)

    step = damped_step(
        residual,
        theta,
        loss,
        JtJ,
        g,
        lam,
        deadline=deadline,
        jac=J,
        geodesic=bool(geodesic),
        res0=res,
        fallback=geodesic == "fallback",
    )
    return step, mode


def _training_rows(net: NormNet, data: FitData, parameters: int, rows: int | None, seed: int):
    """``(outputs per sample, rows, row indices)``: the training rows the steps use, a fixed random subset drawn
    with ``seed``. By default enough equations for the parameters, not more — the normal matrix costs
    ``rows·m·P²`` — and never more rows than the training set has."""
    with torch.no_grad():
        outputs = net(data.x_train[:1]).reshape(1, -1).shape[1]
    if rows is None:
        rows = max(1024, (16 * parameters) // max(1, outputs))
    elif rows < 0:  # "lean": 8 equations per parameter, at least 256 rows, at most 1024 (auto: cheaper steps)
        rows = min(1024, max(256, -(-(8 * parameters) // max(1, outputs))))
    rows = min(rows, data.x_train.shape[0])
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(data.x_train.shape[0], generator=gen)[:rows].to(data.x_train.device)
    return outputs, rows, pick


def _scaled_residual(fn: NormFunction, theta: torch.Tensor, x, y, scale: float) -> torch.Tensor:
    """``r(θ) = vec(f(x; θ) − y) / scale`` in float64 (``θ`` in the network's dtype), without an autograd graph."""
    with torch.no_grad():
        return (fn(theta, x) - y).reshape(-1).to(torch.float64) / scale


def _normal_equations(
    fn: NormFunction, theta: torch.Tensor, x, y, scale: float, mode: str, jac: NormFunction, keep: bool = False
):
    """``(‖r‖², JᵀJ, Jᵀr, r, J or None)`` at ``θ`` (float64), the Jacobian formed in ``mode`` by ``jac`` (``fn``
    itself, or the same block of a lower-precision copy) and freed before returning unless ``keep`` (geodesic
    acceleration needs it; its bytes are within the budget, which counts the Jacobian and the normal matrix).

    With a lower-precision ``jac`` (float32 Jacobians of a float64 network) ``JᵀJ`` is the float32 product of the
    float32 Jacobian (its entries carry float32 error already; no float64 copy of ``J`` is made — at d = 10 that
    copy and the float64 product cost as much as the Jacobian), while the gradient ``Jᵀr`` — which cancels towards
    0 at a minimum and needs the full precision — is one vector–Jacobian product of the network itself. From
    ``FLOAT32_PRODUCT_FROM`` parameters on: below, the extra backward pass costs more than it saves (measured in one
    process, 1,024 rows: 1.3× slower at 60 γ, β; 0.70× at 88, 0.53× at 140, 0.33× at 320)."""
    low = jac.params[0].dtype
    if low == fn.params[0].dtype or fn.params[0].dtype != torch.float64 or fn.size < FLOAT32_PRODUCT_FROM:
        res = _scaled_residual(fn, theta.to(fn.params[0].dtype), x, y, scale)
        J = jac.jacobian(theta.to(low), x.to(low), mode=mode).to(torch.float64) / scale
        JtJ, g = J.T @ J, J.T @ res
    else:
        J = jac.jacobian(theta.to(low), x.to(low), mode=mode)
        JtJ = (J.T @ J).to(torch.float64) / (scale * scale)
        out, pullback = vjp(lambda th: fn(th, x).reshape(-1), theta)[:2]
        diff = (out - y.reshape(-1)).detach()
        grads: tuple[torch.Tensor, ...] = pullback(diff)
        res, g = diff.to(torch.float64) / scale, grads[0].detach().to(torch.float64) / (scale * scale)
        if keep:
            J = J.to(torch.float64) / scale
    if not keep:
        del J
        return float(res @ res), JtJ, g, res, None
    return float(res @ res), JtJ, g, res, J
