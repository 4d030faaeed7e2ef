"""Convolutional and residual targets: BatchNorm-only reconstruction of CNNs.

A target ``Conv2d`` with kernel ``W ∈ R^{c_out×c_in×k_h×k_w}`` becomes a random conv ``A`` (``c_in → N``, same stride,
padding, dilation), ``BatchNorm2d(N)``, ReLU, a random 1×1 conv ``B`` (``N → c_out``) and ``BatchNorm2d(c_out)``.
A 1×1 conv commutes with the spatial sum, so the pair's kernel is ``W'[o,c,:,:] = Σ_j B[o,j] γ_j A[j,c,:,:]`` — the
Khatri–Rao system with ``A`` flattened to ``N × (c_in·k_h·k_w)``, ``N = c_out·c_in·k_h·k_w``. BatchNorm2d has one
``(γ, β)`` per channel, so ``β₁`` keeps each channel active at *every* spatial position of the reachable input
(interval bounds per position, zero padding included, minimised over positions); ``β₂ = b − B β₁``. ``Linear``
layers become the width construction's pairs; ReLU, pooling and Flatten are copied; a ``Residual`` block is
mirrored with its skip connection. Pairs carry no ReLU of their own: the target's ReLU layers are copied.

>>> import torch
>>> from torch import nn
>>> import onlynorm
>>> g = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
>>> f = onlynorm.reconstruct(g, in_shape=(1, 4, 4))
>>> f.summary().widths      # N = 2·1·9 channels, then 2; Linear pair 3·32, then 3
[18, 2, 96, 3]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cnn import ConvNetSpec, box_tensors
from ..cnn_layers import Conv, Pool, ResidualBlock
from ..domain import Box, affine_bounds
from ..errors import InvalidNetworkError
from ..linalg import solve_khatri_rao
from ..normnet import STAGES, NormLinear, NormNet, Stage, frozen_module, make_batchnorm, register_stage
from .base import (
    MARGIN,
    Construction,
    Progress,
    base_meta,
    begin_solve,
    finish_solve,
    frozen_init,
    random_norm_linear,
    register,
    safe_margin,
)

__all__ = ["ConvConstruction", "NormConv2d", "FixedOp", "ResidualStage", "build_stages", "walk_stages"]


@register_stage
class NormConv2d(Stage):
    """``relu?(γ ⊙ (A * x) + β)``: a frozen bias-free ``Conv2d`` and a ``BatchNorm2d`` (per-channel γ, β)."""

    kind = "norm_conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        relu: bool = True,
        *,
        dtype: torch.dtype = torch.float64,
        device=None,
    ):
        super().__init__()
        self.conv = frozen_module(
            nn.Conv2d,
            in_channels,
            out_channels,
            tuple(kernel_size),
            stride=tuple(stride),
            padding=tuple(padding),
            dilation=tuple(dilation),
            dtype=dtype,
            device=device,
        )
        self.norm = make_batchnorm(out_channels, dims=2, dtype=dtype, device=device)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.conv(x))
        return torch.relu(z) if self.relu else z

    def config(self) -> dict[str, Any]:
        c = self.conv
        return {
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "kernel_size": list(c.kernel_size),
            "stride": list(c.stride),
            "padding": list(c.padding),
            "dilation": list(c.dilation),
            "relu": self.relu,
        }


@register_stage
class FixedOp(Stage):
    """A parameter-free layer copied from the target: ``relu``, ``maxpool``, ``avgpool`` or ``flatten``."""

    kind = "op"

    def __init__(
        self,
        op: str,
        kernel=None,
        stride=None,
        padding=(0, 0),
        count_include_pad: bool = True,
        *,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if op not in ("relu", "maxpool", "avgpool", "flatten"):
            raise ValueError(f"unknown op {op!r}")
        self.op, self.kernel, self.stride, self.padding = op, kernel, stride, padding
        self.count_include_pad = count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "relu":
            return torch.relu(x)
        if self.op == "maxpool":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        if self.op == "avgpool":
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=self.count_include_pad)
        return x.flatten(1)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"op": self.op}
        if self.op in ("maxpool", "avgpool"):
            cfg.update(kernel=list(self.kernel), stride=list(self.stride), padding=list(self.padding))
        if self.op == "avgpool":
            cfg["count_include_pad"] = self.count_include_pad
        return cfg

    def widths(self) -> list[int]:
        return []


@register_stage
class ResidualStage(Stage):
    """``relu(body(x) + shortcut(x))`` with ``body``/``shortcut`` lists of stages (an empty shortcut is the
    identity skip; a projection shortcut is mirrored stage by stage like the body)."""

    kind = "residual"

    def __init__(self, body: list, shortcut: list | None = None, *, dtype=torch.float64, device=None):
        super().__init__()
        make = lambda b: b if isinstance(b, nn.Module) else _stage_from_config(b, dtype, device)  # noqa: E731
        self.body = nn.ModuleList([make(b) for b in body])
        self.shortcut = nn.ModuleList([make(b) for b in (shortcut or [])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, s = x, x
        for stage in self.body:
            h = stage(h)
        for stage in self.shortcut:
            s = stage(s)
        return torch.relu(s + h)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"body": [{"kind": s.kind, **s.config()} for s in self.body]}
        if len(self.shortcut):
            cfg["shortcut"] = [{"kind": s.kind, **s.config()} for s in self.shortcut]
        return cfg

    def depth(self) -> int:
        return max(sum(s.depth() for s in self.body), sum(s.depth() for s in self.shortcut))


def _stage_from_config(cfg: dict, dtype, device) -> Stage:
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}")
    return STAGES[kind].from_config(cfg, dtype=dtype, device=device)


@register
class ConvConstruction(Construction):
    name = "conv"
    cost = (
        "CNN/residual targets (chosen automatically): per Conv2d a random conv c_in→N (N = c_out·c_in·k²) and a "
        "1×1 conv; per Linear a width pair; exact"
    )
    options = (MARGIN,)
    target_kinds = ("cnn",)

    def build(self, target: ConvNetSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        self.check_options(options)
        gen = torch.Generator().manual_seed(int(seed))
        stages = build_stages(target.layers, lambda layer: self._pair(layer, gen, dtype, device), dtype, device)
        meta = base_meta(self.name, target, seed, options)
        meta["in_shape"] = list(target.in_shape)
        return NormNet(stages, meta=meta)

    @staticmethod
    def _pair(layer, gen, dtype, device) -> list[Stage]:
        if isinstance(layer, Conv):
            c_out, c_in, kh, kw = layer.weight.shape
            N = c_out * c_in * kh * kw
            first = NormConv2d(
                c_in, N, (kh, kw), layer.stride, layer.padding, layer.dilation, relu=True, dtype=dtype, device=device
            )
            second = NormConv2d(N, c_out, relu=False, dtype=dtype, device=device)
            with torch.no_grad():
                a = frozen_init((N, c_in * kh * kw), gen, dtype=dtype, device=device)
                first.conv.weight.copy_(a.reshape(N, c_in, kh, kw))
                second.conv.weight.copy_(
                    frozen_init((c_out, N), gen, dtype=dtype, device=device).reshape(c_out, N, 1, 1)
                )
            return [first, second]
        m, n = layer.weight.shape
        return [
            random_norm_linear(n, m * n, True, gen, dtype=dtype, device=device),
            random_norm_linear(m * n, m, False, gen, dtype=dtype, device=device),
        ]

    def estimate_bytes(self, target, dtype, **options) -> int:
        from ..conv_memory import estimate_conv_bytes

        return estimate_conv_bytes(target, dtype, "conv")

    def solve(self, net: NormNet, target: ConvNetSpec, domain: Box, *, progress: Progress | None = None) -> NormNet:
        if not isinstance(target, ConvNetSpec):
            raise InvalidNetworkError("this network was built for a CNN target; pass the same CNN as target")
        spec, out, margin = begin_solve(net, target)
        lo, hi = box_tensors(spec, domain, net.dtype)
        records: list[dict] = []
        total = len(spec.weighted())

        def solve_pair(layer, group, lo, hi) -> None:
            self._solve_pair(layer, group, lo, hi, margin, records)
            if progress is not None:
                progress(len(records), total, f"{len(records)} Khatri–Rao systems")

        walk_stages(spec.layers, list(out.layers), lo.to(net.device), hi.to(net.device), solve_pair, 2)
        return finish_solve(out, records, [], domain)

    def certify(self, net: NormNet, target: ConvNetSpec, domain: Box):
        """Per-channel activity over every position of the box, then a distance bound; see :mod:`onlynorm.certify.cnn`."""
        from ..certify.cnn import certify_conv

        if not isinstance(target, ConvNetSpec):
            raise InvalidNetworkError("this network was built for a CNN target; pass the same CNN as target")
        return certify_conv(net, target, domain)

    @staticmethod
    def _solve_pair(layer, group, lo, hi, margin, records) -> None:
        first, second = group
        W = layer.weight
        if isinstance(layer, Conv):
            if not (isinstance(first, NormConv2d) and isinstance(second, NormConv2d)):
                raise InvalidNetworkError(
                    f"expected a conv pair for a Conv2d layer, found {type(first).__name__}, {type(second).__name__}"
                )
            A4 = first.conv.weight
            A, B = A4.reshape(A4.shape[0], -1), second.conv.weight.reshape(second.conv.weight.shape[0], -1)
            if A.shape[1] != W[0].numel() or B.shape[0] != W.shape[0]:
                raise InvalidNetworkError(
                    f"conv pair shapes {tuple(A4.shape)} / {tuple(B.shape)} do not fit "
                    f"the target kernel {tuple(W.shape)}"
                )
            sol = solve_khatri_rao(A, B, W.reshape(W.shape[0], -1), layer=len(records))
            zmin, zmax = layer.bounds(lo, hi, weight=sol.gamma.reshape(-1, 1, 1, 1) * A4, use_bias=False)
            zmin, zmax = zmin.amin(dim=(0, 2, 3)), zmax.amax(dim=(0, 2, 3))
        else:
            if not (isinstance(first, NormLinear) and isinstance(second, NormLinear)):
                raise InvalidNetworkError(
                    f"expected a linear pair for a Linear layer, found {type(first).__name__}, {type(second).__name__}"
                )
            A, B = first.linear.weight, second.linear.weight
            sol = solve_khatri_rao(A, B, W, layer=len(records))
            zmin, zmax = affine_bounds(sol.gamma.unsqueeze(1) * A, lo[0], hi[0])
        beta1 = -zmin + safe_margin(zmin, zmax, margin)
        with torch.no_grad():
            first.norm.weight.copy_(sol.gamma)
            first.norm.bias.copy_(beta1)
            second.norm.weight.fill_(1.0)
            second.norm.bias.copy_(layer.bias - B @ beta1)
        records.append(
            {
                "layer": len(records),
                "type": layer.type,
                "kind": sol.kind,
                "residual": sol.residual,
                "relative_residual": sol.relative_residual,
                "exact": sol.exact,
            }
        )


def build_stages(layers, make_weighted: Callable[[Any], list[Stage]], dtype, device) -> list[Stage]:
    """Mirror the target's layers: ``make_weighted(layer)`` for each Conv/Linear, a :class:`ResidualStage` per
    residual block, a :class:`FixedOp` for every parameter-free layer (ReLU, pooling, Flatten)."""
    stages: list[Stage] = []
    for layer in layers:
        if layer.has_weights:
            stages += make_weighted(layer)
        elif isinstance(layer, ResidualBlock):
            stages.append(
                ResidualStage(
                    build_stages(layer.body, make_weighted, dtype, device),
                    build_stages(layer.shortcut, make_weighted, dtype, device),
                    dtype=dtype,
                    device=device,
                )
            )
        elif isinstance(layer, Pool):
            stages.append(
                FixedOp(
                    layer.type,
                    kernel=list(layer.kernel),
                    stride=list(layer.stride),
                    padding=list(layer.padding),
                    count_include_pad=layer.count_include_pad,
                )
            )
        else:
            stages.append(FixedOp(layer.type))
    return stages


def walk_stages(layers, stages: list, lo: torch.Tensor, hi: torch.Tensor, visit, per_weighted: int):
    """Walk the target's layers and the network's stages together, carrying the target's interval bounds
    ``[lo, hi]`` of each layer's input; ``visit(layer, stages_of_layer, lo, hi)`` for each Conv/Linear. Returns the
    bounds of the output."""
    pos = 0
    for layer in layers:
        if layer.has_weights:
            if pos + per_weighted > len(stages):
                raise InvalidNetworkError("the frozen network has fewer stages than the target needs")
            visit(layer, stages[pos : pos + per_weighted], lo, hi)
            pos += per_weighted
        elif isinstance(layer, ResidualBlock):
            stage = stages[pos] if pos < len(stages) else None
            if not isinstance(stage, ResidualStage):
                raise InvalidNetworkError(f"expected a residual stage, found {type(stage).__name__}")
            walk_stages(layer.body, list(stage.body), lo, hi, visit, per_weighted)
            walk_stages(layer.shortcut, list(stage.shortcut), lo, hi, visit, per_weighted)
            pos += 1
        else:
            pos += 1
        lo, hi = layer.bounds(lo, hi)
    if pos != len(stages):
        raise InvalidNetworkError(f"the frozen network has {len(stages)} stages, the target needs {pos}")
    return lo, hi
