"""The baseline: :func:`onlynorm.train_norm_only` (Adam on γ, β with fixed statistics).

A box is sampled afresh every step (uniformly, as ``train_norm_only`` does); a tensor of inputs is used through
mini-batches of the training part. Defaults: 3,000 steps of batch 256, learning rate 5e-3 (as in the gd-vs-exact
experiment).
"""

from __future__ import annotations

import time
from typing import Any

from ..nets.normnet import NormNet
from .data import FitData
from .gradient import train_norm_only
from .report import Phase

__all__ = ["fit_adam", "ADAM_STEPS", "ADAM_LR"]

ADAM_STEPS = 3000
ADAM_LR = 5e-3


def fit_adam(
    net: NormNet,
    spec,
    data: FitData,
    *,
    steps: int = ADAM_STEPS,
    lr: float = ADAM_LR,
    budget_seconds: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> Phase:
    """Train ``net``'s γ, β in place; returns the phase record."""
    start = time.perf_counter()
    before = data.held_out_error(net)
    source: dict[str, Any]
    if data.source == "box" and net.in_shape is None:  # fresh uniform samples every step
        source = {"target": spec.to(dtype=net.dtype, device=net.device), "box": data.box}
    else:  # the fixed training points (real data, or images)
        source = {"data": (data.x_train, data.y_train)}
    history = train_norm_only(
        net, **source, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False, time_budget=budget_seconds
    )
    return Phase(
        "adam",
        before,
        data.held_out_error(net),
        time.perf_counter() - start,
        len(history.losses),
        details={"lr": lr, "batch_size": batch_size, "final_batch_loss": history.final_loss},
    )
