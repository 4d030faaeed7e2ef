"""The values of a sequence network's graph while it is lowered to ONNX, and the helpers its op lowerings share.

The graph (:mod:`onlynorm.targets.seqgraph`) is evaluated twice side by side — on the example input (``a``) and on
a copy whose batch and sequence dimensions are one longer (``b``) — while ONNX nodes are written. A dimension is
dynamic exactly when it differs between the two runs:

* :class:`Val` — a tensor: its ONNX name (``None`` for a constant, written as an initializer when first used)
  and its two example values;
* :class:`Dyn` — a size that changes with the input's shape (``x.size(1)``, ``t // 2``): a 1-element ``int64``
  ONNX tensor and its two example values. A size equal in both runs stays a Python ``int``.

>>> g = SeqGraph(torch.float64)
>>> x = Val("input", torch.zeros(2, 3, 4), torch.zeros(3, 4, 4))
>>> g.dim(x, 2), isinstance(g.dim(x, 1), Dyn)
(4, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidNetworkError
from .onnx_graph import OnnxGraph

__all__ = ["Val", "Dyn", "SeqGraph", "NotDynamic", "INT64_MAX", "elem_type"]

INT64_MAX = 2**63 - 1


class NotDynamic(Exception):
    """A size that changes with the input's shape is used where the export can only write a constant."""


@dataclass
class Val:
    """A tensor of the graph: ``name`` in the ONNX graph (``None``: a constant) and its values in the two runs."""

    name: str | None
    a: torch.Tensor
    b: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def ndim(self) -> int:
        return self.a.dim()


@dataclass(frozen=True)
class Dyn:
    """A size that differs between the runs: ``name`` a 1-element int64 tensor, ``a``/``b`` its two values."""

    name: str
    a: int
    b: int


def elem_type(dtype: torch.dtype) -> int:
    """The ONNX element type of a torch dtype (the ones a sequence network's tensors have)."""
    from onnx import TensorProto

    table = {
        torch.float64: TensorProto.DOUBLE,
        torch.float32: TensorProto.FLOAT,
        torch.int64: TensorProto.INT64,
        torch.int32: TensorProto.INT32,
        torch.bool: TensorProto.BOOL,
    }
    if dtype not in table:
        raise InvalidNetworkError(f"a tensor of dtype {dtype} cannot be exported; expected float, int or bool")
    return table[dtype]


class SeqGraph(OnnxGraph):
    """:class:`~onlynorm.nets.onnx_graph.OnnxGraph` with the helpers of the sequence lowering: constants on
    demand, sizes (static or :class:`Dyn`), shape vectors, casts."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(dtype, lower=dtype == torch.float64)

    def tensor(self, v: Any, dtype: torch.dtype | None = None) -> str:
        """The ONNX name of ``v`` (a :class:`Val`, a :class:`Dyn` or a Python number), cast to ``dtype``."""
        if isinstance(v, Val):
            if v.name is None:
                v.name = self.const("const", v.a)
            return self.cast(v.name, v.dtype, dtype) if dtype is not None else v.name
        if isinstance(v, Dyn):
            return self.cast(v.name, torch.int64, dtype) if dtype is not None else v.name
        if isinstance(v, (bool, int, float)):
            return self.scalar(v, dtype if dtype is not None else torch.tensor(v).dtype)
        raise InvalidNetworkError(f"expected a tensor or a number, found {type(v).__name__}")

    def scalar(self, value: Any, dtype: torch.dtype) -> str:
        """A 0-d constant of ``dtype``."""
        return self.const("scalar", torch.tensor(value, dtype=dtype))

    def cast(self, name: str, have: torch.dtype, want: torch.dtype | None) -> str:
        if want is None or have == want:
            return name
        return self.node("Cast", [name], "cast", to=elem_type(want))

    def multi(self, op: str, inputs: list[str], outputs: int, hint: str, **attrs: Any) -> list[str]:
        """A node with several outputs (``Split``)."""
        names = [self.name(hint) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op, inputs, names, name=names[0], **attrs))
        return names

    def shape(self, v: Val) -> str:
        return self.node("Shape", [self.tensor(v)], "shape")

    def dim(self, v: Val, i: int) -> int | Dyn:
        """Size ``i`` of ``v``: an ``int`` when both runs agree, else a :class:`Dyn` read from its shape."""
        i = i % max(v.ndim, 1)
        a, b = int(v.a.shape[i]), int(v.b.shape[i])
        if a == b:
            return a
        shape = self.shape(v)
        return Dyn(self.node("Slice", [shape, self.ints("start", [i]), self.ints("end", [i + 1])], "dim"), a, b)

    def vec(self, dims: list[Any] | tuple[Any, ...]) -> str:
        """A 1-D int64 tensor of ``dims`` (``int`` s and :class:`Dyn` s), e.g. the shape of a ``Reshape``."""
        if all(isinstance(d, int) for d in dims):
            return self.ints("shape", [int(d) for d in dims])
        parts = [d.name if isinstance(d, Dyn) else self.ints("dim", [int(d)]) for d in dims]
        return self.node("Concat", parts, "shape", axis=0)

    def index(self, d: Any) -> str:
        """A 0-d int64 tensor of a size (``int`` or :class:`Dyn`): ``Range`` limits, ``Gather`` indices."""
        if isinstance(d, Dyn):
            return self.node("Squeeze", [d.name, self.ints("axes", [0])], "scalar")
        return self.scalar(int(d), torch.int64)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.node("Unsqueeze", [x, self.ints("axes", axes)], "unsqueeze")

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.node("Transpose", [x], "transpose", perm=perm)

    def reshape(self, x: str, dims: list[Any]) -> str:
        """``Reshape`` (``0`` copies the input's size at that position, ``-1`` is inferred)."""
        return self.node("Reshape", [x, self.vec(dims)], "reshape")

    def where(self, cond: str, x: str, y: str, dtype: torch.dtype) -> str:
        """``cond ? x : y``; for bool operands as ``(cond ∧ x) ∨ (¬cond ∧ y)`` (onnxruntime's ``Where`` has no
        bool kernel)."""
        if dtype != torch.bool:
            return self.node("Where", [cond, x, y], "where")
        keep = self.node("And", [cond, x], "and")
        other = self.node("And", [self.node("Not", [cond], "not"), y], "and")
        return self.node("Or", [keep, other], "where")

    def ones_bool(self, dims: list[Any]) -> str:
        """A bool tensor of ``True`` of shape ``dims`` (sizes may be dynamic)."""
        return self.node("Expand", [self.scalar(True, torch.bool), self.vec(dims)], "ones")
