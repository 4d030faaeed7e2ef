"""Does a frozen :class:`~onlynorm.nets.seqnet.SeqNet` fit a sequence model? The checks that
:func:`onlynorm.solve_norms` and :func:`onlynorm.capacity` make before they touch a transformer network.

A SeqNet's architecture is its graph: every node's op, function, arguments and configuration (shapes of the linear
maps, LayerNorms, tables and buffers), the buffers' values (masks are part of the architecture, not tunable), and
the input signature. The frozen tensors depend only on these and the seed
(:func:`onlynorm.constructions.transformer.build_seqnet`), so a network built for one model serves every model of
the same architecture: :func:`check_architecture` refuses anything else in one line naming the first node that
differs.

>>> import torch
>>> from torch import nn
>>> from onlynorm.targets.transformer import TransformerSpec
>>> import onlynorm
>>> x = torch.zeros(1, 2, 4, dtype=torch.float64)
>>> g = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)).double()
>>> net = onlynorm.random_normnet(g, example_input=x)
>>> other = TransformerSpec.from_module(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 5)).double(), x)
>>> check_architecture(net, other)  # doctest: +ELLIPSIS
Traceback (most recent call last):
onlynorm.errors.InvalidNetworkError: the frozen network was built for another architecture: node 2 ('1') is ...
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidNetworkError
from ..nets.factorised import FactorisedLinear
from ..nets.seqnet import SeqNet
from ..nets.stage import dtype_name
from ..targets.transformer import TransformerSpec

__all__ = ["check_architecture", "factorised_maps"]

_REBUILD = "build a network for this model with onlynorm.random_normnet(model, example_input=...)"


def _shape(node_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node_config.items() if k != "stage"}


def check_architecture(frozen: SeqNet, spec: TransformerSpec) -> None:
    """Refuse (:class:`InvalidNetworkError`, one line) a ``spec`` whose graph, buffers, input signature or dtype
    differ from the ones ``frozen`` was built for."""
    if frozen.meta.method != "transformer" or not any(isinstance(s, FactorisedLinear) for s in frozen.layers):
        raise InvalidNetworkError(
            f"expected a frozen transformer network (onlynorm.random_normnet(model, example_input=...)), found one of "
            f"method {frozen.meta.method!r} without factorised maps (a with_norms network: fit it with "
            "onlynorm.fit_norms)"
        )
    if frozen.dtype != spec.dtype:
        raise InvalidNetworkError(
            f"the frozen network is {dtype_name(frozen.dtype)}, the model {dtype_name(spec.dtype)}; convert the model "
            f"with .to(torch.{dtype_name(frozen.dtype)}) or build a network in its dtype"
        )
    if [dict(i) for i in spec.inputs] != frozen.inputs:
        raise InvalidNetworkError(
            f"the frozen network takes inputs {frozen.inputs}, the model's example is {spec.inputs}; pass an "
            "example_input like the one it was built with"
        )
    if len(spec.nodes) != len(frozen.graph):
        raise InvalidNetworkError(
            f"the frozen network was built for another architecture: its graph has {len(frozen.graph)} nodes, the "
            f"model's {len(spec.nodes)}; {_REBUILD}"
        )
    for i, (mine, theirs) in enumerate(zip(frozen.graph, spec.nodes)):
        same = (mine.op, mine.target, mine.args, mine.kwargs) == (theirs.op, theirs.target, theirs.args, theirs.kwargs)
        if not same or _shape(mine.config) != _shape(theirs.config):
            raise InvalidNetworkError(
                f"the frozen network was built for another architecture: node {i} ({theirs.name!r}) is "
                f"{mine.op} {_shape(mine.config)}, the model's is {theirs.op} {_shape(theirs.config)}; {_REBUILD}"
            )
        if mine.op == "const":  # a buffer (a mask) is copied at build time: another value is another architecture
            value = frozen.layers[int(mine.config["stage"])].get_buffer("value")
            theirs_value = spec.tensors[i]["value"].to(device=value.device, dtype=value.dtype)
            if not torch.equal(value, theirs_value):
                raise InvalidNetworkError(
                    f"the model's buffer {theirs.name!r} differs from the one the frozen network copied; {_REBUILD}"
                )


def factorised_maps(
    frozen: SeqNet, spec: TransformerSpec
) -> list[tuple[str, FactorisedLinear, torch.Tensor, torch.Tensor | None]]:
    """``(label, stage, W, b)`` of every linear map of ``spec`` and the factorised stage of ``frozen`` that realises
    it (``W`` as ``(out, in)``, :meth:`TransformerSpec.linear_maps`); call :func:`check_architecture` first."""
    maps = {i: (w, b) for i, w, b in spec.linear_maps()}
    out = []
    for i, node in enumerate(frozen.graph):
        stage = frozen.layers[int(node.config["stage"])] if "stage" in node.config else None
        if isinstance(stage, FactorisedLinear):
            w, b = maps[i]
            out.append((f"{node.name} ({stage.in_features}→{stage.out_features})", stage, w, b))
    return out
