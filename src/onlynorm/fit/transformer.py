"""LayerNorm-only fitting of transformers: :func:`with_layer_norms` (a pretrained sequence model as a
:class:`~onlynorm.nets.seqnet.SeqNet` whose only tunable parameters are its LayerNorms' ``γ, β``) and
:func:`fit_layer_norms` (the best LayerNorm ``γ, β`` of any SeqNet for a target on given inputs) — what LayerNorm
tuning of a language or vision transformer does. ``fit_norms``/``with_norms`` call these for sequence models.

Methods (:mod:`~onlynorm.fit.transformer_lm`): ``"gauss-newton"`` (Levenberg–Marquardt on all LayerNorm ``γ, β``,
normal equations formed in memory-capped chunks of forward-mode tangents, a step kept only if the held-out error
falls), ``"adam"`` (the gradient baseline on the same parameters, its last iterate), and ``"auto"`` (within
``budget_seconds``: an Adam warm start, LM, then Adam for the time left; the best held-out parameters; without a
budget, = gauss-newton). The held-out inputs are the last call of ``data`` (a list), or the last fifth of the
rows of a single tensor.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InvalidNetworkError, OnlyNormError
from ..nets.records import NetMeta
from ..nets.seqnet import ConstStage, LayerNormStage, PretrainedMap, SeqNet
from ..nets.stage import Stage
from ..targets.seqgraph import GNode
from ..targets.transformer import TransformerSpec
from .report import FitReport, Phase
from .transformer_lm import Problem, State, auto, levenberg_marquardt

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
    start = time.perf_counter()  # the budget covers the whole call
    deadline = None if budget_seconds is None else start + float(budget_seconds)
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

    def f(vec: torch.Tensor, *call: torch.Tensor) -> torch.Tensor:
        chunks = dict(zip(names, (c.reshape(params[n].shape) for n, c in zip(names, vec.split(sizes)))))
        return functional_call(net, chunks, call)

    problem = Problem(f, train, want_train, held, want_held)
    before = problem.held_error(theta)
    if deadline is not None:  # keep time for the end (a held-out evaluation, the report): no more than the set-up
        deadline -= time.perf_counter() - start
    if method == "adam":  # the baseline: its last iterate, as plain Adam returns it
        theta, iterations, history = _adam(theta, problem, steps or 3000, deadline, seed)
    else:
        state = State(theta.clone(), before)
        if method == "auto":
            auto(problem, state, steps or 100, deadline, seed=seed)
        else:
            levenberg_marquardt(problem, state, steps or 100, deadline, seed=seed)
        theta, iterations, history = state.theta, state.iterations, state.history
    with torch.no_grad():
        for n, c in zip(names, theta.split(sizes)):
            params[n].copy_(c.reshape(params[n].shape))
    after = problem.held_error(theta)
    phase = Phase(
        method,
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


def _adam(theta, problem, steps, deadline, seed):
    torch.manual_seed(seed)
    vec = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=1e-2)
    history: list[float] = []
    done = 0
    while done < steps:
        done += 1
        opt.zero_grad()
        got = [problem.f(vec, *c) for c in problem.train]
        loss = sum(((a - b) ** 2).mean() for a, b in zip(got, problem.want)) / len(problem.want)
        loss.backward()
        opt.step()
        if deadline is not None and time.perf_counter() > deadline:
            break
    return vec.detach(), done, history
