"""The deep construction for convolutions: blocks of ``k`` input channels, a residual stream of ``c_out`` channels.

A target conv ``W ∈ R^{c_out×c_in×k_h×k_w}`` (bias ``b``) has its input channels split into blocks ``J_1 … J_T``
of ``k`` channels (``T = ⌈c_in/k⌉``, the last block smaller when ``k ∤ c_in``). Per block::

    u_t = relu(Γ_t (A_t * x_{J_t}) + β_t)     A_t: k_t → N_t = c_out·k_t·k_h·k_w channels, the layer's geometry
    s   = Σ_t B_t u_t                         B_t: frozen 1×1 readout N_t → c_out (the residual stream)
    y   = γ_out ⊙ s + β_out                   γ_out = 1,  β_out = b − Σ_t B_t β_t   (paired=0)

**Branch ReLUs.** With ``paired=0`` (the linear regime) ``β_t`` keeps every branch channel active on the box, from
interval bounds of the target. Interval bounds grow geometrically with depth (×10 per residual block of a ResNet-20:
``β`` reaches 1e11 while activations stay O(1), and cancellation in ``β_out`` costs every digit). The default
``paired=1`` reads each branch unit twice, ``relu(v)`` through ``B_t`` and ``relu(−v)`` through the frozen ``−B_t``:
``B_t (relu(v) − relu(−v)) = B_t v`` for *every* ``v`` (exactly, in floating point too), so ``β_t = 0``, no bounds
are needed and the network equals the target on all of ``R^n``, not only on the box.

A 1×1 conv commutes with the spatial sum, so ``B_t Γ_t A_t = W[:, J_t]`` (kernels flattened to ``k_t·k_h·k_w``
columns) is a square Khatri–Rao system of size ``N_t`` — ``T`` of them per layer, solved batched — instead of one of
size ``c_out·c_in·k_h·k_w`` (the ``conv`` construction). In the linear regime ``β_t`` keeps every branch channel
active at every position of the reachable input (interval bounds of the target per position, padding included). All
branches run as one grouped conv (``groups = T``) and one 1×1 conv. A ``Linear`` layer is the same with a 1×1 kernel on a 1×1 image.

>>> import torch
>>> from torch import nn
>>> import onlynorm
>>> g = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
>>> f = onlynorm.reconstruct(g, method="deep", in_shape=(3, 4, 4), block=2)
>>> f.summary().widths      # blocks of 2 and 1 channels: 2·2·9 + 2·1·9 branch channels, 2 stream; 3·32, 3
[54, 2, 96, 3]
>>> bool(onlynorm.verify(f, g, samples=500).max_rel_error < 1e-9)
True
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..certify.cnn import certify_conv
from ..domain import Box
from ..errors import InvalidNetworkError
from ..linalg import blockwise_residual, solve_khatri_rao_batched
from ..linalg_refine import accurate_residual
from ..nets.conv_stream import ConvStream, grouped_conv
from ..nets.match import Realised, walk_bounds, walk_nodes
from ..nets.normnet import NormNet
from ..nets.records import SolveRecord
from ..nets.stage import Stage
from ..nets.stream import block_sizes
from ..nets.tied_conv import TiedConvStream
from ..options import OptionSpec
from ..targets.cnn import ConvNetSpec, box_tensors
from ..targets.layers import Conv, Linear
from .base import MARGIN, Construction, Progress, begin_solve, finish_solve, frozen_init, register, safe_margin
from .conv import build_stages, cnn_plan, cnn_target, conv_geometry
from .conv_memory import estimate_conv_bytes
from .deep import BLOCK
from .plan import Plan, PlanStep, StagePath, path_label
from .tied import TIED, draw_tied, solve_tied_conv, tied_option

__all__ = ["ConvDeepConstruction"]


#: 1 (default): sign-paired branches, exact for every input; 0: linear regime from interval bounds (``β_t``)
PAIRED = OptionSpec(
    "paired",
    int,
    min_val=0,
    max_val=1,
    help="1: each branch unit read as relu(v) − relu(−v) (readout [B, −B]): exact for every input, "
    "no bounds, deep nets stay accurate; 0: linear regime, β from interval bounds",
)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _as_conv(layer) -> Conv:
    return layer.as_conv() if isinstance(layer, Linear) else layer


@register
class ConvDeepConstruction(Construction):
    name = "conv_deep"
    cost = (
        "CNN targets with method='deep': per Conv2d/Linear ⌈c_in/k⌉ branches of c_out·k·kh·kw channels into a "
        "residual stream; ⌈c_in/k⌉ systems of size c_out·k·kh·kw per layer; exact"
    )
    options = (BLOCK, PAIRED, TIED, MARGIN)
    target_kinds = ("cnn",)

    def plan(self, target: ConvNetSpec, options: dict[str, Any]) -> Plan:
        """Per Conv/Linear one ``conv_stream`` stage ``c_in → c_out`` (a Linear as a 1×1 conv on a 1×1 image, ``flat``)
        with blocks of ``k = min(block, c_in)`` input channels: ``⌈c_in/k⌉`` systems of size ``N = c_out·k·k_h·k_w``;
        its branches are in the linear regime unless ``paired``."""
        k = int(options.get("block") or 1)
        paired = bool(1 if options.get("paired") is None else options["paired"])
        stage_type = TiedConvStream if options.get("tied") else ConvStream

        def realise(layer, index: int, at: StagePath, pos: int) -> PlanStep:
            conv = _as_conv(layer)
            c_out, c_in, kh, kw = conv.weight.shape
            kb = min(k, c_in)
            return PlanStep(
                layer=index,
                stages=(pos,),
                shapes=((c_in, c_out),),
                relu=(False,),
                linear_regime=() if paired else (0,),
                stage_type=stage_type,
                details={
                    "type": layer.type,
                    "block": kb,
                    "blocks": len(block_sizes(c_in, kb)),
                    "N": c_out * kb * kh * kw,
                    "paired": paired,
                    "flat": isinstance(layer, Linear),
                    "geometry": (conv_geometry(conv),),
                },
                at=at,
            )

        return cnn_plan(self.name, cnn_target(target), realise)

    def check_options(self, options: dict[str, Any], depth: int | None = None) -> dict[str, Any]:
        """The declared checks, then the defaults written in (``block = 1``, ``paired = 1``): they are recorded
        with the network, so a loaded network's plan does not depend on today's defaults."""
        options = super().check_options(tied_option(options), depth)
        options["block"] = int(options.get("block") or 1)
        options["paired"] = int(1 if options.get("paired") is None else options["paired"])
        options["tied"] = int(options.get("tied") or 0)
        return options

    def build_stages(
        self, plan: Plan, target: ConvNetSpec, gen: torch.Generator, *, dtype: torch.dtype, device, options
    ) -> list[Stage]:
        def stream(step: PlanStep) -> list[Stage]:
            ((c_in, c_out),) = step.shapes
            g = step.details["geometry"][0]
            stage = step.stage_type(  # ConvStream, or TiedConvStream with tied=1: the same configuration
                c_in,
                c_out,
                g["kernel_size"],
                g["stride"],
                g["padding"],
                g["dilation"],
                block=step.details["block"],
                flat=step.details["flat"],
                paired=step.details["paired"],
                dtype=dtype,
                device=device,
            )
            if isinstance(stage, TiedConvStream):
                draw_tied(stage, gen)
                return [stage]
            assert isinstance(stage, ConvStream)
            with torch.no_grad():
                for t, (units, _J) in enumerate(stage.block_slices()):
                    w = stage.block_kernel(t)[units] if t < stage.full else stage.block_kernel(t)
                    w.copy_(frozen_init((w.shape[0], w[0].numel()), gen, dtype=dtype, device=device).reshape(w.shape))
                    r = stage.readout.weight[:, units, 0, 0]
                    stage.readout.weight[:, units, 0, 0] = frozen_init(tuple(r.shape), gen, dtype=dtype, device=device)
            return [stage]

        return build_stages(plan, target.layers, stream, dtype, device)

    def estimate_bytes(self, target, dtype, *, plan: Plan | None = None, **options) -> int:
        if plan is None:  # refuses a target the plan cannot realise
            self.plan(cnn_target(target), self.check_options(options))
        method = "conv_tied" if options.get("tied") else "conv_deep"
        return estimate_conv_bytes(target, dtype, method, block=int(options.get("block") or 1))

    def solve(
        self,
        net: NormNet,
        target: ConvNetSpec,
        domain: Box,
        *,
        progress: Progress | None = None,
        plan: Plan | None = None,
    ) -> NormNet:
        _spec, out, margin = begin_solve(net, target)
        spec = target.to(dtype=torch.float64, device="cpu")  # γ, β are solved in float64, rounded once
        plan, nodes = self.matched(out, spec, plan)
        lo, hi = box_tensors(spec, domain, torch.float64)
        records: list[SolveRecord] = []

        def visit(node: Realised, lo, hi) -> None:
            (stage,) = node.stages
            step = plan.steps[node.index]
            solver = solve_tied_conv if isinstance(stage, TiedConvStream) else _solve_stream
            assert isinstance(stage, (ConvStream, TiedConvStream))
            records.append(
                solver(_as_conv(node.layer), stage, lo, hi, margin, step.layer, flat=step.details["flat"])  # type: ignore[arg-type]
            )
            if progress is not None:
                d = records[-1].details
                many = f"{d['blocks']} systems of size {d['size']}"
                what = f"one LU of size {d['size']} for {d['blocks']} blocks" if d.get("tied") else many
                progress(len(records), len(plan.steps), f"layer {step.layer}: {what}")

        walk_bounds(nodes, lo, hi, visit)
        return finish_solve(out, records, [], domain)

    def systems(self, net: NormNet, target: ConvNetSpec) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per target layer and input block ``t``: ``B_t diag(γ_t) A_t = W[:, J_t]`` with ``A_t`` the block's branch
        kernel as ``N_t × (k_t·k_h·k_w)``, ``B_t`` the readout's columns of its ``N_t`` channels, ``W[:, J_t]`` the
        target kernel's input channels ``J_t`` as ``c_out × (k_t·k_h·k_w)``. Labelled ``layer i block t (conv at
        stage 3.body.0)``."""
        _, nodes = self.matched(net, cnn_target(target))
        out = []
        for node in walk_nodes(nodes):
            (stage,) = node.stages
            W = _as_conv(node.layer).weight.to(dtype=net.dtype, device=net.device)
            where = f"{node.layer.type} at stage {path_label(node.paths[0])}"
            if isinstance(stage, TiedConvStream):
                for t, (_units, J) in enumerate(stage.block_slices()):
                    A_mod, B_mod = stage.block_maps(t)
                    label = f"layer {node.index} block {t} ({where})"
                    out.append((label, A_mod.weight.flatten(1), B_mod.weight.flatten(1), W[:, J].flatten(1)))
                continue
            assert isinstance(stage, ConvStream)
            B = stage.readout.weight.flatten(1)
            for t, (units, J) in enumerate(stage.block_slices()):
                A = stage.block_kernel(t)[units if t < stage.full else slice(None)].flatten(1)
                out.append((f"layer {node.index} block {t} ({where})", A, B[:, units], W[:, J].flatten(1)))
        return out

    def certify(self, net: NormNet, target: ConvNetSpec, domain: Box):
        """Per-channel activity of every branch over every position of the box, then a distance bound."""
        spec = cnn_target(target).to(dtype=torch.float64, device="cpu")
        return certify_conv(net, spec, domain, self.matched(net, spec)[1])


def _solve_stream(conv: Conv, stage: ConvStream, lo, hi, margin: float, index: int, flat: bool) -> SolveRecord:
    W = conv.weight.double()
    c_out, c_in, kh, kw = W.shape
    if (stage.out_channels, stage.in_channels, *stage.geometry["kernel_size"]) != (c_out, c_in, kh, kw):
        raise InvalidNetworkError(
            f"layer {index}: conv_stream {stage.in_channels} → {stage.out_channels} "
            f"{stage.geometry['kernel_size']} does not fit the target kernel {tuple(W.shape)}"
        )
    if flat:
        lo, hi = lo.reshape(1, -1, 1, 1), hi.reshape(1, -1, 1, 1)
    B = stage.readout.weight.detach().double().flatten(1)  # (c_out, channels)
    gamma = torch.empty(stage.channels, dtype=torch.float64)
    block_max, block_norm = [], []  # each block's max |Ŵ − W| and ‖Ŵ − W‖_F
    held = stage.branch_norm.weight.dtype  # γ is rounded to it when set below
    slices = stage.block_slices()
    groups = [list(range(stage.full))] + ([[stage.full]] if stage.rest is not None else [])
    for idx in groups:
        kernel = stage.block_kernel(idx[0]).detach().double()
        units = [slices[t][0] for t in idx]
        A = torch.stack([kernel[u].flatten(1) if idx[0] < stage.full else kernel.flatten(1) for u in units])
        Bt = torch.stack([B[:, u] for u in units])
        Wt = torch.stack([W[:, slices[t][1]].flatten(1) for t in idx])
        with _one_blas_thread():  # many small LUs: threads only contend (4-7× slower on a loaded 2-core box)
            sol = solve_khatri_rao_batched(A, Bt, Wt, layer=index)
        for u, gt in zip(units, sol.gamma):
            gamma[u] = gt
        if held == torch.float64:  # the solve's accurate residual is that of the γ the network holds
            block_max.append(sol.residual)
            block_norm.append(sol.residual_norm)
        else:  # γ as rounded to the network's dtype: its residual below that rounding (not u·|B||γ||A|-blurred)
            error = accurate_residual(A, Bt, sol.gamma.to(held).double(), Wt)
            block_max.append(error.abs().amax(dim=(-2, -1)))
            block_norm.append(torch.linalg.vector_norm(error, dim=(-2, -1)))
    # β: every branch channel active at every position of the reachable input
    if stage.paired:  # relu(v) − relu(−v) = v for every v: no activity to ensure, β_t = 0
        beta = torch.zeros_like(gamma)
    else:
        beta = _linear_regime_beta(stage, gamma, lo, hi, margin)
    with torch.no_grad():
        stage.branch_norm.weight.copy_(gamma)
        stage.branch_norm.bias.copy_(beta)
        stage.norm.weight.fill_(1.0)
        stage.norm.bias.copy_(conv.bias.double() - B @ beta)
    residual, relative = blockwise_residual(block_max, block_norm, W)
    return SolveRecord(
        layer=index,
        kind="batched",
        residual=residual,
        relative_residual=relative,
        exact=True,
        precision="float64",
        details={
            "type": "linear" if flat else "conv",
            "blocks": len(slices),
            "block": stage.block,
            "size": stage.per_block,
        },
    )


def _linear_regime_beta(stage: ConvStream, gamma: torch.Tensor, lo, hi, margin: float) -> torch.Tensor:
    """``β_t = −min z + slack``: every branch channel active at every position of the reachable input."""
    geo = (stage.geometry["stride"], stage.geometry["padding"], stage.geometry["dilation"])
    split = stage.full * stage.block
    mins, maxs, scales = [], [], []
    parts = [(stage.branch.weight, stage.full, slice(0, split), slice(0, stage.full * stage.per_block))]
    if stage.rest is not None:
        parts.append((stage.rest.weight, 1, slice(split, None), slice(stage.full * stage.per_block, None)))
    for kernel, groups, chans, units in parts:
        w = gamma[units].reshape(-1, 1, 1, 1) * kernel.detach().double()
        pos, neg = w.clamp(min=0), w.clamp(max=0)
        x_lo, x_hi = lo[:, chans], hi[:, chans]
        zmin = grouped_conv(x_lo, pos, groups, *geo) + grouped_conv(x_hi, neg, groups, *geo)
        zmax = grouped_conv(x_hi, pos, groups, *geo) + grouped_conv(x_lo, neg, groups, *geo)
        mins.append(zmin.amin(dim=(0, 2, 3)))
        maxs.append(zmax.amax(dim=(0, 2, 3)))
        # |Γ A| (|x| + 1) per channel: floors the slack of channels whose input range is one point (a dead ReLU),
        # so the certificate can prove them active at the *computed* input too (see safe_margin)
        mag = torch.maximum(x_lo.abs(), x_hi.abs()) + 1
        scales.append(grouped_conv(mag, w.abs(), groups, *geo).amax(dim=(0, 2, 3)))
    zmin, zmax = torch.cat(mins), torch.cat(maxs)
    beta = -zmin + safe_margin(zmin, zmax, margin, torch.cat(scales))
    return beta
