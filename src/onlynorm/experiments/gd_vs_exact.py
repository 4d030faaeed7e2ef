"""``gd-vs-exact``: student–teacher on a random target, closed form vs gradient descent on the same norms.

The random frozen network's hidden width is ``N = ratio · m·n`` per pair, ``ratio ∈ {¼, ½, 1, 2}``: below 1 the
closed form is the least-squares γ (the best reachable weights), at 1 it is exact, above 1 the minimum-norm
solution. Gradient norm-only training (Adam, fixed statistics) starts from the same frozen network with norms at
identity and samples the target on the box. Both are scored by the relative RMS error on the same test points;
for gradient descent the error is also recorded against wall time.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import onlynorm
from onlynorm import Box

from .runner import ExperimentResult, run_trials, trial_seed

RATIOS = [0.25, 0.5, 1.0, 2.0]


def _errors(net, spec, x) -> tuple[float, float]:
    with torch.no_grad():
        gx, fx = spec(x), net(x)
    rms = float(torch.sqrt(((fx - gx) ** 2).mean()) / torch.sqrt((gx**2).mean()))
    return rms, float((fx - gx).abs().max() / gx.abs().max())


def trial(ratio: float, d: int, depth: int, steps: int, seed: int) -> dict:

    gen = torch.Generator().manual_seed(seed)
    dims = [d] * (depth + 1)
    spec = onlynorm.MLPSpec(
        tuple(torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5 for n, m in zip(dims, dims[1:])),
        tuple(0.5 * torch.randn(m, generator=gen, dtype=torch.float64) for m in dims[1:]),
    )
    box = Box(-1.0, 1.0, dim=d)
    hidden = [max(1, round(ratio * d * d)) for _ in range(depth)]
    x_test = box.sample(4000, seed=seed + 1)
    frozen = onlynorm.random_normnet(spec, seed=seed, hidden=hidden)
    start = time.perf_counter()
    exact = onlynorm.solve_norms(frozen, spec, box)
    exact_seconds = time.perf_counter() - start
    exact_rms, exact_max = _errors(exact, spec, x_test)
    gd = frozen.clone()
    curve = []
    chunk = max(1, steps // 10)
    elapsed = 0.0
    for k in range(0, steps, chunk):
        history = onlynorm.train_norm_only(
            gd, target=spec, box=box, steps=chunk, batch_size=256, lr=5e-3, seed=seed + k, progress=False
        )
        elapsed += history.seconds[-1]
        rms, mx = _errors(gd, spec, x_test)
        curve.append({"step": k + chunk, "seconds": elapsed, "rms": rms, "max": mx})
    return {
        "ratio": ratio,
        "seed": seed,
        "hidden": hidden,
        "exact_rms": exact_rms,
        "exact_max": exact_max,
        "exact_seconds": exact_seconds,
        "gd_rms": curve[-1]["rms"],
        "gd_max": curve[-1]["max"],
        "gd_seconds": elapsed,
        "gd_curve": curve,
    }


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    d, depth = (4, 2) if quick else (6, 2)
    steps = 400 if quick else 3000
    repeats = 2 if quick else 4
    trials = [
        {"ratio": r, "d": d, "depth": depth, "steps": steps, "seed": trial_seed(seed, i, k)}
        for i, r in enumerate(RATIOS)
        for k in range(repeats)
    ]
    rows = run_trials(trial, trials, console=console, description="gd-vs-exact trials")
    per_ratio = []
    for r in RATIOS:
        sel = [t for t in rows if t["ratio"] == r]
        per_ratio.append(
            {
                "ratio": r,
                "hidden": sel[0]["hidden"],
                "exact_rms_median": float(np.median([t["exact_rms"] for t in sel])),
                "gd_rms_median": float(np.median([t["gd_rms"] for t in sel])),
                "exact_seconds_median": float(np.median([t["exact_seconds"] for t in sel])),
                "gd_seconds_median": float(np.median([t["gd_seconds"] for t in sel])),
            }
        )
    data = {
        "experiment": "gd-vs-exact",
        "quick": quick,
        "seed": seed,
        "d": d,
        "depth": depth,
        "gd_steps": steps,
        "repeats": repeats,
        "per_ratio": per_ratio,
        "trials": rows,
    }
    return ExperimentResult("gd-vs-exact", data, {"gd_vs_exact.png": _figure(per_ratio, rows)}, _summary(data))


def _figure(per_ratio: list[dict], rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-16
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ratios = [r["ratio"] for r in per_ratio]
    ax1.plot(ratios, [max(r["exact_rms_median"], floor) for r in per_ratio], "o-", label="closed form (LS below 1)")
    ax1.plot(ratios, [r["gd_rms_median"] for r in per_ratio], "s-", label="gradient descent on γ, β")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("hidden width N / (m·n)")
    ax1.set_ylabel("relative RMS error on the box")
    ax1.set_title("error vs width (median over trials)")
    ax1.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(per_ratio):
        sel = [t for t in rows if t["ratio"] == r["ratio"]][0]
        c = cmap(i / max(1, len(per_ratio) - 1))
        ax2.plot(
            [p["seconds"] for p in sel["gd_curve"]],
            [p["rms"] for p in sel["gd_curve"]],
            "-",
            color=c,
            label=f"GD, N/(mn)={r['ratio']}",
        )
        ax2.plot([sel["exact_seconds"]], [max(sel["exact_rms"], floor)], "*", ms=12, color=c)
    ax2.set_yscale("log")
    ax2.set_xscale("log")
    ax2.set_xlabel("wall time (s)")
    ax2.set_ylabel("relative RMS error")
    ax2.set_title("error reached vs time (★ = closed form)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(data: dict) -> str:
    lines = [
        "# gd-vs-exact",
        "",
        f"Random target {[data['d']] * (data['depth'] + 1)}, box [-1, 1]^{data['d']}, "
        f"{data['repeats']} trials per ratio, gradient descent: {data['gd_steps']} Adam steps (batch 256).",
        "",
        "| N/(m·n) | hidden | closed form rel RMS | GD rel RMS | closed form s | GD s |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["per_ratio"]:
        lines.append(
            f"| {r['ratio']} | {r['hidden']} | {r['exact_rms_median']:.2e} | {r['gd_rms_median']:.2e} | "
            f"{r['exact_seconds_median']:.3f} | {r['gd_seconds_median']:.1f} |"
        )
    return "\n".join(lines) + "\n"
