"""``TiedConvStream``: the deep convolutional stream with one frozen draw shared by every block of input channels.

All ``T = ⌊c_in/k⌋`` full blocks apply the same branch kernel ``A: k → N`` (``N = c_out·k·k_h·k_w``) and the same
1×1 readout ``B: N → c_out``; only ``γ_t, β_t`` differ per block (the smaller last block, when ``k ∤ c_in``, has its
own draw). The forward runs the branch conv once per chunk of blocks with the blocks folded into the batch
(``(b, T·k, H, W) → (b·T, k, H, W)``), sums the branch activations over blocks and applies the readout once
(``Σ_t B u_t = B Σ_t u_t``): about ``c_in·N·H'W'·k_h·k_w`` multiply-adds per image instead of ``T`` readouts.
Chunks of blocks are sized so a chunk's activations stay within :attr:`TiedConvStream.chunk_bytes`.

The certificate reads the untied view with the shared draw expanded (:class:`~onlynorm.nets.views.StreamView`:
the block-diagonal kernel and the readout ``[B … B B']``), refused when that expansion would not fit in memory.

>>> import torch
>>> stage = TiedConvStream(3, 2, (3, 3), padding=(1, 1), block=2)
>>> stage.widths(), tuple(stage.branch.weight.shape), tuple(stage.affine("s").kernel.shape)
([54, 2], (36, 2, 3, 3), (54, 3, 3, 3))
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidNetworkError, NotCertifiableError
from .conv_stream import ConvStreamShape, grouped_conv
from .modules import frozen_module, inference_scale_shift, make_batchnorm, normalize, paired_relu
from .onnx_graph import OnnxGraph, batchnorm, conv_kernel, slice_last
from .stage import Stage, StageLayout, register_stage
from .stream import block_sizes
from .views import StreamView, read_conv, read_norm

__all__ = ["TiedConvStream"]

#: the certificate's expanded view (block-diagonal kernel) is refused above this many bytes
VIEW_LIMIT_BYTES = 2 << 30


@register_stage
class TiedConvStream(ConvStreamShape, Stage):
    """One target conv (or, with ``flat``, Linear) of ``deep, tied=1``. State-dict keys: ``branch.weight`` (``A``,
    shared), ``readout.weight`` (``B``, shared), ``rest.weight`` / ``rest_readout.weight`` (the smaller last block,
    if any), ``branch_norm.*`` (``γ_t, β_t`` of every block, block-major), ``norm.*``."""

    kind = "tied_conv_stream"
    #: activation bytes a chunk of blocks may use in the forward (blocks are streamed in chunks within it)
    chunk_bytes: ClassVar[int] = 256 << 20
    branch: nn.Conv2d
    readout: nn.Conv2d
    rest: nn.Conv2d | None
    rest_readout: nn.Conv2d | None
    branch_norm: _BatchNorm
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
        kh, kw = (int(v) for v in kernel_size)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.flat, self.paired = bool(flat), bool(paired)
        self.block = min(int(block), self.in_channels)
        self.full = self.in_channels // self.block
        k, r = self.block, self.in_channels % self.block
        self.per_block = self.out_channels * k * kh * kw
        geo = {"stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation)}
        self.branch = frozen_module(nn.Conv2d, k, self.per_block, (kh, kw), **geo, dtype=dtype, device=device)
        self.readout = frozen_module(nn.Conv2d, self.per_block, self.out_channels, (1, 1), dtype=dtype, device=device)
        n_rest = self.out_channels * r * kh * kw
        self.rest = frozen_module(nn.Conv2d, r, n_rest, (kh, kw), **geo, dtype=dtype, device=device) if r else None
        self.rest_readout = (
            frozen_module(nn.Conv2d, n_rest, self.out_channels, (1, 1), dtype=dtype, device=device) if r else None
        )
        self.channels = self.full * self.per_block + n_rest
        self.branch_norm = make_batchnorm(self.channels, dims=2, dtype=dtype, device=device)
        self.norm = make_batchnorm(self.out_channels, dims=2, dtype=dtype, device=device)

    @property
    def sizes(self) -> list[int]:
        """The input block sizes (``k`` … ``k``, the smaller last one): computed, not stored, so cloning a network
        (a deepcopy) does not copy a list of ``⌈n/k⌉`` ints per stage."""
        return block_sizes(self.in_channels, self.block)

    @property
    def geometry(self) -> dict[str, tuple[int, int]]:
        c = self.branch
        return {
            k: (int(getattr(c, k)[0]), int(getattr(c, k)[1])) for k in ("kernel_size", "stride", "padding", "dilation")
        }

    def _geo(self) -> tuple:
        g = self.geometry
        return g["stride"], g["padding"], g["dilation"]

    def _check_modules(self) -> None:
        for module in (self.branch, self.rest, self.readout, self.rest_readout):
            if module is not None and (module.padding_mode != "zeros" or module.bias is not None):
                raise InvalidNetworkError(
                    f"tied_conv_stream: the frozen convs are evaluated bias-free with zero padding; found "
                    f"padding_mode={module.padding_mode!r}, bias={module.bias is not None}"
                )

    def _rho(self, v: torch.Tensor, inplace: bool) -> torch.Tensor:
        if self.paired:  # relu(v) − relu(−v): readout [B, −B] of [relu(v), relu(−v)]
            return paired_relu(v, inplace=inplace)
        return v.relu_() if inplace else torch.relu(v)

    def _chunk(self, batch: int, positions: int, item: int) -> int:
        """Blocks per chunk: three activation tensors of ``batch·chunk·N·positions`` values within the budget."""
        if self.branch_norm.training:  # batch statistics are taken over every channel at once
            return self.full
        return max(1, min(self.full, self.chunk_bytes // max(1, 3 * batch * self.per_block * positions * item)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``γ₂ ⊙ (B Σ_t ρ(BN₁(A * x_{J_t})) [+ B' ρ(…rest…)]) + β₂``, streamed over chunks of blocks; one function in
        every grad mode (without autograd the same operations run in place)."""
        self._check_modules()
        if self.flat:
            x = x[:, :, None, None]
        inplace, b, k = not torch.is_grad_enabled(), x.shape[0], self.block
        form = inference_scale_shift(self.branch_norm)
        geo, B = self._geo(), self.readout.weight.flatten(1)
        acc: torch.Tensor | None = None
        whole: list[torch.Tensor] = []  # batch statistics: every channel first, normalised together
        start, chunk = 0, 1
        out_hw: tuple[int, ...] = (0, 0)
        buffer: torch.Tensor | None = None  # no autograd: every chunk's branch activation in one allocation
        while start < self.full:
            stop = min(self.full, start + chunk)
            xb = x[:, start * k : stop * k].reshape(b * (stop - start), k, *x.shape[2:])
            v = grouped_conv(xb, self.branch.weight, 1, *geo, out=buffer)
            out_hw = tuple(v.shape[2:])
            v = v.reshape(b, (stop - start) * self.per_block, *out_hw)
            if form is None:
                whole.append(v)
            else:
                units = slice(start * self.per_block, stop * self.per_block)
                shape = (1, -1, 1, 1)
                s_, t_ = form[0][units].reshape(shape), form[1][units].reshape(shape)
                v = v.mul_(s_).add_(t_) if inplace else v * s_ + t_
                part = self._rho(v, inplace).reshape(b, stop - start, self.per_block, -1).sum(dim=1)
                acc = part if acc is None else (acc.add_(part) if inplace else acc + part)
            if start == 0:
                chunk = self._chunk(b, out_hw[0] * out_hw[1], x.element_size())
                if inplace and form is not None and chunk < self.full:
                    buffer = v.new_empty(b * min(chunk, self.full - stop) * self.per_block * out_hw[0] * out_hw[1])
            start = stop
        u_rest = None
        if self.rest is not None:
            v_rest = grouped_conv(x[:, self.full * k :], self.rest.weight, 1, *geo)
            if form is None:
                whole.append(v_rest)
            else:
                units = slice(self.full * self.per_block, self.channels)
                v_rest = v_rest * form[0][units].reshape(1, -1, 1, 1) + form[1][units].reshape(1, -1, 1, 1)
                u_rest = self._rho(v_rest, inplace)
        if form is None:  # batch statistics: the module itself on every channel, then the same sums
            u = self._rho(normalize(self.branch_norm, torch.cat(whole, dim=1)), inplace)
            n_full = self.full * self.per_block
            acc = u[:, :n_full].reshape(b, self.full, self.per_block, -1).sum(dim=1)
            u_rest = u[:, n_full:] if self.rest is not None else None
        assert acc is not None
        s = torch.matmul(B, acc)
        if u_rest is not None and self.rest_readout is not None:
            s = s + torch.matmul(self.rest_readout.weight.flatten(1), u_rest.flatten(2))
        s = normalize(self.norm, s.view(b, self.out_channels, *out_hw), inplace=inplace)
        return s.flatten(1) if self.flat else s

    def block_slices(self) -> list[tuple[slice, slice]]:
        """``(branch channels, input channels)`` of each block."""
        kh, kw = self.geometry["kernel_size"]
        out, unit = [], 0
        for t, k in enumerate(self.sizes):
            n = self.out_channels * k * kh * kw
            out.append((slice(unit, unit + n), slice(t * self.block, t * self.block + k)))
            unit += n
        return out

    def block_maps(self, t: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        """The frozen ``(branch, readout)`` convs block ``t`` reads (shared by every full block)."""
        if t < self.full:
            return self.branch, self.readout
        assert self.rest is not None and self.rest_readout is not None
        return self.rest, self.rest_readout

    def dense_branch(self) -> torch.Tensor:
        """The shared kernel expanded block-diagonally, ``(channels, c_in, k_h, k_w)`` (the untied form)."""
        kh, kw = self.geometry["kernel_size"]
        A = self.branch.weight.new_zeros(self.channels, self.in_channels, kh, kw)
        for t, (units, J) in enumerate(self.block_slices()):
            A[units, J] = self.block_maps(t)[0].weight.detach()
        return A

    def dense_readout(self) -> torch.Tensor:
        """The readout expanded to every block, ``(c_out, channels)``: ``[B … B B']``."""
        parts = [self.block_maps(t)[1].weight.detach().flatten(1) for t in range(len(self.sizes))]
        return torch.cat(parts, dim=1)

    def affine(self, where: str) -> StreamView:
        for name, module in (("branch", self.branch), ("rest", self.rest)):
            if module is not None:
                read_conv(module, f"{where} ({name})")
        for name, module in (("readout", self.readout), ("rest readout", self.rest_readout)):
            if module is not None:
                read_conv(module, f"{where} ({name})")
        need = self.channels * self.in_channels * self.branch.weight[0, 0].numel() * self.branch.weight.element_size()
        if need > VIEW_LIMIT_BYTES:
            raise NotCertifiableError(
                f"{where}: the certificate reads the tied stream expanded to its untied form, "
                f"{need / 2**30:.1f} GiB here (limit {VIEW_LIMIT_BYTES / 2**30:.0f} GiB); verify by sampling"
            )
        gamma1, beta1 = read_norm(self.branch_norm, f"{where} (branch norm)")
        gamma2, beta2 = read_norm(self.norm, f"{where} (norm)")
        kernel, readout = self.dense_branch(), self.dense_readout()
        return StreamView(kernel, gamma1, beta1, readout, gamma2, beta2, self.paired, self.flat, self._geo())

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """Blocks folded into the batch: ``Reshape`` to ``(b·T, k, H, W)``, one ``Conv`` by the shared kernel, the
        branch BatchNorm and ``Relu`` (paired: ``Relu(v) − Relu(−v)``) on ``(b, T·N [+ N'], H', W')``, ``ReduceSum``
        over the blocks, one 1×1 ``Conv`` by the shared readout (plus the rest block's pair), the output BatchNorm."""
        image = example[:, :, None, None] if self.flat else example
        h = g.node("Unsqueeze", [x, g.ints("axes", [2, 3])], "image") if self.flat else x
        b, _, H, W = image.shape
        k, full, N = self.block, self.full, self.per_block
        with torch.no_grad():
            Ho, Wo = grouped_conv(image[:1, :k], self.branch.weight, 1, *self._geo()).shape[2:]
        split = full * k
        xs = h if self.rest is None else _slice(g, h, 0, split, axis=1)
        xb = g.node("Reshape", [xs, g.ints("shape", [-1, k, H, W])], "blocks")
        v = conv_kernel(g, self.branch.weight, xb, torch.Size((b * full, k, H, W)), self._geo())
        v = g.node("Reshape", [v, g.ints("shape", [-1, full * N, Ho, Wo])], "branches")
        if self.rest is not None:
            r = self.in_channels - split
            rest = conv_kernel(
                g,
                self.rest.weight,
                _slice(g, h, split, self.in_channels, axis=1),
                torch.Size((b, r, H, W)),
                self._geo(),
            )
            v = g.node("Concat", [v, rest], "branches", axis=1)
        v = batchnorm(g, self.branch_norm, v)
        u = g.node("Relu", [v])
        if self.paired:
            u = g.node("Sub", [u, g.node("Relu", [g.node("Neg", [v])])], "paired")
        per = g.node("Reshape", [_slice(g, u, 0, full * N, axis=1), g.ints("shape", [-1, full, N, Ho, Wo])])
        total = g.node("ReduceSum", [per, g.ints("axes", [1])], "block_sum", keepdims=0)
        unit = ((1, 1), (0, 0), (1, 1))
        s = conv_kernel(g, self.readout.weight, total, torch.Size((b, N, Ho, Wo)), unit)
        if self.rest_readout is not None:
            rest_u = _slice(g, u, full * N, self.channels, axis=1)
            shape = torch.Size((b, self.channels - full * N, Ho, Wo))
            s = g.node("Add", [s, conv_kernel(g, self.rest_readout.weight, rest_u, shape, unit)], "stream")
        s = batchnorm(g, self.norm, s)
        return g.node("Flatten", [s], axis=1) if self.flat else s

    def layout(self) -> StageLayout:
        details = (("geometry", self.geometry), ("block", self.block), ("paired", self.paired), ("flat", self.flat))
        return StageLayout(TiedConvStream, (self.in_channels, self.out_channels), False, details)


def _slice(g: OnnxGraph, x: str, start: int, stop: int, *, axis: int) -> str:
    """``x[start:stop]`` along ``axis``."""
    if axis == -1:
        return slice_last(g, x, slice(start, stop))
    return g.node("Slice", [x, g.ints("start", [start]), g.ints("end", [stop]), g.ints("axis", [axis])], "part")
