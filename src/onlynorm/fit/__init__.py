"""``fit_norms``: the best γ, β for any frozen network — exact where the theory allows, best-effort below it.

``fit_norms(frozen, target, data)`` returns ``(network, report)``: a new network in which only γ, β differ from
``frozen``, and a :class:`FitReport` (relative RMS error on held-out points before/after each phase, wall time,
iterations). ``data`` is a :class:`~onlynorm.Box` (sampled) or a tensor of inputs (the distribution that matters
for a pretrained network). Methods:

* ``"exact"`` — the closed form (``solve_norms``) when :func:`onlynorm.capacity` says the network can express the
  target;
* ``"layerwise"`` — data-aware closed form pair by pair with sequential error propagation
  (:mod:`onlynorm.fit.layerwise`);
* ``"gauss-newton"`` — Levenberg–Marquardt on all γ, β, held-out-checked steps (:mod:`onlynorm.fit.gauss_newton`);
* ``"adam"`` — ``train_norm_only``, the baseline;
* ``"auto"`` — exact when every system has ``N ≥ m·n`` unknowns and the solve succeeds, else layer-wise then
  Gauss–Newton, then **restarts** from other starts (:mod:`onlynorm.fit.restarts`) until ``budget_seconds`` is
  spent (the final evaluation included) or the held-out error is exact. Without a budget (and without ``steps``,
which then means one run of at most that many Levenberg–Marquardt steps), ``auto`` gives itself
  ``DEFAULT_BUDGET_FACTOR`` (5) times what its first run took, at most ``DEFAULT_BUDGET_MAX`` (60 s); the report
  states the budget and its source, why the fit stopped (``report.stopped``: ``"exact"``, ``"converged"``,
  ``"budget"``, ``"steps"`` or ``"done"``) and, for outputs of ≥ 2 columns (classifiers), the argmax agreement with
  the target on the held-out points. ``auto``'s measured choices (restart cycle, screening, geodesic acceleration,
  lean rows) live in :mod:`onlynorm.fit.auto_config`; ``with auto_config(...)`` changes them for A/B runs.

>>> import onlynorm
>>> from torch import nn
>>> g = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
>>> frozen = onlynorm.random_normnet(g, hidden=[6, 6], seed=0)        # a quarter of the theorem's width
>>> net, report = onlynorm.fit_norms(frozen, g, onlynorm.Box(-1, 1), budget_seconds=2)
>>> [p.name for p in report.phases][:2], report.final_error < report.initial_error, report.stopped
(['layerwise', 'gauss-newton'], True, 'budget')
"""

from __future__ import annotations

import contextlib
import importlib
import time
from typing import Any

import torch
from torch import nn

from ..constructions.base import Progress, check_target_kind
from ..errors import InvalidNetworkError, InvalidOptionError, SingularSystemError
from ..nets.normnet import NormNet
from ..nets.pretrained import PretrainedConv2d, PretrainedLinear
from ..nets.seqnet import SeqNet
from ..options import check_scalar, check_seed
from ..targets.convert import as_target
from .adam import fit_adam
from .auto_config import auto_config, current
from .data import FitData, prepare_data, relative_rms
from .exact import check_capacity, exact_applicable, fit_exact
from .gauss_newton import MIN_GAIN, auto_rows, fit_gauss_newton
from .jacobian import NormFunction
from .layerwise import fit_layerwise
from .pretrained import with_norms
from .report import FitReport, Phase
from .restarts import fit_restarts
from .transformer import fit_layer_norms

__all__ = [
    "fit_norms",
    "auto_config",
    "with_norms",
    "FitReport",
    "Phase",
    "FitData",
    "METHODS",
    "relative_rms",
    "PretrainedLinear",
    "PretrainedConv2d",
]

METHODS = ("auto", "exact", "layerwise", "gauss-newton", "adam")
#: held-out relative RMS at or below which a float64 fit counts as exact
EXACT_TOLERANCE = 1e-9
ADAM_STEPS, GN_STEPS = 3000, 300
#: without a budget, auto spends this many times its first run's time on restarts (in total), at most the maximum
DEFAULT_BUDGET_FACTOR, DEFAULT_BUDGET_MAX = 5.0, 60.0
#: fraction of the budget kept for the final evaluation and bookkeeping (the 5 % tolerance's safety margin)
RESERVE_FRACTION = 0.02
#: ... and at least this many held-out evaluations' time (measured on the initial error)
RESERVE_EVALUATIONS = 4
#: a fit that ended past this multiple of its budget says so in ``report.notes``
OVERRUN_NOTE = 1.05
#: fewest points sampled from a box
MIN_SAMPLES = 8


def fit_norms(
    frozen: NormNet,
    target: Any,
    data,
    *,
    method: str = "auto",
    budget_seconds: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    steps: int | None = None,
    memory_budget: int | None = None,
    samples: int = 2048,
) -> tuple[NormNet, FitReport]:
    """Fit only the γ, β of ``frozen`` so it computes ``target`` on ``data``; see the module docstring.

    ``target``: an MLP/CNN (``nn.Sequential``, ``MLPSpec``, ``ConvNetSpec``). ``data``: a ``Box`` (``samples``
    training points and half as many held-out points are drawn) or a tensor of inputs (a fifth held out).
    ``budget_seconds`` bounds ``auto``/``gauss-newton``/``adam``; ``steps`` caps Adam's steps (default 3,000) and
    Gauss–Newton's (default 300); ``memory_budget`` (bytes) bounds Gauss–Newton's Jacobians. ``progress(done, total, message)`` is called as work proceeds.
    """
    if isinstance(frozen, SeqNet):  # a transformer: its LayerNorm γ, β only, on given inputs
        return fit_layer_norms(
            frozen, target, data, method=method, budget_seconds=budget_seconds, steps=steps, seed=seed
        )
    if not isinstance(frozen, NormNet):
        raise InvalidNetworkError(
            f"expected a NormNet (onlynorm.random_normnet, NormNet.load or "
            f"onlynorm.with_norms(model)), found {type(frozen).__name__}"
        )
    seed, steps, samples, memory_budget = _check_arguments(method, budget_seconds, seed, steps, samples, memory_budget)
    if progress is not None and not callable(progress):
        raise InvalidOptionError(
            f"progress: expected None or a callable progress(done, total, message), found {progress!r}"
        )
    spec = as_target(
        target if not isinstance(target, nn.Module) or frozen.in_shape is None else target, frozen.in_shape
    )
    check_target_kind(frozen, spec)
    # one dtype and device throughout: the network's (a float32 target from a trained model is exact in float64)
    spec = spec.to(dtype=frozen.dtype, device=frozen.device)
    if method in ("auto", "gauss-newton"):
        _warm_up()
    with _threads_for(frozen):
        return _fit(frozen, spec, data, method, budget_seconds, seed, progress, steps, memory_budget, samples)


def _check_arguments(method, budget_seconds, seed, steps, samples, memory_budget):
    """Validate the options of :func:`fit_norms` (:class:`InvalidOptionError`, like every other entry point)."""
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidOptionError(f"method: expected one of {', '.join(METHODS)}, found {method!r}")
    if budget_seconds is not None:
        check_scalar(budget_seconds, "budget_seconds", float, min_val=0.0, include_min=False)
    seed = check_seed(seed)
    steps = None if steps is None else check_scalar(steps, "steps", int, min_val=1)
    samples = check_scalar(samples, "samples", int, min_val=MIN_SAMPLES)
    memory_budget = None if memory_budget is None else check_scalar(memory_budget, "memory_budget", int, min_val=1)
    return seed, steps, samples, memory_budget


def _warm_up() -> None:
    """Import what the first ``torch.func`` Jacobian of a process imports lazily (``torch._dynamo``: 1.5–3 s once per
    process) before the budget's clock starts: a one-time cost of the process, not of the fit."""
    importlib.import_module("torch._dynamo")


#: below this width every tensor op is tiny and extra threads only add start-up and contention
SINGLE_THREAD_WIDTH = 512


@contextlib.contextmanager
def _threads_for(net: NormNet):
    """Run small networks single-threaded (restored afterwards): their tensor products are tiny, and on a shared
    2-core machine thread start-up and contention cost more than a second thread gains."""
    widest = max([p.shape[0] for p in net.parameters() if p.ndim >= 1] + [1])
    before = torch.get_num_threads()
    if widest <= SINGLE_THREAD_WIDTH and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _fit(frozen, spec, data, method, budget_seconds, seed, progress, steps, memory_budget, samples):
    start = time.perf_counter()
    fit_data = prepare_data(frozen, spec, data, seed=seed, train_samples=samples, held_samples=max(8, samples // 2))
    net = frozen.clone()
    evaluation = time.perf_counter()
    initial_error = fit_data.held_out_error(net)
    evaluation = time.perf_counter() - evaluation
    report = FitReport(
        method=method,
        train_samples=fit_data.x_train.shape[0],
        held_out_samples=fit_data.x_held.shape[0],
        initial_error=initial_error,
    )
    # every phase works to this deadline: the budget less what the final evaluation and bookkeeping need
    deadline = None if budget_seconds is None else start + float(budget_seconds) - _reserve(budget_seconds, evaluation)
    if method == "exact":
        check_capacity(net, spec)
        net, phase = fit_exact(net, spec, fit_data, progress=progress)
        report.phases.append(phase)
    elif method == "layerwise":
        report.phases.append(fit_layerwise(net, spec, fit_data, progress=progress))
    elif method == "gauss-newton":
        report.phases.append(
            fit_gauss_newton(
                net,
                fit_data,
                spec=spec,
                deadline=deadline,
                memory_budget=memory_budget,
                seed=seed,
                progress=progress,
                max_iterations=steps or GN_STEPS,
            )
        )
    elif method == "adam":
        adam = fit_adam(
            net,
            spec,
            fit_data,
            steps=steps or ADAM_STEPS,
            budget_seconds=None if deadline is None else max(1e-3, deadline - time.perf_counter()),
            seed=seed,
        )
        adam.details["stopped"] = "budget" if adam.iterations < (steps or ADAM_STEPS) else "steps"
        report.phases.append(adam)
    else:
        clock = (start, budget_seconds, steps is None, deadline, evaluation)
        net = _auto(net, spec, fit_data, report, clock, memory_budget, seed, progress, steps or GN_STEPS)
    report.exact = net.dtype == torch.float64 and report.final_error <= EXACT_TOLERANCE
    _finish(report, net, fit_data, budget_seconds)
    wall = time.perf_counter() - start
    if budget_seconds is not None and wall > OVERRUN_NOTE * budget_seconds:
        report.notes.append(
            f"ended {wall:.3f} s after its start, {wall / budget_seconds:.2f}× the budget of {budget_seconds:g} s "
            "(a step or start that took far longer than the ones measured before it, or the machine's load)"
        )
    net.meta = net.meta.replace(fit=report)  # typed: saved with the network, read back by NetMeta.from_dict
    return net, report


def _reserve(budget_seconds: float, evaluation: float) -> float:
    """Seconds kept back from the phases for the final evaluation and bookkeeping: a fraction of the budget, and at
    least ``RESERVE_EVALUATIONS`` held-out evaluations (the final ones: the best γ, β's error and the agreement)."""
    return min(
        0.25 * float(budget_seconds), max(RESERVE_FRACTION * float(budget_seconds), RESERVE_EVALUATIONS * evaluation)
    )


def _finish(report: FitReport, net: NormNet, data: FitData, budget_seconds) -> None:
    """Stop reason (from the last phase unless auto set it), the budget when one was given, the agreement."""
    if not report.stopped:
        last = report.phases[-1] if report.phases else None
        reason = "done" if last is None else str(last.details.get("stopped", "done"))
        report.stopped = "exact" if report.exact else reason
    if report.budget_seconds is None and budget_seconds is not None:
        report.budget_seconds, report.budget_source = float(budget_seconds), "given"
    y = data.y_held
    if y.ndim == 2 and y.shape[1] >= 2:
        with torch.no_grad():
            report.agreement = float((net(data.x_held).argmax(1) == y.argmax(1)).double().mean())


def _auto(
    net: NormNet, spec, data: FitData, report: FitReport, clock, memory_budget, seed, progress, steps: int
) -> NormNet:
    start, budget_seconds, default_steps, deadline, evaluation = clock
    identity = NormFunction(net).vector().clone()
    if exact_applicable(net, spec):
        try:
            solved, phase = fit_exact(net, spec, data, progress=progress)
        except SingularSystemError as exc:
            report.notes.append(f"closed form not available ({str(exc).splitlines()[0][:120]}); fitting instead")
        else:
            report.phases.append(phase)
            if phase.error_after <= EXACT_TOLERANCE or phase.error_after <= phase.error_before * 1e-9:
                return solved
            if phase.error_after < phase.error_before:
                net = solved
    layerwise_seconds = 0.0
    try:
        report.phases.append(fit_layerwise(net, spec, data, progress=progress))
        layerwise_seconds = report.phases[-1].seconds
    except InvalidNetworkError as exc:
        report.notes.append(f"layer-wise start skipped: {exc}")
    if report.final_error <= EXACT_TOLERANCE:
        report.stopped = "exact"
        return net
    if deadline is not None and time.perf_counter() >= deadline:
        report.stopped = "budget"
        return net
    first = fit_gauss_newton(
        net,
        data,
        spec=spec,
        deadline=deadline,
        memory_budget=memory_budget,
        seed=seed,
        progress=progress,
        max_iterations=steps,
        min_gain=MIN_GAIN,
        jacobian_dtype=torch.float32,
        rows=auto_rows(identity.numel(), current().lean_from),
        geodesic=current().geodesic,
    )
    report.phases.append(first)
    if first.error_after <= EXACT_TOLERANCE or first.details.get("stopped") == "budget":
        report.stopped = "exact" if first.error_after <= EXACT_TOLERANCE else "budget"
        return net
    if deadline is None and not default_steps:  # steps= without a budget: one run of at most that many steps
        report.stopped = str(first.details.get("stopped", "steps"))
        return net
    if deadline is None:  # the default budget: a multiple of the first run, stated in the report
        budget_seconds = min(DEFAULT_BUDGET_MAX, DEFAULT_BUDGET_FACTOR * (time.perf_counter() - start))
        report.budget_seconds = budget_seconds
        report.budget_source = f"default: {DEFAULT_BUDGET_FACTOR:g}× the first run, at most {DEFAULT_BUDGET_MAX:g} s"
        deadline = start + budget_seconds - _reserve(budget_seconds, evaluation)
    restarts = fit_restarts(
        net,
        spec,
        data,
        identity=identity,
        deadline=deadline,
        run_seconds=first.seconds,
        step_seconds=float(first.details.get("step_seconds", 0.0)),
        layerwise_seconds=layerwise_seconds,
        exact_tolerance=EXACT_TOLERANCE,
        seed=seed,
        memory_budget=memory_budget,
        max_iterations=steps,
        progress=progress,
    )
    report.phases.append(restarts)
    report.stopped = str(restarts.details["stopped"])
    return net
