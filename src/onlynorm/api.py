"""The public entry points: ``random_normnet`` → ``solve_norms`` = ``reconstruct``.

Inputs are validated here, once, at the boundary (targets, domains, methods, options); the constructions below
trust what they receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .constructions import get_construction
from .constructions.base import Construction, Progress, solving_in_place
from .constructions.memory import check_memory
from .constructions.plan import Plan
from .constructions.transformer import build_seqnet, check_transformer_options, solve_seqnet
from .constructions.transformer_match import check_architecture
from .domain import Box, resolve_domain
from .errors import InvalidNetworkError, InvalidOptionError, InvalidTargetError
from .nets.linear import NormLinear
from .nets.normnet import NormNet
from .nets.seqnet import SeqNet
from .options import check_device, check_dtype, check_seed
from .targets.cnn import ConvNetSpec
from .targets.convert import as_target
from .targets.mlp import MLPSpec
from .targets.transformer import TransformerSpec, is_sequence_model

__all__ = ["random_normnet", "solve_norms", "reconstruct"]

InShape = tuple[int, int, int]


def random_normnet(
    target: MLPSpec | ConvNetSpec | nn.Module,
    method: str | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    in_shape: InShape | None = None,
    example_input: Any = None,
    **options: Any,
) -> NormNet:
    """A frozen random network able to express ``target`` by ``method`` (default ``"width"``), with its norms at
    identity (``γ = 1, β = 0``). Re-initialise its frozen weights if you like; then call :func:`solve_norms`.

    ``in_shape=(c, H, W)`` is needed for CNN targets (the image size is not in the weights). ``options`` are the
    method's declared options (``onlynorm reconstruct --help`` lists them); each is validated here.

    For a sequence model (transformer), ``example_input`` fixes the input signature, as in :func:`reconstruct`:
    the result is a :class:`~onlynorm.nets.seqnet.SeqNet` (``method="deep"`` by default, or ``"width"``) whose
    frozen tensors depend only on ``seed`` and the architecture — every model of that architecture is one
    :func:`solve_norms` away. Its LayerNorms are at identity until then.

    Examples
    --------
    >>> from torch import nn
    >>> net = random_normnet(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), seed=1)
    >>> [tuple(p.shape) for p in net.norm_parameters()][:2]
    [(6,), (6,)]
    """
    if example_input is not None or is_sequence_model(target):
        spec, opts = _sequence_spec(target, example_input, method, dtype, options, "random_normnet")
        return build_seqnet(spec, seed=check_seed(seed), dtype=spec.dtype, device=check_device(device), options=opts)
    method = "width" if method is None else method
    spec = as_target(target, _in_shape(in_shape))
    build = _Build.of(spec, method, seed, dtype, device, options)
    return build.construction.build(
        spec, seed=build.seed, dtype=build.dtype, device=build.device, plan=build.plan, **build.options
    )


def solve_norms(
    frozen: NormNet,
    target: MLPSpec | ConvNetSpec | nn.Module,
    domain: Box | tuple | None = None,
    *,
    progress: Progress | None = None,
    example_input: Any = None,
) -> NormNet:
    """Solve only the ``γ, β`` of ``frozen`` so that it computes ``target`` on ``domain`` (default ``[-1, 1]^n``).

    Returns a new network; every frozen parameter and buffer is bit-for-bit the one of ``frozen``. The method is
    read from ``frozen.meta`` (a hand-built network of ``NormLinear`` pairs is treated as ``"width"``).

    A transformer network (:class:`~onlynorm.nets.seqnet.SeqNet` from ``random_normnet(model, example_input=x)``)
    takes a model of the architecture it was built for and ``example_input``; no domain (the result is exact for
    every input). Its factorised maps get their ``γ, β`` solved and its LayerNorms the model's ``γ, β``.
    """
    if isinstance(frozen, SeqNet):
        return _solve_sequence_model(frozen, target, example_input, domain)
    if not isinstance(frozen, NormNet):
        raise InvalidNetworkError(
            f"expected a NormNet (from onlynorm.random_normnet or NormNet.load), found {type(frozen).__name__}"
        )
    if example_input is not None:
        raise InvalidOptionError(
            "example_input: this frozen network is an MLP/CNN network, not a transformer network; drop example_input="
        )
    spec = as_target(target, frozen.in_shape)
    return _solve(frozen, spec, resolve_domain(domain, spec.in_features), progress)


def _solve(frozen: NormNet, spec: MLPSpec | ConvNetSpec, box: Box, progress: Progress | None) -> NormNet:
    dims = frozen.target_dims
    if dims is not None and list(dims) != spec.dims:
        raise InvalidNetworkError(
            f"the frozen network was built for a target of dims {dims}, found a target of dims {spec.dims}; "
            "build a new one with onlynorm.random_normnet(target)"
        )
    if frozen.meta.method is None:
        if not all(isinstance(s, NormLinear) for s in frozen.layers):
            raise InvalidNetworkError(
                "the frozen network records no method and is not a width network of NormLinear "
                "stages; set net.meta.method to the construction it follows"
            )
        frozen = frozen.clone()  # record what it is on a copy: the caller's network is not modified
        frozen.meta = frozen.meta.replace(
            method="width",
            target_dims=frozen.meta.target_dims or spec.dims,
            target_parameters=frozen.meta.target_parameters or spec.num_parameters,
        )
    return get_construction(frozen.meta.method or "width").solve(frozen, spec, box, progress=progress)


def reconstruct(
    target: MLPSpec | ConvNetSpec | nn.Module,
    method: str | None = None,
    domain: Box | tuple | None = None,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    in_shape: InShape | None = None,
    example_input: Any = None,
    **options: Any,
) -> NormNet:
    """Build a frozen random network for ``target`` and solve its norms: ``f ≡ g`` on ``domain``.

    For a CNN target, ``in_shape=(c, H, W)`` — or a ``Box`` with image-shaped bounds, which supplies it.

    For a sequence model (transformer), ``example_input`` — a tensor (LongTensor token ids, or float features) or
    a tuple of tensors — fixes the input signature; the result is a :class:`~onlynorm.nets.seqnet.SeqNet` equal to
    the model for every input and sequence length (no domain). ``method`` is ``"deep"`` (the default for these;
    options ``block``, ``out_block``, ``tied``) or ``"width"``; see :mod:`onlynorm.constructions.transformer`.
    Other targets default to ``"width"``.

    >>> import torch
    >>> from torch import nn
    >>> g = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    >>> f = reconstruct(g, domain=Box(0.0, 5.0))
    >>> x = Box(0.0, 5.0, dim=4).sample(1000)
    >>> bool((f(x) - g(x)).abs().max() < 1e-9)
    True
    """
    if example_input is not None:
        method = "deep" if method is None else method  # one well-conditioned system per input feature
        return _reconstruct_sequence_model(target, example_input, method, domain, seed, dtype, device, options)
    method = "width" if method is None else method
    if is_sequence_model(target):
        raise InvalidTargetError(
            f"{type(target).__name__} is a sequence model (attention, embeddings or LayerNorm): pass "
            "example_input=<a tensor of inputs> to reconstruct it"
        )
    if in_shape is None and isinstance(domain, Box) and domain.shape is not None:
        in_shape = domain.shape  # type: ignore[assignment]
    spec = as_target(target, _in_shape(in_shape))  # validated once: target, domain, options, plan
    box = resolve_domain(domain, spec.in_features)
    build = _Build.of(spec, method, seed, dtype, device, options)
    construction = build.construction
    net = construction.build(
        spec, seed=build.seed, dtype=build.dtype, device=build.device, plan=build.plan, **build.options
    )
    with solving_in_place(net):  # nobody else holds `net`: solve it rather than a clone of it
        return construction.solve(net, spec, box, progress=progress, plan=build.plan)


def _reconstruct_sequence_model(
    target: Any, example_input: Any, method: str, domain: Any, seed: int, dtype, device, options: dict[str, Any]
) -> NormNet:
    """The transformer path of :func:`reconstruct`: convert (checked on the example), build, solve."""
    if not isinstance(target, nn.Module):
        raise InvalidTargetError(f"example_input is for torch models; found a {type(target).__name__} target")
    if domain is not None:
        raise InvalidOptionError(
            "domain: a transformer reconstruction is exact for every input and takes no domain; drop domain="
        )
    seed, device = check_seed(seed), check_device(device)
    spec, opts = _sequence_spec(target, example_input, method, dtype, options, "reconstruct")
    net = build_seqnet(spec, seed=seed, dtype=spec.dtype, device=device, options=opts)
    with solving_in_place(net):  # nobody else holds `net`: solve it rather than a clone of it
        return solve_seqnet(net, spec)


def _sequence_spec(
    target: Any, example_input: Any, method: str | None, dtype: Any, options: dict[str, Any], caller: str
) -> tuple[TransformerSpec, dict[str, Any]]:
    """A sequence model's spec (converted and checked on ``example_input``) and its checked construction options."""
    if not isinstance(target, nn.Module):
        raise InvalidTargetError(f"example_input is for torch models; found a {type(target).__name__} target")
    if example_input is None:
        raise InvalidTargetError(
            f"{type(target).__name__} is a sequence model (attention, embeddings or LayerNorm): pass "
            f"example_input=<a tensor of inputs> to onlynorm.{caller}"
        )
    opts = check_transformer_options("deep" if method is None else method, options)
    spec = TransformerSpec.from_module(target, example_input)
    if check_dtype(dtype) not in (torch.float64, spec.dtype):
        raise InvalidOptionError(
            f"dtype: a transformer network takes its target's dtype ({spec.dtype}); convert the model with "
            f".to({dtype}) instead"
        )
    return spec, opts


def _solve_sequence_model(frozen: SeqNet, target: Any, example_input: Any, domain: Any) -> NormNet:
    """The transformer path of :func:`solve_norms`: convert the model, check it is the architecture ``frozen``
    was built for, solve (frozen tensors untouched)."""
    if domain is not None:
        raise InvalidOptionError(
            "domain: a transformer network is solved exactly for every input and takes no domain; drop domain="
        )
    if not isinstance(target, nn.Module) or example_input is None:
        raise InvalidTargetError(
            "a transformer network is solved for a torch model of its architecture and its example_input: "
            "pass solve_norms(frozen, model, example_input=<a tensor of inputs>)"
        )
    spec = TransformerSpec.from_module(target, example_input)
    check_architecture(frozen, spec)
    return solve_seqnet(frozen, spec)


@dataclass(frozen=True)
class _Build:
    """Everything a build needs, validated once at the public boundary: the construction, its checked options, its
    plan for the target (worked out once and handed to the memory guard, the build and the solve), seed, dtype,
    device."""

    construction: Construction
    options: dict[str, Any]
    plan: Plan
    seed: int
    dtype: torch.dtype
    device: torch.device | str | None

    @classmethod
    def of(cls, spec, method: str, seed: int, dtype, device, options: dict[str, Any]) -> _Build:
        seed = check_seed(seed)
        dtype, device = check_dtype(dtype), check_device(device)
        construction = get_construction(_method_for(spec, method))
        options = construction.check_options(options, getattr(spec, "depth", None))
        plan = construction.plan(spec, options)
        check_memory(construction, spec, dtype=dtype, device=device, options=options, plan=plan)
        return cls(construction, options, plan, seed, dtype, device)


def _in_shape(in_shape: Any) -> InShape | None:
    if in_shape is None:
        return None
    if not (
        isinstance(in_shape, (tuple, list))
        and len(in_shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in in_shape)
    ):
        raise InvalidOptionError(
            f"in_shape: expected (channels, height, width) of positive integers, found {in_shape!r}"
        )
    return (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))


def _method_for(spec, method: str) -> str:
    """CNN targets use the conv construction (the width construction generalised to convolutions)."""
    if not isinstance(method, str):
        raise InvalidOptionError(f"method: expected a string such as 'width', found {method!r}")
    if isinstance(spec, ConvNetSpec):
        if method in ("deep", "conv_deep"):
            return "conv_deep"
        if method not in ("width", "conv"):
            raise InvalidOptionError(
                f"method {method!r} is not available for CNN targets; use method='width' or method='deep'"
            )
        return "conv"
    if method in ("conv", "conv_deep"):
        raise InvalidOptionError(f"method {method!r} is for CNN targets; this target is an MLP — use 'width'")
    return method
