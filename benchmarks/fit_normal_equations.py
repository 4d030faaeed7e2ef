"""The normal equations of float32 Jacobians: float64 copy of J and float64 products vs a float32 ``JᵀJ`` and a
float64 backward pass for ``Jᵀr`` (``gauss_newton.FLOAT32_PRODUCT_FROM``), in one process, interleaved.

    .venv/bin/python benchmarks/fit_normal_equations.py [--rows 1024] [--repeats 6]

Random width networks (depth 2) at the goal cells' sizes; prints, per size, the number of γ, β, both times and
their ratio (new / old), and the relative difference of ``JᵀJ`` and ``Jᵀr`` between the two (float32 rounding).
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

import onlynorm
import onlynorm.fit.gauss_newton as gn
from onlynorm import Box
from onlynorm.experiments.under_parameterized import random_target
from onlynorm.fit.jacobian import NormFunction

SIZES = [(6, 4), (6, 9), (10, 12), (10, 25), (16, 64)]  # (d, hidden width N)


def timed(fn, jac, theta, x, y, old: bool):
    saved = gn.FLOAT32_PRODUCT_FROM
    gn.FLOAT32_PRODUCT_FROM = 10**9 if old else saved  # old: the float64 path at every size
    try:
        start = time.perf_counter()
        out = gn._normal_equations(fn, theta, x, y, 3.0, "reverse", jac)
        return time.perf_counter() - start, out
    finally:
        gn.FLOAT32_PRODUCT_FROM = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    importlib.import_module("torch._dynamo")
    torch.set_num_threads(1)
    print(f"threshold FLOAT32_PRODUCT_FROM = {gn.FLOAT32_PRODUCT_FROM}")
    for d, hidden in SIZES:
        spec = random_target(d, 2, 0)
        net = onlynorm.random_normnet(spec, seed=0, hidden=[hidden, hidden])
        fn, jac = NormFunction(net), NormFunction(net.clone().to(torch.float32))
        x = Box(-1.0, 1.0, dim=d).sample(args.rows, seed=0)
        y = spec(x) + 0.1
        theta = fn.vector()
        t_old = t_new = 0.0
        for _ in range(args.repeats):
            dt, old = timed(fn, jac, theta, x, y, old=True)
            t_old += dt
            dt, new = timed(fn, jac, theta, x, y, old=False)
            t_new += dt
        jtj = float((new[1] - old[1]).norm() / old[1].norm())
        g = float((new[2] - old[2]).norm() / old[2].norm())
        print(
            f"d={d} N={hidden} γ,β={fn.size}: old {t_old / args.repeats:.4f} s, new {t_new / args.repeats:.4f} s, "
            f"new/old {t_new / t_old:.2f}; rel. diff JᵀJ {jtj:.1e}, Jᵀr {g:.1e}"
        )


if __name__ == "__main__":
    main()
