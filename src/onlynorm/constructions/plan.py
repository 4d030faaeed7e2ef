"""A construction's *plan*: the layout of the frozen network it builds for a target, worked out once.

``Construction.plan(target, options)`` returns a :class:`Plan` — per target layer one :class:`PlanStep` saying
which stages realise it, their shapes and ReLUs, which of them are kept in the linear regime, and which pairs of
stages form the Khatri–Rao systems ``B diag(γ) A = W``. ``build`` draws the frozen weights the plan asks for;
``solve``, ``systems``, ``certify`` and ``estimate_bytes`` read the same plan, and a loaded network gets its plan
back from its metadata (``net.meta.options``) and is checked against it (:meth:`Plan.check`).

>>> step = PlanStep(layer=0, stages=(0, 1), shapes=((3, 6), (6, 2)), relu=(True, False), linear_regime=(0,))
>>> plan = Plan("width", (step,))
>>> plan.num_stages, plan.steps[0].pairs
(2, ((0, 1),))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidNetworkError
from ..normnet import NormLinear, NormNet, Stage

__all__ = ["Plan", "PlanStep"]


@dataclass(frozen=True)
class PlanStep:
    """How target layer ``layer`` is realised.

    ``stages`` are indices into ``net.layers``; ``shapes[j]`` is ``(fan_in, fan_out)`` of stage ``stages[j]``;
    ``relu[j]`` whether it ends in a ReLU; ``linear_regime`` the positions ``j`` whose units must all stay active
    on the reachable set; ``pairs`` the positions ``(j, j + 1)`` forming a Khatri–Rao system (default: stage 0
    with 1, 2 with 3, ...). ``kind`` is the stage kind (``norm_linear`` or ``residual_stream``); ``details``
    holds construction facts (the rank of a lowrank layer, the block size of a deep one).
    """

    layer: int
    stages: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    relu: tuple[bool, ...]
    linear_regime: tuple[int, ...] = ()
    kind: str = "norm_linear"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        if self.kind != "norm_linear":
            return ()
        return tuple((j, j + 1) for j in range(0, len(self.stages) - 1, 2))

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(out for _, out in self.shapes)


@dataclass(frozen=True)
class Plan:
    """The ordered steps of a construction for one target; see the module docstring."""

    method: str
    steps: tuple[PlanStep, ...]

    @property
    def num_stages(self) -> int:
        return sum(len(s.stages) for s in self.steps)

    def stages(self, net: NormNet, step: PlanStep) -> list[NormLinear]:
        """The NormLinear stages of ``step`` in ``net`` (after :meth:`check`)."""
        return [net.layers[j] for j in step.stages]

    def check(self, net: NormNet) -> None:
        """Refuse a network whose stages do not follow this plan, naming the first difference."""
        layers = list(net.layers)
        if len(layers) != self.num_stages:
            raise InvalidNetworkError(
                f"expected a {self.method} network of {self.num_stages} stages for a {len(self.steps)}-layer target, "
                f"found {len(layers)} stages ({', '.join(type(s).__name__ for s in layers[:4])}...)"
            )
        for step in self.steps:
            for j, index in enumerate(step.stages):
                stage = layers[index]
                found = _shape(stage)
                if getattr(stage, "kind", None) != step.kind or found is None:
                    raise InvalidNetworkError(
                        f"layer {step.layer}: expected a {step.kind} stage at position {index}, found "
                        f"{getattr(stage, 'kind', type(stage).__name__)}"
                    )
                if found != step.shapes[j]:
                    raise InvalidNetworkError(
                        f"layer {step.layer}: expected stage {index} to map {step.shapes[j][0]} → {step.shapes[j][1]}, "
                        f"found {found[0]} → {found[1]}; the network was built for another target or options"
                    )
                if bool(getattr(stage, "relu", False)) != step.relu[j]:
                    raise InvalidNetworkError(
                        f"layer {step.layer}: ReLU placement of stage {index} does not match the {self.method} "
                        f"construction (expected relu={step.relu[j]})"
                    )
                block = step.details.get("block")
                if step.kind == "residual_stream" and block is not None and getattr(stage, "block", None) != block:
                    raise InvalidNetworkError(
                        f"layer {step.layer}: expected input blocks of {block}, found {getattr(stage, 'block', None)}"
                    )


def _shape(stage: Stage) -> tuple[int, int] | None:
    if isinstance(stage, NormLinear):
        return stage.linear.in_features, stage.linear.out_features
    if hasattr(stage, "in_features") and hasattr(stage, "out_features"):
        return int(stage.in_features), int(stage.out_features)  # type: ignore[arg-type]
    return None
