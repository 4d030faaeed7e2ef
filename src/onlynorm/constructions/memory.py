"""Memory guard: estimate what a construction needs *before* allocating, and refuse clearly if it will not fit.

The width construction's solve holds one ``N × N`` system (``N = m·n``): ``8 N²`` bytes in float64 — 3.4 GB for
one 96×96 layer, 205 GB for 400×400. Letting the allocator fail (or the OOM killer strike) loses the user's run;
a one-line refusal that names a cheaper construction does not.

The limit is, in order: :func:`set_memory_limit`, the environment variable ``ONLYNORM_MEMORY_LIMIT`` (bytes or
``"8G"``, ``"512M"``), else 90% of the memory currently available (``MemAvailable``; free device memory on CUDA).

>>> parse_bytes("1.5G")
1610612736
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import MemoryBudgetError, OnlyNormError
from .base import available_methods, get_construction

__all__ = ["check_memory", "memory_limit", "set_memory_limit", "available_bytes", "parse_bytes", "format_bytes"]

_USER_LIMIT: int | None = None
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"512M"`` → 536870912; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if match is None:
        raise OnlyNormError(f"expected a memory size like 8G, 512M or 1000000, found {text!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def set_memory_limit(limit: int | str | None) -> None:
    """Set (or with ``None`` clear) the byte budget every construction must fit in."""
    global _USER_LIMIT
    _USER_LIMIT = None if limit is None else parse_bytes(limit)


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory available for new allocations on ``device`` (host RAM for the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 1 << 62


def memory_limit(device: torch.device | str | None = None) -> tuple[int, str]:
    """The budget in bytes and where it comes from."""
    if _USER_LIMIT is not None:
        return _USER_LIMIT, "onlynorm.constructions.memory.set_memory_limit"
    env = os.environ.get("ONLYNORM_MEMORY_LIMIT")
    if env:
        return parse_bytes(env), "ONLYNORM_MEMORY_LIMIT"
    return int(0.9 * available_bytes(device)), "90% of available memory"


def check_memory(construction, spec, *, dtype: torch.dtype, device=None, options: dict, plan=None) -> None:
    """Raise :class:`MemoryBudgetError` if ``construction`` would need more than the budget (no allocation);
    ``plan``: the construction's plan for ``spec`` when the caller has it."""
    need = int(construction.estimate_bytes(spec, dtype, plan=plan, **options))
    if need <= 0:
        return
    limit, source = memory_limit(device)
    if need > limit:
        fits = cheaper_constructions(construction, spec, dtype, limit)
        choices = [f"method={n!r} (~{format_bytes(b)})" for n, b in fits]
        tied = tied_need(construction, spec, dtype, options)
        if tied is not None and tied <= limit:  # the same construction with one shared draw per layer
            choices.insert(0, f"method={_public(construction.name)!r}, tied=True (~{format_bytes(tied)})")
        advice = (
            f"use {' or '.join(choices)}"
            if choices
            else "no construction fits this target in the budget: use a smaller target"
        )
        raise MemoryBudgetError(
            f"method {construction.name!r} needs about {format_bytes(need)} for target dims {spec.dims}, but the "
            f"limit is {format_bytes(limit)} ({source}); {advice}, or raise the limit (ONLYNORM_MEMORY_LIMIT)",
            needed_bytes=need,
            limit_bytes=limit,
        )


def _public(name: str) -> str:
    """The ``method=`` a user passes for a construction (``conv_deep`` is ``deep`` on a CNN target)."""
    return {"conv_deep": "deep", "conv": "width"}.get(name, name)


def tied_need(construction, spec, dtype: torch.dtype, options: dict) -> int | None:
    """Bytes of the same construction with ``tied=1`` when it has that option and the request is untied, else None."""
    if options.get("tied") or "tied" not in {o.name for o in construction.options}:
        return None
    tied_options = {**options, "tied": 1}
    return int(construction.estimate_bytes(spec, dtype, plan=construction.plan(spec, tied_options), **tied_options))


def cheaper_constructions(construction, spec, dtype: torch.dtype, limit: int) -> list[tuple[str, int]]:
    """The other constructions applicable to ``spec`` (with default options) that fit in ``limit``, cheapest
    first, with their estimates: what the refusal suggests — only what would work."""
    kind = "cnn" if getattr(spec, "in_shape", None) is not None else "mlp"
    out = []
    for name in available_methods():
        other = get_construction(name)
        if name == construction.name or kind not in other.target_kinds or other.needs_options:
            continue
        try:
            need = int(other.estimate_bytes(spec, dtype))
        except OnlyNormError:
            continue
        if 0 < need <= limit:
            out.append((name, need))
    return sorted(out, key=lambda item: item[1])
