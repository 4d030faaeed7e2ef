"""``scaling``: construction time, reconstruction error and conditioning vs ``d`` for ``width``, ``deep`` (k = 1)
and ``lowrank``, with the cost models overlaid.

Cost models of one ``d × d`` layer: width — one dense LU of size ``d²``: ``O(d⁶)``; deep (k = 1) — ``d`` LUs of size
``d``: ``O(d⁴)``; lowrank with fixed rank ``r`` — two LUs of size ``r·d``: ``O(r³ d³)``. Each model's constant is
fitted to the largest measured point; the plot shows how well the exponent matches. Conditioning is the
pivoted-QR estimate of every Khatri–Rao system (:func:`onlynorm.capacity`), where it is affordable.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import onlynorm

from ..targets.mlp import MLPSpec
from .runner import ExperimentResult, run_trials, trial_seed

RANK = 4
QUICK = {"width": [4, 8, 12, 16, 24], "deep": [8, 16, 32, 48], "lowrank": [8, 16, 32, 48]}
FULL = {"width": [8, 16, 24, 32, 48, 64], "deep": [16, 32, 64, 128, 192, 256], "lowrank": [16, 32, 64, 128, 192]}
EXPONENT = {"width": 6, "deep": 4, "lowrank": 3}
COND_MAX_SYSTEM = 2400  # pivoted QR beyond this size costs more than the experiment


def _target(method: str, d: int, seed: int):

    g = torch.Generator().manual_seed(seed)
    if method == "lowrank":
        W = (
            torch.randn(d, RANK, generator=g, dtype=torch.float64)
            @ torch.randn(RANK, d, generator=g, dtype=torch.float64)
            / d**0.5
        )
    else:
        W = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return MLPSpec((W,), (torch.randn(d, generator=g, dtype=torch.float64),))


def trial(method: str, d: int, seed: int) -> dict:

    spec = _target(method, d, seed)
    options: dict[str, Any] = {"block": 1} if method == "deep" else {}
    start = time.perf_counter()
    net = onlynorm.reconstruct(spec, method=method, seed=seed, **options)
    seconds = time.perf_counter() - start
    report = onlynorm.verify(net, spec, samples=5_000, seed=seed)
    conds = None
    largest = {"width": d * d, "deep": d, "lowrank": RANK * d}[method]
    if largest <= COND_MAX_SYSTEM:
        conds = [s.condition for s in onlynorm.capacity(net, spec).systems]
    return {
        "method": method,
        "d": d,
        "seconds": seconds,
        "max_rel_error": report.max_rel_error,
        "max_condition": max(conds) if conds else None,
        "median_condition": float(np.median(conds)) if conds else None,
        "max_width": net.summary().max_width,
        "depth": net.summary().depth,
    }


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    sizes = QUICK if quick else FULL
    repeats = 2 if quick else 3
    trials = [
        {"method": m, "d": d, "seed": trial_seed(seed, i, d, r)}
        for i, m in enumerate(sizes)
        for d in sizes[m]
        for r in range(repeats)
    ]
    # timing trials run one at a time: parallel trials would time each other
    rows = run_trials(trial, trials, console=console, description="scaling trials", n_jobs=1)
    summary_rows = []
    for m in sizes:
        for d in sizes[m]:
            sel = [r for r in rows if r["method"] == m and r["d"] == d]
            conds = [r["max_condition"] for r in sel if r["max_condition"] is not None]
            summary_rows.append(
                {
                    "method": m,
                    "d": d,
                    "seconds": float(np.median([r["seconds"] for r in sel])),
                    "max_rel_error": max(r["max_rel_error"] for r in sel),
                    "max_condition": max(conds) if conds else None,
                    "max_width": sel[0]["max_width"],
                    "depth": sel[0]["depth"],
                }
            )
    slopes = {}
    for m in sizes:
        pts = [r for r in summary_rows if r["method"] == m]
        big = pts[len(pts) // 2 :]  # the larger half of the sizes: where the asymptotic cost should show
        if len(big) >= 2:
            slopes[m] = float(np.polyfit(np.log([r["d"] for r in big]), np.log([r["seconds"] for r in big]), 1)[0])
    data = {
        "experiment": "scaling",
        "quick": quick,
        "seed": seed,
        "repeats": repeats,
        "rank": RANK,
        "rows": summary_rows,
        "trials": rows,
        "fitted_time_exponents": slopes,
        "model_exponents": EXPONENT,
    }
    return ExperimentResult("scaling", data, {"scaling.png": _figure(summary_rows)}, _summary(data))


def _figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = {"width": "#1b9e77", "deep": "#d95f02", "lowrank": "#7570b3"}
    for m, color in colors.items():
        pts = [r for r in rows if r["method"] == m]
        if not pts:
            continue
        d = np.array([r["d"] for r in pts], dtype=float)
        t = np.array([r["seconds"] for r in pts])
        axes[0].plot(d, t, "o", color=color, label=m)
        c = t[-1] / d[-1] ** EXPONENT[m]
        grid = np.geomspace(d.min(), d.max(), 50)
        axes[0].plot(grid, c * grid ** EXPONENT[m], "--", color=color, lw=1, label=f"O(d^{EXPONENT[m]}) model")
        axes[1].plot(d, [r["max_rel_error"] for r in pts], "o-", color=color, label=m)
        cond = [(r["d"], r["max_condition"]) for r in pts if r["max_condition"]]
        if cond:
            axes[2].plot(*zip(*cond), "o-", color=color, label=m)
    for ax, title, ylabel in zip(
        axes,
        ["construction time", "reconstruction error", "worst system condition"],
        ["seconds", "max |f−g| / max |g| (5,000 samples)", "cond estimate (pivoted QR)"],
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d (one d×d layer)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(data: dict) -> str:
    lines = [
        "# scaling",
        "",
        f"One d×d layer per trial, median of {data['repeats']} trials; lowrank targets have rank {data['rank']}.",
        "",
        "| method | d | seconds | max rel error | worst cond | max width | depth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        cond = "—" if r["max_condition"] is None else f"{r['max_condition']:.2e}"
        lines.append(
            f"| {r['method']} | {r['d']} | {r['seconds']:.3g} | {r['max_rel_error']:.2e} | {cond} | "
            f"{r['max_width']} | {r['depth']} |"
        )
    lines += ["", "Fitted time exponents (log-log slope over the larger half of the sizes) vs the cost models:", ""]
    for m, s in data["fitted_time_exponents"].items():
        lines.append(f"* {m}: measured d^{s:.2f}, model d^{data['model_exponents'][m]}")
    return "\n".join(lines) + "\n"
