"""Variants of ``fit_norms(method="auto")`` on the under-parameterized goal cells: same cells, seeds and budgets.

    .venv/bin/python benchmarks/fit_variants.py [--dims 6,10] [--seeds 3] [--variants base,geodesic,...]
                                                [--json out.json]
    .venv/bin/python benchmarks/fit_variants.py --from-json docs/results/fit-variants/run3.json   # re-summarize

For each goal cell (depth 2, N/(m·n) = 1/8, 1/4, 1/2) and seed — the under-parameterized experiment's target,
frozen network and test points (its ``trial_seed``, experiment seed 0) — 3,000 Adam steps run first and are
timed; then every variant of ``auto`` (:func:`onlynorm.fit.auto_config`) gets **half of Adam's measured time**, one
after the other in the same trial. Printed per cell: the median test relative RMS (4,000 points) of each variant,
its ratio to the base variant and to Adam, and the first Levenberg–Marquardt run's held-out error (the single-run
quality, before any restart). Ratios within one trial; absolute seconds on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import numpy as np
import torch

import onlynorm
from onlynorm import Box
from onlynorm.experiments.runner import trial_seed
from onlynorm.experiments.under_parameterized import GOAL_RATIOS, RATIOS, random_target
from onlynorm.fit import auto_config
from onlynorm.fit.data import relative_rms

#: the variant measured as auto's default before these choices: restarts cycle, rows lean from 128 γ, β, no geodesic
BASE = {"geodesic": False, "starts": ("perturbed", "sign-flip", "subsample", "perturbed", "identity"), "lean_from": 128}
VARIANTS: dict[str, dict] = {
    "base": BASE,
    "geodesic": dict(BASE, geodesic=True),
    "geodesic-fallback": dict(BASE, geodesic="fallback"),
    "resampled": dict(BASE, starts=("perturbed", "sign-flip", "resampled", "perturbed", "resampled")),
    "lean": dict(BASE, lean_from=0),
    "screen": dict(BASE, screen_steps=8),
    "screen-resampled": dict(BASE, screen_steps=8, starts=("perturbed", "resampled", "sign-flip", "resampled")),
    "screen-identity": dict(
        BASE, screen_steps=8, starts=("perturbed", "resampled", "identity", "sign-flip", "resampled")
    ),
    "lean-resampled": dict(BASE, lean_from=0, starts=("perturbed", "sign-flip", "resampled", "perturbed", "resampled")),
}


def cell_trial(d: int, ratio: float, k: int, variants: list[str], adam_steps: int) -> dict:
    seed = trial_seed(0, d, 2, RATIOS.index(ratio), k)  # the under-parameterized experiment's seeds
    spec = random_target(d, 2, seed)
    box = Box(-1.0, 1.0, dim=d)
    frozen = onlynorm.random_normnet(spec, seed=seed, hidden=[max(1, round(ratio * d * d))] * 2)
    x_test = box.sample(4000, seed=seed + 1)
    y_test = spec(x_test)
    out: dict = {"d": d, "ratio": ratio, "seed": seed}
    start = time.perf_counter()
    net, _ = onlynorm.fit_norms(frozen, spec, box, method="adam", steps=adam_steps, seed=seed)
    out["adam s"] = time.perf_counter() - start
    with torch.no_grad():
        out["adam"] = relative_rms(net(x_test), y_test)
    budget = out["adam s"] / 2
    for name in variants:
        with auto_config(**VARIANTS[name]):
            start = time.perf_counter()
            net, report = onlynorm.fit_norms(frozen, spec, box, seed=seed, budget_seconds=budget)
            wall = time.perf_counter() - start
        with torch.no_grad():
            err = relative_rms(net(x_test), y_test)
        first = report.phase("gauss-newton")
        restarts = next((p for p in report.phases if p.name == "restarts"), None)
        out[name] = {
            "rms": err,
            "wall/budget": wall / budget,
            "first run held-out": first.error_after,
            "first run s": first.seconds,
            "first run steps": first.iterations,
            "restarts": restarts.iterations if restarts else 0,
        }
    return out


def summarize(rows: list[dict], variants: list[str]) -> None:
    """Per ratio, the median over cells of each variant's per-cell median error over Adam's; per trial, how often
    each variant beat the first one (by more than 0.1 %)."""
    print("median over cells of the per-cell median ratio to adam:")
    for v in variants:
        cells: dict = {}
        for t in rows:
            cells.setdefault((t["d"], t["ratio"]), []).append(t[v]["rms"] / t["adam"])
        by_ratio: dict = {}
        for (_d, r), vals in cells.items():
            by_ratio.setdefault(r, []).append(float(np.median(vals)))
        walls = [t[v]["wall/budget"] for t in rows]
        rel = [t[v]["rms"] / t[variants[0]]["rms"] for t in rows]
        better, worse = sum(x < 0.999 for x in rel), sum(x > 1.001 for x in rel)
        first = [t[v]["first run held-out"] / t[variants[0]]["first run held-out"] for t in rows]
        first_s = [t[v]["first run s"] / t[variants[0]]["first run s"] for t in rows]
        print(
            f"  {v}: "
            + ", ".join(f"1/{round(1 / r)} {np.median(vals):.3f}" for r, vals in sorted(by_ratio.items()))
            + f"; vs {variants[0]} per trial: better {better}, worse {worse}, tied {len(rel) - better - worse}, "
            f"mean {np.mean(rel):.3f}, range {min(rel):.3f}–{max(rel):.3f}; first run's held-out error "
            f"{np.median(first):.3f}× (better {sum(x < 0.999 for x in first)}, worse {sum(x > 1.001 for x in first)}) "
            f"in {np.median(first_s):.2f}× the time; wall/budget max {max(walls):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="6,10")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--adam-steps", type=int, default=3000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-json", default=None, help="summarize a stored run (no fitting)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as fh:
            rows = json.load(fh)
        summarize(rows, [v for v in rows[0] if isinstance(rows[0][v], dict)])
        return
    importlib.import_module("torch._dynamo")
    torch.set_num_threads(1)
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for d in (int(x) for x in args.dims.split(",")):
        for ratio in GOAL_RATIOS:
            cell = [cell_trial(d, ratio, k, variants, args.adam_steps) for k in range(args.seeds)]
            rows += cell
            parts = []
            for v in variants:
                med = float(np.median([t[v]["rms"] for t in cell]))
                vs_base = float(np.median([t[v]["rms"] / t[variants[0]]["rms"] for t in cell]))
                vs_adam = float(np.median([t[v]["rms"] / t["adam"] for t in cell]))
                first = float(np.median([t[v]["first run held-out"] for t in cell]))
                parts.append(
                    f"{v} {med:.4f} (/{variants[0]} {vs_base:.3f}, /adam {vs_adam:.3f}, first run {first:.4f})"
                )
            adam = float(np.median([t["adam"] for t in cell]))
            print(f"d={d} ratio={ratio:g}: adam {adam:.4f}; " + "; ".join(parts), flush=True)
    summarize(rows, variants)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
