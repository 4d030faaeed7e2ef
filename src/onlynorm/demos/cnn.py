"""``onlynorm demo --cnn``: a small CNN with BatchNorm, trained on the 8×8 digits, reconstructed exactly.

The target ``Conv(1→6, 3×3) → BN → ReLU → MaxPool 2 → Conv(6→8, 3×3) → BN → ReLU → AvgPool 2 → Flatten → Linear(32→10)``
is trained normally; its BatchNorm layers are folded into the convolutions, and a random frozen CNN (random conv
``c_in → c_out·c_in·9``, BatchNorm2d, ReLU, random 1×1 conv, BatchNorm2d per target conv) gets only its ``γ, β``
solved, on the input box ``[0, 1]^{1×8×8}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_path
from ..api import reconstruct
from ..domain import Box
from ..verify import verify
from .digits import fit_classifier, load_digits_split
from .report import print_rows, print_table

IN_SHAPE = (1, 8, 8)


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
    ).double()


def train_cnn(X, y, seed: int, epochs: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = make_cnn()
    fit_classifier(model, X, y, seed, epochs)
    return model


def run(seed: int = 0, json_path: Path | None = None, console=None, *, epochs: int = 40) -> bool:
    start = time.perf_counter()
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    Xtr, Xte = Xtr.reshape(-1, *IN_SHAPE), Xte.reshape(-1, *IN_SHAPE)
    t0 = time.perf_counter()
    target = train_cnn(Xtr, ytr, seed, epochs)
    train_seconds = time.perf_counter() - t0
    box = Box(0.0, 1.0)
    t0 = time.perf_counter()
    net = reconstruct(target, in_shape=IN_SHAPE, domain=box, seed=seed)
    solve_seconds = time.perf_counter() - t0
    with torch.no_grad():
        logits, target_logits = net(Xte), target(Xte)
    report = verify(net, target, box, samples=20_000, seed=seed)
    doc = {
        "target_accuracy": float((target_logits.argmax(1) == yte).double().mean()),
        "reconstructed_accuracy": float((logits.argmax(1) == yte).double().mean()),
        "agreement": float((logits.argmax(1) == target_logits.argmax(1)).double().mean()),
        "max_abs_error": float((logits - target_logits).abs().max()),
        "box_max_rel_error": report.max_rel_error,
        "solve_seconds": solve_seconds,
        "train_seconds": train_seconds,
        "summary": net.summary().as_dict(),
        "seed": seed,
    }
    s = net.summary()
    print_table(
        console,
        "CNN on 8×8 digits: BatchNorm-only reconstruction",
        ["network", "test acc", "agreement", "max |Δlogit|", "parameters", "seconds"],
        [
            [
                "target CNN (BatchNorm folded)",
                f"{doc['target_accuracy']:.3f}",
                "1.000",
                "0",
                f"{s.target_parameters:,}",
                f"{train_seconds:.1f} (training)",
            ],
            [
                "random CNN, only γ, β solved",
                f"{doc['reconstructed_accuracy']:.3f}",
                f"{doc['agreement']:.3f}",
                f"{doc['max_abs_error']:.1e}",
                f"{s.tunable_parameters:,} tuned / {s.frozen_parameters:,} frozen",
                f"{solve_seconds:.2f} (solve)",
            ],
        ],
    )
    print_rows(
        console,
        "reconstruction",
        [
            ("channels of the normalization layers", str(s.widths)),
            ("max relative error, 20,000 images of the box", f"{report.max_rel_error:.2e}"),
            ("frozen / target parameters", f"{s.ratio('frozen_parameters'):.1f}×"),
        ],
    )
    doc["seconds"] = time.perf_counter() - start
    if json_path is not None:
        with atomic_path(json_path) as out:
            out.write_text(json.dumps(doc, indent=2))
    return doc["agreement"] == 1.0 and report.passed
