"""Memory estimates for the convolutional constructions and a batch size for streaming evaluation.

For a target conv ``c_in → c_out`` with a ``k_h×k_w`` kernel and ``P`` output positions, both constructions have
``C = c_out·c_in·k_h·k_w`` branch channels (``conv``: one branch; ``conv_deep``: ``⌈c_in/k⌉`` blocks of
``N = c_out·k·k_h·k_w``). The memory of a run is

* **frozen weights**: ``conv`` ``C·c_in·k_h·k_w + c_out·C``; ``conv_deep`` ``C·k·k_h·k_w + c_out·C`` (grouped branches
  and the 1×1 readout), times the item size;
* **activations** of one image: about ``3·C·P`` values at the widest stage (conv output, BatchNorm, ReLU); the
  evaluation streams over batches, so this is paid per image of a batch;
* **the solve**: ``conv`` one ``C × C`` system (float32 LU + float64 work: ``16·C²`` bytes); ``conv_deep`` at most
  256 MiB of ``N × N`` float64 systems at a time, twice (matrix and LU).

``conv_tied`` (``deep, tied=1``): frozen weights ``N·k·k_h·k_w + c_out·N`` once per layer; ``γ, β`` and the BatchNorm
buffers of the ``C`` branch channels (``4·C`` values); one ``N × N`` float64 LU plus ``T`` right-hand sides
(``16·N² + 40·C`` bytes); activations streamed over chunks of blocks: one block's three tensors and the running sum
(``4·N·P`` values per image) at least, the whole ``3·C·P`` at most, else the chunk budget.

>>> import torch
>>> from onlynorm.targets.cnn import ConvNetSpec
>>> from onlynorm.targets.layers import Conv, Flatten
>>> w = torch.zeros(64, 64, 3, 3, dtype=torch.float64)
>>> spec = ConvNetSpec((Conv(w, torch.zeros(64, dtype=torch.float64), padding=(1, 1)), Flatten()), (64, 8, 8))
>>> estimate_conv_bytes(spec, torch.float64, "conv") // 2**30        # one 36,864² system
20
>>> estimate_conv_bytes(spec, torch.float64, "conv_deep") // 2**20   # 64 systems of 576²
344
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..targets.cnn import ConvNetSpec
from ..targets.layers import Conv, Layer, Linear, ResidualBlock

__all__ = [
    "LayerCost",
    "layer_costs",
    "estimate_conv_bytes",
    "activation_bytes_per_image",
    "batch_size_for",
    "conv_estimates",
]

_CHUNK = 256 << 20


@dataclass(frozen=True)
class LayerCost:
    """Sizes of one target Conv/Linear: channels, kernel, output positions."""

    c_out: int
    c_in: int
    kernel: int  # k_h·k_w
    positions: int  # output H'·W' (1 for Linear)


def layer_costs(spec: ConvNetSpec) -> list[LayerCost]:
    """One :class:`LayerCost` per Conv/Linear of ``spec`` (output sizes from one shape pass of the target)."""
    out: list[LayerCost] = []

    def run(layers: Iterable[Layer], x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResidualBlock):
                y = run(layer.body, x)
                run(layer.shortcut, x)
                x = torch.relu(y)
                continue
            y = layer.forward(x)
            if isinstance(layer, Conv):
                c_out, c_in, kh, kw = layer.weight.shape
                out.append(LayerCost(c_out, c_in, kh * kw, y.shape[2] * y.shape[3]))
            elif isinstance(layer, Linear):
                out.append(LayerCost(layer.weight.shape[0], layer.weight.shape[1], 1, 1))
            x = y
        return x

    with torch.no_grad():
        run(spec.layers, torch.zeros(1, *spec.in_shape, dtype=spec.dtype))
    return out


def estimate_conv_bytes(spec: ConvNetSpec, dtype: torch.dtype, method: str, block: int = 1, batch: int = 1) -> int:
    """Peak bytes of building, solving and evaluating (``batch`` images at a time) by ``method``."""
    item = torch.empty((), dtype=dtype).element_size()
    frozen, act, solve = 0, 0, 0
    for c in layer_costs(spec):
        C = c.c_out * c.c_in * c.kernel
        if method == "conv":
            frozen += C * c.c_in * c.kernel + c.c_out * C
            solve = max(solve, 16 * C * C)
        elif method == "conv_tied":
            k = min(block, c.c_in)
            N = c.c_out * k * c.kernel
            frozen += N * k * c.kernel + c.c_out * N + 4 * C
            solve = max(solve, 16 * N * N + 40 * C)
            act = max(
                act, min(3 * C, max(3 * N, _CHUNK // item // max(1, c.positions))) * c.positions + N * c.positions
            )
            continue
        else:
            k = min(block, c.c_in)
            N = c.c_out * k * c.kernel
            T = math.ceil(c.c_in / k)
            frozen += C * k * c.kernel + c.c_out * C
            solve = max(solve, 2 * min(T * N * N * 8, max(N * N * 8, _CHUNK)))
        act = max(act, 3 * C * c.positions)
    return frozen * item + max(solve, act * item * batch)


def activation_bytes_per_image(spec: ConvNetSpec, dtype: torch.dtype) -> int:
    """Bytes one image needs in a conv/conv_deep network of ``spec``: ``3·C·P`` values at the widest layer."""
    item = torch.empty((), dtype=dtype).element_size()
    widest = max((3 * c.c_out * c.c_in * c.kernel * c.positions for c in layer_costs(spec)), default=1)
    return widest * item


def batch_size_for(spec: ConvNetSpec, dtype: torch.dtype, budget: int = 1 << 30) -> int:
    """Images per batch so one batch's activations stay within ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, activation_bytes_per_image(spec, dtype)))


def conv_estimates(spec: ConvNetSpec, dtype: torch.dtype) -> dict[str, int]:
    """Estimated peak bytes of each CNN construction, keyed by the ``method=`` a user passes."""
    return {
        "width": estimate_conv_bytes(spec, dtype, "conv"),
        "deep": estimate_conv_bytes(spec, dtype, "conv_deep"),
        "deep, tied=1": estimate_conv_bytes(spec, dtype, "conv_tied"),
    }
