"""Conv deep vs conv width on the same layer: one c→c 3×3 conv (padding 1) on a c×8×8 input, c ∈ {16, 32, 64}.

    .venv/bin/python benchmarks/conv_deep.py [--channels 16,32,64] [--json out.json]

Each reconstruction runs in its own child process, which reports its wall time (build + solve), its peak resident
memory (VmHWM) and the max relative error on 200 images of the box [-1, 1]^{c×8×8}. A construction whose memory
estimate exceeds the guard's limit is not run: the row shows the estimate and "refused". ``width/deep`` is the ratio
of the two wall times measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

import onlynorm
from onlynorm.constructions.conv_memory import conv_estimates
from onlynorm.constructions.memory import format_bytes, memory_limit
from onlynorm.targets.cnn import ConvNetSpec

SIZE = 8


def target(c: int) -> nn.Sequential:
    torch.manual_seed(c)
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Flatten()).double().eval()


def child(c: int, method: str) -> None:
    g = target(c)
    box = onlynorm.Box(-1.0, 1.0)
    onlynorm.reconstruct(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten()).double(), in_shape=(1, 2, 2))  # warm-up
    start = time.perf_counter()
    net = onlynorm.reconstruct(g, method=method, in_shape=(c, SIZE, SIZE), domain=box)
    seconds = time.perf_counter() - start
    report = onlynorm.verify(net, g, samples=200)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "max_rel_error": report.max_rel_error}))


def measure(c: int, method: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(c), method], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="16,32,64")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    limit, source = memory_limit()
    print(
        f"\nConv deep vs conv width, one c→c 3×3 layer on c×{SIZE}×{SIZE} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; limit {format_bytes(limit)} from {source}):\n"
    )
    print("| c | deep s | deep peak | deep rel err | width s | width peak | width rel err | width/deep time |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for c in (int(v) for v in args.channels.split(",")):
        spec = ConvNetSpec.from_module(target(c), (c, SIZE, SIZE))
        est = conv_estimates(spec, torch.float64)
        row: dict = {"c": c, "estimates": est}
        for method in ("deep", "width"):
            row[method] = measure(c, method) if est[method] <= limit else {"refused": True}
        rows.append(row)
        d, w = row["deep"], row["width"]
        if "refused" in w:
            wcells = [f"refused (needs {format_bytes(est['width'])})", "—", "—", "—"]
        else:
            wcells = [
                f"{w['seconds']:.2f}",
                format_bytes(w["peak_bytes"]),
                f"{w['max_rel_error']:.1e}",
                f"{w['seconds'] / d['seconds']:.1f}×",
            ]
        print(
            f"| {c} | {d['seconds']:.2f} | {format_bytes(d['peak_bytes'])} | {d['max_rel_error']:.1e} | "
            + " | ".join(wcells)
            + " |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
