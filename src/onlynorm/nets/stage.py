"""The stage contract: the base class every NormNet building block derives from (:class:`Stage`), its registry,
its layout entry, and the helpers stages are built from (an identity BatchNorm in inference form, frozen bias-free
modules, typed module lists)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import FileFormatError, InvalidNetworkError, NotCertifiableError

__all__ = [
    "Stage",
    "StageLayout",
    "STAGES",
    "register_stage",
    "stage_description",
    "stage_from_description",
    "make_batchnorm",
    "frozen_module",
    "conv2d_config",
    "normalize",
    "inference_form",
    "ModuleSeq",
    "dtype_name",
]

#: set on a BatchNorm whose eps NormNet.train() raised from 0 for batch statistics (eval() gives it back its 0)
RAISED_EPS = "_onlynorm_raised_eps"

#: stage types by their file-format ``kind`` (filled by ``@register_stage``; read by network files only)
STAGES: dict[str, type[Stage]] = {}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage kind loadable from its JSON config."""
    if cls.kind in STAGES and STAGES[cls.kind] is not cls:
        raise ValueError(f"stage kind {cls.kind!r} registered twice")
    STAGES[cls.kind] = cls
    return cls


def make_batchnorm(
    num_features: int, *, dims: int = 1, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> _BatchNorm:
    """A BatchNorm at identity in inference form: ``γ = 1, β = 0``, running mean 0, running var 1, ``eps = 0``.

    ``eps = 0`` matters: with the default ``eps = 1e-5`` BatchNorm would scale by ``1/sqrt(1 + 1e-5)`` and perturb
    every ``γ`` by 5e-6 relative — far above the 1e-12 the constructions reach.
    """
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = cls(num_features, eps=0.0, affine=True, track_running_stats=True, dtype=dtype, device=device)
    bn.eval()
    return bn


M = TypeVar("M", bound=nn.Module)


def frozen_module(cls: type[M], *args, dtype: torch.dtype, device=None, **kwargs) -> M:
    """A bias-free ``nn.Linear``/``nn.Conv2d`` with zero, frozen weights (``requires_grad=False``).

    ``skip_init``: torch's default init would draw from the global RNG; constructions fill the weights from their
    own seeded generator, so building a network never perturbs the user's random stream.
    """
    module = torch.nn.utils.skip_init(
        cls, *args, bias=False, dtype=dtype, device=device if device is not None else "cpu", **kwargs
    )
    weight = module.get_parameter("weight")
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(False)
    return module


def normalize(norm: _BatchNorm, z: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``BN(z)`` as a stage's forward evaluates it: the module itself with batch statistics (training mode), else
    the inference form ``z · s + t`` with ``s = γ/√(var + eps)``, ``t = β − mean · s`` — exactly ``γ z + β`` in the
    constructions' form (mean 0, var 1, eps 0). ``inplace`` (no autograd) reuses ``z``'s memory; the values are the
    same either way, so a stage computes one function in every grad mode."""
    if norm.training or norm.running_mean is None or norm.running_var is None:
        return norm(z)
    shape = (1, -1) + (1,) * (z.ndim - 2)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    return z.mul_(scale).add_(shift) if inplace else z * scale + shift


@contextmanager
def inference_form(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration of the block, then every submodule's own training flag and ``eps``
    exactly as they were: evaluating or exporting a network never changes it (not even its modes).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> with inference_form(net):
    ...     net[1].training
    False
    >>> net[1].training
    True
    """
    saved = [(m, m.training, getattr(m, "eps", None), getattr(m, RAISED_EPS, None)) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training, eps, raised in saved:
            m.training = training
            if eps is not None:
                m.eps = eps
            if raised is not None:
                setattr(m, RAISED_EPS, raised)


def conv2d_config(conv: nn.Conv2d) -> dict[str, Any]:
    """The JSON form of a ``Conv2d``'s shape and geometry (what a stage needs to rebuild it)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
    }


def check_sizes(config: Any, kind: str, held: int, key: str = "") -> None:
    """Every integer of a stage's config (nested ones too) must be a size the file's tensors could describe:
    ≥ 0 (padding may be 0) and ≤ ``held`` elements; sizes such as ``block`` or ``in_features`` must be ≥ 1 — so a
    tampered description is refused with the field named before anything is built or allocated."""
    if isinstance(config, dict):
        for k, v in config.items():
            check_sizes(v, kind, held, k)
    elif isinstance(config, list):
        for v in config:
            check_sizes(v, kind, held, key)
    elif isinstance(config, int) and not isinstance(config, bool):
        low = 0 if key in _MAY_BE_ZERO else 1
        if not low <= config <= held:
            raise FileFormatError(
                f"stage {kind!r}: config field {key!r} must be an integer from {low} to the file's "
                f"{held:,} weight elements, found {config!r}; the architecture description is "
                "corrupt — re-create the file"
            )


#: config fields for which 0 is a valid value
_MAY_BE_ZERO = frozenset({"padding"})


class ModuleSeq(nn.ModuleList, Generic[M]):
    """An ``nn.ModuleList`` whose items have one declared type (for readers and type checkers; same state dict)."""

    def __iter__(self) -> Iterator[M]:
        return super().__iter__()  # type: ignore[return-value]

    def __getitem__(self, idx: Any) -> Any:
        return super().__getitem__(idx)


@dataclass(frozen=True)
class StageLayout:
    """A stage's entry in a plan's layout: its type, ``(fan_in, fan_out)`` (channels for images; None for a
    parameter-free stage), whether it ends in a ReLU, and type-specific facts (``geometry``, ``block``, ``op``...)
    that a plan may pin down."""

    type: type[Stage]
    shape: tuple[int, int] | None = None
    relu: bool | None = None
    details: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.details).get(key, default)

    @property
    def label(self) -> str:
        op = self.get("op")
        return f"{self.type.__name__}({op})" if op is not None else self.type.__name__


class Stage(nn.Module):
    """Base of every NormNet building block. A stage type owns its meaning, in one class:

    * ``forward(x)`` — one code path for every grad mode and dtype;
    * :meth:`affine` — the exact affine map(s) and ReLU placement a certificate reads
      (:mod:`onlynorm.nets.views`), from the very modules ``forward`` calls, refusing state it does not model;
    * :meth:`lower_onnx` — its ONNX lowering (:mod:`onlynorm.nets.onnx_graph`);
    * :meth:`layout` — its entry in a plan's layout (:class:`StageLayout`);
    * :meth:`stage_lists` — nested stage lists (a residual stage's body and shortcut), for walks over a network;
    * ``kind``, :meth:`config`, :meth:`from_config` — its name and JSON form in network files. ``kind`` is read by
      the file format only: everything else dispatches on the type.

    A new stage type subclasses ``Stage``, defines these and is registered with ``@register_stage``.
    """

    kind: ClassVar[str] = "stage"
    #: consecutive stages of this type form Khatri–Rao pairs ``B diag(γ) A`` (the first's map, the second's)
    pairs_with_next: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> Stage:
        return cls(**config, dtype=dtype, device=device)

    def affine(self, where: str) -> Any:
        """The view a certificate reads (``where`` names the stage in refusals); types without one refuse."""
        raise NotCertifiableError(f"{where}: the certificate has no model of a {type(self).__name__} stage")

    def lower_onnx(self, g: Any, x: str, example: torch.Tensor) -> str:
        """Append this stage's ONNX nodes to ``g`` reading ``x`` (``example`` a value of ``x``, for static shapes);
        return the output's name."""
        raise InvalidNetworkError(f"a {type(self).__name__} stage has no ONNX lowering; it cannot be exported")

    def layout(self) -> StageLayout:
        return StageLayout(type(self))

    def stage_lists(self) -> dict[str, list[Stage]]:
        """Nested stage lists by name (``{"body": ..., "shortcut": ...}``); empty for a leaf stage."""
        return {}

    def widths(self) -> list[int]:
        """Widths of this stage's normalization layers (for summaries)."""
        return [int(m.num_features) for m in self.modules() if isinstance(m, _BatchNorm)]

    def depth(self) -> int:
        """Normalization layers a signal passes through on its longest path (all of them, for a chain)."""
        return len(self.widths())


def stage_description(stage: Stage) -> dict[str, Any]:
    """``{"kind": ..., **config}``: a stage's entry in a network file's JSON architecture."""
    return {"kind": stage.kind, **stage.config()}


def stage_from_description(description: dict[str, Any], *, dtype: torch.dtype, device=None) -> Stage:
    """Rebuild a stage from :func:`stage_description` (the registry maps the file's ``kind`` to the type)."""
    cfg = dict(description)
    kind = cfg.pop("kind", None)
    if not isinstance(kind, str) or kind not in STAGES:
        raise FileFormatError(f"unknown stage kind {kind!r}; known kinds: {sorted(STAGES)}")
    return STAGES[kind].from_config(cfg, dtype=dtype, device=device)
