"""Transformer reconstruction: time, error and sizes of `onlynorm.reconstruct(model, example_input=...)`.

    .venv/bin/python benchmarks/transformer.py [--d 64] [--heads 4] [--layers 2] [--method deep] [--json out.json]

A 2-block pre-norm GELU `nn.TransformerEncoder` (dim_feedforward = 4d, final LayerNorm) in float64; the error is
`max |f − g| / max |g|` against the model's own forward on fresh inputs of sequence lengths 1, 8 and 32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import onlynorm


def encoder(d: int, heads: int, layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, heads, 4 * d, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False).double().eval()


def case(d: int, heads: int, layers: int, method: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    g = encoder(d, heads, layers)
    start = time.perf_counter()
    f = onlynorm.reconstruct(g, example_input=torch.randn(2, 8, d, dtype=torch.float64), method=method, seed=seed)
    seconds = time.perf_counter() - start
    inputs = [torch.randn(4, t, d, dtype=torch.float64) for t in (1, 8, 32)]
    report = onlynorm.verify(f, g, inputs=inputs)
    summary = f.summary()
    return {
        "d": d,
        "heads": heads,
        "layers": layers,
        "method": method,
        "seconds": round(seconds, 3),
        "max_rel_error": report.max_rel_error,
        "frozen_parameters": summary.frozen_parameters,
        "tunable_parameters": summary.tunable_parameters,
        "target_parameters": summary.target_parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="deep")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    row = case(args.d, args.heads, args.layers, args.method)
    print(" ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=2)


if __name__ == "__main__":
    main()
