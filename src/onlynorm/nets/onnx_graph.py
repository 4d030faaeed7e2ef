"""The ONNX graph under construction and the lowering helpers stage types use in their ``lower_onnx``.

A stage's ONNX lowering lives in the stage class (beside its ``forward``); this module only knows how to write
standard operators: ``MatMul`` for a bias-free Linear, ``Conv`` (or, for float64, a lowered ``Slice``/``MatMul``/``Add``
form: onnxruntime's CPU provider runs ``Conv`` and ``AveragePool`` in float32 only), ``BatchNormalization`` with
the module's own running statistics and ``epsilon``, chains of ``Add``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidNetworkError, MissingDependencyError

__all__ = [
    "OnnxGraph",
    "onnx_module",
    "batchnorm",
    "matmul",
    "linear",
    "add_all",
    "pad",
    "windows",
    "conv",
    "conv_kernel",
    "relu_if",
    "slice_last",
    "keep_lead",
]


def onnx_module():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(
            "ONNX export needs the onnx package, found it not installed; install it with pip install 'onlynorm[onnx]'"
        ) from None
    return onnx


class OnnxGraph:
    """Nodes and initializers under construction, with unique names.

    ``lower`` replaces ``Conv`` and ``AveragePool`` by ``Pad``/``Slice``/``MatMul``/``Add`` (onnxruntime's CPU
    provider implements those two operators in float32 only, so float64 graphs use the lowered form).
    """

    def __init__(self, dtype: torch.dtype, lower: bool):
        self.onnx = onnx_module()
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


def batchnorm(g: OnnxGraph, bn: _BatchNorm, x: str) -> str:
    """``BatchNormalization`` with the module's own γ, β, running statistics and ``epsilon`` (inference form)."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise InvalidNetworkError(
            "ONNX export writes BatchNorm in inference form; found one normalising by batch statistics — call "
            "net.eval() (or set net.batch_statistics = False) before exporting"
        )
    # ONNX's epsilon attribute is a float32: eps goes into the variance instead, added in the network's own
    # dtype exactly as torch adds it (sqrt(var + eps)), and epsilon = 0 — so float64 stays exact.
    variance = bn.running_var + bn.eps if bn.eps else bn.running_var
    inputs = [
        x,
        g.const("gamma", bn.weight),
        g.const("beta", bn.bias),
        g.const("running_mean", bn.running_mean),
        g.const("running_var", variance),
    ]
    return g.node("BatchNormalization", inputs, "norm", epsilon=0.0)


def matmul(g: OnnxGraph, weight: torch.Tensor, x: str) -> str:
    """``x @ weight.T`` (a bias-free linear map)."""
    return g.node("MatMul", [x, g.const("weight_t", weight.detach().t())], "linear")


def linear(g: OnnxGraph, module: nn.Linear, x: str) -> str:
    """An ``nn.Linear``: ``x @ Wᵀ`` (``+ b`` when it has a bias)."""
    y = matmul(g, module.weight, x)
    return g.node("Add", [y, g.const("bias", module.bias)], "linear_bias") if module.bias is not None else y


def add_all(g: OnnxGraph, names: list[str], hint: str) -> str:
    """``names[0] + names[1] + ...`` as a chain of ``Add`` nodes (left to right, like the torch loops)."""
    total = names[0]
    for name in names[1:]:
        total = g.node("Add", [total, name], hint)
    return total


def pad(g: OnnxGraph, x: str, padding: list[int]) -> str:
    ph, pw = padding
    return g.node("Pad", [x, g.ints("pads", [0, 0, ph, pw, 0, 0, ph, pw])], "pad") if ph or pw else x


def windows(g: OnnxGraph, x: str, shape: torch.Size, kernel, stride, padding, dilation, axes: tuple[int, int]):
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


def conv(g: OnnxGraph, module: nn.Conv2d, x: str, shape: torch.Size) -> str:
    """An ``nn.Conv2d`` (zero padding; bias and groups as the module has them); ``shape`` is the input's."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise InvalidNetworkError(
            f"ONNX export writes zero-padded convolutions; found padding={module.padding!r}, "
            f"padding_mode={module.padding_mode!r}"
        )
    geometry = tuple((int(v[0]), int(v[1])) for v in (module.stride, module.padding, module.dilation))
    return conv_kernel(g, module.weight, x, shape, geometry, bias=module.bias, groups=int(module.groups))


def conv_kernel(
    g: OnnxGraph,
    kernel: torch.Tensor,
    x: str,
    shape: torch.Size,
    geometry: tuple[tuple[int, int], ...],
    *,
    bias: torch.Tensor | None = None,
    groups: int = 1,
) -> str:
    """A zero-padded convolution with ``kernel`` and ``(stride, padding, dilation)``; ``shape`` is the input's."""
    stride, padding, dilation = (list(v) for v in geometry)
    kernel_size = list(kernel.shape[2:])
    if not g.lower:
        inputs = [x, g.const("kernel", kernel)]
        if bias is not None:
            inputs.append(g.const("bias", bias))
        return g.node(
            "Conv",
            inputs,
            "conv",
            kernel_shape=kernel_size,
            strides=stride,
            dilations=dilation,
            pads=padding * 2,
            group=groups,
        )
    if groups != 1:
        raise InvalidNetworkError(
            f"the lowered (float64) ONNX form writes ungrouped convolutions; found groups={groups} — "
            "export with lower_conv=False"
        )
    # Σ over kernel offsets of (strided slice of the padded input, channels last) @ W[:, :, i, j]ᵀ
    channels_last = g.node("Transpose", [pad(g, x, padding)], "nhwc", perm=[0, 2, 3, 1])
    terms = [
        matmul(g, kernel[:, :, i, j], window)
        for (i, j), window in windows(g, channels_last, shape, kernel_size, stride, padding, dilation, axes=(1, 2))
    ]
    if bias is not None:
        terms.append(g.const("bias", bias))
    return g.node("Transpose", [add_all(g, terms, "conv_sum")], "conv", perm=[0, 3, 1, 2])


def relu_if(g: OnnxGraph, x: str, relu: bool) -> str:
    """``Relu(x)`` when the stage ends in a ReLU, else ``x``."""
    return g.node("Relu", [x]) if relu else x


def slice_last(g: OnnxGraph, x: str, part: slice) -> str:
    """``x[..., part]`` (a block of input features)."""
    return g.node(
        "Slice", [x, g.ints("start", [int(part.start)]), g.ints("end", [int(part.stop)]), g.ints("axis", [-1])], "block"
    )


def keep_lead(g: OnnxGraph, y: str, x: str, tail: list[int], drop: int = 1) -> str:
    """``y`` (computed on ``x`` flattened to rows) reshaped to ``x``'s leading sizes (all but its last ``drop``,
    read from ``Shape(x)``: they may be dynamic) followed by ``tail``."""
    lead = g.node("Slice", [g.node("Shape", [x], "shape"), g.ints("start", [0]), g.ints("end", [-drop])], "lead")
    if drop == 0:
        lead = g.node("Shape", [x], "shape")
    return g.node("Reshape", [y, g.node("Concat", [lead, g.ints("tail", tail)], "shape", axis=0)], "unflatten")
