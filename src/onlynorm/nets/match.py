"""The one walk that pairs a target's layers with a network's stages (nested residual blocks included).

Every consumer that needs to know "which stages stand for which target layer" — a plan's check, the solve, the
certificate, the layer-wise fit — reads the typed tree :func:`match` returns instead of walking both structures
itself:

* :class:`Realised` — a weighted target layer (``Conv``/``Linear``) and the stages realising it, in order; when the
  group's last stage ends in a ReLU it also realises the target's ReLU that follows (``relu``);
* :class:`Copied` — a parameter-free target layer (ReLU, pooling, Flatten) and the :class:`FixedOp` computing it;
* :class:`Skip` — a residual block and the :class:`ResidualStage` mirroring it, with the matched body and shortcut.

How many stages realise a weighted layer is the caller's knowledge (a plan knows; a network of pretrained stages
uses one per layer): ``group(index, layer, stages, pos)`` returns it. Whatever does not line up is refused with one
line naming the first layer and stage that differ.

>>> from torch import nn
>>> import onlynorm
>>> from onlynorm.targets import as_target
>>> g = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
>>> net = onlynorm.random_normnet(g, seed=0)
>>> nodes = match(as_target(g), list(net.layers), lambda *_: 2)
>>> [(type(n).__name__, n.index, n.relu, len(n.stages)) for n in nodes]
[('Realised', 0, True, 2), ('Realised', 1, False, 2)]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import InvalidNetworkError
from ..targets.cnn import ConvNetSpec
from ..targets.layers import Conv, Layer, Linear, ReLU, ResidualBlock
from ..targets.mlp import MLPSpec
from .conv import FixedOp, ResidualStage
from .stage import Stage

__all__ = [
    "Realised",
    "Copied",
    "Skip",
    "Node",
    "StagePath",
    "match",
    "target_layers",
    "path_label",
    "walk_nodes",
    "walk_bounds",
]

#: where a stage sits: ``(3,)`` is ``net.layers[3]``; ``(3, "body", 0)`` stage 0 of the body (or ``"shortcut"``) of
#: the residual stage ``net.layers[3]``
StagePath = tuple[int | str, ...]

#: ``group(index, layer, stages, pos)``: how many stages from ``stages[pos]`` on realise weighted layer ``index``
Group = Callable[[int, Layer, Sequence[Stage], int], int]


@dataclass(frozen=True)
class Realised:
    """Weighted target layer ``index`` (depth first) and its stages; ``relu``: they realise the ReLU after it."""

    index: int
    layer: Conv | Linear
    stages: tuple[Stage, ...]
    paths: tuple[StagePath, ...]
    relu: bool = False

    @property
    def where(self) -> str:
        return f"layer {self.index} ({self.layer.type} at stage {path_label(self.paths[0])})"


@dataclass(frozen=True)
class Copied:
    """A parameter-free target layer and the stage that computes it."""

    layer: Layer
    stage: FixedOp
    path: StagePath


@dataclass(frozen=True)
class Skip:
    """A residual block ``relu(body(x) + shortcut(x))`` and its mirror, matched inside too."""

    block: ResidualBlock
    stage: ResidualStage
    path: StagePath
    body: tuple[Node, ...]
    shortcut: tuple[Node, ...]


Node = Realised | Copied | Skip


def path_label(path: StagePath) -> str:
    """``(3, "body", 0)`` → ``"3.body.0"``; ``(2,)`` → ``"2"``."""
    return ".".join(str(p) for p in path)


def target_layers(target: MLPSpec | ConvNetSpec) -> tuple[Layer, ...]:
    """The target as typed layers: a CNN's own; an MLP's ``Linear, ReLU, …, Linear``."""
    if isinstance(target, ConvNetSpec):
        return tuple(target.layers)
    if isinstance(target, MLPSpec):
        out: list[Layer] = []
        for i, (w, b) in enumerate(zip(target.weights, target.biases)):
            out.append(Linear(w, b))
            if i < target.depth - 1:
                out.append(ReLU())
        return tuple(out)
    raise InvalidNetworkError(f"expected an MLP or CNN target, found {type(target).__name__}")


def match(target: MLPSpec | ConvNetSpec, stages: Sequence[Stage], group: Group) -> tuple[Node, ...]:
    """Pair ``target``'s layers with ``stages`` (a network's ``layers``); see the module docstring."""
    return _match(target_layers(target), list(stages), (), group, itertools.count())


def _match(layers, stages: list[Stage], at: StagePath, group: Group, counter: Iterator[int]) -> tuple[Node, ...]:
    nodes: list[Node] = []
    pos = 0
    pending_relu = False  # the last group ends in a ReLU: the target's next layer must be that ReLU
    for layer in layers:
        if pending_relu:
            pending_relu = False
            if isinstance(layer, ReLU):
                continue
            raise InvalidNetworkError(
                f"{_where(nodes[-1])}: expected its stages to end without a ReLU (the target's next layer is a "
                f"{layer.type}), found a ReLU; the network was built for another target"
            )
        if layer.has_weights:
            index = next(counter)
            size = group(index, layer, stages, pos)
            if size < 1 or pos + size > len(stages):
                raise InvalidNetworkError(
                    f"layer {index} ({layer.type}): expected {size} stage(s) from stage {path_label((*at, pos))}, "
                    f"the network has {len(stages)} there; it was built for another target"
                )
            group_stages = tuple(stages[pos : pos + size])
            paths = tuple((*at, pos + j) for j in range(size))
            relu = bool(group_stages[-1].layout().relu)
            nodes.append(Realised(index, layer, group_stages, paths, relu))
            pending_relu = relu
            pos += size
            continue
        stage = _take(stages, pos, at, layer)
        if isinstance(layer, ResidualBlock):
            if not isinstance(stage, ResidualStage):
                raise InvalidNetworkError(
                    f"expected a ResidualStage at {path_label((*at, pos))} for the target's residual block, found "
                    f"{type(stage).__name__}; the network was built for another target"
                )
            body = _match(layer.body, list(stage.body), (*at, pos, "body"), group, counter)
            shortcut = _match(layer.shortcut, list(stage.shortcut), (*at, pos, "shortcut"), group, counter)
            nodes.append(Skip(layer, stage, (*at, pos), body, shortcut))
        else:
            if not isinstance(stage, FixedOp) or stage.op != layer.type:
                found = f"FixedOp({stage.op})" if isinstance(stage, FixedOp) else type(stage).__name__
                raise InvalidNetworkError(
                    f"expected a FixedOp({layer.type}) stage at {path_label((*at, pos))} for the target's "
                    f"{layer.type}, found {found}; the network was built for another target"
                )
            nodes.append(Copied(layer, stage, (*at, pos)))
        pos += 1
    if pending_relu:
        raise InvalidNetworkError(
            f"{_where(nodes[-1])}: expected its stages to end without a ReLU (the target's last layer), found one"
        )
    if pos != len(stages):
        raise InvalidNetworkError(
            f"the network has {len(stages)} stages at {path_label(at) or 'the top level'} where the target needs "
            f"{pos} (first extra: {type(stages[pos]).__name__} at {path_label((*at, pos))}); it was built for "
            "another target"
        )
    return tuple(nodes)


def _take(stages: list[Stage], pos: int, at: StagePath, layer: Layer) -> Stage:
    if pos >= len(stages):
        raise InvalidNetworkError(
            f"expected a stage at {path_label((*at, pos))} for the target's {layer.type}, found none: the network "
            f"has {len(stages)} stages there; it was built for another target"
        )
    return stages[pos]


def _where(node: Node) -> str:
    return node.where if isinstance(node, Realised) else f"stage {path_label(node.path)}"


def walk_nodes(nodes: Sequence[Node]) -> Iterator[Realised]:
    """Every :class:`Realised` node, depth first (body before shortcut) — the order of plan steps."""
    for node in nodes:
        if isinstance(node, Realised):
            yield node
        elif isinstance(node, Skip):
            yield from walk_nodes(node.body)
            yield from walk_nodes(node.shortcut)


#: ``visit(node, lo, hi)``: a realised layer with the target's interval bounds of its input
Visit = Callable[[Realised, object, object], None]


def walk_bounds(nodes: Sequence[Node], lo, hi, visit: Visit):
    """Walk matched ``nodes`` carrying the *target's* interval bounds ``[lo, hi]`` of each layer's input (the
    layers' own ``bounds``), calling ``visit(node, lo, hi)`` for each realised layer; returns the output's bounds."""
    for node in nodes:
        if isinstance(node, Realised):
            visit(node, lo, hi)
            lo, hi = node.layer.bounds(lo, hi)
            if node.relu:
                lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        elif isinstance(node, Copied):
            lo, hi = node.layer.bounds(lo, hi)
        else:
            walk_bounds(node.body, lo, hi, visit)
            walk_bounds(node.shortcut, lo, hi, visit)
            lo, hi = node.block.bounds(lo, hi)
    return lo, hi
