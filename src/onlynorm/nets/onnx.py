"""ONNX export of a :class:`~onlynorm.NormNet` (MLP and CNN stages), written directly with ``onnx.helper``.

Every stage kind maps to standard ONNX operators: frozen ``Linear`` → ``MatMul`` with the transposed weight,
frozen ``Conv2d`` → ``Conv``, every BatchNorm → ``BatchNormalization`` in its inference form (running mean 0,
running variance 1, ``epsilon = 0``, so it computes exactly ``γ ⊙ z + β`` and the tuned γ, β stay visible as the
``scale``/``B`` inputs), ReLU → ``Relu``, pooling → ``MaxPool``/``AveragePool``, ``Flatten`` → ``Flatten``, skip
connections → ``Add``. The graph keeps the network's dtype (float64 or float32) and a dynamic batch dimension.
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
from collections.abc import Callable
from typing import Any

import torch

from .. import _io
from ..errors import InvalidNetworkError, MissingDependencyError

__all__ = ["export_onnx", "OPSET"]

#: ONNX operator set written (BatchNormalization-15 accepts float64); IR version 8 goes with it.
OPSET = 17
IR_VERSION = 8

_EXPORTERS: dict[str, Callable[[_Graph, Any, str, torch.Tensor], str]] = {}


def _exports(kind: str):
    def register(fn):
        _EXPORTERS[kind] = fn
        return fn

    return register


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(
            "ONNX export needs the onnx package, found it not installed; install it with pip install 'onlynorm[onnx]'"
        ) from None
    return onnx


class _Graph:
    """Nodes and initializers under construction, with unique names.

    ``lower`` replaces ``Conv`` and ``AveragePool`` by ``Pad``/``Slice``/``MatMul``/``Add`` (onnxruntime's CPU
    provider implements those two operators in float32 only, so float64 graphs use the lowered form).
    """

    def __init__(self, dtype: torch.dtype, lower: bool):
        self.onnx = _onnx()
        self.dtype = dtype
        self.lower = lower
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, tensor: torch.Tensor) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(tensor.detach().cpu().contiguous().numpy(), name))
        return name

    def ints(self, hint: str, values: list[int]) -> str:
        return self.const(hint, torch.tensor(values, dtype=torch.int64))

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _batchnorm(g: _Graph, bn, x: str) -> str:
    inputs = [
        x,
        g.const("gamma", bn.weight),
        g.const("beta", bn.bias),
        g.const("running_mean", bn.running_mean),
        g.const("running_var", bn.running_var),
    ]
    return g.node("BatchNormalization", inputs, "norm", epsilon=float(bn.eps))


def _matmul(g: _Graph, weight: torch.Tensor, x: str) -> str:
    """``x @ weight.T`` (a bias-free ``nn.Linear``)."""
    return g.node("MatMul", [x, g.const("weight_t", weight.detach().t())], "linear")


def _sum(g: _Graph, names: list[str], hint: str) -> str:
    """``names[0] + names[1] + ...`` as a chain of ``Add`` nodes (left to right, like the torch loops)."""
    total = names[0]
    for name in names[1:]:
        total = g.node("Add", [total, name], hint)
    return total


def _pad(g: _Graph, x: str, padding: list[int]) -> str:
    ph, pw = padding
    return g.node("Pad", [x, g.ints("pads", [0, 0, ph, pw, 0, 0, ph, pw])], "pad") if ph or pw else x


def _windows(g: _Graph, x: str, shape: torch.Size, kernel, stride, padding, dilation, axes: tuple[int, int]):
    """Yield ``((i, j), slice)``: for every kernel offset, the strided slice of the padded input it multiplies."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    hp, wp = shape[-2] + 2 * ph, shape[-1] + 2 * pw
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            starts = [i * dh, j * dw]
            ends = [starts[0] + sh * (ho - 1) + 1, starts[1] + sw * (wo - 1) + 1]
            yield (
                (i, j),
                g.node(
                    "Slice",
                    [
                        x,
                        g.ints("starts", starts),
                        g.ints("ends", ends),
                        g.ints("axes", list(axes)),
                        g.ints("steps", [sh, sw]),
                    ],
                    "window",
                ),
            )


def _conv(g: _Graph, conv, x: str, shape: torch.Size) -> str:
    if not g.lower:
        return g.node(
            "Conv",
            [x, g.const("kernel", conv.weight)],
            "conv",
            kernel_shape=list(conv.kernel_size),
            strides=list(conv.stride),
            dilations=list(conv.dilation),
            pads=list(conv.padding) * 2,
        )
    # Σ over kernel offsets of (strided slice of the padded input, channels last) @ W[:, :, i, j]ᵀ
    channels_last = g.node("Transpose", [_pad(g, x, list(conv.padding))], "nhwc", perm=[0, 2, 3, 1])
    terms = [
        _matmul(g, conv.weight[:, :, i, j], window)
        for (i, j), window in _windows(
            g, channels_last, shape, conv.kernel_size, conv.stride, conv.padding, conv.dilation, axes=(1, 2)
        )
    ]
    return g.node("Transpose", [_sum(g, terms, "conv_sum")], "conv", perm=[0, 3, 1, 2])


@_exports("norm_linear")
def _norm_linear(g: _Graph, stage, x: str, example: torch.Tensor) -> str:
    z = _batchnorm(g, stage.norm, _matmul(g, stage.linear.weight, x))
    return g.node("Relu", [z]) if stage.relu else z


@_exports("norm_conv2d")
def _norm_conv2d(g: _Graph, stage, x: str, example: torch.Tensor) -> str:
    z = _batchnorm(g, stage.norm, _conv(g, stage.conv, x, example.shape))
    return g.node("Relu", [z]) if stage.relu else z


@_exports("op")
def _fixed_op(g: _Graph, stage, x: str, example: torch.Tensor) -> str:
    if stage.op == "relu":
        return g.node("Relu", [x])
    if stage.op == "flatten":
        return g.node("Flatten", [x], axis=1)
    pool = {"kernel_shape": list(stage.kernel), "strides": list(stage.stride), "pads": list(stage.padding) * 2}
    if stage.op == "maxpool":
        return g.node("MaxPool", [x], "maxpool", **pool)
    if not g.lower:
        return g.node("AveragePool", [x], "avgpool", count_include_pad=int(stage.count_include_pad), **pool)
    windows = [
        w
        for _, w in _windows(
            g,
            _pad(g, x, list(stage.padding)),
            example.shape,
            stage.kernel,
            stage.stride,
            stage.padding,
            (1, 1),
            axes=(2, 3),
        )
    ]
    total = _sum(g, windows, "pool_sum")  # lowered: window sums divided by each window's count
    ones = torch.ones(1, 1, *example.shape[-2:], dtype=example.dtype)
    # elements of the input under each window (padding excluded); with count_include_pad, the kernel's area
    counts = torch.nn.functional.avg_pool2d(ones, stage.kernel, stage.stride, stage.padding, divisor_override=1)
    if stage.count_include_pad:
        counts = torch.full_like(counts, float(stage.kernel[0] * stage.kernel[1]))
    return g.node("Div", [total, g.const("window_count", counts)], "avgpool")


@_exports("residual")
def _residual(g: _Graph, stage, x: str, example: torch.Tensor) -> str:
    h, value = x, example
    for inner in stage.body:
        h, value = _stage(g, inner, h, value)
    return g.node("Relu", [g.node("Add", [x, h], "skip")])


@_exports("residual_stream")
def _residual_stream(g: _Graph, stage, x: str, example: torch.Tensor) -> str:
    terms = []
    for branch, readout, part in zip(stage.branches, stage.readouts, stage.block_slices()):
        block = g.node(
            "Slice", [x, g.ints("start", [part.start]), g.ints("end", [part.stop]), g.ints("axis", [-1])], "block"
        )
        terms.append(_matmul(g, readout.weight, _norm_linear(g, branch, block, example[..., part])))
    z = _batchnorm(g, stage.norm, _sum(g, terms, "stream"))
    return g.node("Relu", [z]) if stage.relu else z


def _stage(g: _Graph, stage, x: str, example: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Export one stage reading ``x``; ``example`` is a value of ``x`` (for static shapes)."""
    exporter = _EXPORTERS.get(stage.kind)
    if exporter is None:
        raise InvalidNetworkError(
            f"stage kind {stage.kind!r} has no ONNX export; expected one of "
            f"{sorted(_EXPORTERS)} — export a network built by onlynorm's constructions"
        )
    return exporter(g, stage, x, example), stage(example)


def build_model(net, *, lower_conv: bool | None = None):
    """The ``onnx.ModelProto`` of ``net`` (in its inference form); see :func:`export_onnx`."""
    from .normnet import NormNet

    onnx = _onnx()
    if not isinstance(net, NormNet):
        raise InvalidNetworkError(f"expected a NormNet to export, found {type(net).__name__}")
    elem = {torch.float64: onnx.TensorProto.DOUBLE, torch.float32: onnx.TensorProto.FLOAT}.get(net.dtype)
    if elem is None:
        raise InvalidNetworkError(
            f"ONNX export supports float64 and float32 networks, found {net.dtype}; convert with net.to(torch.float64)"
        )
    if net.in_shape is not None:
        in_dims: list = ["batch", *net.in_shape]
    elif net.in_features is not None:
        in_dims = ["batch", net.in_features]
    else:
        raise InvalidNetworkError(
            "the network records no input size (meta 'target_dims' or 'in_shape'); build it "
            "with onlynorm.random_normnet/reconstruct or set net.meta['target_dims']"
        )
    lower = net.dtype == torch.float64 if lower_conv is None else bool(lower_conv)
    was_training = net.training
    net.eval()  # inference form: fixed statistics, eps = 0
    try:
        g = _Graph(net.dtype, lower)
        h, value = "input", torch.zeros(1, *in_dims[1:], dtype=net.dtype, device=net.device)
        with torch.no_grad():
            for stage in net.layers:
                h, value = _stage(g, stage, h, value)
    finally:
        net.train(was_training)
    g.nodes.append(onnx.helper.make_node("Identity", [h], ["output"], name="output"))
    out_dims = ["batch", *value.shape[1:]]
    graph = onnx.helper.make_graph(
        g.nodes,
        "onlynorm_normnet",
        [onnx.helper.make_tensor_value_info("input", elem, in_dims)],
        [onnx.helper.make_tensor_value_info("output", elem, out_dims)],
        initializer=g.initializers,
    )
    from .. import __version__

    model = onnx.helper.make_model(
        graph,
        producer_name="onlynorm",
        producer_version=__version__,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    model.doc_string = (
        f"onlynorm NormNet (method {net.method}): a frozen random network whose only tuned "
        "parameters are the BatchNormalization scale/B inputs"
    )
    onnx.helper.set_model_props(model, {"onlynorm.method": net.method, "onlynorm.target_dims": str(net.target_dims)})
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
        Not a NormNet, an unsupported dtype, or a stage kind without an exporter.
    """
    onnx = _onnx()
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
