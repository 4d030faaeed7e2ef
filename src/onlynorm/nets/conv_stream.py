"""``ConvStream``: one target conv (or Linear) of the deep convolutional construction — grouped branch convs on
blocks of input channels, a BatchNorm2d, ReLU (or sign-paired ReLUs), a frozen 1×1 readout and an output BatchNorm2d."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidNetworkError
from .modules import frozen_module, make_batchnorm, normalize, paired_relu
from .onnx_graph import OnnxGraph, batchnorm, conv, conv_kernel
from .stage import Stage, StageLayout, register_stage
from .stream import block_sizes
from .views import StreamView, read_conv, read_norm

__all__ = ["ConvStream", "ConvStreamShape", "grouped_conv"]


class ConvStreamShape:
    """What a convolutional stream's size and file entry are made of, shared by :class:`ConvStream` and the tied
    stream (``nets.tied_conv``): the JSON config, the normalization widths, the ReLU units per position."""

    in_channels: int
    out_channels: int
    channels: int
    block: int
    flat: bool
    paired: bool
    geometry: Any

    def config(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(g["kernel_size"]),
            "stride": list(g["stride"]),
            "padding": list(g["padding"]),
            "dilation": list(g["dilation"]),
            "block": self.block,
            "flat": self.flat,
            "paired": self.paired,
        }

    def widths(self) -> list[int]:
        return [self.channels, self.out_channels]

    def relu_units(self) -> int:
        """ReLU units per position: each branch channel once, or twice when ``paired`` (relu(v) and relu(−v))."""
        return self.channels * (2 if self.paired else 1)

    def depth(self) -> int:
        return 2


@register_stage
class ConvStream(ConvStreamShape, Stage):
    """One target conv (or, with ``flat``, Linear) of the deep construction: a grouped branch conv, its
    BatchNorm2d, ReLU, a frozen 1×1 readout into ``out_channels`` and the output BatchNorm2d.

    State-dict keys: ``branch.weight`` (the full blocks, ``groups = ⌊c_in/k⌋``), ``rest.weight`` (the smaller last
    block, if any), ``branch_norm.*``, ``readout.weight``, ``norm.*``.
    """

    kind = "conv_stream"
    branch: nn.Conv2d
    rest: nn.Conv2d | None
    branch_norm: _BatchNorm
    readout: nn.Conv2d
    norm: _BatchNorm

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        block: int = 1,
        flat: bool = False,
        paired: bool = False,
        *,
        dtype: torch.dtype = torch.float64,
        device=None,
    ):
        super().__init__()
        self.paired = bool(paired)
        kh, kw = (int(v) for v in kernel_size)
        self.in_channels, self.out_channels, self.flat = int(in_channels), int(out_channels), bool(flat)
        self.block = min(int(block), self.in_channels)
        self.sizes = block_sizes(self.in_channels, self.block)
        self.full = self.in_channels // self.block  # blocks of exactly k channels
        k, rest = self.block, self.in_channels % self.block
        self.per_block = self.out_channels * k * kh * kw  # N_t of a full block
        self.branch = frozen_module(
            nn.Conv2d,
            self.full * k,
            self.full * self.per_block,
            (kh, kw),
            stride=tuple(stride),
            padding=tuple(padding),
            dilation=tuple(dilation),
            groups=self.full,
            dtype=dtype,
            device=device,
        )
        self.rest = (
            frozen_module(
                nn.Conv2d,
                rest,
                self.out_channels * rest * kh * kw,
                (kh, kw),
                stride=tuple(stride),
                padding=tuple(padding),
                dilation=tuple(dilation),
                dtype=dtype,
                device=device,
            )
            if rest
            else None
        )
        self.channels = self.full * self.per_block + (self.rest.out_channels if self.rest is not None else 0)
        self.branch_norm = make_batchnorm(self.channels, dims=2, dtype=dtype, device=device)
        self.readout = frozen_module(nn.Conv2d, self.channels, self.out_channels, (1, 1), dtype=dtype, device=device)
        self.norm = make_batchnorm(self.out_channels, dims=2, dtype=dtype, device=device)

    @property
    def geometry(self) -> dict[str, tuple[int, int]]:
        """``kernel_size``, ``stride``, ``padding``, ``dilation`` of the branch convs — read from the ``branch``
        module, the one source the forward, the certificate and the export all use."""
        c = self.branch
        return {
            k: (int(getattr(c, k)[0]), int(getattr(c, k)[1])) for k in ("kernel_size", "stride", "padding", "dilation")
        }

    def branch_pre(self, x: torch.Tensor) -> torch.Tensor:
        """``A * x`` for every block at once (before the branch BatchNorm)."""
        shared = (self.branch.stride, self.branch.padding, self.branch.dilation)
        for module in (self.branch, self.rest):
            if module is None:
                continue
            if module.padding_mode != "zeros" or module.bias is not None:
                raise InvalidNetworkError(
                    f"conv_stream: the branch convs are evaluated bias-free with zero padding; found "
                    f"padding_mode={module.padding_mode!r}, bias={module.bias is not None}"
                )
            if (module.stride, module.padding, module.dilation) != shared:
                raise InvalidNetworkError(
                    f"conv_stream: every block convolves with the branch's stride/padding/dilation {shared}; found "
                    f"{(module.stride, module.padding, module.dilation)} on the last block"
                )
        split = self.full * self.block
        g = self.geometry
        u = grouped_conv(
            x[:, :split] if self.rest is not None else x,
            self.branch.weight,
            self.full,
            g["stride"],
            g["padding"],
            g["dilation"],
        )
        if self.rest is not None:
            u = torch.cat(
                [u, grouped_conv(x[:, split:], self.rest.weight, 1, g["stride"], g["padding"], g["dilation"])], dim=1
            )
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``γ₂ ⊙ B ρ(BN₁(A * x)) + β₂`` with ``ρ = relu`` or, paired, ``relu(v) − relu(−v)``. One function in
        every grad mode: without autograd the same operations run in place (the branch activation is the widest
        tensor of the network), with it out of place."""
        if self.flat:
            x = x[:, :, None, None]
        inplace = not torch.is_grad_enabled()
        v = normalize(self.branch_norm, self.branch_pre(x), inplace=inplace)
        if self.paired:  # readout [B, −B] of [relu(v), relu(−v)] = B (relu(v) − relu(−v)), one matmul
            u = paired_relu(v, inplace=inplace)
        else:
            u = v.relu_() if inplace else torch.relu(v)
        if self.readout.bias is not None:
            raise InvalidNetworkError("conv_stream: the readout is evaluated bias-free; found a bias on it")
        s = torch.matmul(self.readout.weight.flatten(1), u.flatten(2))
        s = self.norm(s.view(v.shape[0], -1, *v.shape[2:]))
        return s.flatten(1) if self.flat else s

    def affine(self, where: str) -> StreamView:
        read_conv(self.branch, f"{where} (branch)", groups=self.full)
        if self.rest is not None:
            read_conv(self.rest, f"{where} (rest)")
        readout, _ = read_conv(self.readout, f"{where} (readout)")
        gamma1, beta1 = read_norm(self.branch_norm, f"{where} (branch norm)")
        gamma2, beta2 = read_norm(self.norm, f"{where} (norm)")
        g = self.geometry
        geometry = (g["stride"], g["padding"], g["dilation"])
        kernel = self.dense_branch().detach()
        return StreamView(kernel, gamma1, beta1, readout.flatten(1), gamma2, beta2, self.paired, self.flat, geometry)

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """The branches as one dense conv with the block-diagonal kernel (zeros off the blocks: the same sums), the
        branch BatchNorm, ``Relu`` (paired: ``Relu(v) − Relu(−v)``), the 1×1 readout and the output BatchNorm."""
        image = example[:, :, None, None] if self.flat else example
        h = g.node("Unsqueeze", [x, g.ints("axes", [2, 3])], "image") if self.flat else x
        geometry = tuple(self.geometry[k] for k in ("stride", "padding", "dilation"))
        v = batchnorm(g, self.branch_norm, conv_kernel(g, self.dense_branch().detach(), h, image.shape, geometry))
        u = g.node("Relu", [v])
        if self.paired:
            u = g.node("Sub", [u, g.node("Relu", [g.node("Neg", [v])])], "paired")
        with torch.no_grad():
            u_shape = self.branch_pre(image).shape
        s = batchnorm(g, self.norm, conv(g, self.readout, u, u_shape))
        return g.node("Flatten", [s], axis=1) if self.flat else s

    def layout(self) -> StageLayout:
        details = (("geometry", self.geometry), ("block", self.block), ("paired", self.paired), ("flat", self.flat))
        return StageLayout(ConvStream, (self.in_channels, self.out_channels), False, details)

    def dense_branch(self) -> torch.Tensor:
        """The branch kernels as one ``(channels, c_in, k_h, k_w)`` block-diagonal kernel (for certificates)."""
        kh, kw = self.geometry["kernel_size"]
        A = self.branch.weight.new_zeros(self.channels, self.in_channels, kh, kw)
        for t, (units, J) in enumerate(self.block_slices()):
            w = self.block_kernel(t)
            A[units, J] = w[units] if t < self.full else w
        return A

    def block_kernel(self, t: int) -> torch.Tensor:
        """The frozen kernel holding block ``t``: the grouped ``branch`` (all full blocks; index it by the block's
        units) or, for the smaller last block, ``rest``."""
        if t < self.full:
            return self.branch.weight
        if self.rest is None:
            raise IndexError(f"block {t} of a stream with {self.full} blocks")
        return self.rest.weight

    def block_slices(self) -> list[tuple[slice, slice]]:
        """``(branch channels, input channels)`` of each block."""
        out, unit, chan = [], 0, 0
        kh, kw = self.geometry["kernel_size"]
        for k in self.sizes:
            n = self.out_channels * k * kh * kw
            out.append((slice(unit, unit + n), slice(chan, chan + k)))
            unit, chan = unit + n, chan + k
        return out


def grouped_conv(
    x: torch.Tensor, weight: torch.Tensor, groups: int, stride, padding, dilation, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, groups=groups)`` as one unfold and one batched matmul.

    torch's CPU grouped convolution in float64 takes a slow path (seconds for a 64-group 3×3 layer on one 8×8
    image); ``unfold`` orders its rows by (channel, k_h, k_w), so group ``t`` reads a contiguous row block.
    ``out`` (no autograd): a buffer of at least the result's size to write it into — a stream evaluated in chunks
    reuses one buffer, because a fresh allocation of hundreds of MB is returned to the OS on free and page-faults
    again on the next chunk (3.6× the matmul itself for a 1 → 576 channel 3×3 conv on 16 56×56 maps).
    """
    B, _, H, W = x.shape
    out_channels, k, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    cols = cols.view(B, groups, k * kh * kw, Ho * Wo)
    kernel = weight.reshape(groups, out_channels // groups, k * kh * kw)
    if out is None:
        return torch.matmul(kernel, cols).view(B, out_channels, Ho, Wo)
    target = out.view(-1)[: B * out_channels * Ho * Wo].view(B, groups, out_channels // groups, Ho * Wo)
    torch.matmul(kernel, cols, out=target)
    return target.view(B, out_channels, Ho, Wo)
