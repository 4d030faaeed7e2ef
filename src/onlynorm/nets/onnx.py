"""ONNX export of a :class:`~onlynorm.NormNet` (MLP and CNN stages), written directly with ``onnx.helper``.

Every stage type lowers itself (``Stage.lower_onnx``, beside its ``forward``) to standard ONNX operators: frozen
``Linear`` → ``MatMul`` (+ ``Add`` for a bias), frozen ``Conv2d`` → ``Conv``, every BatchNorm →
``BatchNormalization`` with the module's own statistics and ``epsilon`` (in the constructions' form it computes
exactly ``γ ⊙ z + β``, and the tuned γ, β stay visible as the ``scale``/``B`` inputs), ReLU → ``Relu``, pooling →
``MaxPool``/``AveragePool``, ``Flatten`` → ``Flatten``, skip connections (projection shortcuts included) → ``Add``.
A stage type without a lowering, or a module with forward hooks, is refused, never skipped. The graph keeps the network's dtype (float64 or float32) and a dynamic batch dimension.
The network is exported as ``net.eval()`` computes it, whatever its training flag.

Writing the graph directly (instead of tracing through ``torch.onnx``) keeps ``epsilon = 0`` and float64 exact and
needs only the ``onnx`` package (``pip install 'onlynorm[onnx]'``).

>>> import tempfile, pathlib, torch, onnx
>>> from torch import nn
>>> import onlynorm
>>> net = onlynorm.reconstruct(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double())
>>> path = pathlib.Path(tempfile.mkdtemp()) / "net.onnx"
>>> export_onnx(net, path)["inputs"]       # MatMul → BatchNormalization → Relu → MatMul → ... ; batch is dynamic
['batch', 3]
>>> onnx.checker.check_model(onnx.load(str(path)))
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import _io
from .._version import __version__
from ..errors import InvalidNetworkError
from .modules import inference_form
from .onnx_graph import OnnxGraph, onnx_module
from .stage import Stage
from .views import hook_problem

__all__ = ["export_onnx", "build_model", "OPSET"]

#: ONNX operator set written (BatchNormalization-15 accepts float64); IR version 8 goes with it.
OPSET = 17
IR_VERSION = 8


def _input_dims(net: Any) -> list:
    if net.in_shape is not None:
        return ["batch", *net.in_shape]
    if net.in_features is not None:
        return ["batch", net.in_features]
    raise InvalidNetworkError(
        "the network records no input size (meta 'target_dims' or 'in_shape'); build it "
        "with onlynorm.random_normnet/reconstruct or set net.meta['target_dims']"
    )


def _check_exportable(net: Any) -> None:
    """A NormNet-like module of stages, with no hooks anywhere (a hook would change what torch computes)."""
    layers = getattr(net, "layers", None)
    if isinstance(getattr(net, "graph", None), list):  # a SeqNet (nets.seqnet imports this module: no isinstance)
        raise InvalidNetworkError(
            "a transformer network (SeqNet) is exported by net.to_onnx (onlynorm.nets.onnx_seq), not build_model"
        )
    if not isinstance(net, nn.Module) or not isinstance(layers, nn.ModuleList):
        raise InvalidNetworkError(f"expected a NormNet to export, found {type(net).__name__}")
    for stage in layers:
        if not isinstance(stage, Stage):
            raise InvalidNetworkError(f"expected NormNet stages, found {type(stage).__name__}; it cannot be exported")
    for name, module in net.named_modules():
        problem = hook_problem(module)
        if problem is not None:
            raise InvalidNetworkError(f"{name or 'the network'}: {problem}, which ONNX export cannot write")


def build_model(net: Any, *, lower_conv: bool | None = None) -> Any:
    """The ``onnx.ModelProto`` of ``net`` (in its inference form); see :func:`export_onnx`."""
    onnx = onnx_module()
    _check_exportable(net)
    elem = {torch.float64: onnx.TensorProto.DOUBLE, torch.float32: onnx.TensorProto.FLOAT}.get(net.dtype)
    if elem is None:
        raise InvalidNetworkError(
            f"ONNX export supports float64 and float32 networks, found {net.dtype}; convert with net.to(torch.float64)"
        )
    in_dims = _input_dims(net)
    g = OnnxGraph(net.dtype, net.dtype == torch.float64 if lower_conv is None else bool(lower_conv))
    with inference_form(net), torch.no_grad():  # fixed statistics; the network is left as it was
        h, value = "input", torch.zeros(1, *in_dims[1:], dtype=net.dtype, device=net.device)
        for stage in net.layers:
            h, value = stage.lower_onnx(g, h, value), stage(value)
    g.nodes.append(onnx.helper.make_node("Identity", [h], ["output"], name="output"))
    graph = onnx.helper.make_graph(
        g.nodes,
        "onlynorm_normnet",
        [onnx.helper.make_tensor_value_info("input", elem, in_dims)],
        [onnx.helper.make_tensor_value_info("output", elem, ["batch", *value.shape[1:]])],
        initializer=g.initializers,
    )
    return make_model(
        graph,
        f"onlynorm NormNet (method {net.method}): a frozen random network whose only tuned "
        "parameters are the BatchNormalization scale/B inputs",
        {"onlynorm.method": net.method, "onlynorm.target_dims": str(net.target_dims)},
    )


def make_model(graph: Any, doc: str, props: dict[str, str]) -> Any:
    """The ONNX model around ``graph``: onlynorm as producer, opset :data:`OPSET`, IR :data:`IR_VERSION` (the
    oldest onnxruntime releases still read), the description and metadata a reader sees first."""
    onnx = onnx_module()
    model = onnx.helper.make_model(
        graph,
        producer_name="onlynorm",
        producer_version=__version__,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    model.doc_string = doc
    onnx.helper.set_model_props(model, props)
    return model


def export_onnx(net, path: str | os.PathLike, *, lower_conv: bool | None = None) -> dict[str, Any]:
    """Write ``net`` as an ONNX file at ``path`` (atomically; checked with ``onnx.checker`` first).

    Parameters
    ----------
    net
        A float64 or float32 :class:`~onlynorm.NormNet` (MLP, deep, lowrank, sparse or CNN stages).
    path
        Output file; its directory must exist. Nothing is written if the export fails.
    lower_conv
        Write convolutions and average pooling as ``Slice``/``MatMul``/``Add`` instead of ``Conv``/``AveragePool``.
        The default (``None``) does so for float64 networks only, because onnxruntime's CPU provider runs ``Conv``
        and ``AveragePool`` in float32 only.

    Returns
    -------
    dict
        Facts about the file: ``{"path", "opset", "nodes", "dtype", "inputs"}``.

    Raises
    ------
    MissingDependencyError
        The ``onnx`` package is not installed (``pip install 'onlynorm[onnx]'``).
    InvalidNetworkError
        Not a NormNet, an unsupported dtype, a stage type without an ONNX lowering, or a module with hooks.
    """
    if isinstance(getattr(net, "graph", None), list):  # a SeqNet: its own exporter (nets.onnx_seq)
        return net.to_onnx(path)
    onnx = onnx_module()
    model = build_model(net, lower_conv=lower_conv)
    onnx.checker.check_model(model, full_check=True)
    with _io.atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return {
        "path": str(path),
        "opset": OPSET,
        "nodes": len(model.graph.node),
        "dtype": str(net.dtype).removeprefix("torch."),
        "inputs": [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim],
    }
