"""The points a fit sees: a :class:`~onlynorm.Box` (sampled) or a tensor of real inputs, split into a training set
and a held-out set, with the target's outputs on both.

The function error every phase reports is the **relative RMS** on the held-out points::

    err(f) = ‖f(X) − g(X)‖_F / ‖g(X)‖_F

>>> import torch
>>> round(relative_rms(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])), 6)
0.707107
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..domain import Box
from ..errors import InvalidDomainError, InvalidNetworkError, InvalidOptionError
from ..finite import all_finite
from ..nets.normnet import NormNet
from ..nets.stage import dtype_name

__all__ = ["FitData", "prepare_data", "relative_rms", "MIN_ROWS"]

#: fewest input rows a tensor of data may have (a training and a held-out part of at least a few points each)
MIN_ROWS = 8


def relative_rms(f: torch.Tensor, g: torch.Tensor) -> float:
    """``‖f − g‖ / ‖g‖`` in float64 (``‖f − g‖`` when ``g`` is identically 0)."""
    f64, g64 = f.detach().to(torch.float64), g.detach().to(torch.float64)
    num = float(torch.linalg.vector_norm(f64 - g64))
    den = float(torch.linalg.vector_norm(g64))
    return num / den if den > 0 else num


@dataclass
class FitData:
    """Training and held-out inputs (shaped for the network) and the target's outputs on them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    box: Box  # the sampled box, or the bounding box of tensor data
    source: str  # "box" or "tensor"

    def held_out_error(self, net: torch.nn.Module) -> float:
        with torch.no_grad():
            return relative_rms(net(self.x_held), self.y_held)

    def train_error(self, net: torch.nn.Module) -> float:
        with torch.no_grad():
            return relative_rms(net(self.x_train), self.y_train)


def _shape_for(net: NormNet, spec, x: torch.Tensor) -> torch.Tensor:
    in_shape = net.in_shape or getattr(spec, "in_shape", None)
    if in_shape is not None:
        return x.reshape(x.shape[0], *in_shape)
    return x


def prepare_data(
    frozen: NormNet, spec, data, *, seed: int, train_samples: int = 2048, held_samples: int = 1024
) -> FitData:
    """Sample a Box or split a tensor of inputs (a fifth held out, at least 2 rows), then evaluate the target."""
    n_in = spec.in_features
    dtype, device = frozen.dtype, frozen.device
    if isinstance(data, Box):
        box = data.expand(n_in)
        x_train = box.sample(train_samples, seed=seed, dtype=dtype, device=device)
        x_held = box.sample(held_samples, seed=(seed + 7919) % 2**64, dtype=dtype, device=device)  # seeds < 2⁶⁴
        source = "box"
    elif isinstance(data, torch.Tensor):
        x = _check_tensor(data, n_in, getattr(spec, "in_shape", None) or frozen.in_shape)
        x = x.reshape(x.shape[0], -1).to(dtype=dtype, device=device)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).to(device)
        n_held = max(2, x.shape[0] // 5)
        x_held, x_train = x[order[:n_held]], x[order[n_held:]]
        lo, hi = x.min(0).values.to(torch.float64).cpu(), x.max(0).values.to(torch.float64).cpu()
        pad = 1e-9 * torch.maximum((hi - lo).abs(), torch.ones_like(hi))
        box = Box(lo - pad * (hi <= lo), hi + pad * (hi <= lo))  # widen constant coordinates only
        source = "tensor"
    else:
        raise InvalidOptionError(
            f"data: expected an onlynorm.Box to sample or a tensor of inputs of shape (n, {n_in}), "
            f"found {type(data).__name__}; pass Box(low, high) or your inputs as a torch tensor"
        )
    x_train, x_held = _shape_for(frozen, spec, x_train), _shape_for(frozen, spec, x_held)
    target = spec.to(dtype=dtype, device=device)
    with torch.no_grad():
        y_train, y_held = target(x_train), target(x_held)
        probe = frozen(x_held[:2])
    if probe.shape[1:] != y_held.shape[1:]:
        raise InvalidNetworkError(
            f"output mismatch: the frozen network gives outputs of shape {tuple(probe.shape[1:])}"
            f", the target {tuple(y_held.shape[1:])}; fit a network whose output matches the "
            "target's"
        )
    return FitData(x_train, y_train, x_held, y_held, box, source)


def _check_tensor(data: torch.Tensor, n_in: int, in_shape) -> torch.Tensor:
    shapes = [f"(n, {n_in})"] + ([f"(n, {', '.join(map(str, in_shape))})"] if in_shape else [])
    expected = " or ".join(shapes)
    if not data.is_floating_point():
        raise InvalidDomainError(
            f"data: expected floating-point inputs of shape {expected}, found dtype "
            f"{dtype_name(data.dtype)}; convert with data.double()"
        )
    if (
        data.ndim < 2
        or math.prod(data.shape[1:]) != n_in
        or (data.ndim > 2 and in_shape and tuple(data.shape[1:]) != tuple(in_shape))
    ):
        raise InvalidDomainError(
            f"data: expected inputs of shape {expected} (one row per example), found shape "
            f"{tuple(data.shape)}; reshape your inputs or fit a network for this input width"
        )
    if data.shape[0] < MIN_ROWS:
        raise InvalidDomainError(
            f"data: expected at least {MIN_ROWS} input rows (a training and a held-out part), found "
            f"{data.shape[0]}; pass more inputs or a Box to sample"
        )
    if not all_finite(data):
        bad = int((~torch.isfinite(data)).any(dim=tuple(range(1, data.ndim))).sum())
        raise InvalidDomainError(f"data: expected finite inputs, found NaN/Inf in {bad} row(s); drop or repair them")
    return data
