"""``onlynorm demo --resnet``: a CIFAR-geometry ResNet-20 reconstructed exactly by ``method="deep"``, and what a
ResNet-18 at ImageNet geometry would need.

1. A ResNet-20 (3×32×32 input, 16/32/64 channels, projection shortcuts, 0.27M parameters;
   :mod:`onlynorm.demos.resnet_models`) is trained briefly on scikit-learn's 8×8 digits upsampled to 32×32 and
   repeated over 3 channels, then put in eval mode (BatchNorm is folded during conversion). A random frozen network
   gets only its ``γ, β`` solved by the deep construction (sign-paired branches, the default ``paired=1``) on the box
   ``[0, 1]^{3×32×32}``; the demo reports time,
   peak memory (the process's peak resident set), frozen/tunable counts, the max relative error on box samples,
   the certificate and the agreement on the digits test set.
2. A torchvision-style ResNet-18 (3×224×224) is converted and each construction's memory estimate is printed;
   it is reconstructed if the cheapest estimate fits the machine's limit, else refused with the estimate.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_path
from ..api import reconstruct
from ..constructions.conv_memory import batch_size_for, conv_estimates
from ..constructions.memory import format_bytes, memory_limit
from ..domain import Box
from ..errors import MemoryBudgetError
from ..targets.cnn import ConvNetSpec
from ..verify import verify
from .digits import fit_classifier, load_digits_split
from .report import print_rows, print_table
from .resnet_models import resnet18, resnet20

if TYPE_CHECKING:
    from rich.console import Console

IN_SHAPE = (3, 32, 32)


def digits_as_cifar(X: torch.Tensor) -> torch.Tensor:
    """8×8 digits in [0, 1] → 3×32×32 images (nearest upsampling, the gray level on every channel)."""
    img = F.interpolate(X.reshape(-1, 1, 8, 8), size=(32, 32), mode="nearest")
    return img.expand(-1, 3, -1, -1).contiguous()


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_resnet20(seed: int, epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    Xtr, Xte = digits_as_cifar(Xtr.float()), digits_as_cifar(Xte.float())
    torch.manual_seed(seed)
    model = fit_classifier(resnet20(), Xtr, ytr, seed, epochs, lr=3e-3)
    return model.double().eval(), Xte.double(), yte


def resnet18_figure(console: Console | None, seed: int = 0) -> dict[str, Any]:
    """Memory each construction would need for a ResNet-18 at 224×224; reconstruct or refuse (timed)."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = resnet18().eval()
    spec = ConvNetSpec.from_module(model, (3, 224, 224))
    estimates = {
        name: conv_estimates(spec, dtype) for name, dtype in (("float64", torch.float64), ("float32", torch.float32))
    }
    limit, source = memory_limit()
    doc: dict[str, Any] = {
        "parameters": spec.num_parameters,
        "limit_bytes": limit,
        "limit_source": source,
        "estimates": estimates,
        "convert_seconds": time.perf_counter() - t0,
    }
    t0 = time.perf_counter()
    try:
        reconstruct(spec, method="deep", dtype=torch.float32, domain=Box(0.0, 1.0), seed=seed)
        doc["outcome"] = "reconstructed"
    except MemoryBudgetError as exc:
        doc["outcome"] = "refused"
        doc["message"] = str(exc)
    doc["seconds"] = time.perf_counter() - t0
    rows = [
        (f"{method} ({dtype})", format_bytes(need)) for dtype, est in estimates.items() for method, need in est.items()
    ]
    rows += [
        ("memory limit", f"{format_bytes(limit)} ({source})"),
        (
            "outcome",
            f"{doc['outcome']} in {doc['seconds']:.1f} s (after {doc['convert_seconds']:.1f} s of torch.fx conversion)",
        ),
    ]
    if "message" in doc:
        rows.append(("guard says", doc["message"]))
    print_rows(
        console, f"ResNet-18 at 3×224×224 ({spec.num_parameters:,} parameters): what each construction needs", rows
    )
    return doc


def run(
    seed: int = 0,
    json_path: Path | None = None,
    console: Console | None = None,
    *,
    epochs: int = 2,
    samples: int = 64,
    block: int = 1,
    with_resnet18: bool = True,
) -> bool:
    start = time.perf_counter()
    t0 = time.perf_counter()
    target, Xte, yte = train_resnet20(seed, epochs)
    train_seconds = time.perf_counter() - t0
    box = Box(0.0, 1.0)
    t0, c0 = time.perf_counter(), time.process_time()
    net = reconstruct(target, method="deep", in_shape=IN_SHAPE, domain=box, seed=seed, block=block)
    solve_seconds, solve_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    report = verify(net, target, box, samples=samples, seed=seed, certify=True)
    verify_seconds, verify_cpu = time.perf_counter() - t0, time.process_time() - c0
    batch = batch_size_for(ConvNetSpec.from_module(target, IN_SHAPE), net.dtype, 512 << 20)
    with torch.no_grad():
        logits = torch.cat([net(Xte[i : i + batch]) for i in range(0, Xte.shape[0], batch)])
        target_logits = target(Xte)
    s = net.summary()
    peak = peak_rss_bytes()
    doc = {
        "target_accuracy": float((target_logits.argmax(1) == yte).double().mean()),
        "reconstructed_accuracy": float((logits.argmax(1) == yte).double().mean()),
        "agreement": float((logits.argmax(1) == target_logits.argmax(1)).double().mean()),
        "test_max_abs_error": float((logits - target_logits).abs().max()),
        "box_samples": samples,
        "box_max_rel_error": report.max_rel_error,
        "certified": report.certified,
        "certified_bound": report.certified_bound,
        "rounding_bound": report.rounding_bound,
        "solve_seconds": solve_seconds,
        "solve_cpu_seconds": solve_cpu,
        "verify_seconds": verify_seconds,
        "verify_cpu_seconds": verify_cpu,
        "train_seconds": train_seconds,
        "peak_rss_bytes": peak,
        "threads": torch.get_num_threads(),
        "block": block,
        "summary": s.as_dict(),
        "seed": seed,
        "epochs": epochs,
    }
    print_table(
        console,
        "ResNet-20 (CIFAR geometry) on digits upsampled to 3×32×32: BatchNorm-only reconstruction",
        ["network", "test acc", "agreement", "max |Δlogit|", "parameters", "seconds"],
        [
            [
                "ResNet-20 (BatchNorm folded)",
                f"{doc['target_accuracy']:.3f}",
                "1.000",
                "0",
                f"{s.target_parameters:,}",
                f"{train_seconds:.1f} (training)",
            ],
            [
                "random deep CNN, only γ, β solved",
                f"{doc['reconstructed_accuracy']:.3f}",
                f"{doc['agreement']:.3f}",
                f"{doc['test_max_abs_error']:.1e}",
                f"{s.tunable_parameters:,} tuned / {s.frozen_parameters:,} frozen",
                f"{solve_seconds:.1f} (solve)",
            ],
        ],
    )
    print_rows(
        console,
        "reconstruction (method='deep')",
        [
            (
                "solve time (build + solve)",
                f"{solve_seconds:.1f} s wall, {solve_cpu:.1f} s CPU, {torch.get_num_threads()} threads",
            ),
            ("peak memory (process)", format_bytes(peak)),
            ("normalization layers / max width", f"{s.depth} / {s.max_width:,}"),
            (f"max relative error, {samples} images of the box", f"{report.max_rel_error:.2e}"),
            (
                "certificate (no unit can leave its regime)",
                f"{'yes' if report.certified else 'NO'}; interval bound on "
                f"sup|f − g| {report.certified_bound:.1e}, on rounding "
                f"{report.rounding_bound:.1e} ({verify_seconds:.1f} s with "
                "sampling)",
            ),
        ],
    )
    if with_resnet18:
        doc["resnet18"] = resnet18_figure(console, seed)
    doc["seconds"] = time.perf_counter() - start
    if json_path is not None:
        with atomic_path(json_path) as out:
            out.write_text(json.dumps(doc, indent=2, default=str))
    return doc["agreement"] == 1.0 and report.passed and bool(report.certified)
