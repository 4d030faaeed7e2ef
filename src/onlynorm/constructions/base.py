"""The construction protocol and registry.

A construction turns a target into a frozen random :class:`~onlynorm.normnet.NormNet` (``build``) and solves that
network's ``γ, β`` so it computes the target on a box (``solve``). ``build`` may take a network the user brought
instead: ``solve`` only reads frozen weights and writes normalization parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..domain import Box
from ..errors import InvalidNetworkError, OnlyNormError
from ..normnet import NormLinear, NormNet
from ..target import MLPSpec

__all__ = ["Construction", "register", "get_construction", "available_methods", "Progress", "frozen_init",
           "base_meta", "safe_margin"]

#: ``progress(done, total, message)`` is called after each solved layer (used by the CLI's progress bar).
Progress = Callable[[int, int, str], None]

_REGISTRY: dict[str, Construction] = {}


class Construction:
    """One construction of the theory. Subclasses set ``name`` and ``cost`` and implement ``build``/``solve``."""

    name: ClassVar[str] = ""
    #: one line for ``onlynorm reconstruct --help``: what it is and its width/depth cost
    cost: ClassVar[str] = ""
    #: option names accepted by ``build`` (validated at the public boundary)
    options: ClassVar[tuple[str, ...]] = ()

    def build(self, target: MLPSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        raise NotImplementedError

    def solve(self, net: NormNet, target: MLPSpec, domain: Box, *, progress: Progress | None = None) -> NormNet:
        raise NotImplementedError

    def certify(self, net: NormNet, target: MLPSpec, domain: Box):
        """Rigorous check over the whole box; returns ``onlynorm.certify.CertifyResult``.

        Constructions that cannot certify yet raise :class:`OnlyNormError` saying so.
        """
        raise OnlyNormError(f"certification is not implemented for method {self.name!r} yet")

    def systems(self, net: NormNet, target: MLPSpec) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The Khatri–Rao systems ``(label, A, B, W)`` with ``B diag(γ) A = W`` that ``solve`` must satisfy."""
        raise OnlyNormError(f"method {self.name!r} does not expose its systems")

    def estimate_bytes(self, target: MLPSpec, dtype: torch.dtype, **options: Any) -> int:
        """Peak bytes the solve will need (0 if unknown); used by the memory guard before allocating."""
        return 0

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise OnlyNormError(
                f"method {self.name!r} got unknown option(s) {unknown}; it accepts: {allowed}")


def register(cls: type[Construction]) -> type[Construction]:
    """Class decorator adding a construction to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_construction(name: str) -> Construction:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OnlyNormError(
            f"unknown method {name!r}; expected one of {available_methods()}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def frozen_init(shape: tuple[int, ...], generator: torch.Generator, *, dtype: torch.dtype, device) -> torch.Tensor:
    """I.i.d. Gaussian ``N(0, 1/fan_in)`` — any continuous distribution works for the theory; this scaling keeps
    activations O(1). Drawn on the CPU in float64 so a seed gives bit-identical networks on every device/dtype.
    """
    fan_in = shape[-1] if len(shape) > 1 else 1
    w = torch.randn(shape, generator=generator, dtype=torch.float64) / fan_in ** 0.5
    return w.to(dtype=dtype, device=device)


def random_norm_linear(fan_in: int, fan_out: int, relu: bool, gen: torch.Generator, *, dtype: torch.dtype,
                       device) -> NormLinear:
    """A :class:`NormLinear` stage with frozen ``N(0, 1/fan_in)`` weights drawn from ``gen``, norms at identity."""
    stage = NormLinear(fan_in, fan_out, relu=relu, dtype=dtype, device=device)
    with torch.no_grad():
        stage.linear.weight.copy_(frozen_init((fan_out, fan_in), gen, dtype=dtype, device=device))
    return stage


def base_meta(method: str, target: MLPSpec, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    return {"method": method, "seed": int(seed), "options": _jsonable(options), "target_dims": target.dims,
            "target_parameters": target.num_parameters}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def safe_margin(zmin: torch.Tensor, zmax: torch.Tensor, relative: float) -> torch.Tensor:
    """Positive slack added to ``-zmin`` so a unit stays strictly active on its whole range.

    ``relative × max(zmax − zmin, |zmin|, |zmax|)`` per unit, floored by ``relative ×`` the mean range (units whose
    input range is a single point, e.g. after a dead ReLU, or ``γ_k = 0``) and by a tiny absolute value. The slack
    dwarfs the rounding of ``Γ A x`` (a few ulps of ``|z|``) yet costs no accuracy: the next ``β`` cancels it.
    """
    spread = (zmax - zmin).clamp_min(0)
    scale = torch.maximum(spread, torch.maximum(zmin.abs(), zmax.abs()))
    floor = relative * spread.mean() if spread.numel() else spread.new_tensor(0.0)
    tiny = torch.finfo(zmin.dtype).tiny ** 0.5
    return torch.maximum(relative * scale, floor).clamp_min(tiny)


def per_layer_ints(name: str, value: int | list[int], depth: int) -> list[int]:
    """An int (same for every layer) or one positive int per target layer, validated."""
    values = [value] * depth if isinstance(value, int) else list(value)
    if len(values) != depth:
        raise OnlyNormError(f"{name}: expected one value per target layer ({depth}), found {len(values)}: {values}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OnlyNormError(f"{name}: expected positive integers, found {v!r} for layer {i}")
    return values


#: slack of β₁ relative to the scale of the unit's pre-activation (see :func:`safe_margin`)
DEFAULT_MARGIN = 1e-3


def begin_solve(net: NormNet, target) -> tuple[Any, NormNet, float]:
    """Common start of every ``solve``: refuse non-finite frozen weights, bring the target to the network's
    dtype/device, copy the network (the caller's stays untouched) and read the ``margin`` option."""
    check_frozen_finite(net)
    spec = target.to(dtype=net.dtype, device=net.device)
    margin = float(net.meta.get("options", {}).get("margin", DEFAULT_MARGIN))
    return spec, net.clone(), margin


def finish_solve(out: NormNet, records: list[dict], notes: list[str], domain: Box) -> NormNet:
    """Record how the norms were solved (per-layer residuals, exactness, notes, the box) in ``out.meta``."""
    out.meta["solve"] = {"exact": all(r["exact"] for r in records), "layers": records, "notes": notes,
                         "domain": domain.to_dict()}
    return out


def check_frozen_finite(net: NormNet) -> None:
    for p in net.frozen_parameters():
        if not torch.isfinite(p).all():
            raise InvalidNetworkError(
                "the frozen network has NaN/Inf weights; expected finite frozen weights — re-initialise them")
