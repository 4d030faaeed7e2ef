"""The CNN certificate on deep residual networks: the entrywise (interval) bound alone vs with 2-norm propagation.

    .venv/bin/python benchmarks/certify_resnet.py [--epochs 2] [--json docs/results/bench-certify.json]

The demo's ResNet-20 (CIFAR geometry, 3×32×32, trained ``--epochs`` on the digits upsampled, BatchNorm folded) is
reconstructed by ``method="deep"`` on the box [0, 1]^{3×32×32}; the certificate runs twice on the same network in the
same process — entrywise bounds only (``norm_bounds=False``, what the certificate did before), then with the norm
propagation — and the script prints, for each, the proven distance bound ``sup|f − g|`` (exact arithmetic), the
rounding bound, both relative to the sampled ``max|g|``, and the seconds. ``sampled`` is the max error on 64 images of
the box: every proven bound must be at least it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onlynorm
from onlynorm._io import atomic_path
from onlynorm.certify.cnn import certify_conv
from onlynorm.constructions.base import get_construction
from onlynorm.constructions.conv import cnn_target
from onlynorm.demos.resnet import IN_SHAPE, train_resnet20
from onlynorm.domain import resolve_domain
from onlynorm.targets.convert import as_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    target, _, _ = train_resnet20(args.seed, args.epochs)
    box = onlynorm.Box(0.0, 1.0)
    net = onlynorm.reconstruct(target, method="deep", in_shape=IN_SHAPE, domain=box, seed=args.seed)
    sampled = onlynorm.verify(net, target, box, samples=64, seed=args.seed)
    spec = cnn_target(as_target(target, IN_SHAPE)).to(dtype=net.dtype)
    nodes = get_construction("conv_deep").matched(net, spec)[1]
    full = resolve_domain(box, spec.in_features)
    rows = {}
    for name, norms in (("entrywise (interval) bounds", False), ("with 2-norm propagation", True)):
        start = time.perf_counter()
        result = certify_conv(net, spec, full, nodes, norm_bounds=norms)
        rows[name] = {
            "certified": result.certified,
            "distance_bound": result.bound,
            "rounding_bound": result.rounding_bound,
            "distance_over_max_g": result.bound / sampled.max_target_abs,
            "rounding_over_max_g": result.rounding_bound / sampled.max_target_abs,
            "seconds": time.perf_counter() - start,
        }
    print(
        f"ResNet-20, deep, box [0, 1]^3×32×32; sampled max|f − g| {sampled.max_abs_error:.2e}, max|g| "
        f"{sampled.max_target_abs:.3g} (64 images)"
    )
    print(f"{'certificate':32s} {'distance':>10s} {'/max|g|':>10s} {'rounding':>10s} {'/max|g|':>10s} {'s':>7s}")
    for name, r in rows.items():
        print(
            f"{name:32s} {r['distance_bound']:10.2e} {r['distance_over_max_g']:10.2e} {r['rounding_bound']:10.2e} "
            f"{r['rounding_over_max_g']:10.2e} {r['seconds']:7.1f}"
        )
    before, after = rows["entrywise (interval) bounds"], rows["with 2-norm propagation"]
    print(
        f"distance bound: {before['distance_bound'] / after['distance_bound']:.2e}× tighter; goal ≤ 1e-3·max|g|: "
        f"{'met' if after['distance_over_max_g'] <= 1e-3 else 'not met'}"
    )
    if args.json is not None:
        doc = {
            "sampled_max_abs_error": sampled.max_abs_error,
            "max_target_abs": sampled.max_target_abs,
            "epochs": args.epochs,
            "seed": args.seed,
            "rows": rows,
        }
        with atomic_path(args.json) as out:
            out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
