"""LayerNorm-only fitting of transformers: :func:`with_layer_norms` (a pretrained sequence model as a
:class:`~onlynorm.nets.seqnet.SeqNet` whose only tunable parameters are its LayerNorms' ``γ, β``) and
:func:`fit_layer_norms` (the best LayerNorm ``γ, β`` of any SeqNet for a target on given inputs) — what LayerNorm
tuning of a language or vision transformer does. ``fit_norms``/``with_norms`` call these for sequence models.

Methods: ``"gauss-newton"`` (Levenberg–Marquardt on all LayerNorm ``γ, β``: Jacobians by ``torch.func.jacfwd``,
a step kept only if the held-out error falls), ``"adam"`` (the gradient baseline on the same parameters), and
``"auto"`` (= gauss-newton). The held-out inputs are the last call of ``data`` (a list), or the last fifth of the
rows of a single tensor.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacfwd

from ..errors import InvalidNetworkError, OnlyNormError
from ..nets.records import NetMeta
from ..nets.seqnet import ConstStage, LayerNormStage, PretrainedMap, SeqNet
from ..nets.stage import Stage
from ..targets.seqgraph import GNode
from ..targets.transformer import TransformerSpec
from .report import FitReport, Phase

__all__ = ["with_layer_norms", "fit_layer_norms", "METHODS"]

METHODS = ("auto", "gauss-newton", "adam")
Calls = list[tuple[torch.Tensor, ...]]


def with_layer_norms(model: nn.Module, example_input: Any) -> SeqNet:
    """``model`` (a transformer, eval mode) as a SeqNet computing exactly what it computes: its linear maps,
    embeddings and tables frozen (:class:`~onlynorm.nets.seqnet.PretrainedMap`), its LayerNorms tunable."""
    spec = TransformerSpec.from_module(model, example_input)
    stages: list[Stage] = []
    graph: list[GNode] = []
    for i, node in enumerate(spec.nodes):
        copy = GNode(node.op, node.name, node.target, list(node.args), dict(node.kwargs), dict(node.config))
        t = spec.tensors.get(i, {})
        c = node.config
        stage: Stage | None = None
        if node.op in ("linear", "embedding", "table"):
            weight = t["weight"] if node.op != "table" else t["value"]
            stage = PretrainedMap(node.op, list(weight.shape), "bias" in t, dtype=spec.dtype)
            with torch.no_grad():
                stage.weight.copy_(weight)
                if stage.bias is not None:
                    stage.bias.copy_(t["bias"])
        elif node.op == "layer_norm":
            stage = LayerNormStage(c["shape"], c["eps"], c["affine"], c["bias"], dtype=spec.dtype)
            with torch.no_grad():
                for key in ("weight", "bias"):
                    if getattr(stage.norm, key) is not None and key in t:
                        getattr(stage.norm, key).copy_(t[key])
        elif node.op == "const":
            stage = ConstStage(c["shape"], c["dtype"], dtype=spec.dtype)
            with torch.no_grad():
                stage.get_buffer("value").copy_(t["value"])
        if stage is not None:
            copy.config["stage"] = len(stages)
            stages.append(stage)
        graph.append(copy)
    meta = NetMeta(method="pretrained-transformer", target_parameters=spec.num_parameters, extra={"target": spec.name})
    return SeqNet(stages, graph, spec.inputs, meta=meta)


def _split(data: Any) -> tuple[Calls, Calls]:
    calls = list(data) if isinstance(data, list) else [data]
    calls = [tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in calls]
    if not calls or not all(isinstance(t, torch.Tensor) for c in calls for t in c):
        raise OnlyNormError("data: expected a tensor of inputs, a tuple of tensors, or a list of those")
    if len(calls) >= 2:
        return calls[:-1], calls[-1:]
    rows = int(calls[0][0].shape[0])
    if rows < 2:
        raise OnlyNormError("data: a single input needs at least 2 rows (a fifth is held out)")
    held = max(1, rows // 5)
    return [tuple(t[: rows - held] for t in calls[0])], [tuple(t[rows - held :] for t in calls[0])]


def _layer_norm_names(net: SeqNet) -> list[str]:
    owned = {id(p) for ln in net.layer_norms() for p in (ln.weight, ln.bias) if p is not None}
    return [name for name, p in net.named_parameters() if id(p) in owned]


def fit_layer_norms(
    frozen: SeqNet,
    target: nn.Module,
    data: Any,
    *,
    method: str = "auto",
    budget_seconds: float | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> tuple[SeqNet, FitReport]:
    """Fit only the LayerNorm ``γ, β`` of ``frozen`` so it computes ``target`` on ``data``; returns a new network
    and the report (held-out relative RMS error before and after)."""
    if method not in METHODS:
        raise OnlyNormError(f"method: expected one of {', '.join(METHODS)} for a transformer network, found {method!r}")
    if not isinstance(target, nn.Module):
        raise InvalidNetworkError(f"target: expected the torch model, found {type(target).__name__}")
    train, held = _split(data)
    net: SeqNet = frozen.clone()  # type: ignore[assignment]
    names = _layer_norm_names(net)
    if not names:
        raise InvalidNetworkError("the network has no LayerNorm with γ, β to fit")
    with torch.no_grad():
        want_train = [target(*c).detach() for c in train]
        want_held = [target(*c).detach() for c in held]
    params = dict(net.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def outputs(vec: torch.Tensor, calls: Calls) -> list[torch.Tensor]:
        chunks = dict(zip(names, (c.reshape(params[n].shape) for n, c in zip(names, vec.split(sizes)))))
        return [functional_call(net, chunks, c) for c in calls]

    def error(vec: torch.Tensor, calls: Calls, want: list[torch.Tensor]) -> float:
        with torch.no_grad():
            got = outputs(vec, calls)
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, want))
        den = sum(float((b**2).sum()) for b in want)
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    start = time.perf_counter()
    deadline = None if budget_seconds is None else start + float(budget_seconds)
    before = error(theta, held, want_held)
    if method == "adam":
        theta, iterations, history = _adam(theta, outputs, train, want_train, steps or 3000, deadline, seed)
    else:
        theta, iterations, history = _levenberg_marquardt(
            theta, outputs, error, train, want_train, held, want_held, steps or 100, deadline
        )
    with torch.no_grad():
        for n, c in zip(names, theta.split(sizes)):
            params[n].copy_(c.reshape(params[n].shape))
    after = error(theta, held, want_held)
    name = "adam" if method == "adam" else "gauss-newton"
    phase = Phase(
        name,
        before,
        after,
        time.perf_counter() - start,
        iterations,
        history=history,
        details={"parameters": int(theta.numel()), "layer_norms": len(net.layer_norms())},
    )
    report = FitReport(
        method=method,
        train_samples=sum(int(c[0].shape[0]) for c in train),
        held_out_samples=sum(int(c[0].shape[0]) for c in held),
        initial_error=before,
        phases=[phase],
        exact=after <= 1e-9,
        notes=["LayerNorm γ, β only"],
    )
    net.meta = net.meta.replace(fit=report)
    return net, report


def _adam(theta, outputs, train, want, steps, deadline, seed):
    torch.manual_seed(seed)
    vec = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=1e-2)
    history: list[float] = []
    done = 0
    while done < steps:
        done += 1
        opt.zero_grad()
        got = outputs(vec, train)
        loss = sum(((a - b) ** 2).mean() for a, b in zip(got, want)) / len(want)
        loss.backward()
        opt.step()
        if deadline is not None and time.perf_counter() > deadline:
            break
    return vec.detach(), done, history


def _levenberg_marquardt(theta, outputs, error, train, want, held, want_held, steps, deadline):
    def residual(vec):
        return torch.cat([(a - b).reshape(-1) for a, b in zip(outputs(vec, train), want)])

    damping, best = 1e-3, error(theta, held, want_held)
    history: list[float] = []
    done = 0
    while done < steps:
        done += 1
        r = residual(theta).detach()
        jac = jacfwd(residual)(theta).detach()
        jtj, jtr = jac.T @ jac, jac.T @ r
        accepted = False
        for _ in range(8):
            step = torch.linalg.solve(jtj + damping * torch.diag(jtj.diagonal().clamp_min(1e-12)), -jtr)
            trial = theta + step
            err = error(trial, held, want_held)
            if err < best:
                theta, best, accepted = trial, err, True
                damping = max(damping / 3, 1e-9)
                history.append(err)
                break
            damping *= 4
        if not accepted or best <= 1e-13 or (deadline is not None and time.perf_counter() > deadline):
            break
    return theta, done, history
