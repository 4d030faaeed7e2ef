"""The stage contract: the base class every NormNet building block derives from, its registry, and the helpers
stages are built from (an identity BatchNorm in inference form, frozen bias-free modules, typed module lists)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import FileFormatError

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


class Stage(nn.Module):
    """Base of NormNet building blocks: a registered ``kind`` and a JSON-serialisable ``config()``."""

    kind: str = "stage"

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> Stage:
        return cls(**config, dtype=dtype, device=device)

    def widths(self) -> list[int]:
        """Widths of this stage's normalization layers (for summaries)."""
        return [int(m.num_features) for m in self.modules() if isinstance(m, _BatchNorm)]

    def depth(self) -> int:
        """Normalization layers a signal passes through on its longest path (all of them, for a chain)."""
        return len(self.widths())
