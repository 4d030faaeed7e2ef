"""Sampled (and, with ``certify=True``, rigorous) equivalence of a NormNet and its target on a box.

The sampled check evaluates both networks on ``samples`` points of the box — uniform, on faces, at and near
vertices — and reports ``max_abs_error = max_x max_j |f_j(x) − g_j(x)|`` and
``max_rel_error = max_abs_error / max_x max_j |g_j(x)|``. The target is always evaluated in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .certify import certifiability_problems, not_certifiable
from .constructions import get_construction
from .constructions.conv_memory import batch_size_for
from .constructions.memory import format_bytes, memory_limit
from .domain import Box, resolve_domain
from .errors import InvalidNetworkError, InvalidOptionError, NotCertifiableError
from .nets.modules import inference_form
from .nets.normnet import NormNet
from .nets.seqnet import SeqNet
from .options import check_scalar, check_seed
from .targets.convert import as_target
from .targets.mlp import MLPSpec
from .targets.sklearn import compare_predictions, is_sklearn_mlp
from .verify_report import VerifyReport, default_rounding_tolerance, default_tolerance, describe_box

__all__ = ["VerifyReport", "verify", "default_tolerance", "default_rounding_tolerance", "describe_box"]


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
    inputs: Any = None,
) -> VerifyReport:
    """Compare ``net`` with ``target`` on ``samples`` points of ``domain`` (default: the domain the network was
    solved for, else ``[-1, 1]^n``).

    ``target`` may be a fitted scikit-learn ``MLPClassifier``/``MLPRegressor``: the network is compared with its
    pre-activation outputs as usual, and ``predict``/``predict_proba`` computed from the network's outputs are
    compared with the model's own (``prediction_agreement`` must be 1 and the probability error within the
    tolerance for the report to pass).

    ``inputs`` compares on given inputs instead of box samples: a tensor (one batch, e.g. rows of features or
    ``(batch, length)`` token ids), a tuple of tensors (one call with several arguments), or a list of those
    (several calls — sequences of different lengths). A transformer network (:class:`~onlynorm.nets.seqnet.SeqNet`)
    is verified this way only; its ``certify=True`` is refused (softmax and LayerNorm are not piecewise linear).

    >>> from torch import nn
    >>> import onlynorm
    >>> g = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    >>> report = onlynorm.verify(onlynorm.reconstruct(g), g, samples=2000)
    >>> report.passed, report.max_rel_error < 1e-12
    (True, True)
    """
    _check_network(net, certify)
    if inputs is not None or isinstance(net, SeqNet):
        return verify_on_inputs(net, target, inputs, tolerance, certify)
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


def _same_box(a: Box, b: Box) -> bool:
    return bool(
        torch.equal(a.low.reshape(-1), b.low.reshape(-1)) and torch.equal(a.high.reshape(-1), b.high.reshape(-1))
    )


def verify_on_inputs(
    net: nn.Module, target: Any, inputs: Any, tolerance: float | None = None, certify: bool = False
) -> VerifyReport:
    """:func:`verify` on given inputs: each call's inputs in the network's own dtype (token ids as they are); the
    target in its own dtype when it is a torch module, else as a float64 spec."""
    if certify:
        if isinstance(net, SeqNet):
            raise NotCertifiableError(
                "certify=True: a transformer network is not piecewise linear (softmax and LayerNorm), so the "
                "certificate has no model of it; verify it on sampled inputs (inputs=...)"
            )
        raise InvalidOptionError("certify=True proves the whole box and takes no inputs=; drop one of them")
    if inputs is None:
        raise InvalidOptionError(
            "inputs: a transformer network is verified on given inputs (token ids cannot come from a box); pass "
            "inputs=<a tensor, a tuple of tensors, or a list of those>"
        )
    calls = [
        tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in (inputs if isinstance(inputs, list) else [inputs])
    ]
    if not calls or not all(isinstance(t, torch.Tensor) for c in calls for t in c) or not all(calls):
        raise InvalidOptionError("inputs: expected a tensor, a tuple of tensors, or a non-empty list of those")
    if tolerance is not None:
        tolerance = check_scalar(tolerance, "tolerance", float, min_val=0.0)
    param = next(iter(net.parameters()), None)
    dtype = param.dtype if param is not None else torch.float64
    g = target if isinstance(target, nn.Module) else None
    spec = None if g is not None else as_target(target, getattr(net, "in_shape", None)).to(dtype=torch.float64)
    max_err = max_g = 0.0
    with inference_form(net), torch.no_grad():
        for args in calls:
            own = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
            fx = _first_tensor(net(*own), "network")
            gx = _first_tensor(g(*args) if g is not None else spec(*(t.double() for t in args)), "target")  # type: ignore[misc]
            if fx.shape != gx.shape:
                raise InvalidNetworkError(
                    f"output shape mismatch: network gives {tuple(fx.shape)}, target {tuple(gx.shape)}"
                )
            if fx.numel():
                max_err = max(max_err, float((fx.double() - gx.double()).abs().max()))
                max_g = max(max_g, float(gx.double().abs().max()))
    rel = float("inf") if not math.isfinite(max_err) else (max_err / max_g if max_g > 0 else max_err)
    tol = default_tolerance(dtype) if tolerance is None else float(tolerance)
    solve = net.meta.solve if isinstance(net, NormNet) else None
    report = VerifyReport(
        max_abs_error=max_err,
        max_rel_error=rel,
        max_target_abs=max_g,
        samples=sum(int(c[0].shape[0]) if c[0].dim() else 1 for c in calls),
        tolerance=tol,
        passed=bool(rel <= tol),
        exact=None if solve is None else solve.exact,
    )
    if solve is not None:
        report.notes += list(solve.notes)
    return report


def _first_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise InvalidNetworkError(f"the {what} returned {type(value).__name__}, expected a tensor")
    return value


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
