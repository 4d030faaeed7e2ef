"""Sampled (and, with ``certify=True``, rigorous) equivalence of a NormNet and its target on a box.

The sampled check evaluates both networks on ``samples`` points of the box — uniform, on faces, at and near
vertices — and reports ``max_abs_error = max_x max_j |f_j(x) − g_j(x)|`` and
``max_rel_error = max_abs_error / max_x max_j |g_j(x)|``. The target is always evaluated in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .domain import Box, resolve_domain
from .errors import InvalidNetworkError, OnlyNormError
from .normnet import NormNet
from .target import MLPSpec, as_target

__all__ = ["VerifyReport", "verify", "default_tolerance"]


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance a reconstruction in ``dtype`` is expected to meet: 1e-9 in float64, 1e-4 in float32."""
    return 1e-9 if dtype == torch.float64 else 1e-4


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``passed`` means ``max_rel_error ≤ tolerance``."""

    max_abs_error: float
    max_rel_error: float
    max_target_abs: float
    samples: int
    tolerance: float
    passed: bool
    exact: bool | None = None                  # what the construction claims (False for least-squares)
    certified: bool | None = None              # set by certify=True
    certified_bound: float | None = None       # absolute bound on sup_D |f − g| in exact arithmetic
    rounding_bound: float | None = None        # separate bound on floating-point evaluation error
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("samples", f"{self.samples:,}"),
                ("max |f − g|", f"{self.max_abs_error:.3e}"),
                ("max |g|", f"{self.max_target_abs:.3e}"),
                ("relative error", f"{self.max_rel_error:.3e}"),
                ("tolerance", f"{self.tolerance:.1e}"),
                ("within tolerance", "yes" if self.passed else "NO")]
        if self.exact is not None:
            rows.append(("construction exact", "yes" if self.exact else "no (approximate)"))
        if self.certified is not None:
            rows.append(("certified on the whole box", "yes" if self.certified else "NO"))
            if self.certified_bound is not None:
                rows.append(("certified bound sup|f − g|", f"{self.certified_bound:.3e}"))
            if self.rounding_bound is not None:
                rows.append(("floating-point evaluation bound", f"{self.rounding_bound:.3e}"))
        rows += [("note", n) for n in self.notes]
        return rows

    def __str__(self) -> str:
        w = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{w}}  {v}" for k, v in self.rows())


def verify(net: nn.Module, target: MLPSpec | nn.Module, domain: Box | tuple | None = None,
           samples: int = 100_000, seed: int = 0, *, tolerance: float | None = None, certify: bool = False,
           batch_size: int | None = None) -> VerifyReport:
    """Compare ``net`` with ``target`` on ``samples`` points of ``domain`` (default: the domain the network was
    solved for, else ``[-1, 1]^n``).

    >>> from torch import nn
    >>> import onlynorm
    >>> g = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    >>> report = onlynorm.verify(onlynorm.reconstruct(g), g, samples=2000)
    >>> report.passed, report.max_rel_error < 1e-12
    (True, True)
    """
    spec = as_target(target, net.in_shape if isinstance(net, NormNet) else None)
    if samples < 1:
        raise OnlyNormError(f"expected samples >= 1, found {samples}")
    net_in = getattr(net, "in_features", None)
    if net_in is not None and net_in != spec.in_features:
        raise InvalidNetworkError(
            f"input dimension mismatch: the network takes {net_in} features but the target takes "
            f"{spec.in_features}; verify a network against the target it was built for")
    if isinstance(net, NormNet) and net.target_dims is not None and net.target_dims != spec.dims:
        raise InvalidNetworkError(
            f"the network was built for a target of dims {net.target_dims}, found a target of dims {spec.dims}")
    if domain is None and isinstance(net, NormNet) and "domain" in (net.meta.get("solve") or {}):
        domain = Box.from_dict(net.meta["solve"]["domain"])
    box = resolve_domain(domain, spec.in_features)
    param = next(iter(net.parameters()), None)
    dtype = param.dtype if param is not None else torch.float64
    device = param.device if param is not None else torch.device("cpu")
    tol = default_tolerance(dtype) if tolerance is None else float(tolerance)
    g64 = spec.to(dtype=torch.float64, device=device)
    if batch_size is None:
        widest = max([p.shape[0] for p in net.parameters() if p.ndim >= 1] + [spec.in_features])
        batch_size = max(256, min(samples, (32 << 20) // (8 * widest)))   # ~32 MB of activations per chunk
    x_all = box.sample(samples, seed=seed)
    was_training = net.training
    net.eval()
    max_err = torch.zeros((), dtype=torch.float64)
    max_g = torch.zeros((), dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, samples, batch_size):
                x = x_all[start:start + batch_size].to(device)
                if getattr(spec, "in_shape", None) is not None:    # CNN: flat box samples → images
                    x = x.reshape(x.shape[0], *spec.in_shape)
                fx = net(x.to(dtype)).to(torch.float64)
                gx = g64(x)
                if fx.shape != gx.shape:
                    raise InvalidNetworkError(
                        f"output shape mismatch: network gives {tuple(fx.shape[1:])}, target {tuple(gx.shape[1:])}")
                max_err = torch.maximum(max_err, (fx - gx).abs().max().cpu())
                max_g = torch.maximum(max_g, gx.abs().max().cpu())
    finally:
        net.train(was_training)
    max_abs, max_target = float(max_err), float(max_g)
    if not torch.isfinite(max_err):
        rel = float("inf")
    else:
        rel = max_abs / max_target if max_target > 0 else max_abs
    exact = (net.meta.get("solve") or {}).get("exact") if isinstance(net, NormNet) else None
    report = VerifyReport(max_abs_error=max_abs, max_rel_error=rel, max_target_abs=max_target, samples=samples,
                          tolerance=tol, passed=bool(rel <= tol), exact=exact)
    if isinstance(net, NormNet):
        report.notes += list((net.meta.get("solve") or {}).get("notes", []))
    if certify:
        from .certify import certify_equivalence

        result = certify_equivalence(net, spec, box)
        report.certified = result.certified
        report.certified_bound = result.bound
        report.rounding_bound = result.rounding_bound
        report.notes += list(result.notes)
    return report
