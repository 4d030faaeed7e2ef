"""The graph form of a sequence model (transformers): a list of :class:`GNode` s in evaluation order, shared by the
target (:mod:`onlynorm.targets.transformer`, which evaluates its parameterised nodes with the target's weights) and
the frozen network (:class:`onlynorm.nets.seqnet.SeqNet`, which evaluates them with its stages).

Node ops: ``input`` (the ``index``-th argument), ``call`` (a parameter-free function from :data:`FUNCTIONS`, copied),
``method`` (a tensor method from :data:`METHODS`, copied), ``linear`` / ``embedding`` / ``table`` (a parameterised
linear map: ``x Wᵀ + b``, ``W[idx]``, a learned tensor ``P``), ``layer_norm``, ``const`` (a buffer, copied) and
``output``. Arguments are JSON values: ``{"ref": i}`` is node ``i``'s value; tuples, slices, dtypes, devices and
non-finite floats have tagged forms (:func:`encode`, :func:`decode`). Only the names in the two tables are ever
called, so a graph read from a file runs no code of its own.

>>> nodes = [GNode("input", "x", config={"index": 0}), GNode("call", "r", "relu", [{"ref": 0}]),
...          GNode("output", "out", args=[{"ref": 1}])]
>>> run_graph(nodes, (torch.tensor([-1.0, 2.0]),), None)
tensor([0., 2.])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FileFormatError

__all__ = [
    "GNode",
    "FUNCTIONS",
    "METHODS",
    "PARAMETERISED",
    "encode",
    "decode",
    "run_graph",
    "attention",
    "attention_weights",
    "sdpa",
]

#: node ops whose value depends on parameters (realised by a stage in the frozen network)
PARAMETERISED = frozenset({"linear", "embedding", "table", "layer_norm", "const"})


def _split_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    batch_first: bool,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """``(qh, kh, vh, additive mask, unbatched)``: the heads ``(N, H, L, hd)`` and the mask of the scores."""
    unbatched = q.dim() == 2
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    n, length, e = q.shape
    s = k.shape[1]
    hd = e // num_heads
    qh = q.reshape(n, length, num_heads, hd).transpose(1, 2)
    kh = k.reshape(n, s, num_heads, hd).transpose(1, 2)
    vh = v.reshape(n, s, num_heads, v.shape[-1] // num_heads).transpose(1, 2)
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(n, num_heads, length, s)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, q.dtype).reshape(n, 1, 1, s)  # type: ignore[union-attr]
        mask = pad if mask is None else mask + pad
    if mask is None and is_causal:
        causal = torch.ones(length, s, dtype=torch.bool, device=q.device).triu(1)
        mask = _additive(causal, q.dtype)
    return qh, kh, vh, mask, unbatched


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    batch_first: bool = True,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    safe: bool = True,
) -> torch.Tensor:
    """``nn.MultiheadAttention``'s arithmetic between its projections: split heads, scaled dot products with the
    masks (bool ``True`` = not attended, float = added; ``is_causal`` without a mask = the causal mask), softmax,
    merge heads. ``q, k, v`` are the projected inputs, ``(N, L, E)`` (``(L, N, E)`` unless ``batch_first``, or
    unbatched ``(L, E)``). A query whose every key is masked gets 0 (``safe``, torch's attention without weights)
    or NaN (``safe=False``: the plain softmax torch uses when it computes the weights too)."""
    qh, kh, vh, mask, unbatched = _split_heads(q, k, v, num_heads, batch_first, attn_mask, key_padding_mask, is_causal)
    if safe:
        out = sdpa(qh, kh, vh, attn_mask=mask)
    else:
        scores = (qh @ kh.transpose(-2, -1)) * (1.0 / math.sqrt(qh.size(-1)))
        out = torch.softmax(scores if mask is None else scores + mask, dim=-1) @ vh
    out = out.transpose(1, 2).reshape(qh.shape[0], qh.shape[2], -1)
    if unbatched:
        return out.squeeze(0)
    return out if batch_first else out.transpose(0, 1)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    num_heads: int,
    batch_first: bool = True,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    average: bool = True,
) -> torch.Tensor:
    """``nn.MultiheadAttention``'s second output: ``softmax(q kᵀ/√hd + mask)`` per head ``(N, H, L, S)``, averaged
    over the heads (``(N, L, S)``) when ``average``; batch first whatever ``batch_first`` (as torch returns it)."""
    qh, kh, _, mask, unbatched = _split_heads(q, k, k, num_heads, batch_first, attn_mask, key_padding_mask, is_causal)
    scores = (qh @ kh.transpose(-2, -1)) * (1.0 / math.sqrt(qh.size(-1)))
    weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    if average:
        weights = weights.mean(dim=1)
    return weights.squeeze(0) if unbatched else weights


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) written out — ``softmax(q kᵀ·scale + mask) v`` — so that
    forward-mode autodiff (``torch.func.jacfwd``, the LayerNorm fit's Jacobians) runs through it; torch's fused CPU
    kernel has no forward-mode derivative. Equal to torch's up to rounding."""
    if dropout_p:
        raise ValueError("scaled_dot_product_attention: dropout_p must be 0 in a copied graph")
    if enable_gqa and query.size(-3) != key.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    length, source = query.size(-2), key.size(-2)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * factor
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return safe_softmax(scores) @ value


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """``softmax`` over the last axis with a row whose every score is ``−inf`` (every key masked) giving 0, as
    torch's ``scaled_dot_product_attention`` does, where a plain softmax gives NaN.

    >>> safe_softmax(torch.tensor([[0.0, float("-inf")], [float("-inf"), float("-inf")]]))
    tensor([[1., 0.],
            [0., 0.]])
    """
    masked = (scores == float("-inf")).all(dim=-1, keepdim=True)
    return torch.softmax(scores, dim=-1).masked_fill(masked, 0.0)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _pack(x: Any, weights: Any = None) -> tuple[Any, Any]:
    """``nn.MultiheadAttention`` returns ``(output, weights)``; ``weights`` is ``None`` unless the model reads it."""
    return (x, weights)


def _identity(x: Any) -> Any:
    return x


def _getattr(x: Any, name: str) -> Any:
    if name not in ("device", "dtype", "shape", "ndim", "T", "mT"):
        raise FileFormatError(f"graph: attribute {name!r} is not one a copied node may read")
    return getattr(x, name)


#: the parameter-free functions a graph may call, by name (the converter maps torch's callables to these names)
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "neg": operator.neg,
    "pow": operator.pow,
    "matmul": operator.matmul,
    "getitem": operator.getitem,
    "getattr": _getattr,
    "eq": operator.eq,
    "torch.matmul": torch.matmul,
    "torch.bmm": torch.bmm,
    "torch.add": torch.add,
    "torch.softmax": torch.softmax,
    "softmax": F.softmax,
    "gelu": F.gelu,
    "relu": F.relu,
    "torch.relu": torch.relu,
    "torch.tanh": torch.tanh,
    "torch.exp": torch.exp,
    "torch.sqrt": torch.sqrt,
    "math.sqrt": math.sqrt,
    "scaled_dot_product_attention": sdpa,
    "torch.arange": torch.arange,
    "torch.ones": torch.ones,
    "torch.zeros": torch.zeros,
    "torch.full": torch.full,
    "torch.triu": torch.triu,
    "torch.tril": torch.tril,
    "torch.cat": torch.cat,
    "torch.stack": torch.stack,
    "torch.transpose": torch.transpose,
    "torch.where": torch.where,
    "torch.masked_fill": torch.masked_fill,
    "torch.flatten": torch.flatten,
    "torch.reshape": torch.reshape,
    "torch.unsqueeze": torch.unsqueeze,
    "torch.ones_like": torch.ones_like,
    "torch.zeros_like": torch.zeros_like,
    "identity": _identity,
    "attention": attention,
    "attention_weights": attention_weights,
    "pack": _pack,
}

#: the tensor methods a graph may call
METHODS = frozenset(
    "view reshape transpose permute contiguous size unsqueeze squeeze expand masked_fill softmax split chunk "
    "flatten to type_as float double relu tanh exp repeat tril triu bool long int sqrt t expand_as".split()
)


@dataclass
class GNode:
    """One node: ``op``, a ``name`` for messages (the fx node or module path), the ``target`` function/method name
    of ``call``/``method`` nodes, JSON ``args``/``kwargs``, and ``config`` (shapes; a frozen network's ``stage``
    index)."""

    op: str
    name: str
    target: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "name": self.name,
            "target": self.target,
            "args": self.args,
            "kwargs": self.kwargs,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> GNode:
        if not isinstance(d, dict) or not isinstance(d.get("op"), str) or not isinstance(d.get("name"), str):
            raise FileFormatError(f"{source}: expected graph nodes {{'op', 'name', ...}}, found {str(d)[:80]}")
        node = cls(d["op"], d["name"], str(d.get("target", "")), d.get("args", []), d.get("kwargs", {}))
        node.config = d.get("config", {})
        if not isinstance(node.args, list) or not isinstance(node.kwargs, dict) or not isinstance(node.config, dict):
            raise FileFormatError(f"{source}: graph node {node.name!r} has malformed args/kwargs/config")
        if node.op == "call" and node.target not in FUNCTIONS:
            raise FileFormatError(f"{source}: graph node {node.name!r} calls unknown function {node.target!r}")
        if node.op == "method" and node.target not in METHODS:
            raise FileFormatError(f"{source}: graph node {node.name!r} calls unknown method {node.target!r}")
        known = {"input", "call", "method", "output"} | PARAMETERISED
        if node.op not in known:
            raise FileFormatError(f"{source}: graph node {node.name!r} has unknown op {node.op!r}")
        return node


def encode(value: Any, ref: Callable[[Any], Any] | None = None) -> Any:
    """A Python/fx argument as JSON; ``ref`` maps graph values (fx nodes) to ``{"ref": i}`` (or raises)."""
    if ref is not None:
        found = ref(value)
        if found is not None:
            return found
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (tuple, torch.Size)):
        return {"tuple": [encode(v, ref) for v in value]}
    if isinstance(value, list):
        return [encode(v, ref) for v in value]
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v, ref) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [encode(value.start, ref), encode(value.stop, ref), encode(value.step, ref)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise TypeError(f"a constant of type {type(value).__name__} ({str(value)[:40]})")


_TAGS = ("ref", "float", "tuple", "dict", "slice", "ellipsis", "dtype", "device")


def decode(value: Any, env: Sequence[Any]) -> Any:
    """Inverse of :func:`encode`, reading ``{"ref": i}`` from ``env`` (the values computed so far)."""
    if isinstance(value, list):
        return [decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or next(iter(value)) not in _TAGS:
        raise FileFormatError(f"graph: malformed argument {str(value)[:60]}")
    tag, inner = next(iter(value.items()))
    if tag == "ref":
        return env[inner]
    if tag == "float":
        return float(inner)
    if tag == "tuple":
        return tuple(decode(v, env) for v in inner)
    if tag == "dict":
        return {k: decode(v, env) for k, v in inner.items()}
    if tag == "slice":
        return slice(*(decode(v, env) for v in inner))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        dtype = getattr(torch, str(inner), None)
        if not isinstance(dtype, torch.dtype):
            raise FileFormatError(f"graph: unknown dtype {inner!r}")
        return dtype
    return torch.device(str(inner))


Realise = Callable[[int, GNode, list[Any], dict[str, Any]], Any]


def run_graph(nodes: Sequence[GNode], inputs: Sequence[Any], realise: Realise | None) -> Any:
    """Evaluate ``nodes`` on ``inputs``: copied nodes call their function/method, parameterised nodes
    ``realise(index, node, args, kwargs)`` (the target's weights, or a frozen network's stages)."""
    env: list[Any] = []
    for i, node in enumerate(nodes):
        if node.op == "output":
            return decode(node.args[0], env)
        if node.op == "input":
            env.append(inputs[int(node.config["index"])])
            continue
        args, kwargs = decode(node.args, env), {k: decode(v, env) for k, v in node.kwargs.items()}
        if node.op == "call":
            env.append(FUNCTIONS[node.target](*args, **kwargs))
        elif node.op == "method":
            env.append(getattr(args[0], node.target)(*args[1:], **kwargs))
        else:
            if realise is None:
                raise ValueError(f"graph node {node.name!r} ({node.op}) needs parameters")
            env.append(realise(i, node, args, kwargs))
    raise ValueError("graph has no output node")
