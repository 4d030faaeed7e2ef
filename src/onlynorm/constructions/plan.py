"""A construction's *plan*: the layout of the frozen network it builds for a target, worked out once.

``Construction.plan(target, options)`` returns a :class:`Plan` — per target layer one :class:`PlanStep` saying
which stages realise it, their shapes and ReLUs, which of them are kept in the linear regime, and which pairs of
stages form the Khatri–Rao systems ``B diag(γ) A = W``. ``build`` draws the frozen weights the plan asks for;
``solve``, ``systems``, ``certify`` and ``estimate_bytes`` read the same plan, and a loaded network gets its plan
back from its metadata (``net.meta.options``) and is checked against it (:meth:`Plan.check`).

An MLP network is a flat list of stages, each owned by one step. A CNN network nests stages inside residual stages
and copies parameter-free layers (ReLU, pooling, Flatten) that no step owns, so a CNN plan also has a ``layout``:
every stage's :data:`StagePath` and type, depth first, and each step says in which stage list it sits (``at``).
Checking a network against a plan is one walk: :func:`onlynorm.nets.match.match` pairs the target's layers with the
network's stages (the plan says how many stages realise each weighted layer), then each realised layer's stages are
compared with the step's expectations through their :meth:`~onlynorm.nets.stage.Stage.layout` entries.

>>> step = PlanStep(layer=0, stages=(0, 1), shapes=((3, 6), (6, 2)), relu=(True, False), linear_regime=(0,))
>>> plan = Plan("width", (step,))
>>> plan.num_stages, plan.steps[0].pairs
(2, ((0, 1),))
>>> from onlynorm.nets import NormConv2d
>>> inner = PlanStep(layer=1, stages=(0, 1), shapes=((2, 36), (36, 2)), relu=(True, False), stage_type=NormConv2d,
...                  at=(3, "body"))
>>> inner.paths, path_label(inner.paths[1])    # stages 0 and 1 of the body of the residual stage net.layers[3]
(((3, 'body', 0), (3, 'body', 1)), '3.body.1')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidNetworkError
from ..nets.linear import NormLinear
from ..nets.match import Node, Realised, StagePath, match, path_label, walk_nodes
from ..nets.normnet import NormNet
from ..nets.stage import Stage, StageLayout
from ..targets.layers import Layer

__all__ = ["Plan", "PlanStep", "LayoutKey", "StagePath", "path_label", "stage_at", "walk_network"]

#: a layout entry: the stage's type and, for a copied layer, its op (``(FixedOp, "relu")``)
LayoutKey = tuple[type[Stage], "str | None"]


@dataclass(frozen=True)
class PlanStep:
    """How target layer ``layer`` is realised.

    ``stages`` are indices into the stage list ``at`` (``()``: ``net.layers``; ``(3, "body")``: the body of the
    residual stage ``net.layers[3]``); ``shapes[j]`` is ``(fan_in, fan_out)`` of stage ``stages[j]`` (channels for
    convolutions); ``relu[j]`` whether it ends in a ReLU; ``linear_regime``
    the positions ``j`` whose units must all stay active on the reachable set; ``pairs`` the positions ``(j, j + 1)``
    forming a Khatri–Rao system (stage types with ``pairs_with_next``: stage 0 with 1, 2 with 3, ...).
    ``stage_type`` is the type of every stage of the step; ``details`` holds construction facts (the rank of a
    lowrank layer, the block size of a deep one, ``N`` and the kernel ``geometry`` — one entry per stage, ``None``
    for a linear one — of a conv), which the stages' layout entries must match where they carry the same key.
    """

    layer: int
    stages: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    relu: tuple[bool, ...]
    linear_regime: tuple[int, ...] = ()
    stage_type: type[Stage] = NormLinear
    details: dict[str, Any] = field(default_factory=dict)
    at: StagePath = ()

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        if not self.stage_type.pairs_with_next:
            return ()
        return tuple((j, j + 1) for j in range(0, len(self.stages) - 1, 2))

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(out for _, out in self.shapes)

    @property
    def paths(self) -> tuple[StagePath, ...]:
        """The full :data:`StagePath` of each of the step's stages."""
        return tuple((*self.at, j) for j in self.stages)


@dataclass(frozen=True)
class Plan:
    """The ordered steps of a construction for one target; see the module docstring.

    ``layout`` is empty for a flat network whose stages all belong to steps (the MLP constructions); a nested
    network (CNN) lists every stage's ``(path, (type, op))`` depth first.
    """

    method: str
    steps: tuple[PlanStep, ...]
    layout: tuple[tuple[StagePath, LayoutKey], ...] = ()

    @property
    def num_stages(self) -> int:
        """Stages of ``net.layers`` (top level) the plan asks for."""
        if self.layout:
            return sum(1 for path, _ in self.layout if len(path) == 1)
        return sum(len(s.stages) for s in self.steps)

    def stages(self, net: NormNet, step: PlanStep) -> list[Any]:
        """The stages of ``step`` in ``net`` (after :meth:`check`)."""
        return [stage_at(net, path) for path in step.paths]

    def match(self, net: NormNet, target: Any) -> tuple[Node, ...]:
        """Pair ``target``'s layers with ``net``'s stages as this plan lays them out, checking every realised layer
        against its step (type, shapes, ReLUs, details); the first difference is refused in one line."""
        steps = self.steps

        def group(index: int, layer: Layer, stages: Sequence[Stage], pos: int) -> int:
            if index >= len(steps):
                raise InvalidNetworkError(
                    f"the target has more weighted layers than the {self.method} plan's {len(steps)}; rebuild the "
                    "network for this target"
                )
            return len(steps[index].stages)

        nodes = match(target, list(net.layers), group)
        realised = list(walk_nodes(nodes))
        if len(realised) != len(steps):
            raise InvalidNetworkError(
                f"expected a {self.method} network for a {len(steps)}-layer target, found {len(realised)} layers"
            )
        for step, node in zip(steps, realised):
            _check_step(self.method, step, node)
        return nodes

    def check(self, net: NormNet, target: Any) -> None:
        """Refuse a network whose stages do not follow this plan for ``target``, naming the first difference."""
        self.match(net, target)


def stage_at(net: NormNet, path: StagePath) -> Any:
    """The stage at ``path`` (``(3, "body", 0)`` is ``net.layers[3].body[0]``)."""
    node: Any = net.layers
    for part in path:
        node = getattr(node, part) if isinstance(part, str) else node[part]
    return node


def walk_network(net: NormNet):
    """Every stage with its path, depth first (a stage, then its nested stage lists)."""

    def walk(stages, at: StagePath):
        for i, stage in enumerate(stages):
            yield (*at, i), stage
            for name, inner in stage.stage_lists().items():
                yield from walk(inner, (*at, i, name))

    return walk(net.layers, ())


def _check_step(method: str, step: PlanStep, node: Realised) -> None:
    if node.paths != step.paths:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected its stages at {', '.join(map(path_label, step.paths))}, found them at "
            f"{', '.join(map(path_label, node.paths))}; the {method} network was built for another target"
        )
    for j, stage in enumerate(node.stages):
        _check_stage(method, step, j, path_label(node.paths[j]), stage.layout())


def _check_stage(method: str, step: PlanStep, j: int, where: str, found: StageLayout) -> None:
    if found.type is not step.stage_type or found.shape is None:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected a {step.stage_type.__name__} stage at position {where}, found {found.label}"
        )
    if found.shape != step.shapes[j]:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected stage {where} to map {step.shapes[j][0]} → {step.shapes[j][1]}, "
            f"found {found.shape[0]} → {found.shape[1]}; the network was built for another target or options"
        )
    if found.relu is not None and found.relu != step.relu[j]:
        raise InvalidNetworkError(
            f"layer {step.layer}: ReLU placement of stage {where} does not match the {method} "
            f"construction (expected relu={step.relu[j]})"
        )
    block = step.details.get("block")
    if block is not None and found.get("block", block) != block:
        raise InvalidNetworkError(f"layer {step.layer}: expected input blocks of {block}, found {found.get('block')}")
    geometry = step.details.get("geometry")
    if geometry is not None and geometry[j] is not None and found.get("geometry") != geometry[j]:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected stage {where} to convolve with {_words(geometry[j])}, found "
            f"{_words(found.get('geometry'))}; the network was built for another target"
        )
    for flag in ("paired", "flat"):
        want = step.details.get(flag)
        if want is not None and found.get(flag, want) != want:
            raise InvalidNetworkError(
                f"layer {step.layer}: expected stage {where} with {flag}={int(want)}, found {flag}={int(not want)}; "
                f"the network's metadata does not match its stages"
            )


def _words(geometry: dict[str, tuple[int, ...]] | None) -> str:
    if geometry is None:
        return "no kernel"
    return ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in geometry.items())
