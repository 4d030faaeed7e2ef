"""One Levenberg–Marquardt Jacobian of a DigitsTransformer's LayerNorm γ, β: time and peak memory, whole
``jacfwd`` (as ``fit_norms`` formed it before) vs chunked ``JᵀJ, Jᵀr`` (:mod:`onlynorm.fit.transformer_jacobian`).

    python benchmarks/ln_jacobian.py            # d = 16, 32, 64 at 64 rows; one fresh process per cell, 1 thread

Each cell runs in its own process so that its peak resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch


def cell(mode: str, d: int, rows: int) -> dict:
    from torch.func import functional_call, jacfwd

    import onlynorm
    from onlynorm.demos.transformer import DigitsTransformer
    from onlynorm.fit.transformer import _layer_norm_names
    from onlynorm.fit.transformer_jacobian import normal_equations

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DigitsTransformer(d=d, heads=4, layers=2).double().eval()
    x = torch.rand(rows, 8, 8, dtype=torch.float64)
    net = onlynorm.with_norms(model, example_input=x[:2])
    names = _layer_norm_names(net)
    params = dict(net.named_parameters())
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    want = model(x).detach() + 0.1

    def f(vec, inp):
        return functional_call(
            net, dict(zip(names, (c.reshape(params[n].shape) for n, c in zip(names, vec.split(sizes))))), (inp,)
        )

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "whole":
        jac = jacfwd(lambda v: (f(v, x) - want).reshape(-1))(theta)
        jtj = jac.T @ jac
    else:
        jtj = normal_equations(f, theta, [((x,), want)]).jtj
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "d": d,
        "rows": rows,
        "params": int(theta.numel()),
        "seconds": seconds,
        "peak_rss_mb": peak / 1024,
        "growth_mb": (peak - base) / 1024,
        "trace": float(jtj.trace()),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--cell":
        print(json.dumps(cell(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    out = []
    for d in (16, 32, 64):
        for mode in ("whole", "chunked"):
            res = subprocess.run(
                [sys.executable, __file__, "--cell", mode, str(d), "64"], capture_output=True, text=True, check=True
            )
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(out[-1], flush=True)


if __name__ == "__main__":
    main()
