"""Spend the rest of ``auto``'s budget: Levenberg–Marquardt restarted from other starts, the best on held-out kept.

Once the first run (layer-wise start, then Levenberg–Marquardt) has converged, the remaining time goes to restarts,
cycling through starts of these kinds (each followed by a Levenberg–Marquardt run on all γ, β; the default cycle is
``perturbed, resampled, identity, sign-flip, resampled``, :mod:`onlynorm.fit.auto_config`):

* ``"perturbed"`` — the best γ, β so far with multiplicative noise (basin hopping; the noise grows 0.1 → 0.3 over
  the cycles);
* ``"sign-flip"`` — the best so far with γ, β of a random quarter of the hidden units negated (the unit is then
  active on the other side of its hyperplane);
* ``"subsample"`` — the layer-wise start fitted on a random half of the training points;
* ``"resampled"`` — the layer-wise start with a fresh random half of the rows for every layer's least squares
  (errors still propagated through all points);
* ``"identity"`` — the frozen network's own norms (γ = 1, β = 0 for a random network; a pretrained one's
  BatchNorms).

**Screening** (``auto_config(screen_steps=k)``): each restart first runs ``k`` steps and is run on to convergence
only if its held-out error is then within ``SCREEN_MARGIN`` of the best so far — more starts in the same time.

**The schedule.** A restart is begun only if the time left (minus a reserve for the final evaluation) holds at
least a third of a typical run — the first run's Levenberg–Marquardt time, then the running mean of the restarts'
— and each run is handed the deadline, so its last step is not begun unless it fits (the slowest step so far is the
estimate). A layer-wise start (``subsample``, ``resampled``) the time left cannot hold gives way to the cycle's
next start that needs no layer-wise fit — always a kind the configured cycle names; a cycle of layer-wise starts
only then stops. Restarts stop early only when the held-out error reaches the exact regime. The network is left holding
the best γ, β found on the held-out points; the phase record lists every restart (start, error, seconds).
"""

from __future__ import annotations

import time

import torch

from ..errors import InvalidNetworkError
from ..nets.normnet import NormNet
from .auto_config import current
from .data import FitData
from .gauss_newton import MIN_GAIN, auto_rows, fit_gauss_newton
from .jacobian import NormFunction
from .layerwise import fit_layerwise
from .report import Phase

__all__ = ["fit_restarts", "STARTS", "MIN_RUN_FRACTION"]

#: the starts that run a layer-wise fit (the slow ones: skipped for a cheap start when time is short)
_LAYERWISE = ("subsample", "resampled")

#: the default cycle of restart kinds (``auto_config(starts=...)`` changes it)
STARTS = current().starts
#: a restart is begun only if at least this fraction of a typical run fits in the time left
MIN_RUN_FRACTION = 1 / 3
#: screening (``auto_config(screen_steps=k)``): a restart is run on past its first k steps only if its held-out
#: error is then within this fraction of the best so far
SCREEN_MARGIN = 0.1


def _hidden_norms(net: NormNet) -> set[str]:
    """Names of the γ, β of norms followed by a ReLU (the units whose sign can be flipped)."""
    names = set()
    layers = list(net.layers)
    for i, stage in enumerate(layers):
        norm = getattr(stage, "norm", None)
        after = layers[i + 1] if i + 1 < len(layers) else None
        if norm is not None and (getattr(stage, "relu", False) or getattr(after, "op", None) == "relu"):
            names |= {f"layers.{i}.norm.{k}" for k, _ in norm.named_parameters()}
    return names


def _flipped(fn: NormFunction, theta: torch.Tensor, hidden: set[str], gen: torch.Generator) -> torch.Tensor:
    out = theta.clone()
    offset = 0
    flips: dict[str, torch.Tensor] = {}
    for name, size in zip(fn.names, fn.sizes):
        unit = name.rsplit(".", 1)[0]
        if name in hidden:
            if unit not in flips:
                flips[unit] = torch.rand(size, generator=gen) < 0.25
            sign = 1.0 - 2.0 * flips[unit].to(out)
            out[offset : offset + size] *= sign
        offset += size
    return out


def _perturbed(theta: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(theta.shape, generator=gen, dtype=torch.float64).to(theta)
    scale = theta.abs() + theta.abs().mean().clamp_min(1e-3)  # β near 0 still moves
    return theta + sigma * scale * noise


def _subsample(data: FitData, gen: torch.Generator) -> FitData:
    n = data.x_train.shape[0]
    pick = torch.randperm(n, generator=gen)[: max(2, n // 2)].to(data.x_train.device)
    return FitData(data.x_train[pick], data.y_train[pick], data.x_held, data.y_held, data.box, data.source)


def fit_restarts(
    net: NormNet,
    spec,
    data: FitData,
    *,
    identity: torch.Tensor,
    deadline: float,
    run_seconds: float,
    step_seconds: float,
    layerwise_seconds: float,
    exact_tolerance: float,
    seed: int = 0,
    memory_budget: int | None = None,
    max_iterations: int = 300,
    progress=None,
) -> Phase:
    """Restart Levenberg–Marquardt from other starts until ``deadline`` (or an exact fit); ``net`` ends holding the
    best γ, β on the held-out points. ``identity``: the frozen network's norm vector; ``run_seconds``,
    ``step_seconds``, ``layerwise_seconds``: what the first run took (the schedule's estimates)."""
    start = time.perf_counter()
    fn = NormFunction(net)
    best_theta = fn.vector().clone()
    best = before = data.held_out_error(net)
    gen = torch.Generator().manual_seed(seed + 104729)
    hidden = _hidden_norms(net)
    runs: list[dict] = []
    typical = max(run_seconds, 1e-4)
    k = 0
    stopped = "exact" if best <= exact_tolerance else "budget"
    config = current()
    rows = auto_rows(fn.size, config.lean_from)
    while best > exact_tolerance:
        left = deadline - time.perf_counter()
        kind: str | None = config.starts[k % len(config.starts)]
        if kind in _LAYERWISE and left < layerwise_seconds + 2 * step_seconds:
            kind = _cheap_start(config.starts, k)
        if kind is None or left < max(MIN_RUN_FRACTION * typical, 2 * step_seconds):
            break
        t0 = time.perf_counter()
        if not _set_start(kind, net, spec, data, fn, best_theta, identity, hidden, gen, k):
            k += 1
            continue
        if kind in _LAYERWISE:  # the slowest layer-wise start so far guards the next one
            layerwise_seconds = max(layerwise_seconds, time.perf_counter() - t0)
        if time.perf_counter() + step_seconds > deadline:  # the start itself took the time left
            break
        lm = {
            "spec": spec,
            "deadline": deadline,
            "memory_budget": memory_budget,
            "seed": seed + k + 1,
            "step_seconds": step_seconds,
            "min_gain": MIN_GAIN,
            "jacobian_dtype": torch.float32,
            "rows": rows,
            "geodesic": config.geodesic,
        }
        screen = config.screen_steps if config.screen_steps and config.screen_steps < max_iterations else None
        phase = fit_gauss_newton(net, data, max_iterations=screen or max_iterations, **lm)
        error, steps, screened = phase.error_after, phase.iterations, False
        if screen is not None and phase.details.get("stopped") == "steps":
            if error < best * (1 + SCREEN_MARGIN):  # promising: run it to convergence
                step_seconds = max(step_seconds, float(phase.details.get("step_seconds", 0.0)))
                more = fit_gauss_newton(
                    net, data, max_iterations=max_iterations - steps, **dict(lm, step_seconds=step_seconds)
                )
                error, steps, phase = more.error_after, steps + more.iterations, more
            else:  # far behind the best after the screening steps: drop it, start another
                screened = True
        step_seconds = max(step_seconds, float(phase.details.get("step_seconds", 0.0)))
        seconds = time.perf_counter() - t0
        runs.append({"start": kind, "error": error, "seconds": seconds, "steps": steps, "screened": screened})
        if error < best:
            best, best_theta = error, fn.vector().clone()
        typical = (typical * len(runs) + seconds) / (len(runs) + 1)
        k += 1
        if progress is not None:
            progress(len(runs), len(runs) + 1, f"restarts: {len(runs)} done, best held-out rel RMS {best:.3e}")
        if best <= exact_tolerance:
            stopped = "exact"
    fn.assign(best_theta)
    return Phase(
        "restarts",
        before,
        best,
        time.perf_counter() - start,
        len(runs),
        history=[min([before] + [r["error"] for r in runs[: i + 1]]) for i in range(len(runs))],
        details={"stopped": stopped, "runs": runs, "improved": sum(r["error"] < before for r in runs)},
    )


def _cheap_start(cycle: tuple[str, ...], k: int) -> str | None:
    """The next start after position ``k`` of ``cycle`` that needs no layer-wise fit (None if the cycle has none):
    what runs instead of a layer-wise start the time left cannot hold — always a kind the user's cycle names."""
    for i in range(1, len(cycle) + 1):
        kind = cycle[(k + i) % len(cycle)]
        if kind not in _LAYERWISE:
            return kind
    return None


def _set_start(kind, net, spec, data, fn, best_theta, identity, hidden, gen, k) -> bool:
    """Put the start ``kind`` into ``net``; False if it does not apply to this network (then it is skipped)."""
    if kind == "perturbed":
        fn.assign(_perturbed(best_theta, 0.1 + 0.1 * (k // len(current().starts) % 3), gen))
    elif kind == "sign-flip":
        if not hidden:
            return False
        fn.assign(_flipped(fn, best_theta, hidden, gen))
    elif kind == "identity":
        fn.assign(identity)
    else:
        try:
            if kind == "resampled":
                fit_layerwise(net, spec, data, resample=gen)
            else:
                fit_layerwise(net, spec, _subsample(data, gen))
        except InvalidNetworkError:
            return False
    return True
