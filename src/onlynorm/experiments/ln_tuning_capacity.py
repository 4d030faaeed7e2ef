"""``ln-tuning-capacity``: how much of a fine-tuning can a pretrained transformer's LayerNorms alone reproduce?

The transformer analogue of ``fine-tune-capacity``. On scikit-learn's digits read as 8 tokens of 8 pixels
(:mod:`onlynorm.demos.transformer`), a base :class:`~onlynorm.demos.transformer.DigitsTransformer` (width ``d``,
2 pre-norm blocks, 4 heads, GELU MLP of ``2d``, 5 LayerNorms) is trained on *which digit*. Each target is that base
**fine-tuned in full** (every weight) on another task — *even/odd*, *≥ 5* (logits 0/1 of the same head) and a
*permuted label map*. Then only the base's LayerNorm ``γ, β`` (``onlynorm.with_norms(base, example_input=x)``: its
linear maps frozen as they are, ``5 · 2d`` parameters) are fitted to each target's logits on ``rows`` training
inputs (the next 256 training inputs are :func:`onlynorm.fit_norms`'s held-out call):

* ``adam`` — ``fit_norms(method="adam", steps=...)`` (full batch, lr 1e-2);
* ``auto`` — ``fit_norms(method="auto")`` with **half of Adam's measured wall time** as its budget (the whole call
  timed): an Adam warm start, Levenberg–Marquardt (normal equations formed in memory-capped chunks of forward-mode
  tangents, curvature on as many rows as a tenth of the budget allows, a step kept only if the held-out error
  falls), Adam for the time left; the best held-out parameters (:mod:`onlynorm.fit.transformer_lm`).

Scored on the test split: relative RMS logit error to the target, agreement of predictions with the target,
accuracy on the task's labels, seconds, and ``auto / adam`` for the error and the time. Bases 2× and 4× wider
(trained on *which digit* likewise) are fitted to the same narrow targets. The trials run one at a time in one
process with one thread (wall-clock budgets).
"""

from __future__ import annotations

import copy
import resource
from dataclasses import asdict, dataclass

import numpy as np
import torch

import onlynorm
from onlynorm.demos.digits import fit_classifier, load_digits_split
from onlynorm.demos.transformer import as_tokens, train_transformer

from .fine_tune_capacity import adam_then_auto, task_labels
from .runner import ExperimentResult, run_trials, trial_seed

TASKS = ["even/odd", "≥ 5", "permuted"]
HELD_OUT = 256


@dataclass(frozen=True)
class Config:
    """The grid: ``width`` is the narrow base's ``d``; ``rows`` the training inputs of the fits."""

    tasks: tuple[str, ...]
    factors: tuple[int, ...]
    width: int
    heads: int
    layers: int
    epochs: int
    tune_epochs: int
    rows: int
    steps: int
    repeats: int


#: ``CONFIGS[quick]``. The full grid's 4× base (d = 64, 640 LayerNorm γ, β) is where ``auto``'s Jacobian is
#: costliest (640 forward-mode tangents per row; its memory is capped by chunking, its time is not).
CONFIGS = {
    True: Config(
        ("even/odd",), (1, 2), width=8, heads=2, layers=1, epochs=2, tune_epochs=1, rows=32, steps=30, repeats=1
    ),
    False: Config(
        tuple(TASKS), (1, 2, 4), width=16, heads=4, layers=2, epochs=20, tune_epochs=10, rows=64, steps=1000, repeats=1
    ),
}


def trial(
    task: str,
    width: int,
    factor: int,
    heads: int,
    layers: int,
    epochs: int,
    tune_epochs: int,
    rows: int,
    steps: int,
    seed: int,
) -> dict:
    """One cell: train the base (and the wider base), fine-tune the target, fit the LayerNorms by Adam and auto."""
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    Xtr, Xte = as_tokens(Xtr), as_tokens(Xte)
    arch = {"heads": heads, "layers": layers, "epochs": epochs}
    base = train_transformer(Xtr, ytr, seed, d=width, **arch)
    target = fit_classifier(copy.deepcopy(base), Xtr, task_labels(task, ytr, seed), seed + 1, tune_epochs, lr=1e-3)
    if factor > 1:  # a wider base trained on the original task; the targets stay the narrow fine-tuned ones
        base = train_transformer(Xtr, ytr, seed + 2, d=width * factor, **arch)
    labels = task_labels(task, yte, seed)
    frozen = onlynorm.with_norms(base, example_input=Xtr[:2])
    data = [Xtr[:rows], Xtr[rows : rows + HELD_OUT]]  # the last call is fit_norms' held-out set
    with torch.no_grad():
        target_te = target(Xte)
    out: dict = {
        "task": task,
        "width": width,
        "factor": factor,
        "seed": seed,
        "tunable": sum(p.numel() for p in frozen.norm_parameters()),
        "target_accuracy": float((target_te.argmax(1) == labels).double().mean()),
    }

    scores, _ = adam_then_auto(frozen, target, data, Xte, target_te, labels, steps, seed)
    out.update(scores)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this process, so far
    return out


def trials_for(quick: bool, seed: int) -> list[dict]:
    cfg = CONFIGS[quick]
    fixed = {k: v for k, v in asdict(cfg).items() if k not in ("tasks", "factors", "repeats")}
    return [
        {"task": t, "factor": f, **fixed, "seed": trial_seed(seed, i, f, k)}
        for i, t in enumerate(cfg.tasks)
        for f in cfg.factors
        for k in range(cfg.repeats)
    ]


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (task, factor): medians over the seeds, and the ratios auto / adam of error and time."""
    table = []
    for key in dict.fromkeys((r["task"], r["factor"]) for r in rows):
        sel = [r for r in rows if (r["task"], r["factor"]) == key]
        row: dict = {
            "task": key[0],
            "factor": key[1],
            "width": sel[0]["width"] * key[1],
            "tunable": sel[0]["tunable"],
            "target_accuracy": float(np.median([r["target_accuracy"] for r in sel])),
        }
        for m in ("base", "adam", "auto"):
            for k in ("logit_rms", "agreement", "accuracy", "seconds", "iterations"):
                row[f"{m} {k}"] = float(np.median([r[m][k] for r in sel]))
        row["error ratio"] = float(np.median([r["auto"]["logit_rms"] / r["adam"]["logit_rms"] for r in sel]))
        row["time ratio"] = float(np.median([r["auto"]["seconds"] / r["adam"]["seconds"] for r in sel]))
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in sel)
        table.append(row)
    return table


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    # one at a time: auto's budget is wall time
    rows = run_trials(trial, trials_for(quick, seed), console=console, description="ln-tuning-capacity", n_jobs=1)
    table = summarize(rows)
    data = {
        "experiment": "ln-tuning-capacity",
        "quick": quick,
        "seed": seed,
        "config": asdict(CONFIGS[quick]),
        "table": table,
        "trials": rows,
        "claim": claim(table),
    }
    return ExperimentResult("ln-tuning-capacity", data, {"ln_tuning_capacity.png": _figure(table)}, _summary(data))


def claim(table: list[dict]) -> dict:
    """How many cells satisfy "auto's logit error < Adam's, in ≤ ½ Adam's time" (and each half of it)."""
    better = [r["error ratio"] < 1.0 for r in table]
    faster = [r["time ratio"] <= 0.5 for r in table]
    return {
        "cells": len(table),
        "lower_error": sum(better),
        "within_half_time": sum(faster),
        "both": sum(b and f for b, f in zip(better, faster)),
    }


def _figure(table):
    """Agreement and logit error of adam and auto against the base's width factor, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for t in dict.fromkeys(r["task"] for r in table):
        sel = [r for r in table if r["task"] == t]
        for m, style in (("adam", "--s"), ("auto", "-o")):
            ax1.plot([r["factor"] for r in sel], [r[f"{m} agreement"] for r in sel], style, label=f"{m}: {t}")
            ax2.plot([r["factor"] for r in sel], [r[f"{m} logit_rms"] for r in sel], style, label=f"{m}: {t}")
    factors = sorted({r["factor"] for r in table})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [f"{f}×" for f in factors])
        ax.set_xlabel("base width / target width")
    ax1.set_ylabel("agreement with the fine-tuned target")
    ax2.set_ylabel("relative RMS logit error")
    ax2.set_yscale("log")
    ax1.set_title("LayerNorm γ, β only, digits as 8 tokens", fontsize=9)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(data: dict) -> str:
    c = data["config"]
    lines = [
        "# ln-tuning-capacity",
        "",
        f"Digits as 8 tokens of 8 pixels. Base: DigitsTransformer d = {c['width']} ({c['layers']} pre-norm blocks, "
        f"{c['heads']} heads), trained on *which digit* ({c['epochs']} epochs); targets = the base fine-tuned in full "
        f"for {c['tune_epochs']} epochs. Only the base's LayerNorm γ, β fitted on {c['rows']} training inputs "
        f"({HELD_OUT} held out); Adam: {c['steps']} full-batch steps; auto's budget: half of Adam's measured time. "
        f"{c['repeats']} seed(s) per cell (medians); test split.",
        "",
        "| task | base d | γ, β | target acc | base agreement | Adam agreement | auto agreement | Adam logit err | "
        "auto logit err | auto / Adam err | Adam s | auto s | auto / Adam s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["table"]:
        lines.append(
            f"| {r['task']} | {r['width']} | {r['tunable']} | {r['target_accuracy']:.3f} | {r['base agreement']:.3f} | "
            f"{r['adam agreement']:.3f} | {r['auto agreement']:.3f} | {r['adam logit_rms']:.3f} | "
            f"{r['auto logit_rms']:.3f} | {r['error ratio']:.2f} | {r['adam seconds']:.1f} | "
            f"{r['auto seconds']:.1f} | {r['time ratio']:.2f} |"
        )
    k = data["claim"]
    lines += [
        "",
        f"auto's logit error below Adam's in {k['lower_error']} of {k['cells']} cells; within ½ of Adam's time in "
        f"{k['within_half_time']}; both in {k['both']}.",
    ]
    return "\n".join(lines) + "\n"
