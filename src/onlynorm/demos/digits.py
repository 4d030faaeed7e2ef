"""``onlynorm demo`` — the main job, on scikit-learn's bundled 8×8 digits (no download).

1. Train a target MLP 64 → 32 → 32 → 10 normally.
2. **Closed form:** solve only the BatchNorm ``γ, β`` of a random frozen network (width construction) so it
   computes the target on the input box ``[0, 1]^64``.
3. **Gradient descent on the same norm parameters** of the same random frozen network: (a) distillation on the
   target's logits, (b) cross-entropy on the labels; same optimizer steps for both.

The closed form's claim is *function identity*, not higher accuracy: the table reports, for every network, test
accuracy, agreement of its predictions with the target's, max logit difference to the target, parameters tuned
and wall time — whichever number comes out higher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from .._io import atomic_path
from ..api import random_normnet, solve_norms
from ..domain import Box
from ..fit.gradient import train_norm_only
from ..targets.mlp import MLPSpec
from ..verify import verify
from .report import print_rows, print_table

HIDDEN = (32, 32)
DEFAULT_PNG = Path("runs/demo/digits.png")


def load_digits_split(seed: int):
    """Digits scaled to ``[0, 1]`` (pixel / 16) and a stratified 70/30 split, as float64 tensors."""

    data = load_digits()
    X = data.data.astype(np.float64) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, data.target, test_size=0.3, random_state=seed, stratify=data.target)
    t = lambda a, dt=torch.float64: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return t(Xtr), t(ytr, torch.int64), t(Xte), t(yte, torch.int64)


def fit_classifier(
    model: nn.Module, X, y, seed: int, epochs: int, *, lr: float = 3e-3, weight_decay: float = 0.0
) -> nn.Module:
    """Ordinary training of every parameter: Adam + cross-entropy, shuffled mini-batches of 64; returns it in eval."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0], 64):
            idx = order[start : start + 64]
            if idx.numel() < 2:  # BatchNorm cannot train on a single example
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def train_target(Xtr, ytr, seed: int, epochs: int = 150) -> nn.Sequential:
    """A plain MLP 64 → 32 → 32 → 10 trained normally (all parameters)."""
    torch.manual_seed(seed)
    dims = [Xtr.shape[1], *HIDDEN, 10]
    layers: list[nn.Module] = []
    for i, (n, m) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(n, m, dtype=torch.float64))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    fit_classifier(model, Xtr, ytr, seed, epochs, weight_decay=1e-4)
    return model


def _metrics(net, target_logits, Xte, yte) -> dict:
    with torch.no_grad():
        logits = net(Xte)
    return {
        "accuracy": float((logits.argmax(1) == yte).double().mean()),
        "agreement": float((logits.argmax(1) == target_logits.argmax(1)).double().mean()),
        "max_abs_error": float((logits - target_logits).abs().max()),
    }


def run(
    seed: int = 0,
    json_path: Path | None = None,
    console=None,
    *,
    steps: int = 3000,
    epochs: int = 150,
    png_path: Path | None = None,
) -> bool:
    """Run the demo (the module docstring's three steps), print its table, write the JSON document and the figure;
    ``True`` when the closed form agrees with the target on every test image and :func:`verify` proves it
    ``exact`` on the whole box (sampled and certified)."""
    start_all = time.perf_counter()
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    t0 = time.perf_counter()
    target = train_target(Xtr, ytr, seed, epochs=epochs)
    target_seconds = time.perf_counter() - t0
    spec = MLPSpec.from_module(target)
    with torch.no_grad():
        target_logits_te = target(Xte)
        target_logits_tr = target(Xtr)
    target_accuracy = float((target_logits_te.argmax(1) == yte).double().mean())
    box = Box(0.0, 1.0, dim=Xtr.shape[1])

    t0 = time.perf_counter()
    frozen = random_normnet(spec, method="width", seed=seed)
    exact = solve_norms(frozen, spec, box)
    exact_seconds = time.perf_counter() - t0
    exact_m = _metrics(exact, target_logits_te, Xte, yte)
    box_report = verify(exact, spec, box, samples=20_000, seed=seed, certify=True)

    results = {"closed form (solve γ, β)": {**exact_m, "seconds": exact_seconds}}
    results.update(
        _norm_only_gradient_descent(
            frozen, (Xtr, ytr, target_logits_tr), (Xte, yte, target_logits_te), steps, seed, console is not None
        )
    )
    tuned = sum(p.numel() for p in exact.norm_parameters())
    _print_comparison(console, spec, target_accuracy, target_seconds, results, tuned)
    s = exact.summary()
    print_rows(
        console,
        "closed form",
        [
            ("max relative error, 20,000 points of [0,1]^64", f"{box_report.max_rel_error:.2e}"),
            (
                "certificate on the whole box [0,1]^64",
                f"{box_report.outcome} (sup|f − g| ≤ {box_report.certified_bound:.2e} + rounding "
                f"{box_report.rounding_bound:.2e})",
            ),
            ("frozen random network", f"{s.frozen_parameters:,} frozen weights, widths {s.widths}"),
            ("gradient descent", f"{steps} Adam steps of batch 128 on the 1,257 training images, lr 1e-2"),
        ],
    )

    distill = results["GD norm-only, distill logits"]
    doc = {
        "target_accuracy": target_accuracy,
        "reconstructed_accuracy": exact_m["accuracy"],
        "reconstructed_agreement": exact_m["agreement"],
        "max_abs_error": exact_m["max_abs_error"],
        "box_max_rel_error": box_report.max_rel_error,
        "box_outcome": box_report.outcome,
        "box_certified_bound": box_report.certified_bound,
        "box_rounding_bound": box_report.rounding_bound,
        "norm_only_gd_accuracy": distill["accuracy"],
        "norm_only_gd_agreement": distill["agreement"],
        "norm_only_gd_max_abs_error": distill["max_abs_error"],
        "norm_only_labels_accuracy": results["GD norm-only, labels"]["accuracy"],
        "norm_only_labels_agreement": results["GD norm-only, labels"]["agreement"],
        "norm_only_labels_max_abs_error": results["GD norm-only, labels"]["max_abs_error"],
        "tuned_parameters": tuned,
        "target_parameters": spec.num_parameters,
        "frozen_parameters": s.frozen_parameters,
        "gd_steps": steps,
        "seed": seed,
        "closed_form_seconds": exact_seconds,
        "gd_seconds": distill["seconds"],
        "seconds": time.perf_counter() - start_all,
    }
    _write_outputs(doc, json_path, png_path, console)
    if not box_report.ok and console is not None:
        console.print(f"not verified: {box_report.failure()}", highlight=False, soft_wrap=True)
    return exact_m["agreement"] == 1.0 and box_report.ok


def _norm_only_gradient_descent(frozen, train, test, steps: int, seed: int, progress: bool) -> dict[str, dict]:
    """The baselines: Adam on the γ, β of copies of the same frozen network, (a) distilling the target's logits
    (MSE) and (b) on the labels (cross-entropy), with the same steps; each run's test metrics and seconds.

    ``train`` is ``(X, labels, target logits)`` on the training images, ``test`` the same on the test images."""
    Xtr, ytr, target_logits_tr = train
    Xte, yte, target_logits_te = test
    results = {}
    for name, data, loss in (
        ("GD norm-only, distill logits", (Xtr, target_logits_tr), nn.functional.mse_loss),
        ("GD norm-only, labels", (Xtr, ytr), nn.functional.cross_entropy),
    ):
        net = frozen.clone()
        t0 = time.perf_counter()
        train_norm_only(net, data, steps=steps, batch_size=128, lr=1e-2, loss=loss, seed=seed, progress=progress)
        results[name] = {**_metrics(net, target_logits_te, Xte, yte), "seconds": time.perf_counter() - t0}
    return results


def _print_comparison(console, spec: MLPSpec, target_accuracy: float, target_seconds: float, results, tuned: int):
    """The demo's table: the target, then each network of ``results`` — test accuracy, agreement with the target,
    max logit difference, parameters tuned and seconds."""
    header = ["network", "test acc", "agreement", "max |Δlogit|", "tuned", "seconds"]
    table = [
        [
            "target MLP " + "→".join(map(str, spec.dims)),
            f"{target_accuracy:.3f}",
            "1.000",
            "0",
            f"{spec.num_parameters:,} (all)",
            f"{target_seconds:.1f}",
        ]
    ]
    for name, m in results.items():
        table.append(
            [
                name,
                f"{m['accuracy']:.3f}",
                f"{m['agreement']:.3f}",
                f"{m['max_abs_error']:.2e}",
                f"{tuned:,} γ/β",
                f"{m['seconds']:.1f}",
            ]
        )
    print_table(console, "digits: closed form vs gradient descent on the same norm parameters", header, table)


def _write_outputs(doc: dict, json_path: Path | None, png_path: Path | None, console) -> None:
    """Write the results document (if ``json_path``) and the figure: at ``png_path``, else next to the JSON, else
    at ``DEFAULT_PNG``."""
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    png = png_path or (Path(json_path).with_suffix(".png") if json_path is not None else DEFAULT_PNG)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    _plot(Path(png), doc)
    print_rows(console, "figure", [("written", str(png))])


def _plot(path: Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["target", "closed form", "GD distill", "GD labels"]
    acc = [
        doc["target_accuracy"],
        doc["reconstructed_accuracy"],
        doc["norm_only_gd_accuracy"],
        doc["norm_only_labels_accuracy"],
    ]
    ax1.bar(names, acc, color=["#555", "#1b9e77", "#d95f02", "#7570b3"])
    ax1.set_ylim(min(acc) - 0.05, 1.0)
    ax1.set_ylabel("test accuracy")
    ax1.set_title("same frozen random network, only γ, β tuned")
    errs = [doc["max_abs_error"], doc["norm_only_gd_max_abs_error"], doc["norm_only_labels_max_abs_error"]]
    ax2.bar(names[1:], errs, color=["#1b9e77", "#d95f02", "#7570b3"])
    ax2.set_yscale("log")
    ax2.set_ylabel("max |logit − target logit| (test set)")
    ax2.set_title("function identity")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
