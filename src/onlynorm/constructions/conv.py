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

from ..certify.cnn import certify_conv
from ..domain import Box
from ..errors import InvalidNetworkError
from ..linalg import solve_khatri_rao
from ..nets.conv import FixedOp, NormConv2d, ResidualStage
from ..nets.linear import NormLinear
from ..nets.match import Realised, walk_bounds, walk_nodes
from ..nets.normnet import NormNet
from ..nets.records import SolveRecord
from ..nets.stage import Stage
from ..targets.cnn import ConvNetSpec, box_tensors
from ..targets.layers import Conv, Pool, ResidualBlock
from .base import MARGIN, Construction, Progress, begin_solve, finish_solve, frozen_init, random_norm_linear, register
from .conv_memory import estimate_conv_bytes
from .pair import pair_offsets, record_of, set_norms, solve_pair
from .plan import LayoutKey, Plan, PlanStep, StagePath

__all__ = ["ConvConstruction", "build_stages", "cnn_plan", "cnn_target", "conv_geometry"]


@register
class ConvConstruction(Construction):
    """Per target Conv2d a pair of NormConv2d stages (``c_in → N`` with the layer's geometry, then 1×1 ``N → c_out``),
    per Linear a pair of NormLinear stages (``n → m·n → m``); see the module docstring.

    Its plan (:func:`cnn_plan`) has one step per Conv/Linear, depth first (the order of ``spec.weighted()``), each at
    its place in the nested network, e.g. ``at=(3, "body")`` for a conv in the body of the residual stage 3.
    """

    name = "conv"
    cost = (
        "CNN/residual targets (chosen automatically): per Conv2d a random conv c_in→N (N = c_out·c_in·k²) and a "
        "1×1 conv; per Linear a width pair; exact"
    )
    options = (MARGIN,)
    target_kinds = ("cnn",)

    # ------------------------------------------------------------------ plan, build
    def plan(self, target: ConvNetSpec, options: dict[str, Any]) -> Plan:
        """Per Conv ``(c_in, N), (N, c_out)`` with ``N = c_out·c_in·k_h·k_w`` (the first stage in the linear regime,
        the layer's geometry; the second 1×1); per Linear ``(n, m·n), (m·n, m)``."""

        def realise(layer, index: int, at: StagePath, pos: int) -> PlanStep:
            if isinstance(layer, Conv):
                c_out, c_in, kh, kw = layer.weight.shape
                N = c_out * c_in * kh * kw
                return PlanStep(
                    layer=index,
                    stages=(pos, pos + 1),
                    shapes=((c_in, N), (N, c_out)),
                    relu=(True, False),
                    linear_regime=(0,),
                    stage_type=NormConv2d,
                    details={"type": "conv", "N": N, "geometry": (conv_geometry(layer), conv_geometry(None))},
                    at=at,
                )
            m, n = layer.weight.shape
            return PlanStep(
                layer=index,
                stages=(pos, pos + 1),
                shapes=((n, m * n), (m * n, m)),
                relu=(True, False),
                linear_regime=(0,),
                details={"type": "linear", "N": m * n},
                at=at,
            )

        return cnn_plan(self.name, cnn_target(target), realise)

    def build_stages(
        self, plan: Plan, target: ConvNetSpec, gen: torch.Generator, *, dtype: torch.dtype, device, options
    ) -> list[Stage]:
        return build_stages(plan, target.layers, lambda step: self._pair(step, gen, dtype, device), dtype, device)

    @staticmethod
    def _pair(step: PlanStep, gen, dtype, device) -> list[Stage]:
        (n, N), (_, m) = step.shapes
        if step.stage_type is NormConv2d:
            g = step.details["geometry"][0]
            kh, kw = g["kernel_size"]
            first = NormConv2d(
                n, N, (kh, kw), g["stride"], g["padding"], g["dilation"], relu=True, dtype=dtype, device=device
            )
            second = NormConv2d(N, m, relu=False, dtype=dtype, device=device)
            with torch.no_grad():
                a = frozen_init((N, n * kh * kw), gen, dtype=dtype, device=device)
                first.conv.weight.copy_(a.reshape(N, n, kh, kw))
                second.conv.weight.copy_(frozen_init((m, N), gen, dtype=dtype, device=device).reshape(m, N, 1, 1))
            return [first, second]
        return [
            random_norm_linear(n, N, True, gen, dtype=dtype, device=device),
            random_norm_linear(N, m, False, gen, dtype=dtype, device=device),
        ]

    def estimate_bytes(self, target, dtype, *, plan: Plan | None = None, **options) -> int:
        if plan is None:  # refuses a target the plan cannot realise
            self.plan(cnn_target(target), self.check_options(options))
        return estimate_conv_bytes(target, dtype, "conv")

    # ------------------------------------------------------------------ solve, systems, certificate
    def solve(
        self,
        net: NormNet,
        target: ConvNetSpec,
        domain: Box,
        *,
        progress: Progress | None = None,
        plan: Plan | None = None,
    ) -> NormNet:
        spec, out, margin = begin_solve(net, target)
        plan, nodes = self.matched(out, spec, plan)
        lo, hi = box_tensors(spec, domain, net.dtype)
        records: list[SolveRecord] = []

        def visit(node: Realised, lo, hi) -> None:
            first, second = node.stages
            records.append(_solve_conv_pair(node.layer, plan.steps[node.index], first, second, lo, hi, margin))
            if progress is not None:
                progress(len(records), len(plan.steps), f"{len(records)} Khatri–Rao systems")

        walk_bounds(nodes, lo.to(net.device), hi.to(net.device), visit)
        return finish_solve(out, records, [], domain)

    def systems(self, net: NormNet, target: ConvNetSpec) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per target Conv ``A`` = the first conv's kernel as ``N × (c_in·k_h·k_w)``, ``B`` = the 1×1 conv's
        weight as ``c_out × N``, ``W`` = the target kernel as ``c_out × (c_in·k_h·k_w)``; per Linear the pair's
        weights (as the width construction). Labelled ``layer i (conv at stage 3.body.0)``."""
        _, nodes = self.matched(net, cnn_target(target))
        out = []
        for node in walk_nodes(nodes):
            first, second = node.stages
            if isinstance(first, NormConv2d) and isinstance(second, NormConv2d):
                A, B = first.conv.weight.flatten(1), second.conv.weight.flatten(1)
            elif isinstance(first, NormLinear) and isinstance(second, NormLinear):
                A, B = first.linear.weight, second.linear.weight
            else:  # pragma: no cover - the plan check admits only these pairs
                raise InvalidNetworkError(f"{node.where}: expected a pair of NormConv2d or NormLinear stages")
            W = node.layer.weight.flatten(1).to(dtype=net.dtype, device=net.device)
            out.append((node.where, A, B, W))
        return out

    def certify(self, net: NormNet, target: ConvNetSpec, domain: Box):
        """Per-channel activity over every position of the box, then a distance bound; see :mod:`onlynorm.certify.cnn`."""
        spec = cnn_target(target).to(dtype=torch.float64, device="cpu")
        return certify_conv(net, spec, domain, self.matched(net, spec)[1])


def _solve_conv_pair(layer, step: PlanStep, first, second, lo, hi, margin: float) -> SolveRecord:
    """The pair solve of :mod:`~onlynorm.constructions.pair` for one target layer.

    A Linear layer is a NormLinear pair: :func:`~onlynorm.constructions.pair.solve_pair` itself. A Conv's pair is
    the same with per-channel offsets: ``γ`` solves ``B Γ A = W`` (kernels flattened), and ``β₁`` keeps each channel
    of ``Γ (A * x)`` active at every position of the reachable input (interval bounds per position, zero padding
    included, minimised over positions): ``β₁ = −min z + slack``, ``β₂ = b − B β₁`` (:func:`pair_offsets`).
    """
    if step.stage_type is not NormConv2d:
        return solve_pair(first, second, layer.weight, layer.bias, lo[0], hi[0], margin=margin, layer=step.layer)
    A4 = first.conv.weight
    A, B = A4.flatten(1), second.conv.weight.flatten(1)
    sol = solve_khatri_rao(A, B, layer.weight.flatten(1), layer=step.layer)
    GA4 = sol.gamma.reshape(-1, 1, 1, 1) * A4
    zmin, zmax = layer.bounds(lo, hi, weight=GA4, use_bias=False)
    # the per-channel scale |Γ A| * (|x| + 1) floors the slack of channels with a one-point range (see safe_margin)
    scale = layer.apply(torch.maximum(lo.abs(), hi.abs()) + 1, GA4.abs()).amax(dim=(0, 2, 3))
    beta1, beta2 = pair_offsets(zmin.amin(dim=(0, 2, 3)), zmax.amax(dim=(0, 2, 3)), B, layer.bias, margin, scale)
    set_norms(first, sol.gamma, beta1)
    set_norms(second, None, beta2)
    return record_of(sol, step.layer, type="conv")


def cnn_target(target: Any) -> ConvNetSpec:
    if not isinstance(target, ConvNetSpec):
        raise InvalidNetworkError(
            f"this network was built for a CNN target; expected the same CNN as target (a ConvNetSpec, or the model "
            f"with in_shape), found {type(target).__name__}"
        )
    return target


def conv_geometry(layer: Conv | None) -> dict[str, tuple[int, ...]]:
    """``kernel_size``, ``stride``, ``padding``, ``dilation`` of a target conv (``None``: a 1×1 conv)."""
    if layer is None:
        return {"kernel_size": (1, 1), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
    kh, kw = layer.weight.shape[2:]
    return {
        "kernel_size": (int(kh), int(kw)),
        "stride": tuple(layer.stride),
        "padding": tuple(layer.padding),
        "dilation": tuple(layer.dilation),
    }


def cnn_plan(method: str, target: ConvNetSpec, realise: Callable[[Any, int, StagePath, int], PlanStep]) -> Plan:
    """The plan of a network mirroring ``target``: ``realise(layer, index, at, position)`` gives the step of each
    Conv/Linear (its stages start at ``position`` of the stage list ``at``); a residual block becomes one
    ``residual`` stage whose ``body`` and ``shortcut`` are planned the same way; every other layer one copied
    ``op:<type>`` stage. Steps come depth first, in the order of ``target.weighted()``.
    """
    steps: list[PlanStep] = []
    layout: list[tuple[StagePath, LayoutKey]] = []

    def visit(layers, at: StagePath) -> None:
        pos = 0
        for layer in layers:
            if layer.has_weights:
                step = realise(layer, len(steps), at, pos)
                steps.append(step)
                layout.extend(((*at, j), (step.stage_type, None)) for j in step.stages)
                pos += len(step.stages)
                continue
            layout.append(
                ((*at, pos), (ResidualStage, None) if isinstance(layer, ResidualBlock) else (FixedOp, layer.type))
            )
            if isinstance(layer, ResidualBlock):
                visit(layer.body, (*at, pos, "body"))
                visit(layer.shortcut, (*at, pos, "shortcut"))
            pos += 1

    visit(target.layers, ())
    return Plan(method, tuple(steps), tuple(layout))


def build_stages(plan: Plan, layers, make_weighted: Callable[[PlanStep], list[Stage]], dtype, device) -> list[Stage]:
    """Mirror the target's layers: ``make_weighted(step)`` for each Conv/Linear (its plan step, in order), a
    :class:`ResidualStage` per residual block, a :class:`FixedOp` for every parameter-free layer (ReLU, pooling,
    Flatten)."""
    steps = iter(plan.steps)

    def mirror(layers) -> list[Stage]:
        stages: list[Stage] = []
        for layer in layers:
            if layer.has_weights:
                stages += make_weighted(next(steps))
            elif isinstance(layer, ResidualBlock):
                stages.append(ResidualStage(mirror(layer.body), mirror(layer.shortcut), dtype=dtype, device=device))
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

    return mirror(layers)
