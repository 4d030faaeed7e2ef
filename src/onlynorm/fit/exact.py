"""The closed form where the network can express the target: today's :func:`onlynorm.solve_norms` on the data's box.

``exact_applicable`` is the cheap check ``auto`` runs first — the network follows a registered construction and every
Khatri–Rao system has ``N ≥ m·n`` unknowns — before trying the solve (a structurally singular system still raises
:class:`~onlynorm.SingularSystemError` there and ``auto`` moves on). ``method="exact"`` asks
:func:`onlynorm.capacity` first and refuses clearly when the target is not expressible.
"""

from __future__ import annotations

import time

from ..api import solve_norms
from ..constructions import available_methods, get_construction
from ..constructions.capacity import capacity
from ..errors import OnlyNormError
from ..nets.normnet import NormNet
from .data import FitData
from .report import Phase

__all__ = ["exact_applicable", "fit_exact", "check_capacity"]


def exact_applicable(net: NormNet, spec) -> bool:
    method = net.meta.get("method", "width")
    if method not in available_methods():
        return False
    try:
        systems = get_construction(method).systems(net, spec)
    except OnlyNormError:
        return False
    return bool(systems) and all(A.shape[0] >= W.numel() for _label, A, _B, W in systems)


def check_capacity(net: NormNet, spec) -> None:
    """Raise :class:`OnlyNormError` unless :func:`onlynorm.capacity` says ``net`` can express ``spec``."""
    if net.meta.get("method", "width") not in available_methods():
        raise OnlyNormError(
            f"method='exact': a {net.meta.get('method')!r} network has no closed form; use "
            "method='auto', 'layerwise' or 'gauss-newton'"
        )
    report = capacity(net, spec)
    if not report.expressible:
        worst = min(report.systems, key=lambda s: s.rank / max(s.equations, 1))
        raise OnlyNormError(
            f"method='exact': the frozen network cannot express the target ({worst.label}: rank "
            f"{worst.rank} of {worst.equations} equations with {worst.unknowns} unknowns); use "
            "method='auto' for the best approximation"
        )


def fit_exact(net: NormNet, spec, data: FitData, *, progress=None) -> tuple[NormNet, Phase]:
    """Solve the norms in closed form on ``data.box``; returns a new network and the phase record."""
    start = time.perf_counter()
    before = data.held_out_error(net)
    solved = solve_norms(net, spec, data.box, progress=progress)
    solve = solved.meta.get("solve") or {}
    phase = Phase(
        "exact",
        before,
        data.held_out_error(solved),
        time.perf_counter() - start,
        1,
        notes=list(solve.get("notes", [])),
        details={"construction": solved.method, "exact": bool(solve.get("exact", False))},
    )
    return solved, phase
