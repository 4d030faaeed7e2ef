"""ONNX lowerings of a sequence graph's attention and activations, written out as the torch functions compute them
(:func:`onlynorm.targets.seqgraph.attention`, :func:`~onlynorm.targets.seqgraph.sdpa`, ``F.gelu``).

* attention: ``softmax(q kᵀ · scale + mask) v`` per head — ``Reshape``/``Transpose`` to split and merge heads,
  ``MatMul``, ``Mul``, ``Add``/``Where`` for the masks (bool ``True`` = not attended for ``nn.MultiheadAttention``,
  ``True`` = attended for ``scaled_dot_product_attention``), ``Softmax``; causal masks from ``Trilu`` of the
  dynamic ``(L, S)`` shape;
* GELU, tanh form: ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))``; erf form: ``x · 0.5 · (1 + erf(x/√2))``.
  onnxruntime's ``Erf`` has a float32 kernel only, so a float64 graph evaluates ``erf`` itself (:func:`erf`): a
  Taylor series below 1, ``1 − exp(−x²) R(x)`` with ``R`` piecewise polynomial on ``[1, 6)``, 1 past 6
  (``1 − erf(6) < 2.2e-17``); ``tests/test_transformer_onnx.py`` measures it against ``math.erf``.

>>> coefficients = erf_table()
>>> tuple(coefficients.shape)
(10, 15)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from ..errors import InvalidNetworkError
from .onnx_seq_graph import Dyn, NotDynamic, SeqGraph, Val

__all__ = ["attention", "attention_weights", "sdpa", "gelu", "erf", "erf_table", "ERF_DEGREE", "ERF_PIECES"]

ERF_PIECES, ERF_WIDTH, ERF_DEGREE, ERF_TAYLOR = 10, 0.5, 14, 20


@functools.cache
def erf_table() -> torch.Tensor:
    """``(pieces, degree + 1)``: row ``i`` the monomial coefficients (lowest first) of ``R(c_i + u/4)``,
    ``R(x) = erfc(x) · exp(x²)`` (smooth, about ``1/(x√π)``), ``c_i = 1.25 + i/2``, ``u ∈ [−1, 1]`` — Chebyshev
    interpolation of ``math.erfc(x) · math.exp(x²)``."""
    cheb = np.polynomial.chebyshev
    rows = []
    for i in range(ERF_PIECES):
        centre = 1.0 + (i + 0.5) * ERF_WIDTH

        def scaled(u: np.ndarray, c: float = centre) -> np.ndarray:
            return np.array([math.erfc(c + v * ERF_WIDTH / 2) * math.exp((c + v * ERF_WIDTH / 2) ** 2) for v in u])

        rows.append(cheb.cheb2poly(cheb.chebinterpolate(scaled, ERF_DEGREE)))  # type: ignore[arg-type,type-var]
    return torch.tensor(np.array(rows), dtype=torch.float64)


def _horner(g: SeqGraph, coefficients: list[str], u: str) -> str:
    total = coefficients[-1]
    for c in coefficients[-2::-1]:
        total = g.node("Add", [g.node("Mul", [total, u], "horner"), c], "horner")
    return total


def erf(g: SeqGraph, x: str, dtype: torch.dtype) -> str:
    """``erf(x)`` as ONNX nodes: ``Erf`` in float32; in float64, for ``|x| < 1`` its Taylor series
    ``x Σ_n (−1)ⁿ x²ⁿ / (n! (2n + 1)) · 2/√π`` (:data:`ERF_TAYLOR` terms, the last below 1e-19), for
    ``1 ≤ |x| < 6`` ``1 − exp(−x²) R(|x|)`` with ``R`` piecewise polynomial (:func:`erf_table`), past 6 ``1``;
    the sign of ``x`` restored."""
    if dtype != torch.float64:
        return g.node("Erf", [x], "erf")
    ax = g.node("Abs", [x], "abs")
    square = g.node("Mul", [ax, ax], "square")
    taylor = [2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(ERF_TAYLOR)]
    small = g.node("Mul", [ax, _horner(g, [g.scalar(c, dtype) for c in taylor], square)], "erf_small")
    top = 1.0 + ERF_PIECES * ERF_WIDTH
    clipped = g.node("Max", [g.node("Min", [ax, g.scalar(top - 1e-9, dtype)], "clip"), g.scalar(1.0, dtype)])
    offset = g.node("Sub", [clipped, g.scalar(1.0, dtype)], "offset")
    piece = g.node("Floor", [g.node("Div", [offset, g.scalar(ERF_WIDTH, dtype)], "div")], "piece")
    centre = g.node("Add", [g.node("Mul", [piece, g.scalar(ERF_WIDTH, dtype)], "mul"), g.scalar(ERF_WIDTH / 2, dtype)])
    u = g.node("Div", [g.node("Sub", [offset, centre], "sub"), g.scalar(ERF_WIDTH / 2, dtype)], "u")
    rows = g.node("Gather", [g.const("erf_table", erf_table()), g.cast(piece, dtype, torch.int64)], axis=0)
    columns = [
        g.node("Gather", [rows, g.scalar(j, torch.int64)], "coefficient", axis=-1) for j in range(ERF_DEGREE + 1)
    ]
    tail = g.node("Mul", [g.node("Exp", [g.node("Neg", [square], "neg")], "gauss"), _horner(g, columns, u)], "erfc")
    large = g.node("Sub", [g.scalar(1.0, dtype), tail], "erf_large")
    value = g.node("Where", [g.node("Less", [ax, g.scalar(1.0, dtype)], "near"), small, large], "erf_abs")
    value = g.node("Where", [g.node("GreaterOrEqual", [ax, g.scalar(top, dtype)], "far"), g.scalar(1.0, dtype), value])
    return g.node("Mul", [value, g.node("Sign", [x], "sign")], "erf")


def gelu(g: SeqGraph, out: torch.Tensor, x: Val, approximate: str = "none") -> str:
    """``F.gelu`` in the form torch evaluates it (``approximate`` ``'none'`` or ``'tanh'``)."""
    dtype, name = x.dtype, g.tensor(x)
    half = g.scalar(0.5, dtype)
    if approximate == "tanh":
        cube = g.node("Mul", [g.node("Mul", [name, name], "square"), name], "cube")
        inner = g.node("Add", [name, g.node("Mul", [g.scalar(0.044715, dtype), cube], "mul")], "add")
        inner = g.node("Mul", [g.scalar(math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5, dtype), inner], "mul")
        one_plus = g.node("Add", [g.scalar(1.0, dtype), g.node("Tanh", [inner], "tanh")], "add")
        return g.node("Mul", [g.node("Mul", [half, name], "mul"), one_plus], "gelu")
    if approximate != "none":
        raise InvalidNetworkError(f"gelu: approximate={approximate!r}; expected 'none' or 'tanh'")
    scaled = g.node("Mul", [name, g.scalar(1.0 / math.sqrt(2.0), dtype)], "mul")
    one_plus = g.node("Add", [g.scalar(1.0, dtype), erf(g, scaled, dtype)], "add")
    return g.node("Mul", [g.node("Mul", [name, half], "mul"), one_plus], "gelu")


def _additive(g: SeqGraph, mask: Val, dtype: torch.dtype) -> str:
    """A mask as added to the scores: bool ``True`` → ``−inf``, ``False`` → 0; a float mask cast to ``dtype``."""
    if mask.dtype != torch.bool:
        return g.tensor(mask, dtype)
    return g.node("Where", [g.tensor(mask), g.scalar(float("-inf"), dtype), g.scalar(0.0, dtype)], "additive")


def _dims(g: SeqGraph, x: str, start: int, end: int, sizes: tuple[int, int]) -> list[Any]:
    """Sizes ``start:end`` of the tensor ``x`` (read from its shape when the two runs disagree)."""
    if sizes[0] == sizes[1]:
        return [sizes[0]]
    sliced = g.node("Slice", [g.node("Shape", [x], "shape"), g.ints("start", [start]), g.ints("end", [end])], "dim")
    return [Dyn(sliced, *sizes)]


def _core(
    g: SeqGraph, q: str, k: str, v: str, rank: int, *, factor: float, dtype: torch.dtype, lengths: list[list[Any]]
) -> tuple[str, list[Any]]:
    """``q kᵀ · factor`` (the scores) and the ``(L, S)`` sizes of its last two axes."""
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = g.node("MatMul", [q, g.transpose(k, perm)], "scores")
    return g.node("Mul", [scores, g.scalar(factor, dtype)], "scaled"), lengths[0] + lengths[1]


def _finish(g: SeqGraph, scores: str, v: str, dtype: torch.dtype, safe: bool = True) -> str:
    """``softmax(scores) v``; ``safe``: a row of ``−inf`` scores (every key masked) gives 0, not NaN
    (:func:`onlynorm.targets.seqgraph.safe_softmax`)."""
    probs = g.node("Softmax", [scores], "softmax", axis=-1)
    if safe:
        top = g.node("ReduceMax", [scores], "row_max", axes=[-1], keepdims=1)
        masked = g.node("Equal", [top, g.scalar(float("-inf"), dtype)], "masked_row")
        probs = g.node("Where", [masked, g.scalar(0.0, dtype), probs], "safe_softmax")
    return g.node("MatMul", [probs, v], "attended")


def sdpa(
    g: SeqGraph,
    out: torch.Tensor,
    query: Val,
    key: Val,
    value: Val,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> str:
    """``F.scaled_dot_product_attention`` (no dropout), as :func:`onlynorm.targets.seqgraph.sdpa` computes it."""
    if dropout_p:
        raise InvalidNetworkError("scaled_dot_product_attention: dropout_p must be 0")
    if enable_gqa and query.a.size(-3) != key.a.size(-3):
        raise InvalidNetworkError("scaled_dot_product_attention with enable_gqa (grouped heads) has no ONNX lowering")
    if query.a.size(-1) != query.b.size(-1):
        raise NotDynamic("the attention's head size changes with the input's shape")
    dtype, rank = query.dtype, query.ndim
    factor = 1.0 / math.sqrt(query.a.size(-1)) if scale is None else float(scale)
    q, k, v = g.tensor(query), g.tensor(key), g.tensor(value)
    lengths = [
        _dims(g, q, rank - 2, rank - 1, (query.a.size(-2), query.b.size(-2))),
        _dims(g, k, key.ndim - 2, key.ndim - 1, (key.a.size(-2), key.b.size(-2))),
    ]
    scores, ls = _core(g, q, k, v, rank, factor=factor, dtype=dtype, lengths=lengths)
    inf = g.scalar(float("-inf"), dtype)
    if is_causal:
        allowed = g.node("Trilu", [g.ones_bool(ls)], "causal", upper=0)
        scores = g.node("Where", [allowed, scores, inf], "masked")
    if isinstance(attn_mask, Val):
        if attn_mask.dtype == torch.bool:
            scores = g.node("Where", [g.tensor(attn_mask), scores, inf], "masked")
        else:
            scores = g.node("Add", [scores, g.tensor(attn_mask, dtype)], "masked")
    return _finish(g, scores, v, dtype)


def _attention_scores(
    g: SeqGraph,
    q: Val,
    k: Val,
    v: Val,
    num_heads: int,
    batch_first: bool,
    attn_mask: Any,
    key_padding_mask: Any,
    is_causal: bool,
) -> tuple[str, str, bool]:
    """``(masked scores (N, H, L, S), value heads (N, H, S, hd), unbatched)`` as
    :func:`onlynorm.targets.seqgraph.attention` splits the heads and merges the masks."""
    dtype, heads = q.dtype, int(num_heads)
    names = [g.tensor(t) for t in (q, k, v)]
    unbatched = q.ndim == 2
    pad = g.tensor(key_padding_mask) if isinstance(key_padding_mask, Val) else None
    if unbatched:
        names = [g.unsqueeze(n, [0]) for n in names]
        pad = g.unsqueeze(pad, [0]) if pad is not None else None
    elif not batch_first:
        names = [g.transpose(n, [1, 0, 2]) for n in names]
    seq = 0 if unbatched or not batch_first else 1  # the length axis of the inputs as given
    e, ve = int(q.a.shape[-1]), int(v.a.shape[-1])
    split = [g.transpose(g.reshape(n, [0, 0, heads, w // heads]), [0, 2, 1, 3]) for n, w in zip(names, (e, e, ve))]
    mask = _additive(g, attn_mask, dtype) if isinstance(attn_mask, Val) else None
    if mask is not None and attn_mask.ndim == 3:
        rest = g.node("Slice", [g.node("Shape", [mask], "shape"), g.ints("start", [1]), g.ints("end", [3])], "dims")
        mask = g.node("Reshape", [mask, g.node("Concat", [g.ints("dims", [-1, heads]), rest], "shape", axis=0)])
    if pad is not None:
        pad = g.unsqueeze(_additive(g, Val(pad, key_padding_mask.a, key_padding_mask.b), dtype), [1, 2])
        mask = pad if mask is None else g.node("Add", [mask, pad], "mask")
    lengths = [
        _dims(g, names[0], 1, 2, (q.a.shape[seq], q.b.shape[seq])),
        _dims(g, names[1], 1, 2, (k.a.shape[seq], k.b.shape[seq])),
    ]
    scores, ls = _core(
        g, split[0], split[1], split[2], 4, factor=1.0 / (e // heads) ** 0.5, dtype=dtype, lengths=lengths
    )
    if mask is None and is_causal:
        causal = g.node("Trilu", [g.ones_bool(ls), g.scalar(1, torch.int64)], "causal", upper=1)
        mask = g.node("Where", [causal, g.scalar(float("-inf"), dtype), g.scalar(0.0, dtype)], "additive")
    if mask is not None:
        scores = g.node("Add", [scores, mask], "masked")
    return scores, split[2], unbatched


def attention(
    g: SeqGraph,
    out: torch.Tensor,
    q: Val,
    k: Val,
    v: Val,
    num_heads: int,
    batch_first: bool = True,
    attn_mask: Any = None,
    key_padding_mask: Any = None,
    is_causal: bool = False,
    safe: bool = True,
) -> str:
    """:func:`onlynorm.targets.seqgraph.attention` (``nn.MultiheadAttention`` between its projections)."""
    scores, vh, unbatched = _attention_scores(
        g, q, k, v, num_heads, batch_first, attn_mask, key_padding_mask, is_causal
    )
    merged = g.reshape(g.transpose(_finish(g, scores, vh, q.dtype, safe), [0, 2, 1, 3]), [0, 0, -1])
    if unbatched:
        return g.node("Squeeze", [merged, g.ints("axes", [0])], "unbatched")
    return merged if batch_first else g.transpose(merged, [1, 0, 2])


def attention_weights(
    g: SeqGraph,
    out: torch.Tensor,
    q: Val,
    k: Val,
    num_heads: int,
    batch_first: bool = True,
    attn_mask: Any = None,
    key_padding_mask: Any = None,
    is_causal: bool = False,
    average: bool = True,
) -> str:
    """:func:`onlynorm.targets.seqgraph.attention_weights`: ``Softmax`` of the masked scores, ``ReduceMean``
    over the heads when ``average``."""
    scores, _, unbatched = _attention_scores(g, q, k, k, num_heads, batch_first, attn_mask, key_padding_mask, is_causal)
    weights = g.node("Softmax", [scores], "weights", axis=-1)
    if average:
        weights = g.node("ReduceMean", [weights], "mean_heads", axes=[1], keepdims=0)
    return g.node("Squeeze", [weights, g.ints("axes", [0])], "unbatched") if unbatched else weights
