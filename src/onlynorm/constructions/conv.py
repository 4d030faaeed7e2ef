"""Convolutional and residual targets (DESIGN §3.7): BatchNorm-only reconstruction of CNNs.

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cnn import ConvNetSpec, box_tensors, conv_interval, interval_step
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

__all__ = ["ConvConstruction", "NormConv2d", "FixedOp", "ResidualStage"]


@register_stage
class NormConv2d(Stage):
    """``relu?(γ ⊙ (A * x) + β)``: a frozen bias-free ``Conv2d`` and a ``BatchNorm2d`` (per-channel γ, β)."""

    kind = "norm_conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), relu: bool = True, *, dtype: torch.dtype = torch.float64, device=None):
        super().__init__()
        self.conv = frozen_module(nn.Conv2d, in_channels, out_channels, tuple(kernel_size), stride=tuple(stride),
                                  padding=tuple(padding), dilation=tuple(dilation), dtype=dtype, device=device)
        self.norm = make_batchnorm(out_channels, dims=2, dtype=dtype, device=device)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.conv(x))
        return torch.relu(z) if self.relu else z

    def config(self) -> dict[str, Any]:
        c = self.conv
        return {"in_channels": c.in_channels, "out_channels": c.out_channels, "kernel_size": list(c.kernel_size),
                "stride": list(c.stride), "padding": list(c.padding), "dilation": list(c.dilation), "relu": self.relu}


@register_stage
class FixedOp(Stage):
    """A parameter-free layer copied from the target: ``relu``, ``maxpool``, ``avgpool`` or ``flatten``."""

    kind = "op"

    def __init__(self, op: str, kernel=None, stride=None, padding=(0, 0), count_include_pad: bool = True, *,
                 dtype=None, device=None):
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
    """``relu(x + body(x))`` with ``body`` a list of stages (the mirrored skip connection)."""

    kind = "residual"

    def __init__(self, body: list, *, dtype=torch.float64, device=None):
        super().__init__()
        stages = [b if isinstance(b, nn.Module) else _stage_from_config(b, dtype, device) for b in body]
        self.body = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for stage in self.body:
            h = stage(h)
        return torch.relu(x + h)

    def config(self) -> dict[str, Any]:
        return {"body": [{"kind": s.kind, **s.config()} for s in self.body]}

    def depth(self) -> int:
        return sum(s.depth() for s in self.body)


def _stage_from_config(cfg: dict, dtype, device) -> Stage:
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}")
    return STAGES[kind].from_config(cfg, dtype=dtype, device=device)


@register
class ConvConstruction(Construction):
    name = "conv"
    cost = ("CNN/residual targets (chosen automatically): per Conv2d a random conv c_in→N (N = c_out·c_in·k²) and a "
            "1×1 conv; per Linear a width pair; exact")
    options = (MARGIN,)
    target_kinds = ("cnn",)

    def build(self, target: ConvNetSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        self.check_options(options)
        gen = torch.Generator().manual_seed(int(seed))
        stages = self._build(target.layers, gen, dtype, device)
        meta = base_meta(self.name, target, seed, options)
        meta["in_shape"] = list(target.in_shape)
        return NormNet(stages, meta=meta)

    def _build(self, layers: list[dict], gen, dtype, device) -> list[Stage]:
        stages: list[Stage] = []
        for rec in layers:
            kind = rec["type"]
            if kind == "conv":
                c_out, c_in, kh, kw = rec["weight"].shape
                N = c_out * c_in * kh * kw
                first = NormConv2d(c_in, N, (kh, kw), rec["stride"], rec["padding"], rec["dilation"], relu=True,
                                   dtype=dtype, device=device)
                second = NormConv2d(N, c_out, relu=False, dtype=dtype, device=device)
                with torch.no_grad():
                    a = frozen_init((N, c_in * kh * kw), gen, dtype=dtype, device=device)
                    first.conv.weight.copy_(a.reshape(N, c_in, kh, kw))
                    second.conv.weight.copy_(frozen_init((c_out, N), gen, dtype=dtype, device=device)
                                             .reshape(c_out, N, 1, 1))
                stages += [first, second]
            elif kind == "linear":
                m, n = rec["weight"].shape
                stages += [random_norm_linear(n, m * n, True, gen, dtype=dtype, device=device),
                           random_norm_linear(m * n, m, False, gen, dtype=dtype, device=device)]
            elif kind == "residual":
                stages.append(ResidualStage(self._build(rec["block"], gen, dtype, device), dtype=dtype, device=device))
            else:
                extra = {k: rec[k] for k in ("kernel", "stride", "padding", "count_include_pad") if k in rec}
                stages.append(FixedOp(kind, **extra))
        return stages

    def estimate_bytes(self, target, dtype, **options) -> int:
        sizes = [rec["weight"].numel() for rec in _walk(target.layers) if "weight" in rec]
        return max(sizes) ** 2 * 8 * 2 if sizes else 0

    def solve(self, net: NormNet, target: ConvNetSpec, domain: Box, *, progress: Progress | None = None) -> NormNet:
        if not isinstance(target, ConvNetSpec):
            raise InvalidNetworkError("this network was built for a CNN target; pass the same CNN as target")
        spec, out, margin = begin_solve(net, target)
        lo, hi = box_tensors(spec, domain, net.dtype)
        records: list[dict] = []
        self._solve(spec.layers, list(out.layers), lo.to(net.device), hi.to(net.device), margin, records)
        if progress is not None:
            progress(1, 1, f"{len(records)} Khatri–Rao systems")
        return finish_solve(out, records, [], domain)

    def certify(self, net: NormNet, target: ConvNetSpec, domain: Box):
        """Per-channel activity over every position of the box, then a distance bound; see ``certify_cnn``."""
        from ..certify_cnn import certify_conv

        if not isinstance(target, ConvNetSpec):
            raise InvalidNetworkError("this network was built for a CNN target; pass the same CNN as target")
        return certify_conv(net, target, domain)

    def _solve(self, layers, stages, lo, hi, margin, records) -> None:
        pos = 0
        for rec in layers:
            kind = rec["type"]
            if kind in ("conv", "linear"):
                if pos + 1 >= len(stages):
                    raise InvalidNetworkError("the frozen network has fewer stages than the target needs")
                first, second = stages[pos], stages[pos + 1]
                pos += 2
                W = rec["weight"]
                if kind == "conv":
                    if not (isinstance(first, NormConv2d) and isinstance(second, NormConv2d)):
                        raise InvalidNetworkError(f"expected a conv pair for a Conv2d layer, found "
                                                  f"{type(first).__name__}, {type(second).__name__}")
                    A4 = first.conv.weight
                    A, B = A4.reshape(A4.shape[0], -1), second.conv.weight.reshape(second.conv.weight.shape[0], -1)
                    if A.shape[1] != W[0].numel() or B.shape[0] != W.shape[0]:
                        raise InvalidNetworkError(f"conv pair shapes {tuple(A4.shape)} / {tuple(B.shape)} do not fit "
                                                  f"the target kernel {tuple(W.shape)}")
                    sol = solve_khatri_rao(A, B, W.reshape(W.shape[0], -1), layer=len(records))
                    zmin, zmax = conv_interval(rec, lo, hi, weight=sol.gamma.reshape(-1, 1, 1, 1) * A4,
                                               use_bias=False)
                    zmin, zmax = zmin.amin(dim=(0, 2, 3)), zmax.amax(dim=(0, 2, 3))
                else:
                    if not (isinstance(first, NormLinear) and isinstance(second, NormLinear)):
                        raise InvalidNetworkError(f"expected a linear pair for a Linear layer, found "
                                                  f"{type(first).__name__}, {type(second).__name__}")
                    A, B = first.linear.weight, second.linear.weight
                    sol = solve_khatri_rao(A, B, W, layer=len(records))
                    zmin, zmax = affine_bounds(sol.gamma.unsqueeze(1) * A, lo[0], hi[0])
                beta1 = -zmin + safe_margin(zmin, zmax, margin)
                with torch.no_grad():
                    first.norm.weight.copy_(sol.gamma)
                    first.norm.bias.copy_(beta1)
                    second.norm.weight.fill_(1.0)
                    second.norm.bias.copy_(rec["bias"] - B @ beta1)
                records.append({"layer": len(records), "type": kind, "kind": sol.kind, "residual": sol.residual,
                                "relative_residual": sol.relative_residual, "exact": sol.exact})
            elif kind == "residual":
                stage = stages[pos]
                pos += 1
                if not isinstance(stage, ResidualStage):
                    raise InvalidNetworkError(f"expected a residual stage, found {type(stage).__name__}")
                self._solve(rec["block"], list(stage.body), lo, hi, margin, records)
            else:
                pos += 1
            lo, hi = interval_step(rec, lo, hi)
        if pos != len(stages):
            raise InvalidNetworkError(f"the frozen network has {len(stages)} stages, the target needs {pos}")


def _walk(layers):
    for rec in layers:
        yield rec
        if rec["type"] == "residual":
            yield from _walk(rec["block"])
