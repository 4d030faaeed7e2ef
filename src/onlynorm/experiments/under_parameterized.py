"""``under-parameterized``: the error of norm-only tuning below the theorem's width, method by method.

Random targets ``d → d → … → d`` (depth 2–3) on ``[-1, 1]^d``; frozen random width networks with hidden width
``N = ratio · m·n`` per pair, ``ratio ∈ {1/16 … 2}``. Every method starts from the same frozen network (norms at
identity) and is scored by the relative RMS error ``‖f − g‖ / ‖g‖`` on 4,000 independent test points of the box:

* ``closed form`` — ``solve_norms`` (least-squares γ below ``m·n``, exact at and above it);
* ``adam-3000`` — 3,000 Adam steps (batch 256, lr 5e-3), the baseline, run first and timed;
* ``layerwise``; ``auto`` and ``gauss-newton`` (from identity; below the width only — at and above it the closed
  form is exact) with **half of Adam-3000's measured time as their budget** (what is measured: how low auto's error
  gets in at most half of Adam's time) — :func:`onlynorm.fit_norms`;
* ``adam-matched`` — Adam for as long as ``auto`` took;
* with ``--reference``: ``reference`` — ``auto`` again with ``REFERENCE_FACTOR`` (6) times the budget and another
  seed (another sample of training points, another restart sequence: a long multi-start search), and
  ``best-known`` — the lowest test error any method reached in the trial. ``auto / best-known`` is then how far
  the budgeted answer is from the best γ, β anyone found: a measured estimate of the *expressivity* curve below the
  theorem's width, separate from the optimizer's gap. The reference runs on the goal grid (``GOAL_RATIOS`` at
  d = 6 and 10, depth 2, 3 targets per cell), sized to finish in about 20 minutes on a shared 2-core machine
  (d = 16 would triple it: one of its trials costs ~6× Adam's 3,000 steps, 5–8 minutes there).
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import torch

import onlynorm
from onlynorm import Box
from onlynorm.fit.data import relative_rms

from .runner import ExperimentResult, run_trials, trial_seed

RATIOS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0]
GOAL_RATIOS = [1 / 8, 1 / 4, 1 / 2]
METHODS = ["closed form", "layerwise", "gauss-newton", "auto", "adam-3000", "adam-matched"]
REFERENCE = ["reference", "best-known"]
#: the reference's budget over auto's
REFERENCE_FACTOR = 6
# the first torch.func Jacobian of a process imports torch._dynamo (1.5–3 s): once, here, not inside a timed fit
importlib.import_module("torch._dynamo")


def random_target(d: int, depth: int, seed: int):

    gen = torch.Generator().manual_seed(seed)
    dims = [d] * (depth + 1)
    return onlynorm.MLPSpec(
        tuple(torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5 for n, m in zip(dims, dims[1:])),
        tuple(0.5 * torch.randn(m, generator=gen, dtype=torch.float64) for m in dims[1:]),
    )


def trial(d: int, depth: int, ratio: float, adam_steps: int, seed: int, reference: bool = False) -> dict:

    spec = random_target(d, depth, seed)
    box = Box(-1.0, 1.0, dim=d)
    hidden = [max(1, round(ratio * d * d))] * depth
    x_test = box.sample(4000, seed=seed + 1)
    y_test = spec(x_test)
    frozen = onlynorm.random_normnet(spec, seed=seed, hidden=hidden)
    out: dict = {
        "d": d,
        "depth": depth,
        "ratio": ratio,
        "hidden": hidden,
        "seed": seed,
        "tunable": sum(p.numel() for p in frozen.norm_parameters()),
    }

    def score(name, net, seconds, iterations):
        with torch.no_grad():
            out[name] = {"rms": relative_rms(net(x_test), y_test), "seconds": seconds, "iterations": iterations}

    def timed(name, **kwargs):
        start = time.perf_counter()
        net, report = onlynorm.fit_norms(frozen, spec, box, seed=seed, **kwargs)
        score(name, net, time.perf_counter() - start, report.iterations)
        return report

    start = time.perf_counter()
    closed = onlynorm.solve_norms(frozen, spec, box)
    score("closed form", closed, time.perf_counter() - start, 1)
    timed("layerwise", method="layerwise")
    timed("adam-3000", method="adam", steps=adam_steps)
    budget = out["adam-3000"]["seconds"] / 2  # the goal: auto in at most half of Adam's time
    report = timed("auto", method="auto", budget_seconds=budget)
    out["auto_phases"] = [p.name for p in report.phases]
    if ratio < 1:
        timed("gauss-newton", method="gauss-newton", budget_seconds=budget)
    timed("adam-matched", method="adam", steps=10**7, budget_seconds=max(out["auto"]["seconds"], 1e-3))
    out["auto_stopped"], out["auto_restarts"] = report.stopped, _restarts(report)
    if reference and ratio < 1:
        start = time.perf_counter()
        net, ref = onlynorm.fit_norms(
            frozen, spec, box, seed=seed + 1, budget_seconds=REFERENCE_FACTOR * budget, samples=4096
        )
        score("reference", net, time.perf_counter() - start, ref.iterations)
        out["reference_restarts"] = _restarts(ref)
        best = min((m for m in METHODS + ["reference"] if m in out), key=lambda m: out[m]["rms"])
        out["best-known"] = dict(out[best], source=best)
    return out


def _restarts(report) -> int:
    return next((p.iterations for p in report.phases if p.name == "restarts"), 0)


def configurations(quick: bool, reference: bool = False) -> tuple[list[tuple[int, int]], list[float], int, int]:
    if quick:
        return [(4, 2)], [1 / 4, 1.0], 1, 200
    if reference:
        return [(6, 2), (10, 2)], GOAL_RATIOS, 3, 3000
    return [(6, 2), (6, 3), (10, 2), (16, 2)], RATIOS, 4, 3000


def run(
    quick: bool,
    seed: int,
    console=None,
    reference: bool = False,
    dims: list[int] | None = None,
    repeats: dict[int, int] | int | None = None,
) -> ExperimentResult:
    """Run the grid. ``dims`` (depth 2) replaces the configurations' dimensions and ``repeats`` their trials per
    cell (one number, or one per dimension: ``{6: 3, 16: 1}``) — a smaller or larger grid with the same seeds."""
    configs, ratios, default_repeats, adam_steps = configurations(quick, reference)
    if dims is not None:
        configs = [(d, 2) for d in dims]
    per_dim = repeats if isinstance(repeats, dict) else {}
    count = {d: per_dim.get(d, repeats if isinstance(repeats, int) else default_repeats) for d, _ in configs}
    repeats = max(count.values())
    trials = [
        {
            "d": d,
            "depth": depth,
            "ratio": r,
            "adam_steps": adam_steps,
            "seed": trial_seed(seed, d, depth, RATIOS.index(r) if reference else i, k),  # same cells, same seeds
            "reference": reference,
        }
        for d, depth in configs
        for i, r in enumerate(ratios)
        for k in range(count[d])
    ]
    rows = run_trials(trial, trials, console=console, description="under-parameterized trials")
    table = summarize(rows)
    data = {
        "experiment": "under-parameterized",
        "quick": quick,
        "reference": reference,
        "seed": seed,
        "configs": configs,
        "ratios": ratios,
        "repeats": repeats,
        "repeats_per_dim": {str(d): n for d, n in count.items()},
        "adam_steps": adam_steps,
        "table": table,
        "goal": goal_ratios(table),
        "trials": rows,
    }
    return ExperimentResult(
        "under-parameterized", data, {"under_parameterized.png": _figure(table, configs)}, _summary(data)
    )


def summarize(rows: list[dict]) -> list[dict]:
    keys = sorted({(t["d"], t["depth"], t["ratio"]) for t in rows})
    table = []
    for d, depth, ratio in keys:
        sel = [t for t in rows if (t["d"], t["depth"], t["ratio"]) == (d, depth, ratio)]
        row = {
            "d": d,
            "depth": depth,
            "ratio": ratio,
            "hidden": sel[0]["hidden"][0],
            "tunable": sel[0]["tunable"],
            "trials": len(sel),
        }
        for m in METHODS + REFERENCE:
            vals = [t[m] for t in sel if m in t]
            if vals:
                row[m] = float(np.median([v["rms"] for v in vals]))
                row[m + " s"] = float(np.median([v["seconds"] for v in vals]))
        row["auto/adam error"] = float(np.median([t["auto"]["rms"] / t["adam-3000"]["rms"] for t in sel]))
        row["auto/adam time"] = float(np.median([t["auto"]["seconds"] / t["adam-3000"]["seconds"] for t in sel]))
        if all("best-known" in t for t in sel):
            row["auto/best-known"] = float(np.median([t["auto"]["rms"] / t["best-known"]["rms"] for t in sel]))
        table.append(row)
    return table


def goal_ratios(table: list[dict]) -> list[dict]:
    """The goal ratios, per width ratio: auto's error and time over Adam-3000's (medians over configurations)."""
    out = []
    for r in sorted({row["ratio"] for row in table}):
        sel = [row for row in table if row["ratio"] == r]
        out.append(
            {
                "ratio": r,
                "auto/adam error": float(np.median([s["auto/adam error"] for s in sel])),
                "auto/adam time": float(np.median([s["auto/adam time"] for s in sel])),
                "auto max rms": float(max(s["auto"] for s in sel)),
            }
        )
        if all("auto/best-known" in s for s in sel):
            out[-1]["auto/best-known"] = float(np.median([s["auto/best-known"] for s in sel]))
    return out


def _figure(table: list[dict], configs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(configs) + 1, figsize=(4.2 * (len(configs) + 1), 3.8))
    markers = dict(zip(METHODS + REFERENCE, "o^vsDx*P"))
    for ax, (d, depth) in zip(axes, configs):
        sel = [r for r in table if (r["d"], r["depth"]) == (d, depth)]
        for m in METHODS + REFERENCE:
            pts = [(r["ratio"], max(r[m], 1e-16)) for r in sel if m in r]
            if pts:
                ax.plot(*zip(*pts), marker=markers[m], label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden width N / (m·n)")
        ax.set_title(f"d = {d}, depth {depth}")
    axes[0].set_ylabel("relative RMS error (median)")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for m in METHODS:
        pts = [(r[m + " s"], max(r[m], 1e-16)) for r in table if m in r and r["ratio"] < 1]
        if pts:
            ax.scatter(*zip(*pts), marker=markers[m], label=m, s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_title("below the width: error vs time")
    fig.tight_layout()
    return fig


def _trial_counts(data: dict) -> str:
    per = data.get("repeats_per_dim") or {}
    if len(set(per.values())) > 1:
        return "trials " + ", ".join(f"{n} at d = {d}" for d, n in per.items())
    return f"{data['repeats']} trials"


def _summary(data: dict) -> str:
    ref = bool(data.get("reference"))
    extra_h = " reference | best-known | auto/best-known |" if ref else ""
    lines = [
        "# under-parameterized",
        "",
        f"{_trial_counts(data)} per cell, medians; Adam: {data['adam_steps']} steps of batch 256; auto and "
        "gauss-newton get half of Adam's measured time as budget; test: 4,000 points of [-1, 1]^d. Errors are "
        "relative RMS."
        + (
            f" reference: auto with {REFERENCE_FACTOR}× the budget and another seed; best-known: the lowest test "
            "error of any method in the trial."
            if ref
            else ""
        ),
        "",
        "| d | depth | N/(m·n) | N | closed form | layerwise | gauss-newton | auto | adam-3000 | adam-matched | "
        "auto s | adam-3000 s | auto/adam error | auto/adam time |" + extra_h,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if ref else ""),
    ]
    for r in data["table"]:
        cell = lambda m, r=r: f"{r[m]:.2e}" if m in r else "—"  # noqa: E731
        tail = ""
        if ref:
            kb = f"{r['auto/best-known']:.2f}" if "auto/best-known" in r else "—"
            tail = f" {cell('reference')} | {cell('best-known')} | {kb} |"
        lines.append(
            f"| {r['d']} | {r['depth']} | {r['ratio']:g} | {r['hidden']} | {cell('closed form')} | "
            f"{cell('layerwise')} | {cell('gauss-newton')} | {cell('auto')} | {cell('adam-3000')} | "
            f"{cell('adam-matched')} | {r['auto s']:.2f} | {r['adam-3000 s']:.2f} | "
            f"{r['auto/adam error']:.2f} | {r['auto/adam time']:.2f} |" + tail
        )
    lines += [
        "",
        "Goal ratios (median over configurations of the per-cell medians):",
        "",
        "| N/(m·n) | auto/adam error | auto/adam time | worst auto rel RMS |" + (" auto/best-known |" if ref else ""),
        "|---|---|---|---|" + ("---|" if ref else ""),
    ]
    for g in data["goal"]:
        kb = (f" {g['auto/best-known']:.2f} |" if "auto/best-known" in g else " — |") if ref else ""
        lines.append(
            f"| {g['ratio']:g} | {g['auto/adam error']:.2f} | {g['auto/adam time']:.2f} | {g['auto max rms']:.2e} |"
            + kb
        )
    return "\n".join(lines) + "\n"
