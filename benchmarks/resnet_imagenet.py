"""ResNet-18 and ResNet-50 at 3×224×224 by ``method="deep", tied=True``: time, peak memory, parameter counts, error.

    .venv/bin/python benchmarks/resnet_imagenet.py [--models resnet18,resnet50] [--images 2] [--json out.json]

Each model runs in its own child process (so ``peak_rss`` is that model's peak resident memory alone) and reports
the seconds of conversion (torch.fx), reconstruction (build + solve: one LU per layer) and verification on
``--images`` images of ``[0, 1]^{3×224×224}``, the max relative error ``max |f − g| / max |g|`` over them, the
frozen / tunable / target parameter counts and what the untied default would need (refused by the memory guard).
Goals: exact (≤ 1e-9 relative, float64) within ≤ 16 GiB; ResNet-18 ≤ 10 min, ResNet-50 ≤ 20 min including
verifying 2 images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from onlynorm.constructions.memory import format_bytes
from onlynorm.demos.resnet_imagenet import imagenet_run

GOAL_SECONDS = {"resnet18": 600, "resnet50": 1200}


def child(name: str, images: int) -> None:
    def progress(done: int, total: int, message: str) -> None:
        print(f"  [{name}] {done}/{total} {message}", file=sys.stderr, flush=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    print(json.dumps(imagenet_run(name, images=images, progress=progress, log=log), default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images)
        return
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--images", str(args.images)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        "| model | convert s | reconstruct s | verify s | total s (goal) | peak | frozen | tunable | target | max rel error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['convert_seconds']:.1f} | {r['reconstruct_seconds']:.1f} | {r['verify_seconds']:.1f} "
            f"| {r['total_seconds']:.0f} (≤ {GOAL_SECONDS[r['model']]}) | {format_bytes(r['peak_rss_bytes'])} "
            f"| {r['frozen_parameters']:,} | {r['tunable_parameters']:,} | {r['target_parameters']:,} "
            f"| {r['max_rel_error']:.2e} |"
        )
        print(f"  untied deep: {r['untied'][:160]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
