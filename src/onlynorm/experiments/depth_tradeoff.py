"""``depth-tradeoff``: the block size ``k`` of the deep construction trades width ``m·k`` for depth ``⌈n/k⌉ + 1``.

For one ``d × d`` target layer and every ``k`` the experiment records depth, widest normalization layer, frozen
and tunable parameters, construction time and reconstruction error. ``k = d`` is a single block: width ``d²``,
the width construction's size.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import onlynorm

from .runner import ExperimentResult, run_trials, trial_seed


def trial(d: int, k: int, seed: int) -> dict:

    gen = torch.Generator().manual_seed(seed)
    spec = onlynorm.MLPSpec(
        (torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5,),
        (torch.randn(d, generator=gen, dtype=torch.float64),),
    )
    start = time.perf_counter()
    net = onlynorm.reconstruct(spec, method="deep", block=k, seed=seed)
    seconds = time.perf_counter() - start
    s = net.summary()
    report = onlynorm.verify(net, spec, samples=5_000, seed=seed)
    return {
        "d": d,
        "k": k,
        "depth": s.depth,
        "max_width": s.max_width,
        "frozen_parameters": s.frozen_parameters,
        "tunable_parameters": s.tunable_parameters,
        "seconds": seconds,
        "max_rel_error": report.max_rel_error,
    }


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    d = 12 if quick else 40
    ks = [k for k in range(1, d + 1) if d % k == 0] if quick else [1, 2, 4, 5, 8, 10, 20, 40]
    repeats = 2 if quick else 3
    trials = [{"d": d, "k": k, "seed": trial_seed(seed, k, r)} for k in ks for r in range(repeats)]
    rows = run_trials(trial, trials, console=console, description="depth-tradeoff trials", n_jobs=1)
    per_k = []
    for k in ks:
        sel = [r for r in rows if r["k"] == k]
        per_k.append(
            {
                **{
                    key: sel[0][key]
                    for key in ("d", "k", "depth", "max_width", "frozen_parameters", "tunable_parameters")
                },
                "seconds": float(np.median([r["seconds"] for r in sel])),
                "max_rel_error": max(r["max_rel_error"] for r in sel),
            }
        )
    data = {"experiment": "depth-tradeoff", "quick": quick, "seed": seed, "d": d, "repeats": repeats, "per_k": per_k}
    return ExperimentResult("depth-tradeoff", data, {"depth_tradeoff.png": _figure(per_k)}, _summary(data))


def _figure(per_k: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    ks = [r["k"] for r in per_k]
    ax1.plot([r["max_width"] for r in per_k], [r["depth"] for r in per_k], "o-")
    for r in per_k:
        ax1.annotate(f"k={r['k']}", (r["max_width"], r["depth"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("widest normalization layer (m·k)")
    ax1.set_ylabel("depth (normalization layers)")
    ax1.set_title("width/depth trade-off")
    ax2.plot(ks, [r["seconds"] for r in per_k], "o-", label="construction time")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("block size k")
    ax2.set_ylabel("seconds")
    ax2.set_title("time (⌈n/k⌉ systems of size m·k)")
    ax3.plot(ks, [r["max_rel_error"] for r in per_k], "o-", color="#d95f02")
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("block size k")
    ax3.set_ylabel("max |f−g| / max |g|")
    ax3.set_title("reconstruction error")
    fig.tight_layout()
    return fig


def _summary(data: dict) -> str:
    lines = [
        "# depth-tradeoff",
        "",
        f"One {data['d']}×{data['d']} layer, deep construction, median time of {data['repeats']} trials.",
        "",
        "| k | depth | max width | frozen params | tunable γ, β | seconds | max rel error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["per_k"]:
        lines.append(
            f"| {r['k']} | {r['depth']} | {r['max_width']} | {r['frozen_parameters']:,} | "
            f"{r['tunable_parameters']:,} | {r['seconds']:.3g} | {r['max_rel_error']:.2e} |"
        )
    return "\n".join(lines) + "\n"
