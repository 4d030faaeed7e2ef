"""The pretrained goal cells: ``fit_norms(with_norms(base), target)`` vs 3,000 Adam steps on fine-tune-capacity's cells.

    .venv/bin/python benchmarks/fine_tune_goal.py [--cnn-factors 1,2] [--json out.json]

Runs :func:`onlynorm.experiments.fine_tune_capacity.trial` (same seeds as the experiment's first repeat) on every MLP
cell and the CNN cells of the given width factors, one seed each, one after the other in this process; prints auto's
logit error over Adam's (goal ≤ 0.9, auto's budget: half of Adam's measured time) and both agreements.
"""

from __future__ import annotations

import argparse
import importlib
import json

import numpy as np
import torch

from onlynorm.experiments.fine_tune_capacity import trial, trials_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-factors", default="1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    importlib.import_module("torch._dynamo")
    torch.set_num_threads(1)
    factors = {int(f) for f in args.cnn_factors.split(",") if f}
    cells, seen = [], set()
    for t in trials_for(False, args.seed):
        key = (t["arch"], t["task"], t["factor"])
        if key in seen or (t["arch"] == "cnn" and t["factor"] not in factors):
            continue
        seen.add(key)
        cells.append(t)
    rows = []
    for kwargs in cells:
        r = trial(**kwargs)
        ratio = r["auto"]["logit_rms"] / r["adam"]["logit_rms"]
        rows.append(dict(r, ratio=ratio))
        print(
            f"{r['arch']} {r['task']:<9} ×{r['factor']}: logit err auto {r['auto']['logit_rms']:.3f} / adam "
            f"{r['adam']['logit_rms']:.3f} = {ratio:.2f}; agreement auto {r['auto']['agreement']:.3f} adam "
            f"{r['adam']['agreement']:.3f}; s auto {r['auto']['seconds']:.1f} adam {r['adam']['seconds']:.1f}",
            flush=True,
        )
    med = float(np.median([r["ratio"] for r in rows]))
    print(
        f"median auto/adam logit error {med:.2f} over {len(rows)} cells; goal ≤ 0.9: {'met' if med <= 0.9 else 'not met'}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
