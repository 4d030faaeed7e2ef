"""Transformer targets: any sequence model built of ``nn.Linear``, ``nn.Embedding``, learned positional parameters,
``nn.LayerNorm``, ``nn.MultiheadAttention`` (its attention weights too), ``nn.TransformerEncoder(Layer)``,
``nn.TransformerDecoder(Layer)``, ``nn.Transformer`` and parameter-free torch ops (softmax,
``F.scaled_dot_product_attention``, GELU/ReLU, masks, reshapes, residual additions), as a :class:`TransformerSpec`
— the graph form of :mod:`onlynorm.targets.seqgraph` plus the target's weights.

The model is traced by ``torch.fx`` with the modules fx cannot trace (``nn.MultiheadAttention``, the encoder and
decoder layers and stacks, ``nn.Transformer``) kept as leaves and expanded by module type
(:mod:`onlynorm.targets.transformer_modules`, :mod:`onlynorm.targets.transformer_decoder`). The converted graph is run on the example input and compared with
the model's own output before it is accepted. Refused, in one line naming the node or module
(:class:`~onlynorm.errors.UnsupportedModelError`): active dropout in train mode, data-dependent control flow,
a parameter used other than as a linear map's weight or a learned table that is indexed, added or concatenated,
and any module or function outside the supported set.

>>> import torch
>>> from torch import nn
>>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dtype=torch.float64).eval()
>>> spec = TransformerSpec.from_module(layer, torch.randn(1, 3, 8, dtype=torch.float64))
>>> [n.op for n in spec.nodes].count("linear"), spec.num_parameters == sum(p.numel() for p in layer.parameters())
(6, True)
"""

from __future__ import annotations

import inspect
import operator
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidTargetError, UnsupportedModelError
from .seqgraph import FUNCTIONS, METHODS, GNode, encode, run_graph
from .transformer_decoder import expand_decoder, expand_decoder_layer, expand_transformer
from .transformer_modules import GraphBuilder, expand_encoder, expand_encoder_layer, expand_mha

__all__ = ["TransformerSpec", "is_sequence_model", "as_inputs"]

#: modules converted by type (fx cannot trace them: fast paths, size checks, is_causal detection)
_EXPANDED: dict[type, Callable[..., Any]] = {
    nn.Transformer: expand_transformer,
    nn.TransformerEncoder: expand_encoder,
    nn.TransformerEncoderLayer: expand_encoder_layer,
    nn.TransformerDecoder: expand_decoder,
    nn.TransformerDecoderLayer: expand_decoder_layer,
    nn.MultiheadAttention: expand_mha,
}
_LEAVES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.GELU, nn.ReLU, nn.Dropout, nn.Identity, nn.Softmax, nn.Tanh)
#: torch callables → the graph's function names (``x += y`` is an addition of values)
_NAMES: dict[Any, str] = {fn: name for name, fn in FUNCTIONS.items()} | {
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    operator.iadd: "add",
    operator.isub: "sub",
    operator.imul: "mul",
    getattr: "getattr",
}
#: how a learned parameter may be used: it is a table whose rows are realised, then indexed, added, concatenated
_TABLE_FUNCTIONS = {operator.getitem, operator.add, operator.iadd, operator.sub, torch.add, torch.cat, torch.stack}
_TABLE_METHODS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "transpose", "permute"}
_TABLE_METHODS |= {"contiguous", "to", "type_as", "repeat"}


def is_sequence_model(model: Any) -> bool:
    """A module holding a transformer building block (what needs ``example_input=``)."""
    kinds = (*_EXPANDED, nn.Embedding, nn.LayerNorm)
    return isinstance(model, nn.Module) and any(isinstance(m, kinds) for m in model.modules())


def as_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """An example input (a tensor or a tuple of tensors) as a tuple."""
    items = example if isinstance(example, (tuple, list)) else (example,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise InvalidTargetError(
            f"example_input: expected a tensor (float features or LongTensor token ids) or a tuple of tensors, "
            f"found {type(example).__name__}"
        )
    return tuple(items)


@dataclass
class TransformerSpec:
    """A sequence model in graph form: ``nodes`` (evaluation order), the target's tensors of each parameterised
    node (by node index), the input signature (``dtype``/``ndim`` per argument) and the model's float dtype."""

    nodes: list[GNode]
    tensors: dict[int, dict[str, torch.Tensor]]
    inputs: list[dict[str, Any]]
    dtype: torch.dtype
    num_parameters: int
    name: str = "model"

    @classmethod
    def from_module(cls, model: nn.Module, example_input: Any) -> TransformerSpec:
        example = as_inputs(example_input)
        _refuse_active_dropout(model)
        dtype = _float_dtype(model)
        builder = _convert(model, len(example))
        spec = cls(
            nodes=builder.nodes,
            tensors=builder.tensors,
            inputs=[
                {"dtype": str(t.dtype).removeprefix("torch."), "ndim": t.dim(), "shape": list(t.shape)} for t in example
            ],
            dtype=dtype,
            num_parameters=sum(p.numel() for p in model.parameters()),
            name=type(model).__name__,
        )
        spec._check_against(model, example)
        return spec

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return run_graph(self.nodes, inputs, self._realise)

    def _realise(self, i: int, node: GNode, args: list[Any], kwargs: dict[str, Any]) -> Any:
        t = self.tensors.get(i, {})
        if node.op == "linear":
            return F.linear(args[0], t["weight"], t.get("bias"))
        if node.op == "embedding":
            return F.embedding(args[0], t["weight"])
        if node.op == "layer_norm":
            return F.layer_norm(args[0], node.config["shape"], t.get("weight"), t.get("bias"), node.config["eps"])
        return t["value"]  # table, const

    def linear_maps(self) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """``(node, W, b)`` of every parameterised linear map, ``W`` as ``(out, in)``: a linear layer's weight, an
        embedding's ``Wᵀ`` (a map of the one-hot token), a table ``P`` reshaped to ``(rows, d)`` as ``Pᵀ``."""
        out = []
        for i, node in enumerate(self.nodes):
            t = self.tensors.get(i, {})
            if node.op == "linear":
                out.append((i, t["weight"], t.get("bias")))
            elif node.op == "embedding":
                out.append((i, t["weight"].T, None))
            elif node.op == "table":
                value = t["value"]
                out.append((i, value.reshape(-1, value.shape[-1] if value.dim() else 1).T, None))
        return out

    def _check_against(self, model: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
        """The converted graph must compute the model's output on the example (a conversion that misread a
        module would be refused here, not produce a wrong network)."""
        with torch.no_grad():
            try:
                want = model(*example)
            except Exception as exc:  # the model's own error on its own example
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InvalidTargetError(f"the model fails on example_input: {first}") from None
            got = self(*example)
        pairs = list(zip(_leaves(want), _leaves(got)))
        if not pairs or len(_leaves(want)) != len(_leaves(got)):
            raise UnsupportedModelError(f"{self.name}: the converted graph returns a different output structure")
        for w, g in pairs:
            if w.shape == g.shape and not torch.equal(w.isnan(), g.isnan()):
                raise UnsupportedModelError(
                    f"{self.name}: the model returns NaN on example_input where the converted graph does not, or the "
                    "reverse (torch's fast path gives NaN for a sequence whose every key is padded; the graph "
                    "computes it as with grad enabled); give an example without fully padded sequences"
                )
            w, g = w.nan_to_num(0.0, 0.0, 0.0), g.nan_to_num(0.0, 0.0, 0.0)  # same NaN; ±inf compared as 0
            scale = max(float(w.abs().max()), 1e-300) if w.numel() else 1.0
            err = float((w.double() - g.double()).abs().max()) / scale if w.numel() else 0.0
            tol = 1e-9 if self.dtype == torch.float64 else 1e-4
            if w.shape != g.shape or not err <= tol:
                raise UnsupportedModelError(
                    f"{self.name}: the converted graph does not reproduce the model on example_input (relative error "
                    f"{err:.1e}); it uses an op onlynorm reads differently from torch — please report it"
                )


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return []


def _float_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise InvalidTargetError(
            f"expected a model whose parameters share one float dtype, found {sorted(map(str, dtypes)) or 'none'}"
        )
    return next(iter(dtypes))


def _refuse_active_dropout(model: nn.Module) -> None:
    for path, m in model.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", None)
        if m.training and isinstance(p, float) and p > 0:
            raise UnsupportedModelError(
                f"module {path or type(model).__name__!r} ({type(m).__name__}) has active dropout (p={p}, train "
                "mode); call model.eval() first"
            )


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True  # a buffer (a mask) sliced by a traced size is a graph value too

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(_EXPANDED) + _LEAVES) or super().is_leaf_module(m, qualname)


#: tensor constructors take no tensor, so fx does not see a traced size passed to them: wrapped while tracing
_CONSTRUCTORS = ("ones", "zeros", "full", "arange", "empty", "eye")


@contextmanager
def _traceable_constructors() -> Iterator[None]:
    saved = {name: getattr(torch, name) for name in _CONSTRUCTORS}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            proxies: list[fx.Proxy] = []
            fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
            if not proxies:
                return fn(*args, **kwargs)
            return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)

        return wrapper

    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


class _Root(nn.Module):
    """A leaf module given as the model itself is traced as the one call of a wrapper."""

    def __init__(self, model: nn.Module, arity: int):
        super().__init__()
        self.model, self.arity = model, arity

    def forward(self, x, y=None, z=None):  # noqa: ANN001 - traced
        return self.model(*(x, y, z)[: self.arity])


def _trace(model: nn.Module, arity: int) -> tuple[fx.Graph, nn.Module]:
    root: nn.Module = _Root(model, arity) if isinstance(model, tuple(_EXPANDED) + _LEAVES) else model
    concrete = {n: None for n in ("x", "y", "z")[arity:]} if root is not model else None
    try:
        with _traceable_constructors():
            return _Tracer().trace(root, concrete_args=concrete), root
    except Exception as exc:  # fx reports control flow, iteration, unsupported calls
        where = _user_frame(exc)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = "; data-dependent control flow is not supported" if "control flow" in first else ""
        raise UnsupportedModelError(f"cannot trace {type(model).__name__}{where}: {first}{hint}") from None


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    frames = [f for f in frames if "/onlynorm/" not in f.filename]
    return f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""


def _convert(model: nn.Module, arity: int) -> GraphBuilder:
    graph, root = _trace(model, arity)
    b = GraphBuilder()
    b.weights_read = _attention_weights_read(graph, root)
    env: dict[fx.Node, Any] = {}

    def ref(value: Any) -> Any:
        return env[value] if isinstance(value, fx.Node) else None

    placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            if placeholders >= arity:
                continue  # an optional argument the example does not give (its default)
            env[node] = b.add("input", node.name, config={"index": placeholders})
            placeholders += 1
        elif node.op == "output":
            b.add("output", "output", args=[encode(node.args[0], ref)])
        elif node.op == "get_attr":
            env[node] = _attribute(b, root, node)
        elif node.op == "call_module":
            env[node] = _module_call(b, root.get_submodule(str(node.target)), node, ref)
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise _unsupported(node, f"method .{node.target}()", f"tensor methods {sorted(METHODS)}")
            args, kwargs = _encode_args(node, ref)
            env[node] = b.add("method", node.name, str(node.target), args, kwargs)
        else:
            env[node] = _function_call(b, node, ref)
    return b


def _unsupported(node: fx.Node, what: str, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"node {node.name!r}: {what} is not supported; supported: {supported}")


def _encode_args(node: fx.Node, ref: Callable[[Any], Any]) -> tuple[Any, Any]:
    try:
        return encode(list(node.args), ref), {k: encode(v, ref) for k, v in node.kwargs.items()}
    except TypeError as exc:
        raise _unsupported(node, f"an argument ({exc})", "tensors, numbers, slices, dtypes, devices") from None


def _function_call(b: GraphBuilder, node: fx.Node, ref: Callable[[Any], Any]) -> Any:
    fn = node.target
    if getattr(fn, "__name__", "") == "_assert_is_none" and "fx" in getattr(fn, "__module__", ""):
        return None  # fx's check of a concrete (None) argument of the wrapper
    if fn in (F.dropout, torch.dropout):
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else fn is F.dropout)
        if training and p:
            raise UnsupportedModelError(f"node {node.name!r}: active dropout (p={p}, training=True); call .eval()")
        return ref(node.args[0])
    if fn is F.scaled_dot_product_attention and node.kwargs.get("dropout_p", 0.0):
        raise UnsupportedModelError(f"node {node.name!r}: scaled_dot_product_attention with dropout_p > 0")
    name = _NAMES.get(fn)
    if name is None:
        label = getattr(fn, "__name__", str(fn))
        raise _unsupported(node, f"function {label}", "parameter-free torch ops (see onlynorm.targets.seqgraph)")
    args, kwargs = _encode_args(node, ref)
    return b.add("call", node.name, name, args, kwargs)


def _attribute(b: GraphBuilder, root: nn.Module, node: fx.Node) -> Any:
    target = str(node.target)
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    if isinstance(value, nn.Parameter):
        for user in node.users:
            ok = (user.op == "call_function" and user.target in _TABLE_FUNCTIONS) or (
                user.op == "call_method" and user.target in _TABLE_METHODS and user.args[0] is node
            )
            if user.op == "call_function" and user.target is operator.getitem and user.args[0] is not node:
                ok = False
            if not ok:
                raise UnsupportedModelError(
                    f"node {user.name!r} ({user.target if isinstance(user.target, str) else user.op}) uses parameter "
                    f"{target!r} non-linearly; a learned tensor may only be indexed, reshaped, added or concatenated "
                    "(use nn.Linear / nn.Embedding for linear maps)"
                )
        return b.add("table", target, config={"shape": list(value.shape)}, tensors={"value": value})
    if isinstance(value, torch.Tensor):
        return b.add(
            "const",
            target,
            config={"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")},
            tensors={"value": value},
        )
    raise UnsupportedModelError(f"node {node.name!r}: attribute {target!r} is a {type(value).__name__}, not a tensor")


def _module_call(b: GraphBuilder, m: nn.Module, node: fx.Node, ref: Callable[[Any], Any]) -> Any:
    path = str(node.target)
    args, kwargs = _encode_args(node, ref)
    if type(m) in _EXPANDED:
        try:
            bound = inspect.signature(m.forward).bind(*args, **kwargs)
        except TypeError as exc:
            raise _unsupported(node, f"the call of {type(m).__name__} ({exc})", "its forward's arguments") from None
        return _EXPANDED[type(m)](b, path, m, *bound.args, **bound.kwargs)
    if isinstance(m, nn.Linear):
        return b.linear(path, args[0], m.weight, m.bias)
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            raise UnsupportedModelError(f"module {path!r} (Embedding): max_norm renormalises weights; not supported")
        config = {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
        return b.add("embedding", path, args=[args[0]], config=config, tensors={"weight": m.weight})
    if isinstance(m, nn.LayerNorm):
        return b.layer_norm(path, args[0], m)
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return args[0]
    simple: dict[type, tuple[str, dict[str, Any]]] = {nn.ReLU: ("relu", {}), nn.Tanh: ("torch.tanh", {})}
    if type(m) in simple:
        name, extra = simple[type(m)]
        return b.call(path, name, args[0], **extra)
    if isinstance(m, nn.GELU):
        return b.call(path, "gelu", args[0], approximate=m.approximate)
    if isinstance(m, nn.Softmax):
        return b.call(path, "softmax", args[0], dim=m.dim)
    kind = "has parameters onlynorm cannot express" if any(True for _ in m.parameters()) else "is not supported"
    raise UnsupportedModelError(
        f"module {path!r} ({type(m).__name__}) {kind}; supported: Linear, Embedding, LayerNorm, MultiheadAttention, "
        "Transformer, TransformerEncoder(Layer), TransformerDecoder(Layer), GELU, ReLU, Tanh, Softmax, Dropout "
        "(eval), Identity"
    )


def _attention_weights_read(graph: fx.Graph, root: nn.Module) -> set[str]:
    """The ``nn.MultiheadAttention`` calls whose second output (the attention weights) the model reads: only
    those compute it (an unread ``[1]`` costs nothing)."""
    read = set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(root.get_submodule(str(node.target)), nn.MultiheadAttention):
            continue
        for user in node.users:
            index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
            if index != 0 and (index is None or user.users):
                read.add(str(node.target))
    return read
