"""Can this frozen network express this target? Per-system rank and conditioning, without solving twice.

Every construction reduces to Khatri–Rao systems ``B diag(γ) A = W``. For a frozen network (random,
re-initialised or pretrained) :func:`capacity` factors each system matrix ``M = Aᵀ ⊙ B`` once with a
rank-revealing QR (column pivoting), reading off its numerical rank and a condition estimate
``|R₁₁| / |R_kk|``. A system with full row rank reaches *every* ``W``; a rank-deficient one reaches the target
only if ``vec W`` lies in the range of ``M`` (checked by least squares, only then). For sparse networks the
structural rank of the pattern is reported too: it bounds the rank for every choice of values.

>>> from torch import nn
>>> import onlynorm
>>> g = nn.Sequential(nn.Linear(3, 2)).double()
>>> report = onlynorm.capacity(onlynorm.random_normnet(g, seed=0), g)
>>> report.expressible, [s.rank for s in report.systems]
(True, [6])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from ..errors import InvalidNetworkError
from ..linalg import khatri_rao_system, kr_pattern, structural_rank, vec
from ..nets.normnet import NormNet
from ..nets.seqnet import SeqNet
from ..targets.cnn import ConvNetSpec
from ..targets.convert import as_target
from ..targets.mlp import MLPSpec
from ..targets.transformer import TransformerSpec
from . import get_construction
from .base import check_target_kind
from .transformer_match import check_architecture, factorised_maps

__all__ = ["capacity", "seq_capacity", "CapacityReport", "SystemCapacity"]


@dataclass
class SystemCapacity:
    label: str
    equations: int  # m·n
    unknowns: int  # N
    rank: int
    condition: float  # |R₁₁| / |R_kk| from pivoted QR (≈ cond(M) up to a modest factor)
    structural_rank: int | None  # for sparse frozen weights
    expressible: (
        bool  # vec W ∈ range(M): the system is exactly solvable (full row rank, or rank-deficient and consistent)
    )
    residual: float  # relative least-squares residual of the target (0 when full row rank)

    @property
    def verdict(self) -> str:
        """``exactly solvable`` (full row rank: every W; or rank-deficient and consistent) or ``least squares
        only`` with its residual — never "expressible" for a system that only has a least-squares solution."""
        if self.expressible:
            return "exactly solvable" + ("" if self.rank == self.equations else " (rank-deficient but consistent)")
        return f"NOT exactly solvable: least squares only (relative residual {self.residual:.1e})"


@dataclass
class CapacityReport:
    method: str
    systems: list[SystemCapacity] = field(default_factory=list)
    #: layers the construction realises only approximately even with every system solved (e.g. low rank)
    approximations: list[str] = field(default_factory=list)

    @property
    def expressible(self) -> bool:
        """The network can compute the target *exactly*: every system is exactly solvable and no layer is
        approximated by the construction itself (``onlynorm capacity`` exits 1 otherwise)."""
        return all(s.expressible for s in self.systems) and not self.approximations

    def rows(self) -> list[tuple[str, str]]:
        out = []
        for s in self.systems:
            srank = "" if s.structural_rank is None else f", structural rank {s.structural_rank}"
            out.append(
                (
                    s.label,
                    f"rank {s.rank}/{s.equations} ({s.unknowns} unknowns{srank}), cond ≈ {s.condition:.1e}: "
                    f"{s.verdict}",
                )
            )
        out += [("approximate", a) for a in self.approximations]
        out.append(("target", "exactly expressible" if self.expressible else "NOT exactly expressible"))
        return out

    def __str__(self) -> str:
        w = max((len(k) for k, _ in self.rows()), default=0)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in self.rows())


#: relative residual ‖M γ − vec W‖ / ‖vec W‖ below which a rank-deficient system still reaches W (as verify's
#: default float64 tolerance)
EXPRESSIBLE_RTOL = 1e-9


def capacity(
    frozen: NormNet, target: MLPSpec | ConvNetSpec | nn.Module, *, example_input: Any = None
) -> CapacityReport:
    """Per Khatri–Rao system of ``frozen``: rank, condition estimate, and whether ``target`` is reachable.

    A CNN target (a ``ConvNetSpec``, or the model itself: its image shape is read from ``frozen``) has one system
    per Conv/Linear layer (``conv``), or per layer and input block (``conv_deep``).

    A transformer network (a :class:`~onlynorm.nets.seqnet.SeqNet` of ``random_normnet(model, example_input=x)``)
    takes the model and ``example_input``: one row per linear map (:func:`seq_capacity`).
    """

    if isinstance(frozen, SeqNet):
        return seq_capacity(frozen, target, example_input)
    if not isinstance(frozen, NormNet):
        raise InvalidNetworkError(f"expected a NormNet, found {type(frozen).__name__}")
    spec = as_target(target, frozen.in_shape)
    check_target_kind(frozen, spec)
    method = frozen.meta.method or "width"
    report = CapacityReport(method=method)
    for label, A, B, W in get_construction(method).systems(frozen, spec):
        A64, B64, W64 = (t.detach().to(device="cpu", dtype=torch.float64) for t in (A, B, W))
        M = khatri_rao_system(A64, B64).numpy()
        equations, unknowns = M.shape
        sparse = bool((A64 == 0).any() or (B64 == 0).any())
        srank = structural_rank(kr_pattern(A64, B64)) if sparse else None
        R, _perm = scipy.linalg.qr(M, mode="r", pivoting=True, check_finite=False)
        diag = np.abs(np.diagonal(R))
        top = float(diag[0]) if diag.size else 0.0
        tol = max(M.shape) * np.finfo(np.float64).eps * top
        rank = int((diag > tol).sum())
        condition = top / float(diag[rank - 1]) if rank > 0 else float("inf")
        if rank == equations:
            expressible, residual = True, 0.0
        else:  # only now a second factorisation: is vec W in the range of M?
            rhs = vec(W64).numpy()
            gamma = np.linalg.lstsq(M, rhs, rcond=None)[0]
            scale = float(np.linalg.norm(rhs)) or 1.0
            residual = float(np.linalg.norm(M @ gamma - rhs)) / scale
            # the verification tolerance; a rank-deficient M has condition ∞, which must not widen the test
            expressible = residual <= EXPRESSIBLE_RTOL
        report.systems.append(SystemCapacity(label, equations, unknowns, rank, condition, srank, expressible, residual))
    report.approximations = get_construction(method).approximations(frozen, spec)
    return report


def seq_capacity(frozen: SeqNet, model: Any, example_input: Any) -> CapacityReport:
    """Per linear map of a transformer network: its ``m·n`` equations (``B_{st} diag(γ_{st}) A_{st} = W[I_s, J_t]``
    over every block, padding excluded), its tunable ``γ`` (``S·T·N``), and the rank and condition of its
    block-diagonal system — rank = the sum of the blocks' ranks (singular values above
    ``max(r, N)·ε·σ_max`` of each block), condition = the largest singular value of any block over the smallest
    kept one. The bias needs ``B_{s0} β_{s0} = b_{I_s}``: counted in the residual. The LayerNorms take the model's
    ``γ, β`` as they are (always reachable)."""
    if not isinstance(model, nn.Module) or example_input is None:
        raise InvalidNetworkError(
            "capacity of a transformer network: expected the torch model of its architecture and example_input=<a "
            "tensor of inputs>, found " + (type(model).__name__ if example_input is not None else "no example_input")
        )
    spec = TransformerSpec.from_module(model, example_input)
    check_architecture(frozen, spec)
    report = CapacityReport(method=f"transformer ({frozen.meta.options.get('method', 'deep')})")
    for label, stage, w, b in factorised_maps(frozen, spec):
        report.systems.append(_map_capacity(label, stage, w, b))
    return report


def _map_capacity(label: str, stage: Any, w: torch.Tensor, b: torch.Tensor | None) -> SystemCapacity:
    s, t = stage.blocks
    k, r, n = stage.block, stage.out_block, stage.system_size
    m, fan_in = w.shape
    A, B = stage.factors()  # per block (a tied stage's one pair, seen by every block)
    a = A.detach().to("cpu", torch.float64).reshape(s * t, n, k)
    bm = B.detach().to("cpu", torch.float64).reshape(s * t, r, n)
    rows = [min(r, m - (i // t) * r) for i in range(s * t)]  # real outputs and inputs of each block
    cols = [min(k, fan_in - (i % t) * k) for i in range(s * t)]
    padded = torch.zeros(s * r, t * k, dtype=torch.float64)
    padded[:m, :fan_in] = w.detach().to("cpu", torch.float64)
    blocks = padded.reshape(s, r, t, k).permute(0, 2, 1, 3).reshape(s * t, r, k)
    rank, top, low, num, den = 0, 0.0, float("inf"), 0.0, float(padded.square().sum())
    spectra: dict[tuple[int, int], torch.Tensor] = {}  # tied: blocks with the same real part share their system
    for i in range(s * t):
        # the block's system restricted to its real equations: (B_i ⊙ A_iᵀ) γ = vec W_i, rows i < r_i, cols j < k_i
        M = khatri_rao_system(a[i, :, : cols[i]], bm[i, : rows[i]])
        key = (rows[i], cols[i])
        sv = spectra[key] if stage.tied and key in spectra else torch.linalg.svdvals(M)
        spectra[key] = sv
        kept = sv[sv > max(M.shape) * torch.finfo(torch.float64).eps * float(sv[0])]
        rank += int(kept.numel())
        top, low = max(top, float(sv[0])), min(low, float(kept[-1]))
        if kept.numel() < M.shape[0]:  # rank-deficient: is this block's W in the range?
            rhs = vec(blocks[i, : rows[i], : cols[i]])
            gamma = torch.linalg.lstsq(M, rhs.reshape(-1, 1), driver="gelsd").solution.reshape(-1)
            num += float((M @ gamma - rhs).square().sum())
    if b is not None:  # β of each output block's first input block: B_{s0} β = b_{I_s} (minimum norm)
        bias = torch.zeros(s * r, dtype=torch.float64)
        bias[:m] = b.detach().to("cpu", torch.float64)
        for j in range(s):
            first = bm[j * t, : rows[j * t]]
            rhs = bias[j * r : j * r + rows[j * t]]
            beta = torch.linalg.lstsq(first, rhs.reshape(-1, 1), driver="gelsd").solution.reshape(-1)
            num += float((first @ beta - rhs).square().sum())
        den += float(bias.square().sum())
    residual = (num / den) ** 0.5 if den > 0 else num**0.5
    # residual: 0 for every full-rank block; a rank-deficient one counts what least squares leaves, and the bias's
    expressible = residual <= EXPRESSIBLE_RTOL
    return SystemCapacity(label, m * fan_in, s * t * n, rank, top / low, None, expressible, residual)
