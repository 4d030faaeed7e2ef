"""A construction's *plan*: the layout of the frozen network it builds for a target, worked out once.

``Construction.plan(target, options)`` returns a :class:`Plan` — per target layer one :class:`PlanStep` saying
which stages realise it, their shapes and ReLUs, which of them are kept in the linear regime, and which pairs of
stages form the Khatri–Rao systems ``B diag(γ) A = W``. ``build`` draws the frozen weights the plan asks for;
``solve``, ``systems``, ``certify`` and ``estimate_bytes`` read the same plan, and a loaded network gets its plan
back from its metadata (``net.meta.options``) and is checked against it (:meth:`Plan.check`).

An MLP network is a flat list of stages, each owned by one step. A CNN network nests stages inside residual stages
and copies parameter-free layers (ReLU, pooling, Flatten) that no step owns, so a CNN plan also has a ``layout``:
every stage's :data:`StagePath` and kind, depth first, and each step says in which stage list it sits (``at``).

>>> step = PlanStep(layer=0, stages=(0, 1), shapes=((3, 6), (6, 2)), relu=(True, False), linear_regime=(0,))
>>> plan = Plan("width", (step,))
>>> plan.num_stages, plan.steps[0].pairs
(2, ((0, 1),))
>>> inner = PlanStep(layer=1, stages=(0, 1), shapes=((2, 36), (36, 2)), relu=(True, False), kind="norm_conv2d",
...                  at=(3, "body"))
>>> inner.paths, path_label(inner.paths[1])    # stages 0 and 1 of the body of the residual stage net.layers[3]
(((3, 'body', 0), (3, 'body', 1)), '3.body.1')
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from ..errors import InvalidNetworkError
from ..nets.linear import NormLinear
from ..nets.normnet import NormNet
from ..nets.stage import Stage

__all__ = ["Plan", "PlanStep", "StagePath", "path_label", "stage_at", "walk_network"]

#: where a stage sits: ``(3,)`` is ``net.layers[3]``; ``(3, "body", 0)`` stage 0 of the body (or ``"shortcut"``) of
#: the residual stage ``net.layers[3]``
StagePath = tuple[int | str, ...]

#: stage kinds whose consecutive positions form Khatri–Rao pairs ``(first, second)``
PAIR_KINDS = ("norm_linear", "norm_conv2d")


@dataclass(frozen=True)
class PlanStep:
    """How target layer ``layer`` is realised.

    ``stages`` are indices into the stage list ``at`` (``()``: ``net.layers``; ``(3, "body")``: the body of the
    residual stage ``net.layers[3]``); ``shapes[j]`` is ``(fan_in, fan_out)`` of stage ``stages[j]`` (channels for
    convolutions); ``relu[j]`` whether it ends in a ReLU; ``linear_regime`` the positions ``j`` whose units must
    all stay active on the reachable set; ``pairs`` the positions ``(j, j + 1)`` forming a Khatri–Rao system
    (default: stage 0 with 1, 2 with 3, ...). ``kind`` is the stage kind (``norm_linear``, ``residual_stream``,
    ``norm_conv2d`` or ``conv_stream``); ``details`` holds construction facts (the rank of a lowrank layer, the
    block size of a deep one, ``N`` and the kernel ``geometry`` — one entry per stage, ``None`` for a linear one —
    of a conv).
    """

    layer: int
    stages: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    relu: tuple[bool, ...]
    linear_regime: tuple[int, ...] = ()
    kind: str = "norm_linear"
    details: dict[str, Any] = field(default_factory=dict)
    at: StagePath = ()

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        if self.kind not in PAIR_KINDS:
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
    network (CNN) lists every stage's ``(path, kind)`` depth first — residual stages as ``residual``, copied
    layers as ``op:relu``, ``op:maxpool``, ... — so :meth:`check` can name the first stage out of place.
    """

    method: str
    steps: tuple[PlanStep, ...]
    layout: tuple[tuple[StagePath, str], ...] = ()

    @property
    def num_stages(self) -> int:
        """Stages of ``net.layers`` (top level) the plan asks for."""
        if self.layout:
            return sum(1 for path, _ in self.layout if len(path) == 1)
        return sum(len(s.stages) for s in self.steps)

    def stages(self, net: NormNet, step: PlanStep) -> list[Any]:
        """The stages of ``step`` in ``net`` (after :meth:`check`)."""
        return [stage_at(net, path) for path in step.paths]

    def check(self, net: NormNet) -> None:
        """Refuse a network whose stages do not follow this plan, naming the first difference."""
        layers = list(net.layers)
        if self.layout:
            self._check_layout(net)
        elif len(layers) != self.num_stages:
            raise InvalidNetworkError(
                f"expected a {self.method} network of {self.num_stages} stages for a {len(self.steps)}-layer target, "
                f"found {len(layers)} stages ({', '.join(type(s).__name__ for s in layers[:4])}...)"
            )
        for step in self.steps:
            for j, path in enumerate(step.paths):
                _check_stage(self.method, step, j, path_label(path), stage_at(net, path))

    def _check_layout(self, net: NormNet) -> None:
        found = [(path, _kind(stage)) for path, stage in walk_network(net)]
        for k, (path, kind) in enumerate(self.layout):
            if k >= len(found):
                raise InvalidNetworkError(
                    f"expected a {kind} stage at {path_label(path)}, found none: the {self.method} network has "
                    f"{len(found)} stages where the target needs {len(self.layout)}; rebuild it for this target"
                )
            if found[k] != (path, kind):
                where, what = found[k]
                raise InvalidNetworkError(
                    f"expected a {kind} stage at {path_label(path)}, found {what} at {path_label(where)}; "
                    f"the {self.method} network was built for another target"
                )
        if len(found) > len(self.layout):
            where, what = found[len(self.layout)]
            raise InvalidNetworkError(
                f"expected {len(self.layout)} stages in the {self.method} network, found more ({what} at "
                f"{path_label(where)}); it was built for another target"
            )


def path_label(path: StagePath) -> str:
    """``(3, "body", 0)`` → ``"3.body.0"``; ``(2,)`` → ``"2"``."""
    return ".".join(str(p) for p in path)


def stage_at(net: NormNet, path: StagePath) -> Any:
    """The stage at ``path`` (``(3, "body", 0)`` is ``net.layers[3].body[0]``)."""
    node: Any = net.layers
    for part in path:
        node = getattr(node, part) if isinstance(part, str) else node[part]
    return node


def walk_network(net: NormNet) -> Iterator[tuple[StagePath, nn.Module]]:
    """Every stage with its path, depth first (a residual stage, then its body, then its shortcut)."""

    def walk(stages, at: StagePath) -> Iterator[tuple[StagePath, nn.Module]]:
        for i, stage in enumerate(stages):
            yield (*at, i), stage
            if getattr(stage, "kind", None) == "residual":
                yield from walk(stage.body, (*at, i, "body"))
                yield from walk(stage.shortcut, (*at, i, "shortcut"))

    return walk(net.layers, ())


def _kind(stage: nn.Module) -> str:
    kind = str(getattr(stage, "kind", type(stage).__name__))
    return f"op:{stage.op}" if kind == "op" else kind


def _check_stage(method: str, step: PlanStep, j: int, where: str, stage: Stage) -> None:
    found = _shape(stage)
    if getattr(stage, "kind", None) != step.kind or found is None:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected a {step.kind} stage at position {where}, found "
            f"{getattr(stage, 'kind', type(stage).__name__)}"
        )
    if found != step.shapes[j]:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected stage {where} to map {step.shapes[j][0]} → {step.shapes[j][1]}, "
            f"found {found[0]} → {found[1]}; the network was built for another target or options"
        )
    if bool(getattr(stage, "relu", False)) != step.relu[j]:
        raise InvalidNetworkError(
            f"layer {step.layer}: ReLU placement of stage {where} does not match the {method} "
            f"construction (expected relu={step.relu[j]})"
        )
    block = step.details.get("block")
    if step.kind in ("residual_stream", "conv_stream") and block is not None and getattr(stage, "block", None) != block:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected input blocks of {block}, found {getattr(stage, 'block', None)}"
        )
    geometry = step.details.get("geometry")
    if geometry is not None and geometry[j] is not None and _geometry(stage) != geometry[j]:
        raise InvalidNetworkError(
            f"layer {step.layer}: expected stage {where} to convolve with {_words(geometry[j])}, found "
            f"{_words(_geometry(stage))}; the network was built for another target"
        )
    for flag in ("paired", "flat"):
        want = step.details.get(flag)
        if step.kind == "conv_stream" and want is not None and bool(getattr(stage, flag, None)) != want:
            raise InvalidNetworkError(
                f"layer {step.layer}: expected stage {where} with {flag}={int(want)}, found {flag}={int(not want)}; "
                f"the network's metadata does not match its stages"
            )


def _shape(stage: Stage) -> tuple[int, int] | None:
    if isinstance(stage, NormLinear):
        return stage.linear.in_features, stage.linear.out_features
    conv = getattr(stage, "conv", None)
    if isinstance(conv, nn.Conv2d):
        return conv.in_channels, conv.out_channels
    for fan_in, fan_out in (("in_features", "out_features"), ("in_channels", "out_channels")):
        if hasattr(stage, fan_in) and hasattr(stage, fan_out):
            return int(getattr(stage, fan_in)), int(getattr(stage, fan_out))
    return None


def _geometry(stage: Stage) -> dict[str, tuple[int, ...]] | None:
    """``kernel_size``, ``stride``, ``padding``, ``dilation`` of a conv stage (its ``conv``, or a stream's branch)."""
    conv = getattr(stage, "conv", None)
    if isinstance(conv, nn.Conv2d):
        raw = {k: getattr(conv, k) for k in ("kernel_size", "stride", "padding", "dilation")}
    elif isinstance(getattr(stage, "geometry", None), dict):
        raw = cast(dict, stage.geometry)
    else:
        return None
    return {k: tuple(int(v) for v in raw[k]) for k in ("kernel_size", "stride", "padding", "dilation")}


def _words(geometry: dict[str, tuple[int, ...]] | None) -> str:
    if geometry is None:
        return "no kernel"
    return ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in geometry.items())
