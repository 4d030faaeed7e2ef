"""Validation of arguments and construction options, once, at the public boundary.

In the style of scikit-learn's ``check_scalar``: every check names the argument, says what is accepted and what was
found, and raises :class:`~onlynorm.errors.InvalidOptionError`. Constructions *declare* their options
(:class:`OptionSpec`: name, type, range, one value or one per target layer, help); the Python API validates a call
against the declarations and the CLI derives its flags from the same declarations, so the two cannot drift.

>>> check_scalar(3, "block", int, min_val=1)
3
>>> check_scalar(0, "block", int, min_val=1)
Traceback (most recent call last):
...
onlynorm.errors.InvalidOptionError: block: expected an integer ≥ 1, found 0
>>> OptionSpec("rank", int, min_val=1, per_layer=True).parse_text("2,3")
[2, 3]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidOptionError

__all__ = ["OptionSpec", "check_scalar", "check_options", "check_seed", "check_dtype", "check_device"]

_TYPE_WORDS = {int: "an integer", float: "a number"}


def _range_words(min_val: float | None, max_val: float | None, include_min: bool, include_max: bool) -> str:
    parts = []
    if min_val is not None:
        parts.append(f"{'≥' if include_min else '>'} {min_val:g}")
    if max_val is not None:
        parts.append(f"{'≤' if include_max else '<'} {max_val:g}")
    return " and ".join(parts)


def check_scalar(
    value: Any,
    name: str,
    kind: type,
    *,
    min_val: float | None = None,
    max_val: float | None = None,
    include_min: bool = True,
    include_max: bool = True,
) -> Any:
    """Return ``value`` converted to ``kind`` (``int`` or ``float``) if it is one and lies in range, else raise
    :class:`InvalidOptionError` ``"NAME: expected <type> <range>, found <value>"``.

    Booleans are refused where numbers are expected (``True`` is an ``int`` to Python, never a width); a float
    must be finite; an ``int`` option accepts integral floats such as ``4.0`` only if exact.
    """
    words = _TYPE_WORDS[kind]
    rng = _range_words(min_val, max_val, include_min, include_max)
    expected = f"{words} {rng}".strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, complex):
        raise InvalidOptionError(f"{name}: expected {expected}, found {value!r} ({type(value).__name__})")
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise InvalidOptionError(f"{name}: expected {expected}, found {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InvalidOptionError(f"{name}: expected a finite number {rng}".rstrip() + f", found {value!r}")
    low_bad = min_val is not None and (value < min_val or (not include_min and value == min_val))
    high_bad = max_val is not None and (value > max_val or (not include_max and value == max_val))
    if low_bad or high_bad:
        raise InvalidOptionError(f"{name}: expected {expected}, found {value!r}")
    return value


@dataclass(frozen=True)
class OptionSpec:
    """One construction option: its name, type, range, whether it takes one value per target layer, and help."""

    name: str
    kind: type
    min_val: float | None = None
    max_val: float | None = None
    include_min: bool = True
    include_max: bool = True
    per_layer: bool = False
    help: str = ""

    def check(self, value: Any, depth: int | None = None) -> Any:
        """Validate ``value``: a scalar, or (``per_layer``) a scalar or one value per target layer."""
        if self.per_layer and isinstance(value, (list, tuple)):
            if depth is not None and len(value) != depth:
                raise InvalidOptionError(
                    f"{self.name}: expected one value per target layer ({depth}), found {len(value)}: {list(value)}"
                )
            return [self._scalar(v, f"{self.name}[{i}]") for i, v in enumerate(value)]
        return self._scalar(value, self.name)

    def _scalar(self, value: Any, name: str) -> Any:
        return check_scalar(
            value,
            name,
            self.kind,
            min_val=self.min_val,
            max_val=self.max_val,
            include_min=self.include_min,
            include_max=self.include_max,
        )

    def parse_text(self, text: str) -> Any:
        """Parse a command-line value: ``"64"``, or for per-layer options ``"64,128"``."""
        pieces = [p.strip() for p in str(text).split(",")] if self.per_layer else [str(text).strip()]
        values = []
        for piece in pieces:
            try:
                values.append(int(piece) if self.kind is int else float(piece))
            except ValueError:
                form = "an integer" if self.kind is int else "a number"
                more = " or a comma-separated list like 64,128" if self.per_layer else ""
                raise InvalidOptionError(f"--{self.name}: expected {form}{more}, found {text!r}") from None
        value = values[0] if len(values) == 1 else values
        return self.check(value)

    def cli_help(self) -> str:
        rng = _range_words(self.min_val, self.max_val, self.include_min, self.include_max)
        per = " (one value, or one per target layer: 64,128)" if self.per_layer else ""
        return f"{self.help} ({_TYPE_WORDS[self.kind].split()[-1]}{' ' + rng if rng else ''}{per})"


def check_options(
    method: str, specs: Sequence[OptionSpec], options: Mapping[str, Any], depth: int | None = None
) -> dict[str, Any]:
    """Validate ``options`` against a construction's declarations; unknown names are refused."""
    known = {s.name: s for s in specs}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidOptionError(
            f"method {method!r} got unknown option(s) {unknown}; it accepts: {', '.join(known) or 'none'}"
        )
    return {k: (None if v is None else known[k].check(v, depth)) for k, v in options.items()}


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed is an integer in ``[0, 2⁶⁴)`` (what ``torch.Generator.manual_seed`` accepts without wrapping)."""
    return check_scalar(seed, name, int, min_val=0, max_val=2**64 - 1)


def check_dtype(dtype: Any) -> torch.dtype:
    """Networks are float64 (default, exact to ~1e-13) or float32."""
    if dtype not in (torch.float64, torch.float32):
        raise InvalidOptionError(f"dtype: expected torch.float64 or torch.float32, found {dtype!r}")
    return dtype


def check_device(device: Any) -> torch.device | None:
    """``None``, ``"cpu"`` or an available CUDA device."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidOptionError(f"device: expected 'cpu', 'cuda' or a torch.device, found {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"device: {device!r} was requested but CUDA is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"device: expected 'cpu' or 'cuda', found {device!r}")
    return dev
