"""``deep, tied=1`` vs the untied default and vs the floor, ratios measured in one run (best of interleaved rounds;
the load average at the start and the end is printed and recorded).

    .venv/bin/python benchmarks/tied.py [--rounds 7] [--untied-rounds 2] [--json out.json]

* ``untied/tied`` — the whole reconstruction (build + solve) of one 512×512 layer by ``method="deep"`` (``k = 1``)
  untied over tied (goal ≥ 10×);
* ``mlp_tied_s`` — the whole reconstruction of a 784→256→256→10 MLP, tied (goal ≤ 1 s), and untied for reference;
* ``tied/floor`` — tied reconstruction (and the tied solve alone, ``solve_norms`` on a built network) over the
  floor: one float64 LU of each layer's ``N × N`` Khatri–Rao-sized matrix plus triangular solves with its ``T``
  right-hand sides on random matrices of the same sizes — the faster of scipy (``getrf`` + ``getrs``, OpenBLAS) and
  torch (``lu_factor`` + ``lu_solve``, the LAPACK the tied solve uses), each measured in every round (goal ≤ 1.5×);
* ``tied_solve/floor_check`` — the tied solve over the floor plus one residual GEMM of the same sizes: the tied
  solve checks every block's ``B diag(γ_t) A = W_t`` (the record's ``max|Ŵ − W|``), a product as large as the
  triangular solves, so ~1.5× the floor is what the algebra of a solve that reports its residual costs;
* ``breakdown_ms`` — where the time beyond the floor goes, each part timed alone in every round (best of the rounds)
  on the slowest layer: drawing the
  frozen ``A, B``, the Khatri–Rao matrix + LU + solve, the exactness check (one GEMM over every block), the β
  bounds of every block (the slowest layer's); ``other_ms`` is the rest of the reconstruction (target conversion, plan, network
  construction, interval bounds, validation, records);
* ``max_rel_error`` on 2,000 points of ``[-1, 1]^n``; frozen parameter counts and peak memory are from ``summary()``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import scipy.linalg
import threadpoolctl
import torch
from torch import nn

import onlynorm
from onlynorm.constructions.tied import box_offsets, draw_tied
from onlynorm.linalg_tied import shared_error, solve_khatri_rao_shared
from onlynorm.nets.tied import TiedResidualStream


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


def floor_seconds(dims: list[int], seed: int = 0) -> dict[str, float]:
    """One float64 LU of N × N (N = m, k = 1) and a solve with T = n right-hand sides, per layer ``n → m``, by scipy
    and by torch: ``{"scipy": s, "torch": s, "check": s}`` — ``check`` is one residual GEMM ``R − M X`` of the same
    sizes (torch), the cost of the exactness check any solver that reports its residual pays."""
    gen = torch.Generator().manual_seed(seed)
    total = {"scipy": 0.0, "torch": 0.0, "check": 0.0}
    for n, m in zip(dims, dims[1:]):
        M = torch.randn(m, m, generator=gen, dtype=torch.float64)
        R = torch.randn(m, n, generator=gen, dtype=torch.float64)
        start = time.perf_counter()
        LU, piv, _ = torch.linalg.lu_factor_ex(M)
        X = torch.linalg.lu_solve(LU, piv, R)
        total["torch"] += time.perf_counter() - start
        start = time.perf_counter()
        torch.addmm(R, M, X, beta=-1)
        total["check"] += time.perf_counter() - start
        Mn, Rn = M.numpy().copy(), R.numpy()
        start = time.perf_counter()
        lu = scipy.linalg.lu_factor(Mn, overwrite_a=True, check_finite=False)
        scipy.linalg.lu_solve(lu, Rn, check_finite=False)
        total["scipy"] += time.perf_counter() - start
        time.sleep(0.2)  # OpenBLAS's threads spin for ~0.1 s after a call: let them park before torch runs again
    return total


def breakdown(n: int, m: int, repeats: int = 2) -> dict[str, float]:
    """Milliseconds (best of ``repeats``) of each part of one tied ``n → m`` layer's reconstruction (k = 1)."""
    stage = TiedResidualStream(n, m, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    lo, hi = -torch.ones(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)
    draw_tied(stage, gen)
    A, B = stage.branch.weight.detach(), stage.readout.weight.detach()
    Wt = W.reshape(m, n, 1).transpose(0, 1)
    sol = solve_khatri_rao_shared(A, B, Wt)
    parts = {
        "draw": lambda: draw_tied(stage, gen),
        "solve": lambda: solve_khatri_rao_shared(A, B, Wt),  # Khatri–Rao matrix, LU, solve and the check
        "of which check": lambda: shared_error(B, sol.gamma, A, Wt),
        "beta": lambda: box_offsets(A, sol.gamma, lo, hi, 1e-3),
    }
    out = {}
    for name, fn in parts.items():
        best = float("inf")
        for _ in range(repeats):
            seconds, _ = timed(fn)
            best = min(best, seconds)
        out[name] = 1e3 * best
    return out


def measure(dims: list[int], rounds: int, untied_rounds: int) -> dict:
    g = mlp(dims)
    x = onlynorm.Box(-1.0, 1.0, dim=dims[0]).sample(2000, seed=1)
    best: dict[str, float] = {}
    row: dict = {"dims": dims}
    for r in range(rounds):  # interleaved: tied, tied solve, floor (and untied in the first rounds) in every round
        t_tied, f = timed(lambda: onlynorm.reconstruct(g, method="deep", tied=1))
        frozen = onlynorm.random_normnet(g, method="deep", tied=1)
        t_solve, _ = timed(lambda frozen=frozen: onlynorm.solve_norms(frozen, g))
        floors = floor_seconds(dims)
        times = {"tied_s": t_tied, "tied_solve_s": t_solve, "floor_scipy_s": floors["scipy"]}
        floor = min(floors["scipy"], floors["torch"])
        times |= {"floor_torch_s": floors["torch"], "floor_s": floor, "floor_check_s": floor + floors["check"]}
        if r < untied_rounds:
            t_untied, fu = timed(lambda: onlynorm.reconstruct(g, method="deep"))
            time.sleep(0.2)  # the untied solve's scipy LUs: let OpenBLAS's threads park
            times["untied_s"] = t_untied
            with torch.no_grad():
                row["untied_max_rel_error"] = float((fu(x) - g(x)).abs().max() / g(x).abs().max())
            row["untied_frozen"] = fu.summary().frozen_parameters
            del fu
        for i, (a, b) in enumerate(zip(dims, dims[1:])):  # the parts, alone, in the same round
            times |= {f"layer{i}_{k}_ms": v for k, v in breakdown(a, b).items()}
        for k, v in times.items():
            best[k] = min(best.get(k, float("inf")), v)
        with torch.no_grad():
            row["tied_max_rel_error"] = float((f(x) - g(x)).abs().max() / g(x).abs().max())
        row["tied_frozen"] = f.summary().frozen_parameters
        row["tunable"] = f.summary().tunable_parameters
    parts = ("draw", "solve", "of which check", "beta")
    layers = [{k: best.pop(f"layer{i}_{k}_ms") for k in parts} for i in range(len(dims) - 1)]
    row.update(best)
    row["breakdown_ms"] = max(layers, key=lambda p: p["solve"])
    row["other_ms"] = 1e3 * best["tied_s"] - sum(p["draw"] + p["solve"] + p["beta"] for p in layers)
    row["tied/floor"] = best["tied_s"] / best["floor_s"]
    row["tied_solve/floor"] = best["tied_solve_s"] / best["floor_s"]
    row["tied_solve/floor_check"] = best["tied_solve_s"] / best["floor_check_s"]
    if untied_rounds:
        row["untied/tied"] = best["untied_s"] / best["tied_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of tied, tied solve and floor (best of)")
    parser.add_argument("--untied-rounds", type=int, default=2, help="rounds that also run the untied reference")
    parser.add_argument("--threads", type=int, help="torch and BLAS threads (default: torch's); 1 is the least noisy")
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with threadpoolctl.threadpool_limits(threads):  # scipy's OpenBLAS (the floor, the untied solve) alike
        run(args, threads)


def run(args: argparse.Namespace, threads: int) -> None:
    load = [os.getloadavg()[0]]
    rows = [measure(dims, args.rounds, args.untied_rounds) for dims in ([512, 512], [784, 256, 256, 10])]
    load.append(os.getloadavg()[0])
    print(f"{threads} thread(s); load average (1 min) at the start / end: {load[0]:.1f} / {load[1]:.1f}")
    for r in rows:
        r["load_average"], r["threads"] = load, threads
    print(
        "| target | tied s | untied s | untied/tied | tied solve s | floor s | tied/floor | tied solve/floor "
        "| tied solve/(floor + check) | frozen tied | frozen untied | max rel error tied / untied |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nan = float("nan")
        u = {k: r.get(k, nan) for k in ("untied_s", "untied/tied", "untied_frozen", "untied_max_rel_error")}
        print(
            f"| {'→'.join(map(str, r['dims']))} | {r['tied_s']:.4f} | {u['untied_s']:.2f} | {u['untied/tied']:.1f} "
            f"| {r['tied_solve_s']:.4f} | {r['floor_s']:.4f} | {r['tied/floor']:.2f} | {r['tied_solve/floor']:.2f} "
            f"| {r['tied_solve/floor_check']:.2f} "
            f"| {r['tied_frozen']:,} | {u['untied_frozen']:,} "
            f"| {r['tied_max_rel_error']:.1e} / {u['untied_max_rel_error']:.1e} |"
        )
    print("\nwhere the tied time goes (ms; parts of the slowest layer, the rest over the whole network):")
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_ms"].items())
        print(
            f"  {'→'.join(map(str, r['dims']))}: {parts}; rest of the reconstruction {r['other_ms']:.1f}; "
            f"floor scipy {1e3 * r['floor_scipy_s']:.2f} / torch {1e3 * r['floor_torch_s']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
