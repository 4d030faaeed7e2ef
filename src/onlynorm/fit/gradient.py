"""Norm-only gradient training for any torch model — the baseline the closed form is compared with.

``norm_parameters(module)`` selects the affine parameters of normalization layers **by module type**
(BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm with ``affine=True``, RMSNorm), never by
parameter names. ``train_norm_only`` freezes everything else and optimises those with a standard torch optimizer
(Adam by default), either on a dataset / data loader or by sampling a target function on a :class:`Box`.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1), nn.LayerNorm(1))
>>> [tuple(p.shape) for p in norm_parameters(model)]
[(8,), (8,), (1,), (1,)]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..domain import Box
from ..errors import InvalidOptionError, OnlyNormError
from ..options import check_scalar, check_seed

__all__ = ["norm_parameters", "norm_modules", "train_norm_only", "TrainHistory", "NORM_TYPES"]

#: normalization layer types whose affine parameters count as "norm parameters"
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, _InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def norm_modules(module: nn.Module) -> list[nn.Module]:
    """Normalization layers of ``module`` (by type), in ``module.modules()`` order."""
    return [m for m in module.modules() if isinstance(m, NORM_TYPES)]


def norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Exactly the affine parameters (scale and shift) of the normalization layers of ``module``.

    Layers without affine parameters (``affine=False``, ``elementwise_affine=False``) contribute nothing. Shared
    parameters appear once.
    """
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in norm_modules(module):
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@dataclass
class TrainHistory:
    """Loss per step (mean over the batch), wall time and the number of tuned parameters."""

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time at the end of each step
    tuned_parameters: int = 0
    statistics: str = "fixed"

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def _batches(data, batch_size: int, generator: torch.Generator) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches from ``(X, Y)`` tensors, a Dataset, or a DataLoader."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        X, Y = data
        if X.shape[0] != Y.shape[0] or X.shape[0] == 0:
            raise OnlyNormError(
                f"data: expected X and Y with the same positive number of rows, found "
                f"{tuple(X.shape)} and {tuple(Y.shape)}"
            )
        while True:
            order = torch.randperm(X.shape[0], generator=generator)
            for start in range(0, X.shape[0], batch_size):
                idx = order[start : start + batch_size]
                yield X[idx], Y[idx]
    elif isinstance(data, torch.utils.data.DataLoader):
        while True:
            yield from data
    elif isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
        while True:
            yield from loader
    else:
        raise OnlyNormError(f"data: expected (X, Y) tensors, a Dataset or a DataLoader, found {type(data).__name__}")


def _sampled(
    target: Callable[[torch.Tensor], torch.Tensor], box: Box, batch_size: int, seed: int, dtype: torch.dtype, device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        u = torch.rand(batch_size, int(box.dim or 0), generator=gen, dtype=torch.float64)
        x = (box.low + u * (box.high - box.low)).to(dtype=dtype, device=device)
        with torch.no_grad():
            y = target(x)
        yield x, y


def train_norm_only(
    model: nn.Module,
    data=None,
    *,
    target: Callable | None = None,
    box: Box | None = None,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-2,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    statistics: str = "fixed",
    seed: int = 0,
    progress: bool = True,
    time_budget: float | None = None,
) -> TrainHistory:
    """Train only the normalization parameters of ``model``; everything else is frozen (``requires_grad=False``).

    Either ``data`` — ``(X, Y)`` tensors, a ``Dataset`` or a ``DataLoader`` — or ``target`` (a function) with
    ``box`` (inputs sampled uniformly). ``loss`` defaults to MSE. ``statistics="fixed"`` keeps normalization layers
    on their running statistics (the closed form's setting); ``"batch"`` uses batch statistics (usual practice;
    for a NormNet this sets ``net.batch_statistics``). Stops after ``steps`` or ``time_budget`` seconds. The model is
    left in ``eval()`` mode. Returns a :class:`TrainHistory`.
    """
    if statistics not in {"fixed", "batch"}:
        raise InvalidOptionError(f"statistics: expected 'fixed' or 'batch', found {statistics!r}")
    steps = check_scalar(steps, "steps", int, min_val=1)
    batch_size = check_scalar(batch_size, "batch_size", int, min_val=1)
    lr = check_scalar(lr, "lr", float, min_val=0.0, include_min=False)
    seed = check_seed(seed)
    if time_budget is not None:
        time_budget = check_scalar(time_budget, "time_budget", float, min_val=0.0, include_min=False)
    if (data is None) == (target is None):
        raise OnlyNormError("expected exactly one of data=(X, Y)/Dataset/DataLoader or target=function (with box=)")
    params = norm_parameters(model)
    if not params:
        raise OnlyNormError(
            f"{type(model).__name__} has no normalization layers with affine parameters to train; "
            "expected BatchNorm/LayerNorm/GroupNorm/InstanceNorm(affine)/RMSNorm layers"
        )
    first = next(iter(model.parameters()))
    dtype, device = first.dtype, first.device
    if target is not None:
        if box is None or box.dim is None:
            raise OnlyNormError("target= needs a sized box=Box(low, high, dim=n) to sample inputs from")
        batches = _sampled(target, box, batch_size, seed, dtype, device)
    else:
        batches = _batches(data, batch_size, torch.Generator().manual_seed(seed))
    ids = {id(p) for p in params}
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    loss_fn = loss or nn.functional.mse_loss
    opt = optimizer(params, lr=lr)
    history = TrainHistory(tuned_parameters=sum(p.numel() for p in params), statistics=statistics)
    if hasattr(model, "batch_statistics"):
        setattr(model, "batch_statistics", statistics == "batch")  # noqa: B010 — a NormNet's plain flag, not a submodule
    model.train()
    if statistics == "fixed":
        for m in norm_modules(model):
            m.eval()
    bar = _progress(progress, steps)
    start = time.perf_counter()
    try:
        for step, (x, y) in zip(range(steps), batches):
            opt.zero_grad(set_to_none=True)
            value = loss_fn(model(x.to(device=device, dtype=dtype)), y.to(device))
            if not torch.isfinite(value.detach()):
                raise OnlyNormError(f"training diverged at step {step} (loss {float(value.detach())}); lower lr={lr}")
            value.backward()
            opt.step()
            history.losses.append(float(value.detach()))
            history.seconds.append(time.perf_counter() - start)
            if bar is not None:
                bar.update(1, loss=history.losses[-1])
            if time_budget is not None and history.seconds[-1] >= time_budget:
                break
    finally:
        if bar is not None:
            bar.close()
        for p, flag in previous.items():
            p.requires_grad_(flag)
        if hasattr(model, "batch_statistics"):
            setattr(model, "batch_statistics", False)  # noqa: B010
        model.eval()
    return history


class _RichBar:
    def __init__(self, total: int):

        self._p = Progress(
            TextColumn("norm-only training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3e}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._p.start()
        self._task = self._p.add_task("train", total=total, loss=float("nan"))

    def update(self, n: int, loss: float) -> None:
        self._p.update(self._task, advance=n, loss=loss)

    def close(self) -> None:
        self._p.stop()


def _progress(enabled: bool, total: int):
    return _RichBar(total) if enabled else None
