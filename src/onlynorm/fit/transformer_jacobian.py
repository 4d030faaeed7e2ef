"""Gauss–Newton normal equations ``JᵀJ, Jᵀr`` of a sequence model's residual, formed chunk by chunk.

For ``r(θ) = f(θ; X) − y`` over the rows of ``X`` (``m`` residual entries, ``p`` parameters)

    JᵀJ = Σ_c J_cᵀ J_c,    Jᵀr = Σ_c J_cᵀ r_c,    J_c[:, T] = ∂r_c/∂θ_T  (forward mode, one tangent per column)

where ``c`` runs over chunks of rows and ``T`` over chunks of tangents (standard basis vectors of θ). A forward-mode
pass with ``k`` tangents over ``n`` rows holds about ``k · n`` copies of every activation of one row, so the chunk
sizes are chosen for ``k · n · (activation bytes of one row) ≤ max_bytes``; the whole ``J`` (``m × p``) is never
formed, only one row chunk's ``J_c`` (small: outputs × p). Sums are in float64 whatever the model's dtype. The
deadline is checked between chunks: a chunk that is predicted (from the chunks so far) not to finish in time is not
begun and :func:`normal_equations` returns ``None``.

>>> f = lambda th, x: x * th[0] + th[1]
>>> x = torch.arange(6.0).reshape(3, 2)
>>> eq = normal_equations(f, torch.tensor([1.0, 0.0]), [((x,), x)], max_bytes=64)
>>> eq.jtj.tolist()  # columns of J: x and 1
[[55.0, 15.0], [15.0, 6.0]]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["NormalEquations", "normal_equations", "activation_bytes", "chunk_plan", "MAX_BYTES"]

#: default memory cap of one forward-mode chunk (tangents × rows × activations of a row)
MAX_BYTES = 256 * 2**20

Call = tuple[torch.Tensor, ...]
Residual = Callable[..., torch.Tensor]


@dataclass
class NormalEquations:
    """``JᵀJ`` (p × p), ``Jᵀr`` (p), ``‖r‖²`` (float64), and what forming them cost."""

    jtj: torch.Tensor
    jtr: torch.Tensor
    rr: float
    seconds: float
    chunks: int


class _Bytes(TorchDispatchMode):
    """Sums the bytes of every tensor an op returns (an upper bound on what a forward pass holds at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def activation_bytes(f: Residual, theta: torch.Tensor, call: Call) -> int:
    """Bytes of all activations of ``f(theta, *call)`` on the first row of ``call`` (at least 1)."""
    one = tuple(t[:1] for t in call)
    counter = _Bytes()
    with torch.no_grad(), counter:
        f(theta, *one)
    return max(1, counter.total)


def chunk_plan(rows: int, params: int, row_bytes: int, max_bytes: int) -> tuple[int, int]:
    """``(rows per chunk, tangents per chunk)`` with ``rows · tangents · row_bytes ≤ max_bytes`` (at least 1, 1):
    all tangents at once if a single row allows it (fewest passes), else one row and as many tangents as fit."""
    budget = max(1, max_bytes // max(1, row_bytes))  # tangent-rows one chunk may hold
    if budget >= params:
        return max(1, min(rows, budget // params)), params
    return 1, max(1, budget)


def _rows(call: Call, start: int, stop: int) -> Call:
    return tuple(t[start:stop] for t in call)


def normal_equations(
    f: Residual,
    theta: torch.Tensor,
    pieces: list[tuple[Call, torch.Tensor]],
    *,
    max_bytes: int = MAX_BYTES,
    deadline: float | None = None,
    row_bytes: int | None = None,
) -> NormalEquations | None:
    """``JᵀJ, Jᵀr`` of ``r = f(θ, *call) − want`` summed over ``pieces`` (``(call, want)``, row dimension 0 of every
    tensor of a call), in chunks within ``max_bytes``; ``None`` if the deadline would pass first."""
    start = time.perf_counter()
    p = int(theta.numel())
    jtj = torch.zeros(p, p, dtype=torch.float64)
    jtr = torch.zeros(p, dtype=torch.float64)
    rr, chunks = 0.0, 0
    eye = torch.eye(p, dtype=theta.dtype)
    for call, want in pieces:
        rows = int(call[0].shape[0])
        splittable = all(t.shape[:1] == call[0].shape[:1] for t in call) and want.shape[:1] == call[0].shape[:1]
        per_row = row_bytes if row_bytes is not None else activation_bytes(f, theta, call)
        n_rows, n_tan = chunk_plan(rows if splittable else 1, p, per_row * (1 if splittable else rows), max_bytes)
        n_rows = n_rows if splittable else rows
        for r0 in range(0, rows, n_rows):
            sub, target = _rows(call, r0, r0 + n_rows), want[r0 : r0 + n_rows]

            def res(th: torch.Tensor, sub: Call = sub, target: torch.Tensor = target) -> torch.Tensor:
                return (f(th, *sub) - target).reshape(-1)

            cols = []
            for t0 in range(0, p, n_tan):
                if deadline is not None:  # predict this chunk's time from the mean so far (0 before the first)
                    now = time.perf_counter()
                    if now + (now - start) / max(chunks, 1) * (chunks > 0) > deadline:
                        return None
                tangents = eye[t0 : t0 + n_tan]
                dims: Any = (None, 0)  # the residual does not depend on the tangent; its derivative does
                out = vmap(lambda v, res=res: jvp(res, (theta,), (v,)), out_dims=dims)(tangents)
                r, jt = out[0], out[1]
                cols.append(jt.detach().to(torch.float64))
                chunks += 1
            jc = torch.cat(cols).T  # (residuals of the chunk) × p
            rc = r.detach().to(torch.float64)
            jtj += jc.T @ jc
            jtr += jc.T @ rc
            rr += float(rc @ rc)
    return NormalEquations(jtj, jtr, rr, time.perf_counter() - start, chunks)
