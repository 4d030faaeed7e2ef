"""The construction protocol and registry.

A construction turns a target into a frozen random :class:`~onlynorm.nets.normnet.NormNet` (``build``) and solves that
network's ``γ, β`` so it computes the target on a box (``solve``). ``build`` may take a network the user brought
instead: ``solve`` only reads frozen weights and writes normalization parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from ..certify import CertifyResult
from ..domain import Box
from ..errors import FileFormatError, InvalidDomainError, InvalidNetworkError, InvalidOptionError, OnlyNormError
from ..finite import all_finite
from ..nets.linear import NormLinear
from ..nets.match import Node
from ..nets.normnet import NormNet, register_meta_check
from ..nets.records import NetMeta, SolveInfo, SolveRecord
from ..nets.stage import Stage
from ..options import OptionSpec, check_options
from .plan import Plan

__all__ = [
    "Construction",
    "register",
    "get_construction",
    "available_methods",
    "Progress",
    "frozen_init",
    "fill_frozen",
    "base_meta",
    "safe_margin",
    "MARGIN",
    "DEFAULT_MARGIN",
    "DEFAULT_MARGIN_REDUCED",
    "default_margin",
    "check_target_kind",
]

#: ``progress(done, total, message)`` is called after each solved layer (used by the CLI's progress bar).
Progress = Callable[[int, int, str], None]

_REGISTRY: dict[str, Construction] = {}


class Construction:
    """One construction of the theory (see docs/ARCHITECTURE.md, "Adding a construction").

    A subclass sets ``name``, ``cost`` and ``options`` (declared :class:`~onlynorm.options.OptionSpec` s: the API
    validates against them and the CLI derives its flags from them) and implements

    * ``plan(target, options) -> Plan`` — the layout, worked out once (pure: no tensors allocated);
    * ``build_stages(plan, target, gen, dtype, device, options)`` — the frozen stages the plan asks for (default:
      one random :class:`NormLinear` per planned stage);
    * ``solve(net, target, domain, progress)`` — only ``γ, β`` of a copy of ``net``;
    * ``systems(net, target)`` and ``certify(net, target, domain)`` — the Khatri–Rao systems and the certificate;
    * ``estimate_bytes(target, dtype, **options)`` — peak bytes, read by the memory guard before allocating.
    """

    name: ClassVar[str] = ""
    #: one line for ``onlynorm reconstruct --help``: what it is and its width/depth cost
    cost: ClassVar[str] = ""
    #: declared options (validated at the public boundary; the CLI's flags come from here)
    options: ClassVar[tuple[OptionSpec, ...]] = ()
    #: what targets it realises: "mlp" (MLPSpec) and/or "cnn" (ConvNetSpec)
    target_kinds: ClassVar[tuple[str, ...]] = ("mlp",)
    #: True when an option has no default (sparse's density): never suggested by the memory guard
    needs_options: ClassVar[bool] = False

    # ------------------------------------------------------------------ the plan
    def plan(self, target: Any, options: dict[str, Any]) -> Plan:
        raise NotImplementedError

    def recorded_plan(self, net: NormNet, target: Any) -> Plan:
        """The plan a built (or loaded) network records: from its options (unchecked; see :meth:`matched`)."""
        return self.plan(target, self.check_options(dict(net.meta.options), getattr(target, "depth", None)))

    def matched(self, net: NormNet, target: Any, plan: Plan | None = None) -> tuple[Plan, tuple[Node, ...]]:
        """The network's plan (``plan`` when the caller already has it, else the one its metadata records) and the
        target↔stages pairing it lays out (:func:`onlynorm.nets.match.match`), every realised layer checked
        against its step — the first difference is refused in one line."""
        plan = plan if plan is not None else self.recorded_plan(net, target)
        return plan, plan.match(net, target)

    def plan_of(self, net: NormNet, target: Any) -> Plan:
        """The plan of a built (or loaded) network, checked against its stages."""
        return self.matched(net, target)[0]

    # ------------------------------------------------------------------ build
    def build(
        self, target: Any, *, seed: int, dtype: torch.dtype, device, plan: Plan | None = None, **options: Any
    ) -> NormNet:
        """A frozen random network for ``target`` (norms at identity), drawn from ``seed``; ``plan`` (with
        ``options`` already validated) when the caller has worked it out."""
        if plan is None:
            options = self.check_options(options, getattr(target, "depth", None))
            plan = self.plan(target, options)
        gen = torch.Generator().manual_seed(int(seed))
        stages = self.build_stages(plan, target, gen, dtype=dtype, device=device, options=options)
        return NormNet(stages, meta=base_meta(self.name, target, seed, options))

    def build_stages(
        self, plan: Plan, target: Any, gen: torch.Generator, *, dtype: torch.dtype, device, options: dict[str, Any]
    ) -> list[Stage]:
        return [
            random_norm_linear(fan_in, fan_out, relu, gen, dtype=dtype, device=device)
            for step in plan.steps
            for (fan_in, fan_out), relu in zip(step.shapes, step.relu)
        ]

    # ------------------------------------------------------------------ solve, systems, certificate, memory
    def solve(
        self, net: NormNet, target: Any, domain: Box, *, progress: Progress | None = None, plan: Plan | None = None
    ) -> NormNet:
        """Only ``γ, β`` of a copy of ``net``; ``plan``: the network's plan when the caller has it."""
        raise NotImplementedError

    def certify(self, net: NormNet, target: Any, domain: Box) -> CertifyResult:
        """Rigorous check over the whole box (see :mod:`onlynorm.certify`)."""
        raise OnlyNormError(f"certification is not implemented for method {self.name!r} yet")

    def systems(self, net: NormNet, target: Any) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The Khatri–Rao systems ``(label, A, B, W)`` with ``B diag(γ) A = W`` that ``solve`` must satisfy."""
        raise OnlyNormError(f"method {self.name!r} does not expose its systems")

    def approximations(self, net: NormNet, target: Any) -> list[str]:
        """Layers this network can realise only approximately *even when every system is solved exactly* (e.g. a
        low-rank factorisation below the layer's rank), one line each; ``[]`` when solvable systems mean ``W``."""
        return []

    def estimate_bytes(self, target: Any, dtype: torch.dtype, *, plan: Plan | None = None, **options: Any) -> int:
        """Peak bytes the solve will need (0 if unknown); used by the memory guard before allocating."""
        return 0

    # ------------------------------------------------------------------ options
    def option_specs(self) -> tuple[OptionSpec, ...]:
        return self.options

    def check_options(self, options: dict[str, Any], depth: int | None = None) -> dict[str, Any]:
        """Validate ``options`` against the declarations (unknown names, types, ranges) and return them."""
        return check_options(self.name, self.options, options, depth)


#: the option every construction accepts: slack of β₁ relative to the scale of a unit's pre-activation
MARGIN = OptionSpec(
    "margin",
    float,
    min_val=0.0,
    include_min=False,
    max_val=1.0,
    help="slack of the linear-regime β relative to the pre-activation's scale (default 1e-3; 1e-2 for float32)",
)


def register(cls: type[Construction]) -> type[Construction]:
    """Class decorator adding a construction to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_construction(name: str) -> Construction:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidOptionError(f"method: expected one of {available_methods()}, found {name!r}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def frozen_init(shape: tuple[int, ...], generator: torch.Generator, *, dtype: torch.dtype, device) -> torch.Tensor:
    """I.i.d. Gaussian ``N(0, 1/fan_in)`` — any continuous distribution works for the theory; this scaling keeps
    activations O(1). Drawn on the CPU in the dtype the network uses (float32 networks get float32 draws: no float64
    draw and conversion), so a seed gives bit-identical networks on every device for one dtype.
    """
    fan_in = shape[-1] if len(shape) > 1 else 1
    w = torch.randn(shape, generator=generator, dtype=_draw_dtype(dtype))
    w.div_(fan_in**0.5)
    return w.to(dtype=dtype, device=device)


def fill_frozen(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Draw ``weight`` (any shape; fan-in = the product of all but the first dimension) in place from
    :func:`frozen_init`'s distribution: one call, no copy when it lives on the CPU in a drawable dtype."""
    fan_in = weight[0].numel() if weight.dim() > 1 else 1
    with torch.no_grad():
        if weight.device.type == "cpu" and weight.dtype == _draw_dtype(weight.dtype) and weight.is_contiguous():
            torch.randn(weight.shape, generator=generator, dtype=weight.dtype, out=weight)
            weight.div_(fan_in**0.5)
        else:
            shape = (weight.shape[0], fan_in)
            weight.copy_(frozen_init(shape, generator, dtype=weight.dtype, device=weight.device).reshape(weight.shape))


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def random_norm_linear(
    fan_in: int, fan_out: int, relu: bool, gen: torch.Generator, *, dtype: torch.dtype, device
) -> NormLinear:
    """A :class:`NormLinear` stage with frozen ``N(0, 1/fan_in)`` weights drawn from ``gen``, norms at identity."""
    stage = NormLinear(fan_in, fan_out, relu=relu, dtype=dtype, device=device)
    fill_frozen(stage.linear.weight, gen)
    return stage


def base_meta(method: str, target: Any, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "method": method,
        "seed": int(seed),
        "options": _jsonable(options),
        "target_dims": target.dims,
        "target_parameters": target.num_parameters,
    }
    if getattr(target, "in_shape", None) is not None:
        meta["in_shape"] = list(target.in_shape)
    return meta


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def safe_margin(
    zmin: torch.Tensor, zmax: torch.Tensor, relative: float, weight_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Positive slack added to ``-zmin`` so a unit stays strictly active on its whole range.

    ``relative × max(zmax − zmin, |zmin|, |zmax|)`` per unit, floored by ``relative ×`` the mean range and — for units
    whose input range is a single point, e.g. after a dead ReLU — by ``relative × weight_scale`` (the unit's
    ``|ΓA| (|h| + 1)``, :func:`weight_scale`): the evaluated input of such a unit can still be off by rounding, and
    the certificate must be able to prove the unit active at the *computed* input too. A tiny absolute value
    floors units with ``γ_k = 0`` (their pre-activation is ``β`` exactly). The slack dwarfs the rounding of
    ``Γ A x`` yet costs no accuracy: the next ``β`` cancels it.
    """
    spread = (zmax - zmin).clamp_min(0)
    scale = torch.maximum(spread, torch.maximum(zmin.abs(), zmax.abs()))
    floor = relative * spread.mean() if spread.numel() else spread.new_tensor(0.0)
    margin = torch.maximum(relative * scale, floor)
    if weight_scale is not None:
        margin = torch.maximum(margin, relative * weight_scale)
    return margin.clamp_min(torch.finfo(zmin.dtype).tiny ** 0.5)


def weight_scale(P: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``|P| (max(|low|, |high|) + 1)`` per row: the scale of a unit's pre-activation ``P h`` and of its rounding."""
    return P.abs() @ (torch.maximum(low.abs(), high.abs()) + 1)


def per_layer(value: Any, depth: int) -> list[Any]:
    """A validated per-layer option as one value per target layer (a scalar applies to every layer)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * depth


#: slack of β₁ relative to the scale of the unit's pre-activation (see :func:`safe_margin`)
DEFAULT_MARGIN = 1e-3
#: the same for networks evaluated in reduced precision (float32): the certificate must prove every unit active at
#: the *computed* input, whose worst-case rounding (γ_N·|B||ΓA| through each Khatri–Rao pair) outgrows 1e-3 of the
#: scale after a few CNN layers; 1e-2 keeps a residual CNN certifiable and costs no accuracy (β₂ cancels it)
DEFAULT_MARGIN_REDUCED = 1e-2


def default_margin(dtype: torch.dtype) -> float:
    """The margin used when none is given: :data:`DEFAULT_MARGIN` in float64, :data:`DEFAULT_MARGIN_REDUCED` below."""
    return DEFAULT_MARGIN if dtype == torch.float64 else DEFAULT_MARGIN_REDUCED


#: the network :func:`solving_in_place` hands to the solve (``None`` outside it)
_IN_PLACE: contextvars.ContextVar[NormNet | None] = contextvars.ContextVar("onlynorm_solve_in_place", default=None)


@contextlib.contextmanager
def solving_in_place(net: NormNet) -> Iterator[None]:
    """Within this block, :func:`begin_solve` solves ``net`` itself instead of a clone. For callers that have just
    built ``net`` and hold the only reference (:func:`onlynorm.reconstruct`): the clone would be a second copy of
    every γ, β and BatchNorm buffer — memory at ResNet scale, ~1 ms on a tied MLP — thrown away at once."""
    token = _IN_PLACE.set(net)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def clone_unless_in_place(net: NormNet) -> NormNet:
    """The network a solve writes into: ``net`` itself inside :func:`solving_in_place` for it, else
    :meth:`NormNet.clone` (new γ, β and buffers, the frozen tensors shared)."""
    return net if _IN_PLACE.get() is net else net.clone()


def begin_solve(net: NormNet, target) -> tuple[Any, NormNet, float]:
    """Common start of every ``solve``: refuse non-finite frozen weights, bring the target to the network's
    dtype/device, clone the network — new γ, β and BatchNorm buffers, the frozen tensors *shared* with ``net``
    (:meth:`NormNet.clone`: no copy of the frozen weights; the caller's γ, β stay untouched; no clone inside
    :func:`solving_in_place` for that network) — and read the ``margin`` option."""
    check_frozen_finite(net)
    spec = target.to(dtype=net.dtype, device=net.device)
    margin = net.meta.options.get("margin")
    if margin is not None:  # recorded options are data: a tampered value is named, not converted
        margin = dataclasses.replace(MARGIN, name="meta.options.margin").check(margin)
    return spec, clone_unless_in_place(net), float(default_margin(net.dtype) if margin is None else margin)


def finish_solve(out: NormNet, records: Sequence[SolveRecord | dict], notes: list[str], domain: Box) -> NormNet:
    """Record how the norms were solved (typed per-layer records, notes, the box) in ``out.meta.solve``."""
    for p in out.norm_parameters():
        if not all_finite(p):
            raise InvalidDomainError(
                f"the solved γ, β overflow (non-finite) on the box {domain!r}: the bounds or the weights are too "
                f"large for {str(out.dtype).removeprefix('torch.')}; rescale the inputs or use a smaller box"
            )
    typed = tuple(r if isinstance(r, SolveRecord) else SolveRecord.from_dict(r) for r in records)
    out.meta = out.meta.replace(solve=SolveInfo(records=typed, domain=domain, notes=tuple(notes)))
    return out


def check_frozen_finite(net: NormNet) -> None:
    for p in net.frozen_parameters():
        if not all_finite(p):
            raise InvalidNetworkError(
                "the frozen network has NaN/Inf weights; expected finite frozen weights — re-initialise them"
            )


def check_target_kind(net: NormNet, target: Any) -> None:
    """Refuse a CNN network with an MLP target and the reverse (:class:`InvalidNetworkError`, one line): an image
    network's inputs are ``(c, H, W)``, an MLP network's are flat, and neither can be matched to the other's layers.
    """
    image_target = getattr(target, "in_shape", None) is not None
    if net.in_shape is not None and not image_target:
        raise InvalidNetworkError(
            f"the network takes images of shape {tuple(net.in_shape)} (it was built for a CNN target), found an MLP "
            f"target (dims {getattr(target, 'dims', '?')}); expected a CNN target — pass the CNN it was built for, or a "
            "network built for this MLP"
        )
    if net.in_shape is None and image_target:
        raise InvalidNetworkError(
            f"the network takes flat inputs (it was built for an MLP target), found a CNN target with input shape "
            f"{tuple(target.in_shape)}; expected an MLP target — pass the MLP it was built for, or build a network for "
            "this CNN (onlynorm.random_normnet(target, in_shape=...) or `onlynorm init`)"
        )


@register_meta_check
def check_recorded_options(meta: NetMeta, source: str) -> None:
    """Type-check the construction options a network file records against the construction's declarations, so a
    tampered value (``"margin": "abc"``) is refused on load, in one line naming the field."""
    if meta.method is None or meta.method not in available_methods():
        return  # a network without a construction (with_norms) or from a newer version: nothing declared to check
    try:
        get_construction(meta.method).check_options(dict(meta.options))
    except InvalidOptionError as exc:
        message = str(exc)
        named = message.split(":", 1)[0].split("[", 1)[0] in meta.options  # "margin: expected ..., found 'abc'"
        raise FileFormatError(f"{source}: meta.options{'.' if named else ': '}{message}; re-create the file") from None
