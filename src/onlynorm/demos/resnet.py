"""``onlynorm demo --resnet``: a CIFAR-geometry ResNet-20 reconstructed exactly by ``method="deep"``, and what a
ResNet-18 at ImageNet geometry would need.

1. A ResNet-20 (3×32×32 input, 16/32/64 channels, projection shortcuts, 0.27M parameters;
   :mod:`onlynorm.demos.resnet_models`) is trained briefly on scikit-learn's 8×8 digits upsampled to 32×32 and
   repeated over 3 channels, then put in eval mode (BatchNorm is folded during conversion). A random frozen network
   gets only its ``γ, β`` solved by the deep construction (sign-paired branches, the default ``paired=1``) on the box
   ``[0, 1]^{3×32×32}``; the demo reports time,
   peak memory (the process's peak resident set), frozen/tunable counts, the max relative error on box samples,
   the certificate and the agreement on the digits test set.
2. Torchvision-style ResNet-18 and ResNet-50 (3×224×224, random weights and BatchNorm statistics): the untied deep
   construction's estimate (refused by the memory guard) and the tied one's (``deep, tied=True``: one frozen draw per
   layer shared by every block). With ``--imagenet`` (``run(imagenet=True)``; about 15 more minutes on 2 cores) both
   are reconstructed and verified on 2 images (:mod:`onlynorm.demos.resnet_imagenet`) and a table puts the three
   networks side by side (time, peak memory, frozen/tunable counts, error).

Progress lines (a stage, a solved layer) go to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_path
from ..api import reconstruct
from ..constructions.conv_memory import batch_size_for
from ..constructions.memory import format_bytes
from ..domain import Box
from ..targets.cnn import ConvNetSpec
from ..verify import verify
from .digits import fit_classifier, load_digits_split
from .report import print_rows, print_table
from .resnet_imagenet import imagenet_estimates, imagenet_run
from .resnet_models import resnet20

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


def stderr_line(line: str) -> None:
    """A progress line on stderr (the tables go to stdout; a long run says what it is doing)."""
    print(line, file=sys.stderr, flush=True)


def _layer_progress(name: str):
    def progress(done: int, total: int, message: str) -> None:
        stderr_line(f"  [{name}] {done}/{total} {message}")

    return progress


def imagenet_figure(
    console: Console | None, seed: int = 0, models: tuple[str, ...] = ("resnet18", "resnet50"), *, run: bool = True
) -> dict[str, Any]:
    """ResNet-18/50 at 3×224×224 by ``deep, tied=True`` (:mod:`onlynorm.demos.resnet_imagenet`): the untied
    estimate (refused) and the tied estimate; with ``run`` also the tied reconstruction's time, peak memory, counts
    and error on 2 images (about 5–8 minutes per model on 2 cores; progress lines on stderr)."""
    out: dict[str, Any] = {}
    for name in models:
        if run:
            doc = imagenet_run(name, seed=seed, images=2, progress=_layer_progress(name), log=stderr_line)
        else:
            stderr_line(f"[{name}] converting the model and asking the memory guard (nothing is allocated)")
            doc = imagenet_estimates(name, seed)[2]
        out[name] = doc
        est = doc["estimates"]
        rows = [
            ("untied deep (the theorem's network)", f"needs {format_bytes(est['deep'])}: {doc['untied'][:7]}"),
            ("deep, tied=True: estimate", format_bytes(est["deep, tied=1"])),
        ]
        if run:
            rows += [
                (
                    "time (convert / reconstruct / verify 2 images)",
                    f"{doc['convert_seconds']:.1f} / {doc['reconstruct_seconds']:.1f} / {doc['verify_seconds']:.1f} s "
                    f"(total {doc['total_seconds']:.0f} s wall, {doc['total_cpu_seconds']:.0f} s CPU, "
                    f"{doc['threads']} threads)",
                ),
                ("peak memory (process so far)", format_bytes(doc["peak_rss_bytes"])),
                (
                    "frozen / tunable / target parameters",
                    f"{doc['frozen_parameters']:,} / {doc['tunable_parameters']:,} / {doc['target_parameters']:,}",
                ),
                ("max relative error on 2 images of [0, 1]", f"{doc['max_rel_error']:.2e}"),
            ]
        else:
            rows.append(("reconstruct it", "onlynorm demo --resnet --imagenet (about 15 minutes on 2 cores)"))
        print_rows(console, f"{name} at 3×224×224 (random weights, random BatchNorm statistics)", rows)
    return out


def comparison_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per network: ResNet-20 (untied deep) and every ImageNet model reconstructed (tied deep)."""
    s = doc["summary"]
    rows = [
        [
            "ResNet-20, 3×32×32 (deep)",
            f"{doc['solve_seconds']:.1f}",
            format_bytes(doc["peak_rss_bytes"]),
            f"{s['frozen_parameters']:,} / {s['tunable_parameters']:,}",
            f"{doc['box_max_rel_error']:.1e} ({doc['box_samples']} images)",
        ]
    ]
    for name, d in doc.get("imagenet", {}).items():
        if "reconstruct_seconds" in d:
            rows.append(
                [
                    f"{name}, 3×224×224 (deep, tied=True)",
                    f"{d['reconstruct_seconds']:.1f} (+ {d['verify_seconds']:.0f} verify)",
                    format_bytes(d["peak_rss_bytes"]),
                    f"{d['frozen_parameters']:,} / {d['tunable_parameters']:,}",
                    f"{d['max_rel_error']:.1e} ({d['images']} images)",
                ]
            )
    return rows


def print_resnet20(console: Console | None, doc: dict[str, Any], s, report) -> None:
    """The ResNet-20 tables: accuracy and agreement next to the target, then the reconstruction's facts."""
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
                f"{doc['train_seconds']:.1f} (training)",
            ],
            [
                "random deep CNN, only γ, β solved",
                f"{doc['reconstructed_accuracy']:.3f}",
                f"{doc['agreement']:.3f}",
                f"{doc['test_max_abs_error']:.1e}",
                f"{s.tunable_parameters:,} tuned / {s.frozen_parameters:,} frozen",
                f"{doc['solve_seconds']:.1f} (solve)",
            ],
        ],
    )
    print_rows(
        console,
        "reconstruction (method='deep')",
        [
            (
                "solve time (build + solve)",
                f"{doc['solve_seconds']:.1f} s wall, {doc['solve_cpu_seconds']:.1f} s CPU, {doc['threads']} threads",
            ),
            ("peak memory (process)", format_bytes(doc["peak_rss_bytes"])),
            ("normalization layers / max width", f"{s.depth} / {s.max_width:,}"),
            (f"max relative error, {doc['box_samples']} images of the box", f"{report.max_rel_error:.2e}"),
            (
                "certificate (no unit can leave its regime)",
                f"{'yes' if report.certified else 'NO'}; proven bound on "
                f"sup|f − g| {report.certified_bound:.1e}, on rounding "
                f"{report.rounding_bound:.1e} ({doc['verify_seconds']:.1f} s with "
                "sampling)",
            ),
        ],
    )


def run(
    seed: int = 0,
    json_path: Path | None = None,
    console: Console | None = None,
    *,
    epochs: int = 2,
    samples: int = 64,
    block: int = 1,
    with_resnet18: bool = True,
    imagenet: bool = False,
    models: tuple[str, ...] = ("resnet18", "resnet50"),
) -> bool:
    """The demo; ``with_resnet18=False`` leaves out the ImageNet-geometry part, ``imagenet=True`` reconstructs
    ``models`` in it (else only their conversion and the memory guard's estimates)."""
    start = time.perf_counter()
    t0 = time.perf_counter()
    stderr_line(f"[resnet20] training {epochs} epochs on the digits upsampled to 3×32×32")
    target, Xte, yte = train_resnet20(seed, epochs)
    train_seconds = time.perf_counter() - t0
    box = Box(0.0, 1.0)
    stderr_line("[resnet20] reconstructing by method='deep'")
    t0, c0 = time.perf_counter(), time.process_time()
    net = reconstruct(
        target,
        method="deep",
        in_shape=IN_SHAPE,
        domain=box,
        seed=seed,
        block=block,
        progress=_layer_progress("resnet20"),
    )
    solve_seconds, solve_cpu = time.perf_counter() - t0, time.process_time() - c0
    stderr_line(f"[resnet20] reconstructed in {solve_seconds:.1f} s; verifying {samples} images and the certificate")
    t0, c0 = time.perf_counter(), time.process_time()
    report = verify(net, target, box, samples=samples, seed=seed, certify=True)
    verify_seconds, verify_cpu = time.perf_counter() - t0, time.process_time() - c0
    batch = batch_size_for(ConvNetSpec.from_module(target, IN_SHAPE), net.dtype, 512 << 20)
    with torch.no_grad():
        logits = torch.cat([net(Xte[i : i + batch]) for i in range(0, Xte.shape[0], batch)])
        target_logits = target(Xte)
    s = net.summary()
    peak = peak_rss_bytes()
    doc: dict[str, Any] = {
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
    print_resnet20(console, doc, s, report)
    if with_resnet18:  # ImageNet geometry: ResNet-18 and ResNet-50 by deep, tied=True
        doc["imagenet"] = imagenet_figure(console, seed, models, run=imagenet)
        if imagenet:
            print_table(
                console,
                "three ResNets, only γ, β solved (float64, [0, 1] box)",
                ["network", "build + solve s", "peak memory (process)", "frozen / tunable", "max rel error"],
                comparison_rows(doc),
            )
    doc["seconds"] = time.perf_counter() - start
    doc["load_average"] = list(os.getloadavg())
    if json_path is not None:
        with atomic_path(json_path) as out:
            out.write_text(json.dumps(doc, indent=2, default=str))
    return doc["agreement"] == 1.0 and report.passed and bool(report.certified)
