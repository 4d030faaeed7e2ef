"""What :func:`onlynorm.verify` reports: :class:`VerifyReport` (sampled errors, the certificate's bounds and outcome
``exact`` / ``bounded`` / ``not proven``, scikit-learn agreement) and the default tolerances it is judged by."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .domain import Box

__all__ = [
    "VerifyReport",
    "default_tolerance",
    "default_rounding_tolerance",
    "describe_box",
    "EXACT",
    "BOUNDED",
    "NOT_PROVEN",
]


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance a reconstruction in ``dtype`` is expected to meet: 1e-9 in float64, 1e-4 in float32."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def default_rounding_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the *total proven bound* (exact-arithmetic distance plus floating-point evaluation
    error) of a network in ``dtype``, when no tolerance is given: ``max(default_tolerance, √u)`` — 1.5e-8 in
    float64, 2.4e-4 in float32.

    The certificate's rounding bound is a worst case (``γ_n`` per dot product, every error aligned), so even an
    exact reconstruction evaluated in ``dtype`` carries a bound of ``u × κ × max|g|``, ``κ`` the network's
    evaluation condition (:attr:`VerifyReport.condition`, printed): the magnitudes its arithmetic handles relative
    to its output — large for the constructions, whose offsets ``β`` cancel. Accepting up to ``√u`` (``κ ≤ 1/√u``)
    means at least half of the format's digits survive the worst case; the exact-arithmetic distance alone must
    still meet :func:`default_tolerance`."""
    return max(default_tolerance(dtype), (float(torch.finfo(dtype).eps) / 2) ** 0.5)


#: the outcomes of a certified verification (:attr:`VerifyReport.outcome`)
EXACT, BOUNDED, NOT_PROVEN = "exact", "bounded", "not proven"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``passed`` means ``max_rel_error ≤ tolerance`` on the samples; with
    ``certify=True``, :attr:`proven` says the certificate holds AND its bounds meet the same tolerance, and
    :attr:`ok` (what ``onlynorm verify`` exits 0 on) requires both."""

    max_abs_error: float
    max_rel_error: float
    max_target_abs: float
    samples: int
    tolerance: float
    passed: bool
    exact: bool | None = None  # what the construction claims (False for least-squares)
    certified: bool | None = None  # set by certify=True
    certified_bound: float | None = None  # absolute bound on sup_D |f − g| in exact arithmetic
    prediction_agreement: float | None = None  # scikit-learn classifier targets: fraction of equal predict()
    max_proba_error: float | None = None  # scikit-learn classifier targets: max |Δ predict_proba|
    max_predict_error: float | None = None  # scikit-learn regressor targets: max |Δ predict|
    rounding_bound: float | None = None  # separate bound on floating-point evaluation error
    notes: list[str] = field(default_factory=list)
    rounding_tolerance: float | None = None  # relative tolerance of the total proven bound (certify=True)
    box: str | None = None  # the box verified (and certified on), and where it came from
    dtype: str | None = None  # the network's dtype (its evaluation is bounded in it)

    @property
    def proven(self) -> bool | None:
        """:attr:`outcome` is ``"exact"``: ``certified``, ``certified_bound / max|g| ≤ tolerance`` (the network
        equals the target in exact arithmetic, up to the solve's tolerance) and ``(certified_bound +
        rounding_bound) / max|g| ≤ rounding_tolerance`` (so does its floating-point evaluation;
        ``rounding_tolerance = tolerance`` when a tolerance is given, :func:`default_rounding_tolerance`
        otherwise). Relative to the largest sampled ``|g|``, a lower bound of ``sup_D |g|``, so the claim is
        conservative. ``None`` if not certified."""
        if self.certified is None:
            return None
        return self.outcome == EXACT

    @property
    def outcome(self) -> str | None:
        """``"exact"`` (proven within the tolerances), ``"bounded"`` (the certificate holds — ``sup_D |f − g|``
        is at most the printed bounds — but they exceed the tolerance: *not* a proof of equality) or
        ``"not proven"`` (no bound holds on the whole box); ``None`` without ``certify=True``."""
        if self.certified is None:
            return None
        if not self.certified or self.certified_bound is None or self.rounding_bound is None:
            return NOT_PROVEN
        total = self.certified_bound + self.rounding_bound
        if not math.isfinite(total):
            return NOT_PROVEN
        scale = self.max_target_abs or 1.0
        within = self.certified_bound <= self.tolerance * scale and total <= self._total_tolerance() * scale
        return EXACT if within else BOUNDED

    def _total_tolerance(self) -> float:
        return self.tolerance if self.rounding_tolerance is None else self.rounding_tolerance

    @property
    def condition(self) -> float | None:
        """The network's evaluation condition ``κ = rounding_bound / (u · max|g|)``: how many units of roundoff of
        its dtype the proven floating-point evaluation error amounts to, relative to the output."""
        if self.rounding_bound is None or self.dtype is None or not math.isfinite(self.rounding_bound):
            return None
        u = float(torch.finfo(getattr(torch, self.dtype)).eps) / 2
        return self.rounding_bound / (u * (self.max_target_abs or 1.0))

    @property
    def ok(self) -> bool:
        """Within tolerance on the samples, and proven ``exact`` if a certificate was asked for."""
        return self.passed and self.proven is not False

    def failure(self) -> str | None:
        """Why the verification is not :attr:`ok`, in one line (``None`` when it is)."""
        if not self.passed:
            return f"sampled relative error {self.max_rel_error:.3e} exceeds the tolerance {self.tolerance:.1e}"
        if self.outcome == NOT_PROVEN:
            keys = ("switch off", "overflow", "not certifiable", "non-finite")
            first = next((n for n in self.notes if any(k in n for k in keys)), None)
            why = f": {first}" if first else " (see the notes)"
            return f"not proven: the certificate does not hold on the whole box{why}"
        if self.outcome == BOUNDED:
            assert self.certified_bound is not None and self.rounding_bound is not None
            scale = self.max_target_abs or 1.0
            if self.certified_bound > self.tolerance * scale:
                return (
                    f"bounded, not exact: the certified bound {self.certified_bound:.3e} (exact arithmetic) "
                    f"exceeds the tolerance {self.tolerance:.1e} × max|g| {self.max_target_abs:.3e}"
                )
            return (
                f"bounded, not exact: the certified bound {self.certified_bound:.3e} + rounding bound "
                f"{self.rounding_bound:.3e} exceeds the tolerance {self._total_tolerance():.1e} × max|g| "
                f"{self.max_target_abs:.3e}"
            )
        return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "proven": self.proven,
            "outcome": self.outcome,
            "condition": self.condition,
            "ok": self.ok,
            "reason": self.failure(),
        }

    def rows(self) -> list[tuple[str, str]]:
        rows = [("box", self.box)] if self.box is not None else []
        rows += [
            ("samples", f"{self.samples:,}"),
            ("max |f − g|", f"{self.max_abs_error:.3e}"),
            ("max |g|", f"{self.max_target_abs:.3e}"),
            ("relative error", f"{self.max_rel_error:.3e}"),
            ("tolerance", f"{self.tolerance:.1e}"),
            ("within tolerance", "yes" if self.passed else "NO"),
        ]
        if self.prediction_agreement is not None:
            rows.append(("scikit-learn predict agreement", f"{self.prediction_agreement:.2%}"))
        if self.max_proba_error is not None:
            rows.append(("scikit-learn max |Δ predict_proba|", f"{self.max_proba_error:.3e}"))
        if self.max_predict_error is not None:
            rows.append(("scikit-learn max |Δ predict|", f"{self.max_predict_error:.3e}"))
        if self.exact is not None:
            rows.append(("construction exact", "yes" if self.exact else "no (approximate)"))
        if self.certified is not None:
            rows.append(("a bound holds on the whole box", "yes" if self.certified else "NO"))
            if self.certified_bound is not None:
                rows.append(("certified bound sup|f − g| (exact arithmetic)", f"{self.certified_bound:.3e}"))
            if self.rounding_bound is not None:
                rows.append(("floating-point evaluation bound", f"{self.rounding_bound:.3e}"))
            if self.condition is not None:
                rows.append(("evaluation condition κ (bound / u·max|g|)", f"{self.condition:.2e}"))
            rows.append(("tolerance of the total bound", f"{self._total_tolerance():.2e}"))
            rows.append(("outcome", str(self.outcome)))
            reason = self.failure()
            if reason is not None:
                rows.append(("why", reason))
        rows += [("note", n) for n in self.notes]
        return rows

    def __str__(self) -> str:
        w = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{w}}  {v}" for k, v in self.rows())


def describe_box(box: Box) -> str:
    """``[0, 1]^10`` for a box of equal bounds, else the ranges of its lows and highs."""
    lo, hi = box.low.reshape(-1), box.high.reshape(-1)
    n = lo.numel()
    if bool((lo == lo[0]).all()) and bool((hi == hi[0]).all()):
        return f"[{float(lo[0]):g}, {float(hi[0]):g}]^{n}"
    return (
        f"{n} coordinates, low in [{float(lo.min()):g}, {float(lo.max()):g}], "
        f"high in [{float(hi.min()):g}, {float(hi.max()):g}]"
    )
