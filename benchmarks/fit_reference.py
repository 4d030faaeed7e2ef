"""The under-parameterized grid with the reference column, on chosen dimensions and trial counts.

    .venv/bin/python benchmarks/fit_reference.py --dims 6,10,16 --repeats 6:3,10:3,16:1 \\
        --out docs/results/under-parameterized-reference

Runs :func:`onlynorm.experiments.under_parameterized.run` with ``reference=True`` (the goal ratios 1/8, 1/4, 1/2,
depth 2; 3,000 Adam steps first, ``auto`` and ``gauss-newton`` with half of Adam's measured time, the reference:
``auto`` with 6× that budget and another seed) and writes ``results.json``, the figure and ``summary.md`` like
``onlynorm experiment under-parameterized --reference`` — the same seeds per cell, with d = 16 (left out of the
CLI's reference grid to fit its time) when asked for. ``ONLYNORM_JOBS`` sets the trial workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onlynorm.experiments.runner import write_artifacts
from onlynorm.experiments.under_parameterized import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="6,10")
    parser.add_argument("--repeats", default="3", help="N, or D:N,D:N per dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",") if d]
    if ":" in args.repeats:
        repeats: dict[int, int] | int = {int(k): int(v) for k, v in (p.split(":") for p in args.repeats.split(","))}
    else:
        repeats = int(args.repeats)
    result = run(False, args.seed, reference=True, dims=dims, repeats=repeats)
    for path in write_artifacts(result, Path(args.out)):
        print(path)
    print(result.summary)


if __name__ == "__main__":
    main()
