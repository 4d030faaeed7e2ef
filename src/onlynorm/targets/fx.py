"""CNN targets from any ``torch.fx``-traceable model: ResNets written the way people write them.

The model is traced symbolically (``torch.fx.symbolic_trace``; custom blocks with their own ``forward`` are traced
through) and its shapes propagated on one zero image of ``in_shape``. The graph is then read as a chain of typed
layers (:mod:`onlynorm.targets.layers`):

* ``Conv2d`` (groups = 1, zero padding) with an eval-mode ``BatchNorm2d`` directly after it folded in
  (``W' = W·γ/√(var+eps)``, ``b' = (b − mean)·γ/√(var+eps) + β``); ``Linear`` (+ ``BatchNorm1d``);
* ``ReLU`` (module, ``F.relu``, ``torch.relu``, ``x.relu()``, in place or not);
* ``MaxPool2d``/``AvgPool2d``/``AdaptiveAvgPool2d`` (adaptive: output size dividing the input), their ``F.``
  forms; ``Flatten``/``torch.flatten(x, 1)``/``x.view(x.size(0), -1)``; ``Identity`` and ``Dropout`` are skipped;
* a residual add (``+``, ``+=``, ``torch.add``) of two branches leaving the same tensor, followed by a ReLU, becomes
  one :class:`~onlynorm.targets.layers.ResidualBlock` ``relu(body(x) + shortcut(x))`` — identity or projection shortcut.

Anything else is refused with one line naming the node, its op and what is supported.

>>> import torch
>>> import torch.nn.functional as F
>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv = nn.Conv2d(2, 2, 3, padding=1)
...         self.bn = nn.BatchNorm2d(2)
...     def forward(self, x):
...         out = self.bn(self.conv(x))
...         out += x
...         return F.relu(out)
>>> model = nn.Sequential(nn.Conv2d(1, 2, 1), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
>>> [layer.type for layer in layers_from_fx(model.double().eval(), (1, 4, 4))]
['conv', 'residual', 'avgpool', 'flatten', 'linear']
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import InvalidTargetError
from .layers import Conv, Flatten, Layer, Linear, Pool, ReLU, ResidualBlock
from .parse import conv_layer, fold_batchnorm, linear_layer, pool_layer

__all__ = ["layers_from_fx", "SUPPORTED"]

SUPPORTED = (
    "Conv2d (groups=1) with BatchNorm2d, Linear with BatchNorm1d, ReLU/F.relu/torch.relu, residual add "
    "(+, +=, torch.add) followed by ReLU, MaxPool2d/AvgPool2d/AdaptiveAvgPool2d, Flatten/torch.flatten, "
    "Identity, Dropout"
)

_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", F.relu)}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_IDENTITY_FUNCS = {F.dropout}
_SKIP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


@dataclass
class _Value:
    """A tensor of the graph as ``anchor`` (a node whose value is stored in ``full``) followed by ``layers``."""

    anchor: str
    layers: tuple[Layer, ...]
    pending_add: tuple[str, tuple[Layer, ...], tuple[Layer, ...]] | None = None


def _refuse(node: fx.Node, what: str, why: str = "is not supported") -> InvalidTargetError:
    return InvalidTargetError(f"node {node.name!r} ({node.op} {what}) {why}; supported: {SUPPORTED}")


def _name(target: object) -> str:
    return getattr(target, "__name__", None) or str(target)


class _Shapes(fx.Interpreter):
    """Runs the traced model once, recording each tensor node's shape in ``node.meta["onlynorm_shape"]``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["onlynorm_shape"] = tuple(result.shape)
        return result


def _shape(node: object) -> tuple[int, ...] | None:
    return node.meta.get("onlynorm_shape") if isinstance(node, fx.Node) else None


def _pool_module(fn: Callable[..., Any], node: fx.Node) -> nn.AvgPool2d | nn.MaxPool2d:
    """The module of a ``F.avg_pool2d``/``F.max_pool2d`` call whose arguments after the input are constants (the
    constructor checks them as torch does)."""
    args: tuple[Any, ...] = node.args[1:]
    kwargs: dict[str, Any] = dict(node.kwargs)
    return nn.AvgPool2d(*args, **kwargs) if fn is F.avg_pool2d else nn.MaxPool2d(*args, **kwargs)


def _output_size(node: fx.Node, output_size: object) -> tuple[int | None, int | None]:
    """The ``(oh, ow)`` of an adaptive pooling's ``output_size``: an int, or a pair of ints/``None`` (keep that dim)."""
    if isinstance(output_size, int):
        return output_size, output_size
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        oh, ow = output_size
        if (oh is None or isinstance(oh, int)) and (ow is None or isinstance(ow, int)):
            return oh, ow
    raise _refuse(node, "adaptive_avg_pool2d", f"has output size {output_size!r}; expected an int or a pair of ints")


def layers_from_fx(model: nn.Module, in_shape: tuple[int, int, int]) -> tuple[Layer, ...]:
    """Typed layers of ``model`` (traced by ``torch.fx``) for inputs of shape ``in_shape = (c, H, W)``."""
    if model.training:
        raise InvalidTargetError(
            f"{type(model).__name__} is in training mode; call model.eval() first so BatchNorm "
            "uses its running statistics (they are folded into the convolutions)"
        )
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 — tracing failures come in many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidTargetError(
            f"{type(model).__name__} cannot be traced by torch.fx ({first}); write data-"
            "dependent control flow out of forward, or pass an nn.Sequential"
        ) from None
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float64
    try:
        with torch.no_grad():
            _Shapes(gm).run(torch.zeros(1, *in_shape, dtype=dtype))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidTargetError(
            f"{type(model).__name__} does not run on inputs of shape {tuple(in_shape)}: {first}"
        ) from None
    return _Reader(gm).read()


class _Reader:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.values: dict[str, _Value] = {}
        self.full: dict[str, tuple[Layer, ...]] = {}
        self.placeholders = 0

    def read(self) -> tuple[Layer, ...]:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                arg = node.args[0]
                if not isinstance(arg, fx.Node):
                    raise _refuse(node, "output", "returns several values; expected one tensor")
                return self._materialise(self._get(arg, node))
            self._node(node)
        raise InvalidTargetError("the traced model has no output")  # pragma: no cover

    # ------------------------------------------------------------------ bookkeeping
    def _get(self, arg: object, user: fx.Node) -> _Value:
        if not isinstance(arg, fx.Node) or arg.name not in self.values:
            raise _refuse(user, _name(user.target), f"reads {arg!r}, which is not a tensor of the network")
        value = self.values[arg.name]
        if value.pending_add is not None and not self._is_relu(user):
            raise _refuse(user, _name(user.target), "follows a residual add; expected a ReLU right after the add")
        return value

    def _materialise(self, value: _Value) -> tuple[Layer, ...]:
        return self.full[value.anchor] + value.layers

    def _set(self, node: fx.Node, value: _Value) -> None:
        # a tensor read by several nodes becomes an anchor: branches start from it with empty chains
        if len(node.users) > 1 and value.pending_add is None:
            self.full[node.name] = self._materialise(value)
            value = _Value(node.name, ())
        self.values[node.name] = value

    def _module(self, node: fx.Node) -> nn.Module | None:
        """The submodule a ``call_module`` node calls (its target is the submodule's qualified name)."""
        return self.modules.get(node.target) if isinstance(node.target, str) else None

    def _is_relu(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self._module(node), nn.ReLU)
        if node.op == "call_function":
            return node.target in _RELU_FUNCS
        return node.op == "call_method" and node.target in ("relu", "relu_")

    # ------------------------------------------------------------------ nodes
    def _node(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.placeholders += 1
            if self.placeholders > 1:
                raise _refuse(node, "placeholder", "is a second input; expected a model with one input tensor")
            self.full[node.name] = ()
            self._set(node, _Value(node.name, ()))
            return
        if node.op == "get_attr":
            raise _refuse(node, f"get_attr {node.target}", "reads a parameter outside a supported module")
        if node.op == "call_method" and node.target == "size":
            return  # only feeds a view(x.size(0), -1), checked there
        if node.op == "call_function" and node.target is operator.getitem:
            return
        if self._is_relu(node):
            self._relu(node)
            return
        if node.op == "call_function" and node.target in _ADD_FUNCS:
            self._add(node)
            return
        layer = self._layer(node)  # refuses unsupported ops before looking at their inputs
        x = self._get(node.args[0] if node.args else None, node)
        if layer is None:  # identity at inference
            self._set(node, x)
        elif isinstance(layer, str):  # "bn"
            self._fold(node, x)
        else:
            self._set(node, _Value(x.anchor, x.layers + (layer,)))

    def _relu(self, node: fx.Node) -> None:
        x = self._get(node.args[0] if node.args else None, node)
        if x.pending_add is not None:
            anchor, body, shortcut = x.pending_add
            self.full[node.name] = self.full[anchor] + (ResidualBlock(body, shortcut),)
            self.values[node.name] = _Value(node.name, ())
            return
        self._set(node, _Value(x.anchor, x.layers + (ReLU(),)))

    def _add(self, node: fx.Node) -> None:
        if len(node.args) != 2 or node.kwargs:
            raise _refuse(node, _name(node.target), "has extra arguments; expected a plain sum of two tensors")
        a, b = (self._get(arg, node) for arg in node.args)
        if a.anchor != b.anchor:
            raise _refuse(
                node,
                _name(node.target),
                "adds tensors that do not branch from the same tensor; "
                "expected a residual add relu(body(x) + shortcut(x))",
            )
        if len(node.users) != 1 or not self._is_relu(next(iter(node.users))):
            raise _refuse(node, _name(node.target), "is not followed by a ReLU; expected relu(body(x) + shortcut(x))")
        body, shortcut = (a.layers, b.layers) if len(a.layers) >= len(b.layers) else (b.layers, a.layers)
        self.values[node.name] = _Value(a.anchor, (), pending_add=(a.anchor, body, shortcut))

    def _fold(self, node: fx.Node, x: _Value) -> None:
        bn = self._module(node)
        last = x.layers[-1] if x.layers else None
        if not (
            (isinstance(bn, nn.BatchNorm2d) and isinstance(last, Conv))
            or (isinstance(bn, nn.BatchNorm1d) and isinstance(last, Linear))
        ):
            raise _refuse(
                node,
                f"call_module {type(bn).__name__}",
                "does not directly follow a Conv2d/Linear read only by it, so it cannot be folded",
            )
        w, b = fold_batchnorm(last.weight, last.bias, bn, f"node {node.name!r} ({type(bn).__name__})")
        self._set(node, _Value(x.anchor, x.layers[:-1] + (replace(last, weight=w, bias=b),)))

    def _layer(self, node: fx.Node) -> Layer | Literal["bn"] | None:
        """The typed layer of a one-input node, ``None`` for an identity, ``"bn"`` for a BatchNorm to fold."""
        where = f"node {node.name!r}"
        if node.op == "call_module":
            m = self._module(node)
            what = f"call_module {type(m).__name__}"
            if isinstance(m, nn.Conv2d):
                try:
                    return conv_layer(m, None, where)
                except InvalidTargetError as exc:
                    raise _refuse(node, what, f"has {str(exc).split('found ')[-1]}") from None
            if isinstance(m, nn.Linear):
                return linear_layer(m, None, where)
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                return "bn"
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                return pool_layer(m, where)
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return self._adaptive(node, m.output_size)
            if isinstance(m, nn.Flatten):
                return self._flatten(node, m.start_dim, m.end_dim)
            if isinstance(m, _SKIP_MODULES):
                return None
            raise _refuse(node, what)
        if node.op == "call_function":
            fn, what = node.target, f"call_function {_name(node.target)}"
            if fn in _IDENTITY_FUNCS:
                return None
            if fn is torch.flatten:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                return self._flatten(node, start, end)
            if fn is F.adaptive_avg_pool2d:
                return self._adaptive(node, node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
            if fn in (F.avg_pool2d, F.max_pool2d):
                if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                    raise _refuse(node, what, "takes its window from the traced tensor; give a constant size")
                return pool_layer(_pool_module(fn, node), where)
            raise _refuse(node, what)
        if node.op == "call_method":
            what = f"call_method {node.target}"
            if node.target == "flatten":
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                return self._flatten(node, start, end)
            if node.target in ("view", "reshape"):
                src, out = _shape(node.args[0]), _shape(node)
                if src is not None and out is not None and len(src) == 4 and out == (src[0], src[1] * src[2] * src[3]):
                    return Flatten()
                raise _refuse(
                    node, what, f"reshapes {src} to {out}; only flattening (N, C, H, W) → (N, C·H·W) is supported"
                )
            if node.target in ("contiguous", "clone", "detach"):
                return None
            raise _refuse(node, what)
        raise _refuse(node, f"{node.op} {_name(node.target)}")

    def _flatten(self, node: fx.Node, start: object, end: object) -> Flatten:
        src = _shape(node.args[0])
        if start != 1 or end not in (-1, (len(src) - 1) if src else -1):
            raise _refuse(node, "flatten", f"flattens dims {start}..{end}; only flattening from dim 1 is supported")
        return Flatten()

    def _adaptive(self, node: fx.Node, output_size: object) -> Pool:
        src = _shape(node.args[0])
        oh, ow = _output_size(node, output_size)
        if src is None or len(src) != 4:
            raise _refuse(node, "adaptive_avg_pool2d", "has an unknown input shape")
        H, W = src[2], src[3]
        oh, ow = oh or H, ow or W
        if H % oh or W % ow:
            raise _refuse(
                node,
                "adaptive_avg_pool2d",
                f"pools {H}×{W} to {oh}×{ow}; expected an output size that divides the input size (uniform windows)",
            )
        kernel = (H // oh, W // ow)
        return Pool("avg", kernel, kernel)
