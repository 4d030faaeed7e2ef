"""The public entry points: ``random_normnet`` → ``solve_norms`` = ``reconstruct``.

Inputs are validated here, once, at the boundary (targets, domains, methods, options); the constructions below
trust what they receive.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .constructions import get_construction
from .constructions.base import Progress
from .domain import Box, resolve_domain
from .errors import InvalidNetworkError
from .normnet import NormLinear, NormNet
from .target import MLPSpec, as_target

__all__ = ["random_normnet", "solve_norms", "reconstruct"]


def random_normnet(target: MLPSpec | nn.Module, method: str = "width", seed: int = 0, *,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                   **options: Any) -> NormNet:
    """A frozen random network able to express ``target`` by ``method``, with its norms at identity
    (``γ = 1, β = 0``). Re-initialise its frozen weights if you like; then call :func:`solve_norms`.

    >>> from torch import nn
    >>> net = random_normnet(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), seed=1)
    >>> [tuple(p.shape) for p in net.norm_parameters()][:2]
    [(6,), (6,)]
    """
    spec = as_target(target, options.pop("in_shape", None))
    construction = get_construction(_method_for(spec, method))
    construction.check_options(options)
    _guard_memory(construction, spec, dtype, device, options)
    return construction.build(spec, seed=int(seed), dtype=dtype, device=device, **options)


def solve_norms(frozen: NormNet, target: MLPSpec | nn.Module, domain: Box | tuple | None = None, *,
                progress: Progress | None = None) -> NormNet:
    """Solve only the ``γ, β`` of ``frozen`` so that it computes ``target`` on ``domain`` (default ``[-1, 1]^n``).

    Returns a new network; every frozen parameter and buffer is bit-for-bit the one of ``frozen``. The method is
    read from ``frozen.meta`` (a hand-built network of ``NormLinear`` pairs is treated as ``"width"``).
    """
    if not isinstance(frozen, NormNet):
        raise InvalidNetworkError(
            f"expected a NormNet (from onlynorm.random_normnet or NormNet.load), found {type(frozen).__name__}")
    spec = as_target(target, frozen.in_shape)
    dims = frozen.target_dims
    if dims is not None and list(dims) != spec.dims:
        raise InvalidNetworkError(
            f"the frozen network was built for a target of dims {dims}, found a target of dims {spec.dims}; "
            "build a new one with onlynorm.random_normnet(target)")
    method = frozen.meta.get("method")
    if method is None:
        if not all(isinstance(s, NormLinear) for s in frozen.layers):
            raise InvalidNetworkError("the frozen network has no 'method' in its meta and is not a width network; "
                                      "set net.meta['method'] to the construction it follows")
        method = "width"
        frozen = frozen.clone()   # record what it is on a copy: the caller's network is not modified
        frozen.meta.setdefault("target_dims", spec.dims)
        frozen.meta.setdefault("target_parameters", spec.num_parameters)
        frozen.meta["method"] = method
    box = resolve_domain(domain, spec.in_features)
    return get_construction(method).solve(frozen, spec, box, progress=progress)


def reconstruct(target: MLPSpec | nn.Module, method: str = "width", domain: Box | tuple | None = None,
                seed: int = 0, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                progress: Progress | None = None, **options: Any) -> NormNet:
    """Build a frozen random network for ``target`` and solve its norms: ``f ≡ g`` on ``domain``.

    >>> import torch
    >>> from torch import nn
    >>> g = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    >>> f = reconstruct(g, domain=Box(0.0, 5.0))
    >>> x = Box(0.0, 5.0, dim=4).sample(1000)
    >>> bool((f(x) - g(x)).abs().max() < 1e-9)
    True
    """
    spec = as_target(target, options.pop("in_shape", None))
    box = resolve_domain(domain, spec.in_features)   # validate before any work
    net = random_normnet(spec, method=method, seed=seed, dtype=dtype, device=device, **options)
    return solve_norms(net, spec, box, progress=progress)


def _method_for(spec, method: str) -> str:
    """CNN targets use the conv construction (the width construction generalised to convolutions)."""
    from .cnn import ConvNetSpec

    if isinstance(spec, ConvNetSpec):
        if method not in ("width", "conv"):
            raise InvalidNetworkError(f"method {method!r} is not available for CNN targets; use method='width'")
        return "conv"
    if method == "conv":
        raise InvalidNetworkError("method 'conv' is for CNN targets; this target is an MLP — use 'width'")
    return method


def _guard_memory(construction, spec: MLPSpec, dtype, device, options: dict[str, Any]) -> None:
    """Hook for the memory guard (see ``onlynorm.memory``); a no-op when that module is absent."""
    try:
        from .memory import check_memory
    except ImportError:  # pragma: no cover - the guard ships with the package
        return
    check_memory(construction, spec, dtype=dtype, device=device, options=options)
