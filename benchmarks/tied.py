"""``deep, tied=1`` vs the untied default and vs the floor, ratios measured in one run (best of interleaved rounds).

    .venv/bin/python benchmarks/tied.py [--rounds 3] [--json out.json]

* ``untied/tied`` — the whole reconstruction (build + solve) of one 512×512 layer by ``method="deep"`` (``k = 1``)
  untied over tied (goal ≥ 10×);
* ``mlp_tied_s`` — the whole reconstruction of a 784→256→256→10 MLP, tied (goal ≤ 1 s), and untied for reference;
* ``tied/floor`` — tied reconstruction (and the tied solve alone, ``solve_norms`` on a built network) over the
  floor: one float64 LU of each layer's ``N × N`` Khatri–Rao-sized matrix plus triangular solves with its ``T``
  right-hand sides (scipy ``getrf`` + ``getrs`` on random matrices of the same sizes; goal ≤ 1.5×);
* ``max_rel_error`` on 2,000 points of ``[-1, 1]^n``; frozen parameter counts and peak memory are from ``summary()``.
"""

from __future__ import annotations

import argparse
import json
import time

import scipy.linalg
import torch
from torch import nn

import onlynorm


def mlp(dims: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers).double()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def floor_seconds(dims: list[int], seed: int = 0) -> float:
    """One float64 LU of N × N (N = m, k = 1) and a solve with T = n right-hand sides, per layer ``n → m``."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for n, m in zip(dims, dims[1:]):
        M = torch.randn(m, m, generator=gen, dtype=torch.float64).numpy()
        R = torch.randn(m, n, generator=gen, dtype=torch.float64).numpy()
        start = time.perf_counter()
        lu = scipy.linalg.lu_factor(M, overwrite_a=True, check_finite=False)
        scipy.linalg.lu_solve(lu, R, check_finite=False)
        total += time.perf_counter() - start
    return total


def measure(dims: list[int], rounds: int, untied: bool) -> dict:
    g = mlp(dims)
    x = onlynorm.Box(-1.0, 1.0, dim=dims[0]).sample(2000, seed=1)
    best: dict[str, float] = {}
    row: dict = {"dims": dims}
    for _ in range(rounds):  # interleaved: tied, tied solve, floor, untied in every round
        t_tied, f = timed(lambda: onlynorm.reconstruct(g, method="deep", tied=1))
        frozen = onlynorm.random_normnet(g, method="deep", tied=1)
        t_solve, _ = timed(lambda frozen=frozen: onlynorm.solve_norms(frozen, g))
        t_floor = floor_seconds(dims)
        times = {"tied_s": t_tied, "tied_solve_s": t_solve, "floor_s": t_floor}
        if untied:
            t_untied, fu = timed(lambda: onlynorm.reconstruct(g, method="deep"))
            times["untied_s"] = t_untied
            with torch.no_grad():
                row["untied_max_rel_error"] = float((fu(x) - g(x)).abs().max() / g(x).abs().max())
            row["untied_frozen"] = fu.summary().frozen_parameters
            del fu
        for k, v in times.items():
            best[k] = min(best.get(k, float("inf")), v)
        with torch.no_grad():
            row["tied_max_rel_error"] = float((f(x) - g(x)).abs().max() / g(x).abs().max())
        row["tied_frozen"] = f.summary().frozen_parameters
        row["tunable"] = f.summary().tunable_parameters
    row.update(best)
    row["tied/floor"] = best["tied_s"] / best["floor_s"]
    row["tied_solve/floor"] = best["tied_solve_s"] / best["floor_s"]
    if untied:
        row["untied/tied"] = best["untied_s"] / best["tied_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = [measure([512, 512], args.rounds, untied=True), measure([784, 256, 256, 10], args.rounds, untied=True)]
    print(
        "| target | tied s | untied s | untied/tied | tied solve s | floor s | tied/floor | tied solve/floor "
        "| frozen tied | frozen untied | max rel error tied / untied |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'→'.join(map(str, r['dims']))} | {r['tied_s']:.3f} | {r['untied_s']:.2f} | {r['untied/tied']:.1f} "
            f"| {r['tied_solve_s']:.3f} | {r['floor_s']:.4f} | {r['tied/floor']:.1f} | {r['tied_solve/floor']:.1f} "
            f"| {r['tied_frozen']:,} | {r['untied_frozen']:,} "
            f"| {r['tied_max_rel_error']:.1e} / {r['untied_max_rel_error']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
