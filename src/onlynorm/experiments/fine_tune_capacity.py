"""``fine-tune-capacity``: how much of a fine-tuning can a pretrained network's norms alone reproduce?

On scikit-learn's digits (bundled, no download), a base MLP ``64 → h → h → 10`` is trained on *which digit*. Each
target is that base **fine-tuned in full** (every weight) on another task — *even/odd*, *≥ 5* (logits 0/1 of the
same head) and a *permuted label map*. Only the base's γ, β (``onlynorm.with_norms``: a BatchNorm at identity after
every Linear) are then fitted to each target's function on the training inputs:

* ``adam`` — 3,000 Adam steps (batch 256, lr 5e-3) on the target's logits;
* ``auto`` — :func:`onlynorm.fit_norms` (per-unit regression start, then Levenberg–Marquardt) with **half of Adam's
  measured wall time** as its budget.

Scored on the test split: relative RMS logit error to the target, agreement of predictions with the target, accuracy
on the task's labels. The same is repeated with a base 2× and 4× wider (trained on *which digit* likewise), fitted
to the same narrow targets: how quickly does capacity arrive with width?
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from .runner import ExperimentResult, run_trials, trial_seed

TASKS = ["even/odd", "≥ 5", "permuted"]


def task_labels(name: str, y: torch.Tensor, seed: int) -> torch.Tensor:
    if name == "digit":
        return y
    if name == "even/odd":
        return y % 2
    if name == "≥ 5":
        return (y >= 5).long()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
    return perm[y]


def _mlp(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).double()


def trial(task: str, width: int, factor: int, epochs: int, tune_epochs: int, adam_steps: int, seed: int) -> dict:
    import onlynorm
    from onlynorm.demos.digits import fit_classifier, load_digits_split
    from onlynorm.fit.data import relative_rms

    Xtr, ytr, Xte, yte = load_digits_split(seed)
    base = fit_classifier(_mlp(width, seed), Xtr, ytr, seed, epochs, weight_decay=1e-4)
    target = fit_classifier(copy.deepcopy(base), Xtr, task_labels(task, ytr, seed), seed + 1, tune_epochs)
    if factor > 1:  # a wider base trained on the original task; the targets stay the narrow fine-tuned ones
        base = fit_classifier(_mlp(width * factor, seed + 2), Xtr, ytr, seed, epochs, weight_decay=1e-4)
    labels = task_labels(task, yte, seed)
    with torch.no_grad():
        target_te = target(Xte)
    frozen = onlynorm.with_norms(base)
    out = {
        "task": task,
        "width": width,
        "factor": factor,
        "seed": seed,
        "tunable": sum(p.numel() for p in frozen.norm_parameters()),
        "target_accuracy": float((target_te.argmax(1) == labels).double().mean()),
    }

    def score(name, net, seconds, iterations):
        with torch.no_grad():
            logits = net(Xte)
        out[name] = {
            "logit_rms": relative_rms(logits, target_te),
            "agreement": float((logits.argmax(1) == target_te.argmax(1)).double().mean()),
            "accuracy": float((logits.argmax(1) == labels).double().mean()),
            "seconds": seconds,
            "iterations": iterations,
        }

    score("base", frozen, 0.0, 0)
    start = time.perf_counter()
    net, report = onlynorm.fit_norms(frozen, target, Xtr, method="adam", steps=adam_steps, seed=seed)
    adam_seconds = time.perf_counter() - start
    score("adam", net, adam_seconds, report.iterations)
    start = time.perf_counter()
    net, report = onlynorm.fit_norms(frozen, target, Xtr, method="auto", budget_seconds=adam_seconds / 2, seed=seed)
    score("auto", net, time.perf_counter() - start, report.iterations)
    out["auto_phases"] = [p.name for p in report.phases]
    return out


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    if quick:
        tasks, factors, width, epochs, tune_epochs, steps, repeats = ["even/odd"], [1, 2], 16, 10, 5, 200, 1
    else:
        tasks, factors, width, epochs, tune_epochs, steps, repeats = TASKS, [1, 2, 4], 32, 100, 40, 3000, 2
    trials = [
        {
            "task": t,
            "width": width,
            "factor": f,
            "epochs": epochs,
            "tune_epochs": tune_epochs,
            "adam_steps": steps,
            "seed": trial_seed(seed, i, f, k),
        }
        for i, t in enumerate(tasks)
        for f in factors
        for k in range(repeats)
    ]
    rows = run_trials(trial, trials, console=console, description="fine-tune-capacity trials")
    table = []
    for t in tasks:
        for f in factors:
            sel = [r for r in rows if r["task"] == t and r["factor"] == f]
            row = {
                "task": t,
                "factor": f,
                "width": width * f,
                "tunable": sel[0]["tunable"],
                "target_accuracy": float(np.median([r["target_accuracy"] for r in sel])),
            }
            for m in ("base", "adam", "auto"):
                for k in ("logit_rms", "agreement", "accuracy", "seconds"):
                    row[f"{m} {k}"] = float(np.median([r[m][k] for r in sel]))
            table.append(row)
    data = {
        "experiment": "fine-tune-capacity",
        "quick": quick,
        "seed": seed,
        "width": width,
        "epochs": epochs,
        "tune_epochs": tune_epochs,
        "adam_steps": steps,
        "repeats": repeats,
        "table": table,
        "trials": rows,
    }
    return ExperimentResult(
        "fine-tune-capacity", data, {"fine_tune_capacity.png": _figure(table, tasks, factors)}, _summary(data)
    )


def _figure(table, tasks, factors):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for t in tasks:
        sel = [r for r in table if r["task"] == t]
        for m, style in (("adam", "--s"), ("auto", "-o")):
            ax1.plot([r["factor"] for r in sel], [r[f"{m} agreement"] for r in sel], style, label=f"{m}: {t}")
            ax2.plot([r["factor"] for r in sel], [r[f"{m} logit_rms"] for r in sel], style, label=f"{m}: {t}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [f"{f}×" for f in factors])
        ax.set_xlabel("base width / target width")
    ax1.set_ylabel("agreement with the fine-tuned target")
    ax2.set_ylabel("relative RMS logit error")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(data: dict) -> str:
    lines = [
        "# fine-tune-capacity",
        "",
        f"Digits, base MLP 64 → {data['width']} → {data['width']} → 10 trained on *which digit* "
        f"({data['epochs']} epochs), targets = the base fine-tuned in full for {data['tune_epochs']} epochs; "
        f"{data['repeats']} seed(s) per cell (medians). Adam: {data['adam_steps']} steps; auto's budget: half of "
        "Adam's measured time.",
        "",
        "| task | base width | γ, β | target acc | base agreement | Adam agreement | auto agreement | Adam acc | "
        "auto acc | Adam logit err | auto logit err | Adam s | auto s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["table"]:
        lines.append(
            f"| {r['task']} | {r['width']} | {r['tunable']} | {r['target_accuracy']:.3f} | "
            f"{r['base agreement']:.3f} | {r['adam agreement']:.3f} | {r['auto agreement']:.3f} | "
            f"{r['adam accuracy']:.3f} | {r['auto accuracy']:.3f} | {r['adam logit_rms']:.3f} | "
            f"{r['auto logit_rms']:.3f} | {r['adam seconds']:.2f} | {r['auto seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"
