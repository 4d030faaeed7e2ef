"""Walk a NormNet next to its target, layer by layer: which frozen stages stand in for which target layer.

Three kinds of :class:`Segment`:

* ``"pair"`` — a width/conv construction pair ``u = relu(Γ₁ A h + β₁)``, ``y = Γ₂ B u + β₂`` standing for one
  target ``Linear``/``Conv2d`` (the target's ReLU after it is absorbed when the pair's second stage has one);
* ``"unit"`` — a :func:`~onlynorm.fit.with_norms` stage (pretrained layer + BatchNorm) standing for the target
  layer of the same index, unit for unit;
* ``"op"`` — a parameter-free stage (ReLU, pooling, Flatten) copied on both sides.

Networks of other layouts (the deep construction's residual streams, residual blocks) have no segments: the
layer-wise method refuses them and ``auto`` goes straight to Gauss–Newton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidNetworkError
from ..nets.conv import FixedOp, NormConv2d
from ..nets.linear import NormLinear
from ..nets.normnet import NormNet
from ..nets.pretrained import PretrainedStage
from ..targets.cnn import ConvNetSpec
from ..targets.layers import Conv, Layer, Linear, ReLU
from ..targets.mlp import MLPSpec

__all__ = ["Segment", "segments", "target_records"]


@dataclass
class Segment:
    kind: str  # "pair", "unit" or "op"
    record: Layer  # the target layer (onlynorm.targets.layers: Linear, Conv, ReLU, Pool, Flatten...)
    stages: list = field(default_factory=list)
    relu_after: bool = False  # the target applies a ReLU after this layer inside the segment

    def target_out(self, ht: torch.Tensor) -> torch.Tensor:
        """The target layer's output (pre-activation for pairs/units)."""
        return self.record.forward(ht)


def target_records(spec) -> list[Layer]:
    """The target as a flat list of typed layers (an MLP becomes Linear/ReLU layers)."""
    if isinstance(spec, ConvNetSpec):
        return list(spec.layers)
    if isinstance(spec, MLPSpec):
        out: list[Layer] = []
        for i, (w, b) in enumerate(zip(spec.weights, spec.biases)):
            out.append(Linear(w, b))
            if i < spec.depth - 1:
                out.append(ReLU())
        return out
    raise InvalidNetworkError(f"expected an MLP or CNN target, found {type(spec).__name__}")


def segments(net: NormNet, spec) -> list[Segment]:
    """Pair the network's stages with the target's layers; :class:`InvalidNetworkError` if they do not match."""
    records = target_records(spec)
    stages = list(net.layers)
    out: list[Segment] = []
    pos, skip_relu = 0, False

    def take() -> Any:
        nonlocal pos
        if pos >= len(stages):
            raise InvalidNetworkError(
                f"the frozen network has {len(stages)} stages, fewer than the target's layers "
                "need; the layer-wise method needs a network built for this target "
                "(or with_norms of a model of the same architecture)"
            )
        pos += 1
        return stages[pos - 1]

    for rec in records:
        kind = rec.type
        if skip_relu and kind != "relu":
            raise InvalidNetworkError("a pair of the frozen network ends in a ReLU where the target has none")
        if kind in ("linear", "conv"):
            assert isinstance(rec, (Linear, Conv))
            first = take()
            if isinstance(first, PretrainedStage):
                if first.layer.weight.shape[0] != rec.weight.shape[0]:
                    raise InvalidNetworkError(
                        f"pretrained layer {first.layer} has {first.layer.weight.shape[0]} outputs, the target layer "
                        f"{rec.weight.shape[0]}; the layer-wise start needs the same architecture"
                    )
                out.append(Segment("unit", rec, [first]))
                continue
            second = take()
            pair_types = (NormLinear,) if kind == "linear" else (NormConv2d,)
            if not (isinstance(first, pair_types) and isinstance(second, pair_types)):
                raise InvalidNetworkError(
                    f"expected a pair of {pair_types[0].__name__} stages for a target {kind} "
                    f"layer, found {type(first).__name__}, {type(second).__name__}"
                )
            if _out_features(second) != rec.weight.shape[0] or _in_features(first) != rec.weight[0].numel():
                raise InvalidNetworkError(
                    f"a pair of shapes {_in_features(first)} → {_out_features(second)} cannot "
                    f"stand for a target layer of weight {tuple(rec.weight.shape)}"
                )
            skip_relu = bool(second.relu)
            out.append(Segment("pair", rec, [first, second], relu_after=skip_relu))
        elif kind == "relu" and skip_relu:
            skip_relu = False
        elif kind in ("relu", "maxpool", "avgpool", "flatten"):
            stage = take()
            if not isinstance(stage, FixedOp) or stage.op != kind:
                raise InvalidNetworkError(
                    f"expected a {kind} stage for the target's {kind}, found {type(stage).__name__}"
                )
            out.append(Segment("op", rec, [stage]))
        else:
            raise InvalidNetworkError(
                f"the layer-wise method does not support target layers of type {kind!r} "
                "(residual blocks); use method='gauss-newton' or 'adam'"
            )
    if skip_relu:
        raise InvalidNetworkError("the frozen network's last pair ends in a ReLU where the target has none")
    if pos != len(stages):
        raise InvalidNetworkError(
            f"the frozen network has {len(stages)} stages, the target's layers use {pos}; "
            "the layer-wise method needs a network built for this target"
        )
    return out


def _in_features(stage) -> int:
    return stage.linear.in_features if isinstance(stage, NormLinear) else stage.conv.weight[0].numel()


def _out_features(stage) -> int:
    return stage.linear.out_features if isinstance(stage, NormLinear) else stage.conv.out_channels


def patches(stage, h: torch.Tensor) -> torch.Tensor:
    """Rows the first stage's frozen map acts on: ``h`` itself (linear) or its conv patches (one row per position)."""
    if isinstance(stage, NormLinear):
        return h
    c = stage.conv
    cols = F.unfold(h, c.kernel_size, dilation=c.dilation, padding=c.padding, stride=c.stride)  # (n, p, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def rows(t: torch.Tensor) -> torch.Tensor:
    """``(n, m)`` stays; ``(n, m, H, W)`` becomes ``(n·H·W, m)`` (one row per sample and position)."""
    return t if t.ndim == 2 else t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def weight_matrix(stage) -> torch.Tensor:
    w = stage.linear.weight if isinstance(stage, NormLinear) else stage.conv.weight
    return w.reshape(w.shape[0], -1)


def pre_norm(stage, h: torch.Tensor) -> torch.Tensor:
    return stage.linear(h) if isinstance(stage, NormLinear) else stage.conv(h)
