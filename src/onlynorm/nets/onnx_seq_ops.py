"""ONNX lowerings of the copied (parameter-free) nodes of a sequence graph: one function per name of
:data:`onlynorm.targets.seqgraph.FUNCTIONS` (``call`` nodes) and :data:`~onlynorm.targets.seqgraph.METHODS`
(``method`` nodes, keyed ``".name"``).

A lowering is called as ``lower(g, out, *args, **kwargs)``: ``g`` the :class:`~onlynorm.nets.onnx_seq_graph.SeqGraph`,
``out`` the node's value on the example (its dtype and rank decide casts and axes), the arguments as the graph
gives them with tensors as :class:`~onlynorm.nets.onnx_seq_graph.Val` and changing sizes as
:class:`~onlynorm.nets.onnx_seq_graph.Dyn`. It returns the ONNX name of a tensor result, a :class:`Dyn`'s name
(``int`` results), or a structure of these. Operands of elementwise ops are cast to the dtype torch's promotion
gave the result, so ``mask + 0.0`` or ``x * 2`` type-check in ONNX as they do in torch.

>>> sorted(LOWERINGS)[:4]
['.bool', '.chunk', '.contiguous', '.double']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidNetworkError
from .onnx_seq_graph import INT64_MAX, Dyn, NotDynamic, SeqGraph, Val
from .onnx_seq_math import attention, attention_weights, gelu, sdpa

__all__ = ["LOWERINGS"]

Lowering = Callable[..., Any]


def _dtype(v: Any) -> torch.dtype | None:
    return v.dtype if isinstance(v, Val) else torch.int64 if isinstance(v, Dyn) else None


def _binary(op: str, int_op: str | None = None, compare: bool = False) -> Lowering:
    def lower(g: SeqGraph, out: Any, x: Any, y: Any, **kwargs: Any) -> Any:
        if kwargs.get("alpha", 1) != 1:
            raise InvalidNetworkError(f"{op} with alpha={kwargs['alpha']!r} has no ONNX lowering")
        if not isinstance(out, torch.Tensor):  # arithmetic of sizes (Dyn and int)
            if int_op is None or not isinstance(out, int) or isinstance(out, bool):
                raise NotDynamic(f"{op} of sizes that change with the input's shape")
            return g.node(int_op, [_int(g, x), _int(g, y)], "size")
        dtype = out.dtype
        if compare:
            kinds = [t for t in (_dtype(x), _dtype(y)) if t is not None]
            dtype = kinds[0] if len(kinds) == 1 else torch.promote_types(*kinds)
        return g.node(op, [g.tensor(x, dtype), g.tensor(y, dtype)], op.lower())

    return lower


def _int(g: SeqGraph, v: Any) -> str:
    return v.name if isinstance(v, Dyn) else g.ints("size", [int(v)])


def _floordiv(g: SeqGraph, out: Any, x: Any, y: Any) -> Any:
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            raise InvalidNetworkError("floor division of integer tensors has no ONNX lowering")
        return g.node("Floor", [_binary("Div")(g, out, x, y)], "floordiv")
    return _binary("Div", "Div")(g, out, x, y)  # sizes are positive: truncation is floor


def _unary(op: str) -> Lowering:
    def lower(g: SeqGraph, out: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            if isinstance(x, Dyn) and op == "Neg":
                return g.node("Neg", [x.name], "size")
            raise NotDynamic(f"{op} of a size that changes with the input's shape")
        return g.node(op, [g.tensor(x, out.dtype)], op.lower())

    return lower


def _softmax(g: SeqGraph, out: torch.Tensor, x: Val, dim: Any = None, *args: Any, **kwargs: Any) -> str:
    if dim is None:
        raise InvalidNetworkError("softmax without dim has no ONNX lowering; pass dim=")
    return g.node("Softmax", [g.tensor(x, out.dtype)], "softmax", axis=int(dim))


def _getattr(g: SeqGraph, out: Any, x: Any, name: str) -> Any:
    if name == "shape":
        return tuple(g.dim(x, i) for i in range(x.ndim))
    if name in ("T", "mT"):
        perm = list(range(x.ndim))[::-1] if name == "T" else list(range(x.ndim - 2)) + [x.ndim - 1, x.ndim - 2]
        return g.transpose(g.tensor(x), perm)
    return out  # ndim, dtype, device: the same in both runs


def _getitem(g: SeqGraph, out: Any, x: Any, index: Any) -> Any:
    if not isinstance(x, Val):
        return x[index]  # a tuple (shape, split, pack) holding Val/Dyn/int
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, Val) for i in items):
        if len(items) == 1 and items[0].dtype in (torch.int64, torch.int32):
            return g.node("Gather", [g.tensor(x), g.tensor(items[0])], "gather", axis=0)
        raise InvalidNetworkError("indexing by a tensor has no ONNX lowering (only x[long_indices])")
    name, axis = g.tensor(x), 0
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    for item in items:
        if item is Ellipsis:
            axis += x.ndim - consumed
        elif item is None:
            name, axis = g.unsqueeze(name, [axis]), axis + 1
        elif isinstance(item, slice):
            if item != slice(None):
                start = 0 if item.start is None else item.start
                stop = INT64_MAX if item.stop is None else item.stop
                bounds = [g.vec([start]), g.vec([stop]), g.ints("axis", [axis]), g.ints("step", [item.step or 1])]
                name = g.node("Slice", [name, *bounds], "slice")
            axis += 1
        elif isinstance(item, (int, Dyn)):
            name = g.node("Gather", [name, g.index(item)], "select", axis=axis)
        else:
            raise InvalidNetworkError(f"indexing by {type(item).__name__} has no ONNX lowering")
    return name


def _sizes(args: tuple[Any, ...]) -> list[Any]:
    """``view(2, 3)`` and ``view((2, 3))`` alike."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return list(args[0])
    return list(args)


def _reshape(g: SeqGraph, out: torch.Tensor, x: Val, *shape: Any) -> str:
    return g.reshape(g.tensor(x), _sizes(shape))


def _flatten(g: SeqGraph, out: torch.Tensor, x: Val, start_dim: int = 0, end_dim: int = -1) -> str:
    if x.ndim == 0:
        return g.reshape(g.tensor(x), [1])
    s, e = start_dim % x.ndim, end_dim % x.ndim
    dims = [g.dim(x, i) for i in range(s)] + [-1] + [g.dim(x, i) for i in range(e + 1, x.ndim)]
    return g.reshape(g.tensor(x), dims)


def _transpose(g: SeqGraph, out: torch.Tensor, x: Val, d0: int, d1: int) -> str:
    perm = list(range(x.ndim))
    perm[d0 % x.ndim], perm[d1 % x.ndim] = perm[d1 % x.ndim], perm[d0 % x.ndim]
    return g.transpose(g.tensor(x), perm)


def _permute(g: SeqGraph, out: torch.Tensor, x: Val, *dims: Any) -> str:
    return g.transpose(g.tensor(x), [int(d) % x.ndim for d in _sizes(dims)])


def _unsqueeze(g: SeqGraph, out: torch.Tensor, x: Val, dim: int) -> str:
    return g.unsqueeze(g.tensor(x), [int(dim) % out.dim()])


def _squeeze(g: SeqGraph, out: torch.Tensor, x: Val, dim: Any = None) -> str:
    if dim is None:
        axes = [i for i in range(x.ndim) if x.a.shape[i] == 1 and x.b.shape[i] == 1]
    else:
        axes = [int(d) % x.ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        axes = [i for i in axes if x.a.shape[i] == 1]
    return g.node("Squeeze", [g.tensor(x), g.ints("axes", axes)], "squeeze") if axes else g.tensor(x)


def _expand(g: SeqGraph, out: torch.Tensor, x: Val, *sizes: Any) -> str:
    dims = [1 if (isinstance(d, int) and d == -1) else d for d in _sizes(sizes)]  # Expand broadcasts: 1 keeps
    return g.node("Expand", [g.tensor(x), g.vec(dims)], "expand")


def _expand_as(g: SeqGraph, out: torch.Tensor, x: Val, other: Val) -> str:
    return g.node("Expand", [g.tensor(x), g.shape(other)], "expand")


def _repeat(g: SeqGraph, out: torch.Tensor, x: Val, *sizes: Any) -> str:
    reps = _sizes(sizes)
    name = g.tensor(x)
    if len(reps) > x.ndim:
        name = g.unsqueeze(name, list(range(len(reps) - x.ndim)))
    return g.node("Tile", [name, g.vec(reps)], "repeat")


def _cast(g: SeqGraph, out: torch.Tensor, x: Val, *args: Any, **kwargs: Any) -> str:
    return g.cast(g.tensor(x), x.dtype, out.dtype)


def _identity(g: SeqGraph, out: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return g.tensor(x) if isinstance(x, Val) else x


def _size(g: SeqGraph, out: Any, x: Val, dim: Any = None) -> Any:
    return g.dim(x, int(dim)) if dim is not None else tuple(g.dim(x, i) for i in range(x.ndim))


def _masked_fill(g: SeqGraph, out: torch.Tensor, x: Val, mask: Val, value: Any) -> str:
    return g.where(g.tensor(mask, torch.bool), g.tensor(value, out.dtype), g.tensor(x, out.dtype), out.dtype)


def _where(g: SeqGraph, out: torch.Tensor, cond: Val, x: Any, y: Any) -> str:
    return g.where(g.tensor(cond, torch.bool), g.tensor(x, out.dtype), g.tensor(y, out.dtype), out.dtype)


def _tri(upper: int) -> Lowering:
    def lower(g: SeqGraph, out: torch.Tensor, x: Val, diagonal: Any = 0) -> str:
        return g.node("Trilu", [g.tensor(x, out.dtype), g.index(diagonal)], "triu" if upper else "tril", upper=upper)

    return lower


def _constant(value: Any) -> Lowering:
    """``torch.ones/zeros/full(size, ...)`` with a size that changes with the input: ``Expand`` of a scalar."""

    def lower(g: SeqGraph, out: torch.Tensor, *args: Any, **kwargs: Any) -> str:
        fill = value
        if value is None:  # torch.full(size, fill_value)
            size, fill = args[0], kwargs.get("fill_value", args[1] if len(args) > 1 else None)
            if isinstance(fill, (Val, Dyn)):
                raise InvalidNetworkError("torch.full with a tensor fill value has no ONNX lowering")
            sizes = list(size)
        else:
            sizes = _sizes(args if args else (kwargs["size"],))
        return g.node("Expand", [g.scalar(fill, out.dtype), g.vec(sizes)], "constant")

    return lower


def _like(value: Any) -> Lowering:
    def lower(g: SeqGraph, out: torch.Tensor, x: Val, *args: Any, **kwargs: Any) -> str:
        return g.node("Expand", [g.scalar(value, out.dtype), g.shape(x)], "constant")

    return lower


def _arange(g: SeqGraph, out: torch.Tensor, *args: Any, **kwargs: Any) -> str:
    bounds = list(args) + [kwargs[k] for k in ("start", "end", "step") if k in kwargs]
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (list(bounds) + [1])[:3]
    parts = [
        g.cast(g.index(v), torch.int64, out.dtype) if isinstance(v, Dyn) else g.scalar(v, out.dtype)
        for v in (start, end, step)
    ]
    return g.node("Range", parts, "arange")


def _cat(g: SeqGraph, out: torch.Tensor, tensors: Any, dim: int = 0) -> str:
    return g.node("Concat", [g.tensor(t, out.dtype) for t in tensors], "cat", axis=int(dim) % out.dim())


def _stack(g: SeqGraph, out: torch.Tensor, tensors: Any, dim: int = 0) -> str:
    axis = int(dim) % out.dim()
    return g.node("Concat", [g.unsqueeze(g.tensor(t, out.dtype), [axis]) for t in tensors], "stack", axis=axis)


def _split(g: SeqGraph, out: Any, x: Val, size: Any, dim: int = 0) -> list[str]:
    axis = int(dim) % x.ndim
    if x.a.shape[axis] != x.b.shape[axis]:
        raise NotDynamic("split/chunk along an axis whose size changes with the input's shape")
    sizes = [int(t.shape[axis]) for t in out]
    return g.multi("Split", [g.tensor(x), g.ints("split", sizes)], len(sizes), "split", axis=axis)


def _chunk(g: SeqGraph, out: Any, x: Val, chunks: int, dim: int = 0) -> list[str]:
    return _split(g, out, x, chunks, dim)


def _pack(g: SeqGraph, out: Any, x: Val, weights: Any = None) -> tuple[str, str | None]:
    return (g.tensor(x), g.tensor(weights) if isinstance(weights, Val) else None)


def _matmul(g: SeqGraph, out: torch.Tensor, x: Val, y: Val) -> str:
    return g.node("MatMul", [g.tensor(x, out.dtype), g.tensor(y, out.dtype)], "matmul")


def _t(g: SeqGraph, out: torch.Tensor, x: Val) -> str:
    return g.transpose(g.tensor(x), list(range(x.ndim))[::-1])


_ARITHMETIC = {
    "add": _binary("Add", "Add"),
    "sub": _binary("Sub", "Sub"),
    "mul": _binary("Mul", "Mul"),
    "truediv": _binary("Div"),
    "floordiv": _floordiv,
    "pow": _binary("Pow"),
    "eq": _binary("Equal", compare=True),
    "torch.add": _binary("Add", "Add"),
    "neg": _unary("Neg"),
}

#: lowerings by graph function name (``call``) and ``".method"`` name
LOWERINGS: dict[str, Lowering] = {
    **_ARITHMETIC,
    "matmul": _matmul,
    "torch.matmul": _matmul,
    "torch.bmm": _matmul,
    "getitem": _getitem,
    "getattr": _getattr,
    "torch.softmax": _softmax,
    "softmax": _softmax,
    "gelu": gelu,
    "relu": _unary("Relu"),
    "torch.relu": _unary("Relu"),
    "torch.tanh": _unary("Tanh"),
    "torch.exp": _unary("Exp"),
    "torch.sqrt": _unary("Sqrt"),
    "scaled_dot_product_attention": sdpa,
    "attention": attention,
    "attention_weights": attention_weights,
    "torch.arange": _arange,
    "torch.ones": _constant(1),
    "torch.zeros": _constant(0),
    "torch.full": _constant(None),
    "torch.triu": _tri(1),
    "torch.tril": _tri(0),
    "torch.cat": _cat,
    "torch.stack": _stack,
    "torch.transpose": _transpose,
    "torch.where": _where,
    "torch.masked_fill": _masked_fill,
    "torch.flatten": _flatten,
    "torch.reshape": _reshape,
    "torch.unsqueeze": _unsqueeze,
    "torch.ones_like": _like(1),
    "torch.zeros_like": _like(0),
    "identity": _identity,
    "pack": _pack,
    ".view": _reshape,
    ".reshape": _reshape,
    ".transpose": _transpose,
    ".permute": _permute,
    ".contiguous": _identity,
    ".size": _size,
    ".unsqueeze": _unsqueeze,
    ".squeeze": _squeeze,
    ".expand": _expand,
    ".expand_as": _expand_as,
    ".masked_fill": _masked_fill,
    ".softmax": _softmax,
    ".split": _split,
    ".chunk": _chunk,
    ".flatten": _flatten,
    ".to": _cast,
    ".type_as": _cast,
    ".float": _cast,
    ".double": _cast,
    ".bool": _cast,
    ".long": _cast,
    ".int": _cast,
    ".relu": _unary("Relu"),
    ".tanh": _unary("Tanh"),
    ".exp": _unary("Exp"),
    ".sqrt": _unary("Sqrt"),
    ".repeat": _repeat,
    ".tril": _tri(0),
    ".triu": _tri(1),
    ".t": _t,
}
