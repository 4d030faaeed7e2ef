"""Typed layers of a CNN target: small frozen dataclasses, each with its forward, interval bounds and JSON form.

A :class:`~onlynorm.targets.cnn.ConvNetSpec` is a tuple of these layers. Every layer ``L`` provides

* ``L.forward(x)`` — the map itself on a batch;
* ``L.bounds(lo, hi)`` — sound elementwise bounds of ``L(x)`` for ``lo ≤ x ≤ hi`` (batched ``(1, …)`` tensors).
  For a conv ``z = W * x + b``: ``z_min = W⁺ * lo + W⁻ * hi + b`` (zero padding contributes exactly 0);
  ReLU and pooling are monotone, so they map the bounds themselves;
* ``L.describe(prefix, tensors)`` / ``layer_from_json(d, tensors)`` — the JSON record of docs/FILE_FORMATS.md
  (tensors are stored by name next to it).

:class:`ResidualBlock` is ``relu(body(x) + shortcut(x))`` with an empty ``shortcut`` meaning the identity; a
projection shortcut is any chain of layers (typically a strided conv with BatchNorm folded in).

>>> import torch
>>> conv = Conv(torch.ones(1, 1, 3, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), padding=(1, 1))
>>> lo, hi = conv.bounds(torch.zeros(1, 1, 3, 3, dtype=torch.float64), torch.ones(1, 1, 3, 3, dtype=torch.float64))
>>> hi[0, 0].tolist()      # corners see 4 pixels, edges 6, the centre 9
[[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import InvalidTargetError
from ..finite import all_finite

__all__ = [
    "TARGET_DTYPES",
    "check_target_tensor",
    "Layer",
    "Conv",
    "Linear",
    "ReLU",
    "Pool",
    "Flatten",
    "ResidualBlock",
    "walk",
    "layer_from_json",
    "run_layers",
    "bounds_layers",
    "pair",
]

Pair = tuple[int, int]

#: the dtypes a target's weights and biases may have (float8 formats have no arithmetic to evaluate them with)
TARGET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_target_tensor(t: torch.Tensor, where: str) -> None:
    """Refuse a target weight or bias that holds no usable values: on the meta device, not dense, not one of
    :data:`TARGET_DTYPES` (a bool or integer bias, float8), or NaN/Inf — :class:`InvalidTargetError`, one line.

    >>> check_target_tensor(torch.ones(2, dtype=torch.bool), "layer 0: bias")
    Traceback (most recent call last):
    ...
    onlynorm.errors.InvalidTargetError: layer 0: bias: expected a floating-point tensor (float16, bfloat16, float32 or float64), found dtype bool; convert it with .double()
    """
    if t.device.type == "meta":
        raise InvalidTargetError(
            f"{where}: expected a tensor with values, found one on the meta device (shapes only); load the weights "
            "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(...)"
        )
    if t.layout != torch.strided:
        raise InvalidTargetError(
            f"{where}: expected a dense tensor, found layout {t.layout}; convert it with .to_dense()"
        )
    if t.dtype not in TARGET_DTYPES:
        raise InvalidTargetError(
            f"{where}: expected a floating-point tensor (float16, bfloat16, float32 or float64), found dtype "
            f"{str(t.dtype).removeprefix('torch.')}; convert it with .double()"
        )
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise InvalidTargetError(
            f"{where} has {bad} non-finite value(s) (NaN or Inf); expected finite numbers — check the training run "
            "that produced this target"
        )


def pair(v: Any) -> Pair:
    """``3`` → ``(3, 3)``; ``[2, 1]`` → ``(2, 1)``."""
    if isinstance(v, int):
        return (int(v), int(v))
    a, b = (int(x) for x in v)
    return (a, b)


class Layer:
    """Base of the typed CNN layers (``type`` is the JSON tag: a class constant, or a property for :class:`Pool`)."""

    @property
    def type(self) -> str:
        return ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bounds(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(lo), self.forward(hi)  # monotone (non-decreasing) layers

    def error_map(self, t: torch.Tensor) -> torch.Tensor:
        """A nonnegative error map through this parameter-free, 1-Lipschitz (max norm) layer."""
        return self.forward(t)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Layer:
        return self

    def children(self) -> tuple[Layer, ...]:
        return ()

    def describe(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"type": self.type}

    @property
    def has_weights(self) -> bool:
        return False


@dataclass(frozen=True, eq=False)
class Conv(Layer):
    """``z = W * x + b`` (``F.conv2d``, groups = 1, zero padding); BatchNorm already folded in."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    type: ClassVar[str] = "conv"

    @property
    def has_weights(self) -> bool:
        return True

    @property
    def geometry(self) -> tuple[Pair, Pair, Pair]:
        return self.stride, self.padding, self.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """``weight * x`` with this layer's geometry and no bias (any kernel of the same size)."""
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, groups)

    def bounds(
        self,
        lo: torch.Tensor,
        hi: torch.Tensor,
        weight: torch.Tensor | None = None,
        use_bias: bool = True,
        groups: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight if weight is None else weight
        pos, neg = w.clamp(min=0), w.clamp(max=0)
        zmin = self.apply(lo, pos, groups) + self.apply(hi, neg, groups)
        zmax = self.apply(hi, pos, groups) + self.apply(lo, neg, groups)
        if use_bias:
            zmin, zmax = zmin + self.bias.reshape(1, -1, 1, 1), zmax + self.bias.reshape(1, -1, 1, 1)
        return zmin, zmax

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conv:
        return replace(self, weight=fn(self.weight), bias=fn(self.bias))

    def describe(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        tensors[f"{prefix}weight"], tensors[f"{prefix}bias"] = self.weight, self.bias
        return {
            "type": self.type,
            "weight": f"{prefix}weight",
            "bias": f"{prefix}bias",
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }


@dataclass(frozen=True, eq=False)
class Linear(Layer):
    """``z = W x + b`` on flat features; BatchNorm1d already folded in."""

    weight: torch.Tensor
    bias: torch.Tensor
    type: ClassVar[str] = "linear"

    @property
    def has_weights(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def bounds(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos, neg = self.weight.clamp(min=0), self.weight.clamp(max=0)
        return F.linear(lo, pos) + F.linear(hi, neg) + self.bias, F.linear(hi, pos) + F.linear(lo, neg) + self.bias

    def as_conv(self) -> Conv:
        """The same map as a 1×1 conv on a ``(n, 1, 1)`` image."""
        return Conv(self.weight[:, :, None, None], self.bias)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Linear:
        return replace(self, weight=fn(self.weight), bias=fn(self.bias))

    def describe(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        tensors[f"{prefix}weight"], tensors[f"{prefix}bias"] = self.weight, self.bias
        return {"type": self.type, "weight": f"{prefix}weight", "bias": f"{prefix}bias"}


@dataclass(frozen=True, eq=False)
class ReLU(Layer):
    type: ClassVar[str] = "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def error_map(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass(frozen=True, eq=False)
class Pool(Layer):
    """Max or average pooling (``mode`` ``"max"``/``"avg"``); JSON types ``maxpool``/``avgpool``."""

    mode: str
    kernel: Pair
    stride: Pair
    padding: Pair = (0, 0)
    count_include_pad: bool = True

    @property
    def type(self) -> str:
        return f"{self.mode}pool"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=self.count_include_pad)

    def describe(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
        }
        if self.mode == "avg":
            d["count_include_pad"] = self.count_include_pad
        return d


@dataclass(frozen=True, eq=False)
class Flatten(Layer):
    type: ClassVar[str] = "flatten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@dataclass(frozen=True, eq=False)
class ResidualBlock(Layer):
    """``relu(body(x) + shortcut(x))``; an empty ``shortcut`` is the identity skip."""

    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] = field(default=())
    type: ClassVar[str] = "residual"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(run_layers(self.body, x) + run_layers(self.shortcut, x))

    def bounds(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blo, bhi = bounds_layers(self.body, lo, hi)
        slo, shi = bounds_layers(self.shortcut, lo, hi)
        return (blo + slo).clamp(min=0), (bhi + shi).clamp(min=0)

    def children(self) -> tuple[Layer, ...]:
        return self.body + self.shortcut

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ResidualBlock:
        return replace(
            self,
            body=tuple(l.map_tensors(fn) for l in self.body),
            shortcut=tuple(l.map_tensors(fn) for l in self.shortcut),
        )

    def describe(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type,
            "block": [l.describe(f"{prefix}block.{i}.", tensors) for i, l in enumerate(self.body)],
        }
        if self.shortcut:
            d["shortcut"] = [l.describe(f"{prefix}shortcut.{i}.", tensors) for i, l in enumerate(self.shortcut)]
        return d


def run_layers(layers: Iterable[Layer], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer.forward(x)
    return x


def bounds_layers(layers: Iterable[Layer], lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for layer in layers:
        lo, hi = layer.bounds(lo, hi)
    return lo, hi


def walk(layers: Iterable[Layer]) -> Iterator[Layer]:
    """Every layer, depth first (a residual block, then its body, then its shortcut)."""
    for layer in layers:
        yield layer
        yield from walk(layer.children())


_TYPES = ("conv", "linear", "relu", "maxpool", "avgpool", "flatten", "residual")


def layer_from_json(d: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Layer:
    """Rebuild one layer from its JSON record (raises ``ValueError``/``KeyError`` on malformed records)."""
    kind = d.get("type")
    if kind not in _TYPES:
        raise ValueError(f"unknown layer type {kind!r} (expected one of {sorted(_TYPES)})")

    def tensor(key: str) -> torch.Tensor:
        if d[key] not in tensors:
            raise ValueError(f"tensor {d[key]!r} is missing")
        return tensors[d[key]]

    if kind == "conv":
        return Conv(tensor("weight"), tensor("bias"), pair(d["stride"]), pair(d["padding"]), pair(d["dilation"]))
    if kind == "linear":
        return Linear(tensor("weight"), tensor("bias"))
    if kind == "relu":
        return ReLU()
    if kind == "flatten":
        return Flatten()
    if kind == "residual":
        return ResidualBlock(
            tuple(layer_from_json(b, tensors) for b in d["block"]),
            tuple(layer_from_json(b, tensors) for b in d.get("shortcut", [])),
        )
    return Pool(
        kind[:3], pair(d["kernel"]), pair(d["stride"]), pair(d["padding"]), bool(d.get("count_include_pad", True))
    )
