"""``fine-tune-capacity``: how much of a fine-tuning can a pretrained network's norms alone reproduce?

On scikit-learn's digits (bundled, no download), a base network is trained on *which digit* — an MLP
``64 → h → h → 10`` and, on the same pixels as 1×8×8 images, a small CNN
``conv 3×3 (1 → c) → ReLU → max-pool 2 → conv 3×3 (c → c) → ReLU → Linear (16c → 10)``. Each target is that base
**fine-tuned in full** (every weight) on another task — *even/odd*, *≥ 5* (logits 0/1 of the same head) and a
*permuted label map*. Only the base's γ, β (``onlynorm.with_norms``: a BatchNorm at identity after every
Linear/Conv2d) are then fitted to each target's function on the training inputs:

* ``adam`` — 3,000 Adam steps (batch 256, lr 5e-3) on the target's logits;
* ``auto`` — :func:`onlynorm.fit_norms` (per-unit regression start, then Levenberg–Marquardt) with **half of Adam's
  measured wall time** as its budget.

Scored on the test split: relative RMS logit error to the target, agreement of predictions with the target, accuracy
on the task's labels. The same is repeated with a base 2× and 4× wider (units for the MLP, channels for the CNN;
trained on *which digit* likewise), fitted to the same narrow targets: how quickly does capacity arrive with width?
Both architectures run in one command; the table has an ``arch`` column and the figure a row per architecture.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

import onlynorm
from onlynorm.demos.digits import fit_classifier, load_digits_split
from onlynorm.fit.data import relative_rms
from onlynorm.nets.records import FitReport

from .runner import ExperimentResult, run_trials, trial_seed

TASKS = ["even/odd", "≥ 5", "permuted"]
ARCHS = ("mlp", "cnn")
ARCH_NAMES = {"mlp": "MLP 64 → h → h → 10", "cnn": "CNN conv(1 → c) → pool → conv(c → c) → linear"}
#: the digits as images: one channel of 8 × 8 pixels (they arrive flattened, 64 features per row)
IN_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class Config:
    """One architecture's grid: ``width`` is the narrow base's hidden units (MLP) or channels (CNN)."""

    tasks: tuple[str, ...]
    factors: tuple[int, ...]
    width: int
    epochs: int
    tune_epochs: int
    steps: int
    repeats: int


#: ``CONFIGS[quick][arch]``. The CNN's 8 channels give 52 γ, β (the MLP's 32 units: 148). At 4× (32 channels) one
#: Adam step on a batch of 256 images costs ~10× an MLP step (a CNN trial there: ~3 CPU-minutes), so the full CNN
#: grid runs one seed per cell to keep the whole command under ~40 minutes on a shared 2-core machine.
CONFIGS = {
    True: {
        "mlp": Config(("even/odd",), (1, 2), width=16, epochs=10, tune_epochs=5, steps=200, repeats=1),
        "cnn": Config(("even/odd",), (1, 2), width=4, epochs=10, tune_epochs=5, steps=200, repeats=1),
    },
    False: {
        "mlp": Config(tuple(TASKS), (1, 2, 4), width=32, epochs=100, tune_epochs=40, steps=3000, repeats=2),
        "cnn": Config(tuple(TASKS), (1, 2, 4), width=8, epochs=100, tune_epochs=40, steps=3000, repeats=1),
    },
}


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


def _cnn(channels: int, seed: int) -> nn.Sequential:
    """``c`` channels: two 3×3 convolutions (zero padding keeps 8×8, then 4×4 after the pooling) and a linear head.

    >>> _cnn(8, 0)(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).shape
    torch.Size([2, 10])
    """
    torch.manual_seed(seed)
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * 4 * 4, 10),
    ).double()


def _model(arch: str, width: int, seed: int) -> nn.Sequential:
    return _cnn(width, seed) if arch == "cnn" else _mlp(width, seed)


def adam_then_auto(frozen, target, data, Xte, target_te, labels, adam_steps: int, seed: int) -> tuple[dict, FitReport]:
    """One trial's comparison: the frozen network's own scores (``base``), ``adam_steps`` Adam steps, then ``auto``
    with half of Adam's measured time as its budget — each scored on ``Xte`` by its logits' relative RMS to the
    target's ``target_te``, its argmax agreement with them and its accuracy on ``labels``. Returns the scores (and
    ``auto_budget``) and auto's report."""
    out: dict = {}

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
    net, report = onlynorm.fit_norms(frozen, target, data, method="adam", steps=adam_steps, seed=seed)
    adam_seconds = time.perf_counter() - start
    score("adam", net, adam_seconds, report.iterations)
    start = time.perf_counter()
    net, report = onlynorm.fit_norms(frozen, target, data, method="auto", budget_seconds=adam_seconds / 2, seed=seed)
    score("auto", net, time.perf_counter() - start, report.iterations)
    out["auto_budget"] = adam_seconds / 2
    return out, report


def trial(
    task: str, width: int, factor: int, epochs: int, tune_epochs: int, adam_steps: int, seed: int, arch: str = "mlp"
) -> dict:

    Xtr, ytr, Xte, yte = load_digits_split(seed)
    in_shape = IN_SHAPE if arch == "cnn" else None
    if in_shape is not None:  # the CNN (and fit_norms, through the NormNet's in_shape) sees images, not rows
        Xtr, Xte = Xtr.reshape(-1, *in_shape), Xte.reshape(-1, *in_shape)
    base = fit_classifier(_model(arch, width, seed), Xtr, ytr, seed, epochs, weight_decay=1e-4)
    target = fit_classifier(copy.deepcopy(base), Xtr, task_labels(task, ytr, seed), seed + 1, tune_epochs)
    if factor > 1:  # a wider base trained on the original task; the targets stay the narrow fine-tuned ones
        base = fit_classifier(_model(arch, width * factor, seed + 2), Xtr, ytr, seed, epochs, weight_decay=1e-4)
    labels = task_labels(task, yte, seed)
    with torch.no_grad():
        target_te = target(Xte)
    frozen = onlynorm.with_norms(base, in_shape=in_shape)
    out = {
        "arch": arch,
        "task": task,
        "width": width,
        "factor": factor,
        "seed": seed,
        "tunable": sum(p.numel() for p in frozen.norm_parameters()),
        "target_accuracy": float((target_te.argmax(1) == labels).double().mean()),
    }

    scores, report = adam_then_auto(frozen, target, Xtr, Xte, target_te, labels, adam_steps, seed)
    out.update(scores)
    out["auto_phases"] = [p.name for p in report.phases]
    out["auto_initial_error"], out["auto_final_error"] = report.initial_error, report.final_error
    return out


def trials_for(quick: bool, seed: int) -> list[dict]:
    """Keyword arguments of every trial; the MLP's seeds are those of the MLP-only experiment (same numbers for the
    same seed), the CNN's come from their own stream (a fifth coordinate)."""
    out = []
    for arch in ARCHS:
        cfg = CONFIGS[quick][arch]
        extra = (1,) if arch == "cnn" else ()
        out += [
            {
                "arch": arch,
                "task": t,
                "width": cfg.width,
                "factor": f,
                "epochs": cfg.epochs,
                "tune_epochs": cfg.tune_epochs,
                "adam_steps": cfg.steps,
                "seed": trial_seed(seed, i, f, k, *extra),
            }
            for i, t in enumerate(cfg.tasks)
            for f in cfg.factors
            for k in range(cfg.repeats)
        ]
    return out


def _cost(t: dict) -> tuple:
    """Sort key, most expensive trial first (CNN before MLP, wider before narrower): with the longest trials
    dispatched first, the workers finish together instead of one idling while the other runs a 4× CNN."""
    return (t["arch"] != "cnn", -t["factor"])


def _order(r: dict) -> tuple:
    """The table's order: architecture, task, width factor, as the configs list them."""
    return ARCHS.index(r["arch"]), TASKS.index(r["task"]), r["factor"]


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (arch, task, factor), in the configs' order: medians over the seeds of every score."""
    table = []
    for key in dict.fromkeys((r["arch"], r["task"], r["factor"]) for r in sorted(rows, key=_order)):
        sel = [r for r in rows if (r["arch"], r["task"], r["factor"]) == key]
        row = {
            "arch": key[0],
            "task": key[1],
            "factor": key[2],
            "width": sel[0]["width"] * key[2],
            "tunable": sel[0]["tunable"],
            "target_accuracy": float(np.median([r["target_accuracy"] for r in sel])),
        }
        for m in ("base", "adam", "auto"):
            for k in ("logit_rms", "agreement", "accuracy", "seconds"):
                row[f"{m} {k}"] = float(np.median([r[m][k] for r in sel]))
        table.append(row)
    return table


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    trials = sorted(trials_for(quick, seed), key=_cost)  # stable: the order within a cost class is kept
    rows = run_trials(trial, trials, console=console, description="fine-tune-capacity trials")
    table = summarize(rows)
    data = {
        "experiment": "fine-tune-capacity",
        "quick": quick,
        "seed": seed,
        "configs": {arch: asdict(CONFIGS[quick][arch]) for arch in ARCHS},
        "table": table,
        "trials": rows,
    }
    return ExperimentResult("fine-tune-capacity", data, {"fine_tune_capacity.png": _figure(table)}, _summary(data))


def _figure(table):
    """A row of panels per architecture: agreement and logit error against the base's width factor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in table))
    fig, axes = plt.subplots(len(archs), 2, figsize=(10, 3.8 * len(archs)), squeeze=False)
    for (ax1, ax2), arch in zip(axes, archs):
        rows = [r for r in table if r["arch"] == arch]
        for t in dict.fromkeys(r["task"] for r in rows):
            sel = [r for r in rows if r["task"] == t]
            for m, style in (("adam", "--s"), ("auto", "-o")):
                ax1.plot([r["factor"] for r in sel], [r[f"{m} agreement"] for r in sel], style, label=f"{m}: {t}")
                ax2.plot([r["factor"] for r in sel], [r[f"{m} logit_rms"] for r in sel], style, label=f"{m}: {t}")
        factors = sorted({r["factor"] for r in rows})
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(factors, [f"{f}×" for f in factors])
            ax.set_xlabel("base width / target width")
            ax.set_title(ARCH_NAMES[arch], fontsize=9)
        ax1.set_ylabel("agreement with the fine-tuned target")
        ax2.set_ylabel("relative RMS logit error")
        ax2.set_yscale("log")
        ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _describe(arch: str, cfg: dict) -> str:
    w = cfg["width"]
    if arch == "cnn":
        net = f"CNN conv 3×3 (1 → {w}) → ReLU → max-pool 2 → conv 3×3 ({w} → {w}) → ReLU → Linear ({16 * w} → 10)"
    else:
        net = f"MLP 64 → {w} → {w} → 10"
    return (
        f"* **{arch}** — base {net} trained on *which digit* ({cfg['epochs']} epochs), targets = the base fine-tuned "
        f"in full for {cfg['tune_epochs']} epochs; {cfg['repeats']} seed(s) per cell (medians); Adam: "
        f"{cfg['steps']} steps."
    )


def _summary(data: dict) -> str:
    lines = [
        "# fine-tune-capacity",
        "",
        "Digits; auto's budget: half of Adam's measured time. Base width: hidden units (MLP) or channels (CNN).",
        "",
        *[_describe(arch, cfg) for arch, cfg in data["configs"].items()],
        "",
        "| arch | task | base width | γ, β | target acc | base agreement | Adam agreement | auto agreement | Adam acc | "
        "auto acc | Adam logit err | auto logit err | Adam s | auto s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["table"]:
        lines.append(
            f"| {r['arch']} | {r['task']} | {r['width']} | {r['tunable']} | {r['target_accuracy']:.3f} | "
            f"{r['base agreement']:.3f} | {r['adam agreement']:.3f} | {r['auto agreement']:.3f} | "
            f"{r['adam accuracy']:.3f} | {r['auto accuracy']:.3f} | {r['adam logit_rms']:.3f} | "
            f"{r['auto logit_rms']:.3f} | {r['adam seconds']:.2f} | {r['auto seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"
