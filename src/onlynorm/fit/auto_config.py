"""The choices inside ``fit_norms(method="auto")`` that were measured against each other, in one place.

``auto`` reads :func:`current`; :func:`auto_config` changes it for a ``with`` block (the benchmark
``benchmarks/fit_variants.py`` compares variants on the same cells, seeds and budgets this way). The defaults are
the variant that measured best on the goal cells (``screen-identity`` there: screened restarts, the resampled
layer-wise start twice per cycle and the identity once, no geodesic acceleration; docs/RESULTS.md §6a has the
numbers of every variant):

* ``geodesic`` — geodesic acceleration in every Levenberg–Marquardt step (:mod:`onlynorm.fit.lm_step`):
  ``False``, ``True`` (Transtrum–Sethna: a step whose acceleration fails the test is damped more) or
  ``"fallback"`` (such a step is the plain one);
* ``starts`` — the cycle of restart kinds (:mod:`onlynorm.fit.restarts`);
* ``screen_steps`` — ``None``, or restarts are screened: run on past their first ``screen_steps`` steps only when
  they are then close to the best (:mod:`onlynorm.fit.restarts`);
* ``lean_from`` — from this many γ, β on, Levenberg–Marquardt steps use lean rows (8 equations per parameter,
  256–1,024 rows, instead of at least 1,024): cheaper steps, more of them and more restarts in the same time.

>>> current().geodesic in (True, False, "fallback")
True
>>> with auto_config(geodesic=True):
...     current().geodesic
True
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from ..errors import InvalidOptionError

__all__ = ["AutoConfig", "auto_config", "current", "START_KINDS"]

#: every restart kind :mod:`onlynorm.fit.restarts` knows
START_KINDS = ("perturbed", "sign-flip", "subsample", "resampled", "identity")


@dataclasses.dataclass(frozen=True)
class AutoConfig:
    geodesic: bool | str = False
    starts: tuple[str, ...] = ("perturbed", "resampled", "identity", "sign-flip", "resampled")
    lean_from: int = 128
    screen_steps: int | None = 8


_CURRENT = [AutoConfig()]


def current() -> AutoConfig:
    return _CURRENT[-1]


@contextlib.contextmanager
def auto_config(**changes) -> Iterator[AutoConfig]:
    """Run a block with some of :class:`AutoConfig`'s fields changed (restored afterwards, even on error)."""
    fields = {f.name for f in dataclasses.fields(AutoConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise InvalidOptionError(f"auto_config: expected fields among {sorted(fields)}, found {unknown}")
    starts = changes.get("starts", current().starts)
    if not starts or any(s not in START_KINDS for s in starts):
        raise InvalidOptionError(f"auto_config: starts must be a non-empty tuple of {START_KINDS}, found {starts!r}")
    _CURRENT.append(dataclasses.replace(current(), **changes))
    try:
        yield current()
    finally:
        _CURRENT.pop()
