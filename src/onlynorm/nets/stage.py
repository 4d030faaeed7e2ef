"""The stage contract: the base class every NormNet building block derives from (:class:`Stage`), its registry,
its layout entry, and a stage's JSON description in network files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
    "dtype_name",
]

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
