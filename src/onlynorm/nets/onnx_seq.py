"""ONNX export of a sequence network (:class:`~onlynorm.nets.seqnet.SeqNet`): its graph written node by node with
``onnx.helper``, as :mod:`onlynorm.nets.onnx` writes an MLP or CNN.

Every stage lowers itself (``Stage.lower_onnx``): a factorised map → a batched ``MatMul`` by the frozen blocks
``A`` → ``BatchNormalization`` (the tuned ``γ, β`` visible as its ``scale``/``B``) → a batched ``MatMul`` by the
blocks ``B`` (the initializers are the frozen tensors, no dense copies), an embedding on the one-hot rows of its
ids (``Equal`` with ``Range``), a learned table on those of ``Range(rows)``; a LayerNorm as
its formula ``(x − mean)/√(var + eps) · γ + β`` (``ReduceMean``/``Sub``/``Mul``/``Sqrt``/``Div``: ``eps`` in the
network's dtype, where ``LayerNormalization``'s ``epsilon`` attribute is a float32); a buffer (mask) as an
initializer. Every copied node lowers by name (:mod:`onlynorm.nets.onnx_seq_ops`, :mod:`onlynorm.nets.onnx_seq_math`);
a node without a lowering is refused in one line naming it, never skipped.

Shapes: the graph is evaluated on the example input and on a copy whose batch and sequence axes (every axis but
a float input's last) are one longer; an axis that differs between the two is written dynamic (named
``<input>_dim<i>``), every size read from it is computed in the graph (``Shape``/``Slice``) and every constant
that depends on it (a causal mask, ``arange``, a slice of a buffer) is built in the graph. ``dynamic=None`` falls
back to the example's static shapes when the model does not run at the longer shape (a table of positions as
long as the example) or uses a changing size where ONNX needs a constant; ``dynamic=True`` refuses instead.
When onnxruntime is installed the written graph is run on both examples and compared with the network's forward
before the file is written.

>>> import tempfile, pathlib, torch
>>> from torch import nn
>>> import onlynorm
>>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dtype=torch.float64).eval()
>>> net = onlynorm.reconstruct(layer, example_input=torch.randn(2, 3, 8, dtype=torch.float64), method="deep")
>>> info = export_seq_onnx(net, pathlib.Path(tempfile.mkdtemp()) / "net.onnx")
>>> info["inputs"], info["dynamic"]
(['input_dim0', 'input_dim1', 8], True)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import _io
from ..errors import InvalidNetworkError
from ..targets.seqgraph import FUNCTIONS, PARAMETERISED, GNode, decode
from .modules import inference_form
from .onnx import OPSET, make_model
from .onnx_graph import onnx_module
from .onnx_seq_graph import Dyn, NotDynamic, SeqGraph, Val, elem_type
from .onnx_seq_ops import LOWERINGS
from .views import hook_problem

__all__ = ["export_seq_onnx", "build_seq_model", "example_inputs"]

_CONSTANT_STAGES = ("const",)


def example_inputs(net: Any, example_input: Any = None) -> tuple[torch.Tensor, ...]:
    """The example the graph is evaluated on: ``example_input``, or inputs of the shapes the network was built
    with (its ``inputs`` signature): floats drawn from a fixed generator, token ids 0, masks ``False``."""
    if example_input is not None:
        items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        if len(items) != len(net.inputs) or not all(isinstance(t, torch.Tensor) for t in items):
            raise InvalidNetworkError(f"example_input: expected {len(net.inputs)} tensor(s), found {len(items)}")
        return tuple(items)
    gen, out = torch.Generator().manual_seed(0), []
    for i, sig in enumerate(net.inputs):
        shape = sig.get("shape")
        if not isinstance(shape, list):
            raise InvalidNetworkError(
                f"input {i}: the network records no example shape (it was built by an older version); pass "
                "example_input= to to_onnx"
            )
        out.append(_like(sig["dtype"], shape, net.dtype, gen))
    return tuple(out)


def _like(dtype: str, shape: list[int], float_dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype) or kind.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(float_dtype)
    return torch.zeros(shape, dtype=kind)


def _longer(inputs: tuple[torch.Tensor, ...], float_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Each input one longer on every axis but a float input's last (the features)."""
    gen, out = torch.Generator().manual_seed(1), []
    for x in inputs:
        grow = x.dim() - 1 if x.is_floating_point() else x.dim()
        shape = [n + 1 if i < grow else n for i, n in enumerate(x.shape)]
        out.append(_like(str(x.dtype).removeprefix("torch."), shape, float_dtype, gen))
    return tuple(out)


def _input_name(i: int, count: int) -> str:
    return "input" if count == 1 else f"input_{i}"


def _values(value: Any, side: str) -> Any:
    """The example value (``side`` ``'a'`` or ``'b'``) of an argument structure of Val/Dyn."""
    if isinstance(value, (Val, Dyn)):
        return getattr(value, side)
    if isinstance(value, (list, tuple)):
        return type(value)(_values(v, side) for v in value)
    if isinstance(value, dict):
        return {k: _values(v, side) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_values(value.start, side), _values(value.stop, side), _values(value.step, side))
    return value


def _dynamic(value: Any) -> bool:
    """Whether an argument structure holds a graph tensor or a changing size."""
    if isinstance(value, Val):
        return value.name is not None
    if isinstance(value, Dyn):
        return True
    if isinstance(value, (list, tuple)):
        return any(_dynamic(v) for v in value)
    if isinstance(value, dict):
        return any(_dynamic(v) for v in value.values())
    if isinstance(value, slice):
        return any(_dynamic(v) for v in (value.start, value.stop, value.step))
    return False


def _wrap(result: Any, a: Any, b: Any) -> Any:
    """A lowering's result (ONNX names) paired with the two example values."""
    if isinstance(result, (Val, Dyn)):
        return result
    if isinstance(a, torch.Tensor):
        if not isinstance(result, str):
            raise InvalidNetworkError(f"internal: a tensor result lowered to {type(result).__name__}")
        return Val(result, a, b)
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(result, str):
        return Dyn(result, a, b)
    if isinstance(a, (tuple, list)):
        items = result if isinstance(result, (tuple, list)) else [result] * len(a)
        wrapped = [_wrap(r, x, y) for r, x, y in zip(items, a, b)]
        return wrapped if isinstance(a, list) else tuple(wrapped)  # a torch.Size holds ints only
    if isinstance(result, (int, float, bool)) or result is None:
        return result
    return a


def _constant(a: Any) -> Any:
    """A value computed from constants alone: tensors become constant :class:`Val` s (initializers when used)."""
    if isinstance(a, torch.Tensor):
        return Val(None, a, a)
    if isinstance(a, (tuple, list)):
        return type(a)(_constant(v) for v in a)
    return a


def _evaluate(node: GNode, args: list[Any], kwargs: dict[str, Any], side: str) -> Any:
    args, kwargs = _values(args, side), _values(kwargs, side)
    if node.op == "call":
        return FUNCTIONS[node.target](*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _lower_copied(g: SeqGraph, node: GNode, args: list[Any], kwargs: dict[str, Any]) -> Any:
    a = _evaluate(node, args, kwargs, "a")
    if not _dynamic([args, kwargs]):
        return _constant(a)  # folded: a constant of the graph (a mask of the example's static shape, ...)
    try:
        b = _evaluate(node, args, kwargs, "b")
    except Exception as exc:  # the model does not run at the longer shape
        raise NotDynamic(f"it fails at the longer shape ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    key = node.target if node.op == "call" else f".{node.target}"
    lower = LOWERINGS.get(key)
    if lower is None:
        what = f"function {node.target!r}" if node.op == "call" else f"method .{node.target}()"
        raise InvalidNetworkError(f"the ONNX export has no lowering of {what}")
    return _wrap(lower(g, a, *args, **kwargs), a, b)


def _lower_stage(g: SeqGraph, stage: Any, args: list[Any]) -> Val:
    a_args, b_args = _values(args, "a"), _values(args, "b")
    a = stage(*a_args)
    if stage.kind in _CONSTANT_STAGES or (stage.kind == "pretrained_map" and stage.op == "table"):
        return Val(None, a, a)
    b = stage(*b_args)
    x = args[0] if args else None
    name = stage.lower_onnx(g, g.tensor(x) if isinstance(x, Val) else "", x.a if isinstance(x, Val) else a)
    return Val(name, a, b)


def _walk(net: Any, g: SeqGraph, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[list[Val], Any]:
    """Lower every node; return the input values and the output structure (of Val)."""
    env: list[Any] = []
    inputs = [Val(_input_name(i, len(a)), x, y) for i, (x, y) in enumerate(zip(a, b))]
    for node in net.graph:
        if node.op == "output":
            return inputs, decode(node.args[0], env)
        if node.op == "input":
            env.append(inputs[int(node.config["index"])])
            continue
        args, kwargs = decode(node.args, env), {k: decode(v, env) for k, v in node.kwargs.items()}
        try:
            if node.op in PARAMETERISED:
                env.append(_lower_stage(g, net.layers[int(node.config["stage"])], args))
            else:
                env.append(_lower_copied(g, node, args, kwargs))
        except NotDynamic as exc:
            raise NotDynamic(f"node {node.name!r}: {exc}") from None
        except InvalidNetworkError as exc:
            what = node.target or node.op
            raise InvalidNetworkError(f"node {node.name!r} ({what}): {exc}; it cannot be exported") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            # arguments in a form no lowering expects (a hand-edited graph, an op used in an unusual way)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidNetworkError(
                f"node {node.name!r} ({node.target or node.op}): the ONNX export cannot lower it ({first}); it "
                "cannot be exported"
            ) from None
    raise InvalidNetworkError("the network's graph has no output node")


def _leaves(value: Any) -> list[Val]:
    if isinstance(value, Val):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _leaves(item)]
    return []


def _dims(v: Val, name: str) -> list[Any]:
    return [int(p) if p == q else f"{name}_dim{i}" for i, (p, q) in enumerate(zip(v.a.shape, v.b.shape))]


def _graph(net: Any, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[Any, list[list[Any]]]:
    onnx = onnx_module()
    g = SeqGraph(net.dtype)
    inputs, out = _walk(net, g, a, b)
    leaves = _leaves(out)
    if not leaves:
        raise InvalidNetworkError("the network returns no tensor; nothing to export")
    names = ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]
    for leaf, name in zip(leaves, names):
        g.nodes.append(onnx.helper.make_node("Identity", [g.tensor(leaf)], [name], name=name))
    make = onnx.helper.make_tensor_value_info
    in_dims = [_dims(v, str(v.name)) for v in inputs]
    graph = onnx.helper.make_graph(
        g.nodes,
        "onlynorm_seqnet",
        [make(str(v.name), elem_type(v.dtype), d) for v, d in zip(inputs, in_dims)],
        [make(n, elem_type(v.dtype), _dims(v, n)) for v, n in zip(leaves, names)],
        initializer=g.initializers,
    )
    return graph, in_dims


def build_seq_model(net: Any, example_input: Any = None, *, dynamic: bool | None = None) -> tuple[Any, dict]:
    """``(onnx.ModelProto, facts)`` of a SeqNet in inference form; see :func:`export_seq_onnx`."""
    onnx_module()  # refuses in one line when the onnx extra is missing, before any work
    if net.dtype not in (torch.float64, torch.float32):
        raise InvalidNetworkError(f"ONNX export supports float64 and float32 networks, found {net.dtype}")
    for name, module in net.named_modules():
        problem = hook_problem(module)
        if problem is not None:
            raise InvalidNetworkError(f"{name or 'the network'}: {problem}, which ONNX export cannot write")
    a = example_inputs(net, example_input)
    with inference_form(net), torch.no_grad():
        graph, b = None, a
        in_dims: list[list[Any]] = []
        if dynamic is not False:
            b = _longer(a, net.dtype)
            try:
                graph, in_dims = _graph(net, a, b)
            except NotDynamic as exc:
                if dynamic:
                    raise InvalidNetworkError(f"no dynamic-shape export: {exc}; export with dynamic=False") from None
                b = a
        if graph is None:
            graph, in_dims = _graph(net, a, a)
    model = make_model(
        graph,
        "onlynorm SeqNet: a frozen random sequence network whose only tuned parameters are the "
        "BatchNormalization scale/B inputs and the LayerNorm γ, β",
        {"onlynorm.method": str(net.method), "onlynorm.target": net.summary().target_name},
    )
    return model, {"examples": (a, b), "inputs": in_dims, "dynamic": b is not a}


def _check_runtime(model: Any, net: Any, examples: tuple[tuple[torch.Tensor, ...], ...]) -> str | None:
    """Run the graph with onnxruntime (when installed) on each example and compare with the network's forward:
    a lowering that misread a node is refused here, before anything is written."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    tolerance = 1e-9 if net.dtype == torch.float64 else 1e-4
    for inputs in dict.fromkeys(examples):
        with inference_form(net), torch.no_grad():
            want = [v.a for v in _leaves(_constant(net(*inputs)))]
        got = session.run(None, {n: x.cpu().numpy() for n, x in zip(names, inputs)})
        for w, h in zip(want, got):
            h = torch.from_numpy(h).to(torch.float64)
            w = w.to(torch.float64)
            same = torch.isnan(w) == torch.isnan(h)
            scale = float(w.nan_to_num().abs().max()) if w.numel() else 1.0
            err = float((w - h).nan_to_num().abs().max()) / max(scale, 1e-300) if w.numel() else 0.0
            if w.shape != h.shape or not bool(same.all()) or not err <= tolerance:
                raise InvalidNetworkError(
                    f"the exported graph does not reproduce the network on an input of shape "
                    f"{[list(x.shape) for x in inputs]} (relative error {err:.1e}); please report it"
                )
    return "onnxruntime"


def export_seq_onnx(
    net: Any, path: str | os.PathLike, *, example_input: Any = None, dynamic: bool | None = None
) -> dict[str, Any]:
    """Write the SeqNet ``net`` as an ONNX file at ``path`` (atomically; checked with ``onnx.checker`` and, when
    installed, run by onnxruntime against the network first).

    Parameters
    ----------
    net
        A float64 or float32 :class:`~onlynorm.nets.seqnet.SeqNet`.
    path
        Output file; its directory must exist. Nothing is written if the export fails.
    example_input
        The input the graph is evaluated on (a tensor or a tuple); default: inputs of the shapes the network was
        built with.
    dynamic
        ``None``: batch and sequence axes dynamic where the network runs at other shapes, else the example's
        static shapes; ``True``: dynamic or refuse; ``False``: the example's shapes.

    Returns
    -------
    dict
        ``{"path", "opset", "nodes", "dtype", "inputs" (the first input's dims), "signature" (every input's
        dims; a dynamic axis is a name), "dynamic", "checked"}``.

    Raises
    ------
    MissingDependencyError
        The ``onnx`` package is not installed (``pip install 'onlynorm[onnx]'``).
    InvalidNetworkError
        An unsupported dtype, a node without an ONNX lowering (named), a module with hooks.
    """
    onnx = onnx_module()
    model, facts = build_seq_model(net, example_input, dynamic=dynamic)
    onnx.checker.check_model(model, full_check=True)
    checked = _check_runtime(model, net, facts["examples"])
    with _io.atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return {
        "path": str(path),
        "opset": OPSET,
        "nodes": len(model.graph.node),
        "dtype": str(net.dtype).removeprefix("torch."),
        "inputs": facts["inputs"][0],
        "signature": facts["inputs"],
        "dynamic": facts["dynamic"],
        "checked": checked,
    }
