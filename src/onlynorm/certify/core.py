"""The certificate's common core: the result type, the rounding model, and what makes a network certifiable.

**Rounding model.** Every quantity computed in floating point carries the standard forward-error bound of a dot
product, ``|fl(a·x) − a·x| ≤ γ_n |a|·|x|`` with ``γ_n = n·u / (1 − n·u)`` and ``u`` the unit roundoff of the format
that computed it (:func:`gamma_n`). The certificate's own arithmetic runs in extended precision (x87 80-bit on
x86-64, ``u = 2⁻⁶⁴``), so its rounding lands far below float64's; the evaluation of ``f`` is bounded with the unit
roundoff of *the network's own dtype* (float32 networks too), and that of ``g`` with float64's (targets are always
evaluated in float64). The model needs every result within the format's range: :class:`Overflow` checks the
magnitudes each evaluation handles against ``finfo.max`` (a bound that may reach it is no bound: not certified),
and an underflowing or flushed product adds at most ``finfo.tiny`` each. Compositions of exact maps use
compensated products (:func:`matmul_xp`).

**What is certified.** The function a NormNet computes in inference form: frozen weights, ``γ``, ``β`` AND the
BatchNorm statistics as evaluated. The constructions use running mean 0, running variance 1 and ``eps = 0``
(``BN(z) = γ z + β`` exactly); a network whose statistics differ (a tampered file, a network trained with batch
statistics) is *not certifiable* and says which tensor is off (:func:`certifiability_problems`); so is one with
non-finite parameters. Nothing is ever certified from part of a network.

>>> gamma_n(10) < 1.2e-15
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..finite import all_finite
from ..nets.modules import ModuleSeq
from ..nets.normnet import NormNet
from ..nets.stage import STAGES
from ..nets.views import hook_problem

__all__ = [
    "CertifyResult",
    "gamma_n",
    "unit_roundoff",
    "XP",
    "U_XP",
    "to_xp",
    "affine_interval",
    "certifiability_problems",
    "structure_problems",
    "not_certifiable",
    "final_result",
    "Overflow",
]

#: extended precision used by the certificate's own arithmetic, and its unit roundoff
XP = np.longdouble
U_XP = float(np.finfo(XP).eps) / 2
U64 = float(torch.finfo(torch.float64).eps) / 2


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of a floating dtype (float64: 1.1e-16, float32: 6.0e-8)."""
    return float(torch.finfo(dtype).eps) / 2


def gamma_n(n: int, u: float = U64) -> float:
    """``γ_n = n·u / (1 − n·u)``: the relative forward-error bound of an ``n``-term dot product."""
    if n * u >= 1:
        return float("inf")
    return n * u / (1 - n * u)


@dataclass
class CertifyResult:
    """``certified``: every linear-regime unit is proven active on the box and the network is certifiable;
    ``bound``: ``sup_D |f − g|`` in exact arithmetic for the stored parameters (``inf`` if not certified);
    ``rounding_bound``: floating-point evaluation error of ``f`` (in its dtype) and ``g`` (float64) on ``D``."""

    certified: bool
    bound: float
    rounding_bound: float
    notes: list[str] = field(default_factory=list)


def to_xp(t: torch.Tensor) -> np.ndarray:
    """A tensor in extended precision (exact: every float64/float32 value is representable)."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy().astype(XP)


def affine_interval(P: np.ndarray, lo: np.ndarray, hi: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact range of ``P h + q`` over the box ``[lo, hi]`` (up to the rounding of this very computation)."""
    pos, neg = np.maximum(P, 0), np.minimum(P, 0)
    return pos @ lo + neg @ hi + q, pos @ hi + neg @ lo + q


def certifiability_problems(net: nn.Module) -> list[str]:
    """Why ``net`` cannot be certified as it is (empty when it can): non-finite parameters or buffers, BatchNorm
    layers that are not the fixed inference form ``γ z + β`` (running mean 0, running var 1, eps 0, running
    statistics tracked, not training)."""
    problems: list[str] = structure_problems(net)
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        if t.is_floating_point() and not all_finite(t):
            problems.append(f"{name} holds NaN/Inf values")
    for name, m in net.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        where = name or "batchnorm"
        if m.training or not m.track_running_stats or m.running_mean is None or m.running_var is None:
            problems.append(f"{where} normalises by batch statistics (training mode); call net.eval()")
            continue
        if not m.affine:
            problems.append(f"{where} has no affine γ, β")
        if float(m.eps) != 0.0:
            problems.append(f"{where}.eps is {m.eps:g}, expected 0 (BN(z) = γ z + β exactly)")
        if bool((m.running_mean != 0).any()):
            problems.append(f"{where}.running_mean is not 0 (max |mean| {float(m.running_mean.abs().max()):.3g})")
        if bool((m.running_var != 1).any()):
            problems.append(
                f"{where}.running_var is not 1 (max |var − 1| {float((m.running_var - 1).abs().max()):.3g})"
            )
    return problems


def structure_problems(net: nn.Module) -> list[str]:
    """Modules whose forward the certificate cannot know: a type other than the network, its stage types and
    torch's own Linear/Conv2d/BatchNorm (a subclass may override ``forward``), hooks, a replaced ``forward``."""
    allowed = (NormNet, ModuleSeq, nn.ModuleList, nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
    stage_types = set(STAGES.values())
    problems: list[str] = []
    for name, m in net.named_modules():
        where = name or "the network"
        if type(m) not in allowed and type(m) not in stage_types:
            problems.append(
                f"{where} is a {type(m).__name__}, not one of the module types the certificate models (a subclass "
                "may change forward)"
            )
        problem = hook_problem(m)
        if problem is not None:
            problems.append(f"{where}: {problem}")
    return problems


class Overflow:
    """The rounding model's range condition: ``|fl(x) − x| ≤ u|x|`` holds only while every result stays below the
    format's largest finite number. Each check receives an upper bound of the magnitudes an evaluation handles —
    of a dot product's terms and partial sums (``Σ|a_i||x_i|`` bounds both, in any order), of a scaling, of an
    offset added — in ``f``'s dtype (:meth:`check`) or float64 for ``g`` (:meth:`check_g`). A bound that may
    reach the range (with room for rounding) means the evaluation may overflow to ``inf``: it is *not* a bound,
    and the certificate does not hold (:attr:`hit`, with a note)."""

    def __init__(self, dtype: torch.dtype):
        info = torch.finfo(dtype)
        self.dtype, self.u = dtype, unit_roundoff(dtype)
        #: an absolute error per rounded product or scaling that underflows (or is flushed to zero)
        self.eta = float(info.tiny)
        self.limit_f = float(info.max) * (1 - 4 * info.eps)
        self.limit_g = float(torch.finfo(torch.float64).max) * (1 - 4 * U64)
        self.worst_f = 0.0
        self.worst_g = 0.0

    def check(self, terms, gamma=None, beta=None) -> None:
        """A stage of ``f``: ``terms`` bounds ``|A||x̃|`` (the products and partial sums of ``A x̃``); then
        ``γ ⊙ (A x̃) + β``."""
        worst = np.asarray(terms, dtype=np.float64)
        if gamma is not None:
            worst = np.maximum(worst, np.asarray(gamma, dtype=np.float64) * worst)
        if beta is not None:
            worst = worst + np.asarray(beta, dtype=np.float64)
        self.worst_f = max(self.worst_f, _peak(worst))

    def check_g(self, terms, beta=None) -> None:
        """A layer of ``g`` in float64: ``terms`` bounds ``|W||h̃|``, then ``+ b``."""
        worst = np.asarray(terms, dtype=np.float64) + (0 if beta is None else np.asarray(beta, dtype=np.float64))
        self.worst_g = max(self.worst_g, _peak(worst))

    @property
    def hit(self) -> bool:
        return not (self.worst_f < self.limit_f and self.worst_g < self.limit_g)

    def notes(self) -> list[str]:
        out = []
        name = str(self.dtype).removeprefix("torch.")
        if not self.worst_f < self.limit_f:
            out.append(
                f"the network's {name} evaluation may overflow on the box: its intermediate magnitudes reach "
                f"{self.worst_f:.3g}, beyond {name}'s largest finite {self.limit_f:.3g} (f may be inf there) — "
                "no rounding bound holds; use a smaller box or float64"
            )
        if not self.worst_g < self.limit_g:
            out.append(
                f"the target's float64 evaluation may overflow on the box (magnitudes up to {self.worst_g:.3g}): "
                "no rounding bound holds"
            )
        return out


def _peak(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    m = float(np.max(x))
    return m if not np.isnan(m) else float("inf")


def final_result(certified: bool, bound: float, rounding: float, notes: list[str]) -> CertifyResult:
    """The result of a finished certificate: a non-finite (overflowed or NaN) bound is never certified."""
    if certified and not (math.isfinite(bound) and math.isfinite(rounding)):
        certified = False
        notes.append("the bounds overflowed (non-finite)")
    if not certified:
        notes.append("not certified: equivalence is only supported by samples")
    return CertifyResult(
        certified=certified, bound=bound if certified else float("inf"), rounding_bound=rounding, notes=notes
    )


def not_certifiable(problems: list[str]) -> CertifyResult:
    """The result for a network that cannot be certified: the first few reasons, and what to do."""
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return CertifyResult(
        certified=False,
        bound=float("inf"),
        rounding_bound=float("inf"),
        notes=[
            f"not certifiable: {shown} — the certificate covers networks in the constructions' "
            "inference form (running mean 0, running var 1, eps 0, finite parameters); re-solve "
            "or reload the network"
        ],
    )


#: Veltkamp's splitter for the extended format (64-bit significand): x = hi + lo with 32-bit halves
_SPLIT = XP(2.0**32 + 1.0)
#: above this many scalar products, :func:`matmul_xp` composes with one plain extended-precision product
DOT2_BUDGET = 60_000_000


def _two_sum(a, b):
    s = a + b
    z = s - a
    return s, (a - (s - z)) + (b - z)


def _split(a):
    c = _SPLIT * a
    hi = c - (c - a)
    return hi, a - hi


def _two_product(a, b):
    p = a * b
    a1, a2 = _split(a)
    b1, b2 = _split(b)
    return p, a2 * b2 - (((p - a1 * b1) - a2 * b1) - a1 * b2)


def matmul_xp(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C, E)`` with ``|C − A B| ≤ E`` entrywise, for extended-precision (XP) matrices of exact values.

    Products of up to :data:`DOT2_BUDGET` scalar terms are evaluated as *compensated* dot products (Ogita, Rump &
    Oishi's Dot2: error-free TwoProduct and TwoSum over the inner dimension, as if in twice the working
    precision), with their bound ``u|AB| + γ_n² |A||B|`` (``u = U_XP``, ``n`` the inner dimension; valid without
    underflow or overflow, which the certificate checks separately); larger ones by one plain XP product with
    ``γ_n |A||B|``. The compensated product keeps the composition's own rounding at ``u`` *relative to the
    result* — with cancelling factors (the Khatri–Rao pairs, offsets ``β`` that cancel) a plain product's error is
    relative to ``|A||B|`` instead, which can exceed the result by orders of magnitude."""
    A = np.asarray(A, dtype=XP)
    B = np.asarray(B, dtype=XP)
    vector = B.ndim == 1
    B2 = B.reshape(B.shape[0], -1)
    n = A.shape[1]
    absAB = np.abs(A) @ np.abs(B2)
    if A.shape[0] * n * B2.shape[1] > DOT2_BUDGET or n == 0:
        C = A @ B2
        E = gamma_n(n + 1, U_XP) * absAB
    else:
        s = np.zeros((A.shape[0], B2.shape[1]), dtype=XP)
        c = np.zeros_like(s)
        for k in range(n):
            p, e = _two_product(A[:, k : k + 1], B2[k : k + 1, :])
            s, q = _two_sum(s, p)
            c = c + (q + e)
        C = s + c
        g = gamma_n(n + 1, U_XP)
        E = U_XP * np.abs(C) * (1 + 2 * U_XP) + 2 * g * g * absAB
    if vector:
        return C.reshape(-1), E.reshape(-1)
    return C, E
