"""The transformer construction: a sequence model (:class:`~onlynorm.targets.transformer.TransformerSpec`) →
a frozen :class:`~onlynorm.nets.seqnet.SeqNet` computing it exactly, by tuning only normalization parameters.

Every parameterised linear map — q/k/v/out projections, MLP layers, token embeddings (``W·onehot(idx)``), learned
tables such as positional embeddings (``P·onehot(position)``), the output head — becomes a factorised stage
``Σ B_{st} diag(γ_{st}) A_{st} x_{J_t}`` (:mod:`onlynorm.nets.factorised`); its ``γ`` solve the square Khatri–Rao
systems ``B_{st} diag(γ_{st}) A_{st} = W[I_s, J_t]`` (:func:`onlynorm.linalg.solve_khatri_rao_batched`) and its
bias goes into ``β`` (``B_{s0} β_{s0} = b_{I_s}``, the minimum-norm solution). The branch is linear, so no bound
on the inputs is needed. LayerNorms stay LayerNorms with the target's ``γ, β``; buffers (masks) are copied; every
parameter-free op is copied. So ``f ≡ g`` up to the solves' rounding, for every input and sequence length.

``method="deep"`` (blocks of ``block`` input features, default 1, and ``out_block`` outputs, default
``min(m, 256)``: systems of size ``out_block·block``) or ``method="width"`` (one system of size ``m·n`` per map,
refused above :data:`MAX_WIDTH_SYSTEM`). The frozen tensors depend only on the seed and the architecture: they are
drawn from one generator, stage by stage, from the shapes alone.

``tied=1`` (``deep`` only): every block of a map shares one frozen pair ``(A, B)`` — one draw per map instead of one
per block, so *not* the i.i.d. network of the theorem (``tied=0``, the default). All ``S·T`` block systems of a map
then have one Khatri–Rao matrix: one LU per map and a solve with ``S·T`` right-hand sides
(:func:`onlynorm.linalg_tied.solve_khatri_rao_shared`); the frozen tensors of a map shrink ``S·T``-fold and its
forward reads out once per output block (:class:`~onlynorm.nets.factorised.FactorisedLinear`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..domain import Box
from ..errors import InvalidOptionError, MemoryBudgetError
from ..linalg import relative_residual, solve_khatri_rao_batched
from ..linalg_exact import compose_accurate
from ..linalg_tied import solve_khatri_rao_shared
from ..nets.factorised import FactorisedEmbedding, FactorisedLinear, FactorisedTable
from ..nets.records import NetMeta, SolveInfo, SolveRecord
from ..nets.seqnet import ConstStage, LayerNormStage, SeqNet
from ..nets.stage import Stage
from ..options import check_scalar
from ..targets.seqgraph import GNode
from ..targets.transformer import TransformerSpec
from .base import clone_unless_in_place
from .memory import format_bytes, memory_limit

__all__ = ["build_seqnet", "solve_seqnet", "check_transformer_options", "estimate_bytes", "MAX_WIDTH_SYSTEM", "METHODS"]

#: the largest Khatri–Rao system method="width" solves for one map (m·n); above it, use method="deep"
MAX_WIDTH_SYSTEM = 4096
METHODS = ("deep", "width")
_DEFAULT_OUT_BLOCK = 256


def check_transformer_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``{"method", "block", "out_block", "tied"}`` validated (``block``/``out_block``/``tied`` only for ``deep``;
    ``tied`` is 0 or 1, ``True``/``False`` accepted)."""
    if method not in METHODS:
        raise InvalidOptionError(f"method: expected one of {list(METHODS)} for a transformer target, found {method!r}")
    allowed = {"block", "out_block", "tied"} if method == "deep" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidOptionError(
            f"option {unknown[0]!r} is not an option of method {method!r} for transformers; "
            f"accepted: {sorted(allowed) or 'none'}"
        )
    out: dict[str, Any] = {"method": method}
    for name in sorted(allowed - {"tied"}):
        value = options.get(name)
        out[name] = None if value is None else check_scalar(value, name, int, min_val=1)
    if method == "deep":
        tied = options.get("tied", 0)
        out["tied"] = check_scalar(int(tied) if isinstance(tied, bool) else tied, "tied", int, min_val=0, max_val=1)
    return out


def _shape(node: GNode) -> tuple[int, int]:
    """``(n, m)`` of a parameterised linear node, from its configuration (never from the weights)."""
    c = node.config
    if node.op == "linear":
        return int(c["in_features"]), int(c["out_features"])
    if node.op == "embedding":
        return int(c["num_embeddings"]), int(c["embedding_dim"])
    shape = [int(v) for v in c["shape"]]
    d = shape[-1] if shape else 1
    return max(1, math.prod(shape) // max(d, 1)), d


def _blocks(node: GNode, options: dict[str, Any]) -> tuple[int, int]:
    n, m = _shape(node)
    if options["method"] == "width":
        if m * n > MAX_WIDTH_SYSTEM:
            raise MemoryBudgetError(
                f"method='width': {node.name!r} ({n}→{m}) needs one Khatri–Rao system of size {m * n:,} (over "
                f"{MAX_WIDTH_SYSTEM:,}); use method='deep' (systems of size out_block·block)"
            )
        return n, m
    return min(options.get("block") or 1, n), min(options.get("out_block") or _DEFAULT_OUT_BLOCK, m)


def estimate_bytes(spec: TransformerSpec, options: dict[str, Any], dtype: torch.dtype) -> int:
    """Peak bytes of build + solve: the frozen ``A, B`` of every factorised map (kept, in ``dtype``, plus their
    float64 copies and one chunk of system matrices while a map is solved; tied: one pair per map, its one
    ``N × N`` system and the ``S·T`` right-hand sides, solutions and residuals)."""
    size = torch.finfo(dtype).bits // 8
    frozen, peak = 0, 0
    for node in spec.nodes:
        if node.op in ("linear", "embedding", "table"):
            n, m = _shape(node)
            k, r = _blocks(node, options)
            blocks = math.ceil(n / k) * math.ceil(m / r)
            if options.get("tied"):
                elements = r * k * (k + r)
                solve = (r * k) ** 2 * 8 * 2 + blocks * r * k * 8 * 4
            else:
                elements = blocks * r * k * (k + r)
                solve = elements * 8 * 2 + min(256 << 20, blocks * (r * k) ** 2 * 8)
            frozen += elements * size
            peak = max(peak, solve)
    return frozen + peak


def _check_memory(spec: TransformerSpec, options: dict[str, Any], dtype: torch.dtype, device: Any) -> None:
    need = estimate_bytes(spec, options, dtype)
    limit, source = memory_limit(device)
    if need > limit:
        advice = "use method='deep' with a smaller out_block (systems of size out_block·block)"
        if options["method"] == "deep" and not options.get("tied"):
            tied = estimate_bytes(spec, {**options, "tied": 1}, dtype)
            if tied <= limit:
                advice = f"use tied=True (one frozen draw per map: ~{format_bytes(tied)}) or a smaller out_block"
        raise MemoryBudgetError(
            f"the transformer construction ({options['method']}) needs about {format_bytes(need)}, over the memory "
            f"limit {format_bytes(limit)} ({source}); {advice}",
            needed_bytes=need,
            limit_bytes=limit,
        )


def _stage_for(node: GNode, options: dict[str, Any], dtype: torch.dtype, device: Any) -> Stage:
    c = node.config
    if node.op in ("linear", "embedding", "table"):
        n, m = _shape(node)
        k, r = _blocks(node, options)
        tied = bool(options.get("tied"))
        if node.op == "table":
            return FactorisedTable(c["shape"], k, r, tied=tied, dtype=dtype, device=device)
        cls = FactorisedLinear if node.op == "linear" else FactorisedEmbedding
        return cls(n, m, k, r, tied=tied, dtype=dtype, device=device)
    if node.op == "layer_norm":
        return LayerNormStage(c["shape"], c["eps"], c["affine"], c["bias"], dtype=dtype, device=device)
    return ConstStage(c["shape"], c["dtype"], dtype=dtype, device=device)


def random_factors(stage: FactorisedLinear, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random frozen ``A, B`` for ``stage``, drawn from the shapes alone: ``A`` with random signs and magnitudes
    uniform in ``[0.5, 1.5]/√k``, each ``B_{st}`` with orthonormal rows (:func:`orthonormal_rows`) — one pair per
    block, or one for the whole map when the stage is tied (its tensors hold one).

    Gaussian factors work too, but their block systems are worse conditioned and the large ``γ`` of a badly
    conditioned block amplify rounding: a 2-block d=32 encoder measured 5e-11 relative error with Gaussian
    ``A, B``, 2e-15 with these."""
    shape = stage.A.shape
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    a = sign * (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)) / math.sqrt(stage.block)
    s, t, r, n = stage.B.shape
    return a, orthonormal_rows(s * t, r, n, gen).reshape(s, t, r, n)


def orthonormal_rows(batch: int, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random ``rows × cols`` matrices with orthonormal rows (``rows ≤ cols``): the first rows of the
    identity, then ``2⌈log₂ cols⌉`` rounds of a random column permutation and random Givens rotations of column
    pairs (``c, s = (u, v)/√(u² + v²)``, ``u, v`` Gaussian). Only the generator, elementwise IEEE operations and
    ``sqrt`` are used — no BLAS or LAPACK — so the bits do not depend on the thread count or the CPU.

    >>> q = orthonormal_rows(2, 3, 5, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(q @ q.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(2, 3, 3)))
    True
    """
    q = torch.zeros(batch, rows, cols, dtype=torch.float64)
    q[:, torch.arange(rows), torch.arange(rows)] = 1.0
    half = cols // 2
    for _ in range(2 * max(1, math.ceil(math.log2(max(cols, 2))))):
        q = q[:, :, torch.randperm(cols, generator=gen)]
        u = torch.randn(batch, 1, half, generator=gen, dtype=torch.float64)
        v = torch.randn(batch, 1, half, generator=gen, dtype=torch.float64)
        norm = torch.sqrt(u * u + v * v)
        c, s = u / norm, v / norm
        x, y = q[:, :, :half], q[:, :, half : 2 * half]
        q = torch.cat([c * x - s * y, s * x + c * y, q[:, :, 2 * half :]], dim=-1)
    return q


def build_seqnet(
    spec: TransformerSpec, *, seed: int, dtype: torch.dtype, device: Any = None, options: dict[str, Any]
) -> SeqNet:
    """The frozen network for ``spec``: random ``A, B`` (:func:`random_factors`, drawn in float64 from ``seed``
    stage by stage, then rounded to ``dtype``), ``γ = 1, β = 0``, LayerNorms at identity, buffers copied."""
    _check_memory(spec, options, dtype, device)  # before anything is allocated
    gen = torch.Generator().manual_seed(seed)
    stages: list[Stage] = []
    graph: list[GNode] = []
    for i, node in enumerate(spec.nodes):
        copy = GNode(node.op, node.name, node.target, list(node.args), dict(node.kwargs), dict(node.config))
        if node.op in ("linear", "embedding", "table", "layer_norm", "const"):
            stage = _stage_for(node, options, dtype, device)
            with torch.no_grad():
                if isinstance(stage, FactorisedLinear):
                    a, b = random_factors(stage, gen)
                    stage.A.copy_(a)
                    stage.B.copy_(b)
                elif isinstance(stage, ConstStage):
                    stage.get_buffer("value").copy_(spec.tensors[i]["value"])
            copy.config["stage"] = len(stages)
            stages.append(stage)
        graph.append(copy)
    meta = NetMeta(
        method="transformer",
        seed=seed,
        options=dict(options),
        target_parameters=spec.num_parameters,
        extra={"target": spec.name},
    )
    return SeqNet(stages, graph, spec.inputs, meta=meta)


def solve_seqnet(net: SeqNet, spec: TransformerSpec) -> SeqNet:
    """A copy of ``net`` with every ``γ, β`` solved for ``spec`` (frozen tensors untouched) — ``net`` itself inside
    :func:`~onlynorm.constructions.base.solving_in_place`, as for every construction's solve."""
    out: SeqNet = clone_unless_in_place(net)  # type: ignore[assignment]
    maps = {i: (w, b) for i, w, b in spec.linear_maps()}
    records = []
    for i, node in enumerate(out.graph):
        if "stage" not in node.config:
            continue
        stage = out.layers[int(node.config["stage"])]
        if isinstance(stage, FactorisedLinear):
            w, b = maps[i]
            records.append(solve_factorised(stage, w, b, layer=i, name=node.name))
        elif isinstance(stage, LayerNormStage):
            with torch.no_grad():
                for key in ("weight", "bias"):
                    mine, theirs = getattr(stage.norm, key), spec.tensors[i].get(key)
                    if mine is not None and theirs is not None:
                        mine.copy_(theirs)
    notes = ("transformer: exact for every input (the factorised branches are linear); the box is not used",)
    out.meta = out.meta.replace(solve=SolveInfo(records=tuple(records), domain=Box(-1.0, 1.0, dim=1), notes=notes))
    return out


def solve_factorised(
    stage: FactorisedLinear, w: torch.Tensor, b: torch.Tensor | None, *, layer: int, name: str
) -> SolveRecord:
    """Set ``stage``'s ``γ, β`` so that it computes ``x ↦ W x + b``; return the record of the solve."""
    s, t = stage.blocks
    k, r, n = stage.block, stage.out_block, stage.system_size
    m, fan_in = w.shape
    padded = torch.zeros(s * r, t * k, dtype=torch.float64, device=w.device)
    padded[:m, :fan_in] = w.to(torch.float64)
    blocks = padded.reshape(s, r, t, k).permute(0, 2, 1, 3).reshape(s * t, r, k)
    A, B = stage.factors()  # per block: the frozen tensors, or views of the tied pair (no copies)
    a = A.detach().to(torch.float64).reshape(s * t, n, k)
    bm = B.detach().to(torch.float64).reshape(s * t, r, n)
    if stage.tied:  # one matrix for every block: one LU, S·T right-hand sides
        shared = solve_khatri_rao_shared(a[0], bm[0], blocks, layer=layer)
        gamma, rcond = shared.gamma, torch.tensor([shared.rcond])
    else:
        gamma, _, rcond, _ = solve_khatri_rao_batched(a, bm, blocks, layer=layer)
    beta = torch.zeros(s, t, n, dtype=torch.float64, device=w.device)
    if b is not None:
        bias = torch.zeros(s * r, dtype=torch.float64, device=w.device)
        bias[:m] = b.to(torch.float64)
        first = bm.reshape(s, t, r, n)[:, 0]  # (S, r, N): β of each output block's first input block
        coeff = torch.linalg.solve(first @ first.transpose(-1, -2), bias.reshape(s, r, 1))
        beta[:, 0] = (first.transpose(-1, -2) @ coeff).squeeze(-1)
    with torch.no_grad():
        stage.norm.weight.copy_(gamma.reshape(-1))
        stage.norm.bias.copy_(beta.reshape(-1))
    g = stage.norm.weight.detach().to(torch.float64).reshape(s * t, n)  # as rounded to the network's dtype
    realised = compose_accurate(bm, g, a).reshape(s, t, r, k).permute(0, 2, 1, 3).reshape(s * r, t * k)[:m, :fan_in]
    residual, relative = relative_residual(realised, w.to(torch.float64))
    tolerance = 1e-10 if stage.A.dtype == torch.float64 else 1e-5  # what the network's dtype can hold
    details: dict[str, Any] = {"node": name, "blocks": s * t, "size": n} | ({"tied": 1} if stage.tied else {})
    if b is not None:
        beta_r = stage.norm.bias.detach().to(torch.float64).reshape(s, t, n)
        got = torch.einsum("stin,stn->si", bm.reshape(s, t, r, n), beta_r).reshape(-1)[:m]
        details["bias_residual"] = float((got - b.to(torch.float64)).abs().max())
    return SolveRecord(
        layer=layer,
        kind="shared" if stage.tied else "batched",
        residual=residual,
        relative_residual=relative,
        exact=bool(relative <= tolerance),
        rcond=float(rcond.min()),
        precision="float64",
        details=details,
    )
