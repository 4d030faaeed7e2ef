"""Sampled (and, with ``certify=True``, rigorous) equivalence of a NormNet and its target on a box.

The sampled check evaluates both networks on ``samples`` points of the box — uniform, on faces, at and near
vertices — and reports ``max_abs_error = max_x max_j |f_j(x) − g_j(x)|`` and
``max_rel_error = max_abs_error / max_x max_j |g_j(x)|``. The target is always evaluated in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .certify import certifiability_problems, not_certifiable
from .constructions import get_construction
from .constructions.conv_memory import batch_size_for
from .constructions.memory import format_bytes, memory_limit
from .domain import Box, resolve_domain
from .errors import InvalidNetworkError, NotCertifiableError
from .nets.modules import inference_form
from .nets.normnet import NormNet
from .options import check_scalar, check_seed
from .targets.convert import as_target
from .targets.mlp import MLPSpec
from .targets.sklearn import compare_predictions, is_sklearn_mlp

__all__ = ["VerifyReport", "verify", "default_tolerance", "default_rounding_tolerance", "describe_box"]


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


def verify(
    net: nn.Module,
    target: MLPSpec | nn.Module,
    domain: Box | tuple | None = None,
    samples: int = 100_000,
    seed: int = 0,
    *,
    tolerance: float | None = None,
    certify: bool = False,
    batch_size: int | None = None,
) -> VerifyReport:
    """Compare ``net`` with ``target`` on ``samples`` points of ``domain`` (default: the domain the network was
    solved for, else ``[-1, 1]^n``).

    ``target`` may be a fitted scikit-learn ``MLPClassifier``/``MLPRegressor``: the network is compared with its
    pre-activation outputs as usual, and ``predict``/``predict_proba`` computed from the network's outputs are
    compared with the model's own (``prediction_agreement`` must be 1 and the probability error within the
    tolerance for the report to pass).

    >>> from torch import nn
    >>> import onlynorm
    >>> g = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    >>> report = onlynorm.verify(onlynorm.reconstruct(g), g, samples=2000)
    >>> report.passed, report.max_rel_error < 1e-12
    (True, True)
    """
    _check_network(net, certify)
    sklearn_model = target if is_sklearn_mlp(target) else None
    spec = as_target(target, net.in_shape if isinstance(net, NormNet) else None)
    samples = check_scalar(samples, "samples", int, min_val=1)
    seed = check_seed(seed)
    if tolerance is not None:
        tolerance = check_scalar(tolerance, "tolerance", float, min_val=0.0)
    if batch_size is not None:
        batch_size = check_scalar(batch_size, "batch_size", int, min_val=1)
    _check_samples_fit_memory(samples, spec.in_features)
    _check_built_for(net, spec)
    stored = net.meta.solve.domain if isinstance(net, NormNet) and net.meta.solve is not None else None
    box_source = "given"
    if domain is None or (stored is not None and domain is stored):
        box_source = "the default box" if stored is None else "the box the network was solved on, from its metadata"
        domain = stored if domain is None else domain
    box = resolve_domain(domain, spec.in_features)
    if box_source == "given" and stored is not None and _same_box(box, resolve_domain(stored, spec.in_features)):
        box_source = "given; the box the network was solved on"
    param = next(iter(net.parameters()), None)
    dtype = param.dtype if param is not None else torch.float64
    device = param.device if param is not None else torch.device("cpu")
    tol = default_tolerance(dtype) if tolerance is None else float(tolerance)
    g64 = spec.to(dtype=torch.float64, device=device)
    if batch_size is None:
        batch_size = _default_batch_size(net, spec, samples, dtype)
    x_all = box.sample(samples, seed=seed)
    max_abs, max_target, outputs = _sampled_errors(
        net,
        g64,
        x_all,
        getattr(spec, "in_shape", None),
        batch_size,
        dtype,
        device,
        keep_outputs=sklearn_model is not None,
    )
    if not math.isfinite(max_abs):
        rel = float("inf")
    else:
        rel = max_abs / max_target if max_target > 0 else max_abs
    solve = net.meta.solve if isinstance(net, NormNet) else None
    report = VerifyReport(
        max_abs_error=max_abs,
        max_rel_error=rel,
        max_target_abs=max_target,
        samples=samples,
        tolerance=tol,
        passed=bool(rel <= tol),
        exact=None if solve is None else solve.exact,
        box=f"{describe_box(box)} ({box_source})",
        dtype=str(dtype).removeprefix("torch."),
    )
    if solve is not None:
        report.notes += list(solve.notes)
    if sklearn_model is not None:
        _compare_sklearn(report, sklearn_model, x_all, torch.cat(outputs))
    if certify:
        assert isinstance(net, NormNet)
        report.rounding_tolerance = default_rounding_tolerance(dtype) if tolerance is None else tol
        _certify(report, net, spec, box)
    return report


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


def _same_box(a: Box, b: Box) -> bool:
    return bool(
        torch.equal(a.low.reshape(-1), b.low.reshape(-1)) and torch.equal(a.high.reshape(-1), b.high.reshape(-1))
    )


def _check_network(net: nn.Module, certify: bool) -> None:
    """Refuse what is not a module at all, and ``certify=True`` for a module onlynorm did not build: only a
    NormNet's construction knows what to prove."""
    if not isinstance(net, nn.Module):
        raise InvalidNetworkError(f"expected a torch module (a NormNet) to verify, found {type(net).__name__}")
    if certify and not isinstance(net, NormNet):
        raise InvalidNetworkError(
            f"certify=True needs a NormNet built by onlynorm (its construction knows what to prove), found "
            f"{type(net).__name__}; verify it without certify, or rebuild it with onlynorm.reconstruct"
        )


def _check_samples_fit_memory(samples: int, in_features: int) -> None:
    """Refuse, before drawing them, sample points that would take over half the memory limit: they are held at
    once (only the network's activations are streamed in batches)."""
    limit, source = memory_limit()
    if samples * in_features * 8 > limit // 2:
        raise InvalidNetworkError(
            f"samples: {samples:,} points of {in_features} coordinates need "
            f"{format_bytes(samples * in_features * 8)}, over half the memory limit {format_bytes(limit)} "
            f"({source}); use fewer samples (certify=True proves the whole box without sampling it)"
        )


def _check_built_for(net: nn.Module, spec) -> None:
    """Refuse a network whose input width, or recorded target dims, do not match the target's: comparing them
    would fail with a shape error, or silently compare two unrelated functions."""
    net_in = getattr(net, "in_features", None)
    if net_in is not None and net_in != spec.in_features:
        raise InvalidNetworkError(
            f"input dimension mismatch: the network takes {net_in} features but the target takes "
            f"{spec.in_features}; verify a network against the target it was built for"
        )
    if isinstance(net, NormNet) and net.target_dims is not None and net.target_dims != spec.dims:
        raise InvalidNetworkError(
            f"the network was built for a target of dims {net.target_dims}, found a target of dims {spec.dims}"
        )


def _default_batch_size(net: nn.Module, spec, samples: int, dtype: torch.dtype) -> int:
    """Points per forward pass when none is given: image networks stream so a batch's activations stay near
    512 MB; others take about 32 MB of activations per batch (at least 256 points)."""
    if isinstance(net, NormNet) and getattr(spec, "in_shape", None) is not None:
        return min(samples, batch_size_for(spec, dtype, 512 << 20))
    widest = max([p.shape[0] for p in net.parameters() if p.ndim >= 1] + [spec.in_features])
    return max(256, min(samples, (32 << 20) // (8 * widest)))


def _sampled_errors(
    net: nn.Module,
    g64,
    x_all: torch.Tensor,
    in_shape,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    keep_outputs: bool,
) -> tuple[float, float, list[torch.Tensor]]:
    """``(max |f − g|, max |g|, outputs)`` over the sample points, batch by batch: ``f`` (the network, in eval
    mode and its own dtype) and ``g64`` (the target in float64) see the same points on ``device``, reshaped to images when the
    target takes ``in_shape`` images. ``outputs`` holds ``f``'s outputs only if ``keep_outputs`` (a scikit-learn
    target's predict comparison needs them). The network is left exactly as it was (modes and eps included)."""
    max_err = torch.zeros((), dtype=torch.float64)
    max_g = torch.zeros((), dtype=torch.float64)
    outputs = []
    with inference_form(net):
        with torch.no_grad():
            for start in range(0, x_all.shape[0], batch_size):
                x = x_all[start : start + batch_size].to(device)
                if in_shape is not None:  # CNN: flat box samples → images
                    x = x.reshape(x.shape[0], *in_shape)
                fx = net(x.to(dtype)).to(torch.float64)
                gx = g64(x)
                if fx.shape != gx.shape:
                    raise InvalidNetworkError(
                        f"output shape mismatch: network gives {tuple(fx.shape[1:])}, target {tuple(gx.shape[1:])}"
                    )
                max_err = torch.maximum(max_err, (fx - gx).abs().max().cpu())
                max_g = torch.maximum(max_g, gx.abs().max().cpu())
                if keep_outputs:
                    outputs.append(fx.cpu())
    return float(max_err), float(max_g), outputs


def _certify(report: VerifyReport, net: NormNet, spec, box: Box) -> None:
    """Prove (or refute) the bound on the whole box with the network's own construction, filling the report's
    certificate fields. The network is certified in eval mode and left in the mode it was in."""
    if net.meta.method is None:
        raise InvalidNetworkError(
            "certify=True: the network records no construction method (a hand-built "
            "network); solve it with onlynorm.solve_norms first"
        )
    with inference_form(net):
        # one gate for every construction: the certificate covers the network as it evaluates, so statistics
        # that are not the fixed inference form, module state the views do not model (hooks, subclasses, biases,
        # eps) or non-finite parameters are refused, never half-certified
        problems = certifiability_problems(net)
        try:
            result = not_certifiable(problems) if problems else get_construction(net.method).certify(net, spec, box)
        except NotCertifiableError as exc:
            result = not_certifiable([str(exc)])
    report.certified = result.certified
    report.certified_bound = result.bound
    report.rounding_bound = result.rounding_bound
    report.notes += list(result.notes)


def _compare_sklearn(report: VerifyReport, model, x: torch.Tensor, outputs: torch.Tensor) -> None:
    """Fill the scikit-learn fields of ``report`` and fold them into ``passed``."""
    found = compare_predictions(model, x.numpy(), outputs.numpy())
    report.prediction_agreement = found["prediction_agreement"]
    report.max_proba_error = found["max_proba_error"]
    report.max_predict_error = found["max_predict_error"]
    ok = report.prediction_agreement in (None, 1.0)
    ok &= report.max_proba_error is None or report.max_proba_error <= report.tolerance
    scale = report.max_target_abs if report.max_target_abs > 0 else 1.0
    ok &= report.max_predict_error is None or report.max_predict_error / scale <= report.tolerance
    report.passed = bool(report.passed and ok)
    report.notes.append(
        "scikit-learn target: the reconstructed map is the network before its output activation; "
        "predict/predict_proba were compared on the same samples"
    )
