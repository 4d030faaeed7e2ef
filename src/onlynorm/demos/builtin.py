"""``onlynorm demo --builtin``: reconstruct a random 6→24→24→3 MLP on ``[0, 2]^6``, verify it, print the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .._io import atomic_path
from ..api import reconstruct
from ..domain import Box
from ..targets.mlp import MLPSpec
from ..verify import verify
from .report import print_rows

DIMS = [6, 24, 24, 3]


def example_target(seed: int = 0, dims: list[int] = DIMS) -> MLPSpec:
    """A random ReLU MLP with ``N(0, 1/n)`` weights and ``N(0, 1)`` biases (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    weights = tuple(torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5 for n, m in zip(dims, dims[1:]))
    biases = tuple(torch.randn(m, generator=gen, dtype=torch.float64) for m in dims[1:])
    return MLPSpec(weights, biases)


def run(seed: int = 0, json_path: Path | None = None, console=None) -> bool:
    """Reconstruct, verify with the certificate, print; ``True`` only when the report is ``ok`` (sampled within
    tolerance and proven ``exact``) — otherwise the one-line reason is printed too."""
    spec = example_target(seed)
    box = Box(0.0, 2.0)
    start = time.perf_counter()
    net = reconstruct(spec, method="width", domain=box, seed=seed)
    seconds = time.perf_counter() - start
    report = verify(net, spec, domain=box, samples=100_000, seed=seed, certify=True)
    print_rows(console, f"built-in target {DIMS} on [0, 2]^6, solved in {seconds:.2f} s", net.summary().rows())
    print_rows(console, "verification", report.rows())
    if json_path is not None:
        doc = {"target_dims": DIMS, "seconds": seconds, "summary": net.summary().as_dict(), "verify": report.as_dict()}
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    if not report.ok and console is not None:
        console.print(f"not verified: {report.failure()}", highlight=False, soft_wrap=True)
    return report.ok
