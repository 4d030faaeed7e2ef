"""``onlynorm demo --tasks``: one frozen random network, three digits tasks, switched by swapping norm sets.

Three MLPs 64 → 32 → 32 → 10 are trained on the digits: *which digit*, *even or odd* and *≥ 5* (the binary tasks use
logits 0 and 1 of the same 10-way head, so all three share one architecture). One frozen random network is built
once; for each task only its ``γ, β`` are solved and saved as a norm set. Reloading the frozen network and swapping
norm sets reproduces each target's predictions exactly; a norm set is a small fraction of the frozen network.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from .._io import atomic_path
from ..api import random_normnet, solve_norms
from ..domain import Box
from ..nets.normnet import NormNet
from ..targets.mlp import MLPSpec
from .digits import load_digits_split, train_target
from .report import print_rows, print_table

TASKS = {"digit": lambda y: y, "even/odd": lambda y: y % 2, "≥ 5": lambda y: (y >= 5).long()}


def run(seed: int = 0, json_path: Path | None = None, console=None, *, epochs: int = 100) -> bool:
    start = time.perf_counter()
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    box = Box(0.0, 1.0, dim=Xtr.shape[1])
    targets = {name: train_target(Xtr, f(ytr), seed + i, epochs=epochs) for i, (name, f) in enumerate(TASKS.items())}
    specs = {name: MLPSpec.from_module(m) for name, m in targets.items()}
    frozen = random_normnet(next(iter(specs.values())), seed=seed)
    rows, doc_tasks, ok = [], {}, True
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        frozen.save(tmp / "frozen.safetensors")
        for name, spec in specs.items():  # solve each task's γ, β on the same frozen network
            solve_norms(frozen, spec, box).save_norms(tmp / f"{name.replace('/', '-')}.norms.safetensors")
        net = NormNet.load(tmp / "frozen.safetensors")  # a fresh process would start here
        frozen_bytes = (tmp / "frozen.safetensors").stat().st_size
        for name, f in TASKS.items():
            path = tmp / f"{name.replace('/', '-')}.norms.safetensors"
            net.load_norms(path)  # switch task: only γ, β change
            with torch.no_grad():
                logits, target_logits = net(Xte), targets[name](Xte)
            labels = f(yte)
            agreement = float((logits.argmax(1) == target_logits.argmax(1)).double().mean())
            result = {
                "target_accuracy": float((target_logits.argmax(1) == labels).double().mean()),
                "accuracy": float((logits.argmax(1) == labels).double().mean()),
                "agreement": agreement,
                "max_abs_error": float((logits - target_logits).abs().max()),
                "norm_set_bytes": path.stat().st_size,
            }
            ok &= agreement == 1.0 and result["max_abs_error"] < 1e-8
            doc_tasks[name] = result
            rows.append(
                [
                    name,
                    f"{result['target_accuracy']:.3f}",
                    f"{result['accuracy']:.3f}",
                    f"{agreement:.3f}",
                    f"{result['max_abs_error']:.1e}",
                    f"{result['norm_set_bytes'] / 1024:.1f} KiB",
                ]
            )
    print_table(
        console,
        "three tasks, one frozen random network, swapped norm sets",
        ["task", "target acc", "swapped-in acc", "agreement", "max |Δlogit|", "norm set"],
        rows,
    )
    s = frozen.summary()
    print_rows(
        console,
        "sizes",
        [
            ("frozen network file", f"{frozen_bytes / 1024:.0f} KiB ({s.frozen_parameters:,} frozen weights)"),
            (
                "one norm set",
                f"{max(t['norm_set_bytes'] for t in doc_tasks.values()) / 1024:.1f} KiB "
                f"({s.tunable_parameters:,} γ, β) = "
                f"{100 * max(t['norm_set_bytes'] for t in doc_tasks.values()) / frozen_bytes:.1f}% of it",
            ),
        ],
    )
    if json_path is not None:
        doc = {
            "tasks": doc_tasks,
            "frozen_bytes": frozen_bytes,
            "frozen_parameters": s.frozen_parameters,
            "tunable_parameters": s.tunable_parameters,
            "seconds": time.perf_counter() - start,
            "seed": seed,
        }
        with atomic_path(json_path) as out:
            out.write_text(json.dumps(doc, indent=2))
    return ok
