"""Width/depth trade-off with skip connections: width ``m·k``, depth ``⌈n/k⌉ + 1`` per layer.

The input coordinates of a target layer ``(W, b)`` are split into blocks ``J_1 … J_T`` of size ``k`` (the last one
smaller when ``k ∤ n``). A residual stream ``s ∈ R^m`` starts at 0; a skip connection carries ``x`` to every block::

    u_t = relu(Γ_t A_t x_{J_t} + β_t)      A_t ∈ R^{mk×k}        (all units active on the box)
    s  ← s + B_t u_t                         B_t ∈ R^{m×mk} frozen, no normalization
    y  = relu(Γ_out s + β_out)               γ_out = 1, β_out = b − Σ_t B_t β_t

Each block is a square Khatri–Rao system ``B_t Γ_t A_t = W[:, J_t]`` of size ``m·k``; all blocks of a layer are
solved as one batched LU. With ``k = 1`` a layer costs ``O(n·m³)`` instead of ``O(m³n³)``: the construction that
scales to large ``d``. The number of tunable ``γ`` is still ``m·n`` (plus ``m`` output scales).

>>> from torch import nn
>>> import onlynorm
>>> g = nn.Sequential(nn.Linear(5, 3)).double()
>>> f = onlynorm.reconstruct(g, method="deep", block=2)
>>> f.summary().widths, f.summary().depth      # blocks of 2, 2, 1 inputs; then the output norm
([6, 6, 3, 3], 4)
"""

from __future__ import annotations

from typing import Any

import torch

from ..certify import CertifyResult, certify_residual_streams
from ..domain import Box, affine_bounds, interval_bounds
from ..linalg import blockwise_residual, solve_khatri_rao_batched
from ..nets.match import walk_nodes
from ..nets.normnet import NormNet
from ..nets.records import SolveRecord
from ..nets.stage import Stage
from ..nets.stream import ResidualStream
from ..nets.tied import TiedResidualStream
from ..options import OptionSpec
from ..targets.mlp import MLPSpec
from .base import MARGIN, Construction, Progress, begin_solve, fill_frozen, finish_solve, register, weight_scale
from .pair import pair_offsets, set_norms
from .plan import Plan, PlanStep
from .tied import TIED, draw_tied, solve_tied_stream, tied_option

__all__ = ["DeepConstruction"]


BLOCK = OptionSpec("block", int, min_val=1, help="input block size k (default 1): width m·k, depth ⌈n/k⌉ + 1")


@register
class DeepConstruction(Construction):
    name = "deep"
    cost = (
        "residual stream with skip connections: width m·k, depth ⌈n/k⌉+1 per layer; exact; ⌈n/k⌉ systems of "
        "size m·k (k=1: O(n·m³), scales to large d)"
    )
    options = (BLOCK, TIED, MARGIN)

    def check_options(self, options: dict[str, Any], depth: int | None = None) -> dict[str, Any]:
        return super().check_options(tied_option(options), depth)

    def plan(self, target: MLPSpec, options: dict[str, Any]) -> Plan:
        """One residual stream per target layer (tied: one shared draw per layer), input blocks of ``min(k, n)``."""
        k = options.get("block") or 1
        stage_type = TiedResidualStream if options.get("tied") else ResidualStream
        steps = []
        for i, w in enumerate(target.weights):
            m, n = w.shape
            steps.append(
                PlanStep(
                    layer=i,
                    stages=(i,),
                    shapes=((n, m),),
                    relu=(i < target.depth - 1,),
                    stage_type=stage_type,
                    details={"block": min(k, n)},
                )
            )
        return Plan(self.name, tuple(steps))

    def build(self, target: MLPSpec, *, seed: int, dtype: torch.dtype, device, **options: Any) -> NormNet:
        options.setdefault("block", 1)
        return super().build(target, seed=seed, dtype=dtype, device=device, **options)

    def build_stages(
        self, plan: Plan, target: MLPSpec, gen: torch.Generator, *, dtype: torch.dtype, device, options: dict[str, Any]
    ) -> list[Stage]:
        stages: list[Stage] = []
        for step in plan.steps:
            ((n, m),) = step.shapes
            if step.stage_type is TiedResidualStream:
                tied = TiedResidualStream(n, m, step.details["block"], step.relu[0], dtype=dtype, device=device)
                draw_tied(tied, gen)
                stages.append(tied)
                continue
            stage = ResidualStream(n, m, step.details["block"], relu=step.relu[0], dtype=dtype, device=device)
            _draw_untied(stage, gen)
            stages.append(stage)
        return stages

    def estimate_bytes(self, target: MLPSpec, dtype: torch.dtype, *, plan: Plan | None = None, **options: Any) -> int:
        plan = plan if plan is not None else self.plan(target, options)
        item = torch.empty((), dtype=dtype).element_size()
        if options.get("tied"):  # A (mk×k), B (m×mk) once per layer, γ/β of m·n units; one (mk)² LU, T right-hand sides
            sizes = [(w.shape[0], w.shape[1], s.details["block"]) for w, s in zip(target.weights, plan.steps)]
            network = sum(2 * (m * k * k + m * m * k) + 4 * m * n for m, n, k in sizes) * item
            return network + max(16 * (m * k) ** 2 + 32 * m * n for m, n, k in sizes)
        network = sum(2 * w.shape[0] ** 2 * w.shape[1] for w in target.weights) * item
        largest = max((w.shape[0] * step.details["block"]) ** 2 for w, step in zip(target.weights, plan.steps)) * 8
        return network + max(largest, min(256 << 20, largest * max(w.shape[1] for w in target.weights))) * 2

    def _stages(
        self, net: NormNet, target: MLPSpec, plan: Plan | None = None
    ) -> list[ResidualStream | TiedResidualStream]:
        """The residual stream of every target layer, read off the matcher."""
        _, nodes = self.matched(net, target, plan)
        streams: list[ResidualStream | TiedResidualStream] = []
        for node in walk_nodes(nodes):
            stage = node.stages[0]
            assert isinstance(stage, (ResidualStream, TiedResidualStream))  # the plan check admits only streams
            streams.append(stage)
        return streams

    def systems(self, net: NormNet, target: MLPSpec):
        out = []
        for i, (stage, W) in enumerate(zip(self._stages(net, target), target.weights)):
            for t, J in enumerate(stage.block_slices()):
                if isinstance(stage, TiedResidualStream):
                    A_mod, B_mod = stage.block_maps(t)
                    A, B = A_mod.weight, B_mod.weight
                else:
                    A, B = stage.branches[t].linear.weight, stage.readouts[t].weight
                out.append((f"layer {i} block {t}", A, B, W[:, J].to(net.dtype)))
        return out

    def solve(
        self, net: NormNet, target: MLPSpec, domain: Box, *, progress: Progress | None = None, plan: Plan | None = None
    ) -> NormNet:
        spec, out, margin = begin_solve(net, target)
        boxes = interval_bounds(spec, domain)
        records = []
        stages = self._stages(out, spec, plan)
        for i, (stage, W, b) in enumerate(zip(stages, spec.weights, spec.biases)):
            lo, hi = boxes[i]
            if isinstance(stage, TiedResidualStream):
                records.append(solve_tied_stream(stage, W, b, lo, hi, margin, i))
                if progress is not None:
                    progress(i + 1, spec.depth, f"layer {i}: one shared system of size {stage.per_block}")
                continue
            slices = stage.block_slices()
            gammas: list[torch.Tensor] = [W.new_empty(0)] * len(slices)
            rconds: list[float] = []
            block_max, block_norm = [], []  # each block's max |Ŵ − W| and ‖Ŵ − W‖_F, from its solve
            # one batched solve per block size (all blocks but possibly the last share k)
            for k in sorted(set(stage.sizes)):
                idx = [t for t, size in enumerate(stage.sizes) if size == k]
                A = torch.stack([stage.branches[t].linear.weight for t in idx])
                B = torch.stack([stage.readouts[t].weight for t in idx])
                Wt = torch.stack([W[:, slices[t]] for t in idx])
                sol = solve_khatri_rao_batched(A, B, Wt, layer=i)  # γ in the network's dtype, residual of that γ
                rconds += [float(r) for r in sol.rcond]
                block_max.append(sol.residual)
                block_norm.append(sol.residual_norm)
                for t, g in zip(idx, sol.gamma):
                    gammas[t] = g
            offset = torch.zeros_like(b)
            for t, (branch, readout, J) in enumerate(zip(stage.branches, stage.readouts, slices)):
                A = branch.linear.weight
                GA = gammas[t].unsqueeze(1) * A
                zmin, zmax = affine_bounds(GA, lo[J], hi[J])
                beta, _ = pair_offsets(
                    zmin, zmax, readout.weight, torch.zeros_like(b), margin, weight_scale(GA, lo[J], hi[J])
                )
                set_norms(branch, gammas[t], beta)
                offset = offset + readout.weight @ beta
            set_norms(stage, None, b - offset)
            residual, relative = blockwise_residual(block_max, block_norm, W)  # without composing Ŵ again
            records.append(
                SolveRecord(
                    layer=i,
                    kind="batched",
                    residual=residual,
                    relative_residual=relative,
                    exact=True,
                    rcond=min(rconds),
                    precision="float64",
                    details={"blocks": len(slices), "block": stage.block},
                )
            )
            if progress is not None:
                progress(
                    i + 1, spec.depth, f"layer {i}: {len(slices)} systems of size {stage.out_features * stage.block}"
                )
        return finish_solve(out, records, [], domain)

    def certify(self, net: NormNet, target: MLPSpec, domain: Box) -> CertifyResult:
        return certify_residual_streams(net, target, domain, self.matched(net, target)[1])


def _draw_untied(stage: ResidualStream, gen: torch.Generator) -> None:
    """Every block's own ``A_t``, ``B_t``: one draw per tensor, in place, in the network's dtype."""
    for branch, readout in zip(stage.branches, stage.readouts):
        fill_frozen(branch.linear.weight, gen)
        fill_frozen(readout.weight, gen)
