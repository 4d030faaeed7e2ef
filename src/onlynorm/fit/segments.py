"""Which frozen stages stand in for which target layer, for the layer-wise fit (read off the one matcher).

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

import torch
import torch.nn.functional as F

from ..errors import InvalidNetworkError
from ..nets.conv import NormConv2d
from ..nets.linear import NormLinear
from ..nets.match import Copied, Realised, Skip, match, target_layers
from ..nets.normnet import NormNet
from ..nets.pretrained import PretrainedStage
from ..targets.layers import Layer, Linear

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
    return list(target_layers(spec))


def segments(net: NormNet, spec) -> list[Segment]:
    """Pair the network's stages with the target's layers through the one matcher
    (:func:`onlynorm.nets.match.match`: a pretrained stage stands for one layer, construction stages come in
    pairs); :class:`InvalidNetworkError` if they do not match."""

    def group(index: int, layer: Layer, stages, pos: int) -> int:
        return 1 if pos < len(stages) and isinstance(stages[pos], PretrainedStage) else 2

    out: list[Segment] = []
    for node in match(spec, list(net.layers), group):
        if isinstance(node, Skip):
            raise InvalidNetworkError(
                "the layer-wise method does not support target layers of type 'residual' "
                "(residual blocks); use method='gauss-newton' or 'adam'"
            )
        if isinstance(node, Copied):
            out.append(Segment("op", node.layer, [node.stage]))
            continue
        out.append(_realised_segment(node))
    return out


def _realised_segment(node: Realised) -> Segment:
    rec = node.layer
    if len(node.stages) == 1:
        (unit,) = node.stages
        assert isinstance(unit, PretrainedStage)
        if unit.layer.weight.shape[0] != rec.weight.shape[0]:
            raise InvalidNetworkError(
                f"pretrained layer {unit.layer} has {unit.layer.weight.shape[0]} outputs, the target layer "
                f"{rec.weight.shape[0]}; the layer-wise start needs the same architecture"
            )
        return Segment("unit", rec, [unit])
    first, second = node.stages
    pair_type = NormLinear if isinstance(rec, Linear) else NormConv2d
    if not (isinstance(first, pair_type) and isinstance(second, pair_type)):
        raise InvalidNetworkError(
            f"expected a pair of {pair_type.__name__} stages for a target {rec.type} "
            f"layer, found {type(first).__name__}, {type(second).__name__}"
        )
    if _out_features(second) != rec.weight.shape[0] or _in_features(first) != rec.weight[0].numel():
        raise InvalidNetworkError(
            f"a pair of shapes {_in_features(first)} → {_out_features(second)} cannot "
            f"stand for a target layer of weight {tuple(rec.weight.shape)}"
        )
    return Segment("pair", rec, [first, second], relu_after=node.relu)


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
