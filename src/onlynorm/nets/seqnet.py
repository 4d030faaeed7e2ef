"""``SeqNet``: the frozen network of a sequence model (transformer) — the target's graph
(:mod:`onlynorm.targets.seqgraph`) with every parameterised linear map a factorised stage
(:mod:`onlynorm.nets.factorised`), every LayerNorm a :class:`LayerNormStage` (its ``γ, β`` tunable), every buffer
a :class:`ConstStage`, and everything parameter-free copied. Its tunable parameters are the BatchNorm ``γ, β`` of
the factorised stages and the LayerNorm affines; everything else is frozen.

A network file is safetensors plus JSON (``format: onlynorm.seqnet``): the stages, the graph and the input
signature; :meth:`NormNet.load` reads it too. Nothing is unpickled and the graph can only call the functions
named in :data:`onlynorm.targets.seqgraph.FUNCTIONS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _io
from ..errors import FileFormatError, InvalidNetworkError
from ..finite import all_finite
from ..targets.seqgraph import PARAMETERISED, GNode, run_graph
from .normnet import _DTYPES, DOCUMENT_FORMATS, FORMAT_VERSION, NetSummary, NormNet, document_header
from .onnx_graph import OnnxGraph
from .onnx_seq import export_seq_onnx
from .records import NetMeta
from .stage import STAGES, Stage, StageLayout, check_sizes, dtype_name, register_stage

__all__ = ["SeqNet", "LayerNormStage", "ConstStage", "PretrainedMap", "SEQ_FORMAT"]

SEQ_FORMAT = "onlynorm.seqnet"


@register_stage
class LayerNormStage(Stage):
    """A LayerNorm of the target, kept: ``F.layer_norm`` over ``shape`` with tunable ``γ, β`` (``affine``)."""

    kind = "layer_norm"

    def __init__(
        self,
        shape: list[int],
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(
            [int(v) for v in shape],
            eps=float(eps),
            elementwise_affine=bool(affine),
            bias=bool(bias),
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def config(self) -> dict[str, Any]:
        n = self.norm
        return {
            "shape": list(n.normalized_shape),
            "eps": n.eps,
            "affine": n.elementwise_affine,
            "bias": n.bias is not None,
        }

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """``(x − mean)/√(var + eps) · γ + β`` over the last ``len(shape)`` axes (biased variance, as torch);
        ``eps`` is a constant of the network's dtype (``LayerNormalization``'s ``epsilon`` is a float32)."""
        n = self.norm
        axes = list(range(-len(n.normalized_shape), 0))
        mean = g.node("ReduceMean", [x], "mean", axes=axes, keepdims=1)
        centred = g.node("Sub", [x, mean], "centred")
        var = g.node("ReduceMean", [g.node("Mul", [centred, centred], "square")], "var", axes=axes, keepdims=1)
        eps = g.const("eps", torch.tensor(n.eps, dtype=example.dtype))
        y = g.node("Div", [centred, g.node("Sqrt", [g.node("Add", [var, eps], "var_eps")], "std")], "normed")
        if n.weight is not None:
            y = g.node("Mul", [y, g.const("ln_gamma", n.weight)], "ln_scale")
        if n.bias is not None:
            y = g.node("Add", [y, g.const("ln_beta", n.bias)], "ln_shift")
        return y

    def layout(self) -> StageLayout:
        return StageLayout(LayerNormStage, None, False, (("shape", tuple(self.norm.normalized_shape)),))

    def widths(self) -> list[int]:
        return []


@register_stage
class ConstStage(Stage):
    """A buffer of the target (a mask, a fixed encoding), copied: takes no input and returns the tensor."""

    kind = "const"

    def __init__(self, shape: list[int], dtype_of: str = "float64", *, dtype: torch.dtype = torch.float64, device=None):
        super().__init__()
        own = _DTYPES.get(dtype_of, getattr(torch, dtype_of, None))
        if not isinstance(own, torch.dtype):
            raise FileFormatError(f"const stage: unknown dtype {dtype_of!r}")
        # a floating buffer follows the network's dtype (to(float32) of the target); masks keep theirs
        self.register_buffer(
            "value", torch.zeros([int(v) for v in shape], dtype=dtype if own.is_floating_point else own, device=device)
        )
        self.dtype_of = dtype_of

    def forward(self) -> torch.Tensor:
        return self.get_buffer("value")

    def config(self) -> dict[str, Any]:
        return {"shape": list(self.get_buffer("value").shape), "dtype_of": self.dtype_of}

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """An initializer holding the buffer (``x`` is not read)."""
        return g.const("buffer", self.get_buffer("value"))

    def layout(self) -> StageLayout:
        return StageLayout(ConstStage)


@register_stage
class PretrainedMap(Stage):
    """A pretrained model's linear map kept as it is (frozen): ``op`` ``linear`` (``x Wᵀ + b``), ``embedding``
    (``W[idx]``) or ``table`` (the tensor ``W``) — the frozen part of :func:`onlynorm.with_norms` of a transformer,
    whose only tunable parameters are its LayerNorms'."""

    kind = "pretrained_map"

    def __init__(self, op: str, shape: list[int], bias: bool = False, *, dtype=torch.float64, device=None):
        super().__init__()
        if op not in ("linear", "embedding", "table"):
            raise FileFormatError(f"pretrained_map: unknown op {op!r}")
        self.op = op
        self.weight = nn.Parameter(
            torch.zeros([int(v) for v in shape], dtype=dtype, device=device), requires_grad=False
        )
        out = int(shape[0]) if shape else 1
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.op == "table" or x is None:
            return self.weight
        if self.op == "embedding":
            return nn.functional.embedding(x, self.weight)
        return nn.functional.linear(x, self.weight, self.bias)

    def config(self) -> dict[str, Any]:
        return {"op": self.op, "shape": list(self.weight.shape), "bias": self.bias is not None}

    def lower_onnx(self, g: OnnxGraph, x: str, example: torch.Tensor) -> str:
        """``MatMul`` by ``Wᵀ`` (+ ``Add`` b), ``Gather`` of ``W``'s rows, or the tensor ``W`` (``table``)."""
        if self.op == "table":
            return g.const("table", self.weight)
        if self.op == "embedding":
            return g.node("Gather", [g.const("embedding", self.weight), x], "embedding", axis=0)
        y = g.node("MatMul", [x, g.const("weight_t", self.weight.detach().t())], "linear")
        return g.node("Add", [y, g.const("bias", self.bias)], "linear_bias") if self.bias is not None else y

    def layout(self) -> StageLayout:
        return StageLayout(PretrainedMap, None, False, (("op", self.op),))


class SeqNet(NormNet):
    """A frozen sequence network: ``layers`` (its stages), ``graph`` (the target's graph; parameterised nodes
    name their stage in ``config["stage"]``) and ``inputs`` (the signature of the example: ``dtype``, ``ndim``)."""

    def __init__(
        self,
        layers: Sequence[Stage],
        graph: Sequence[GNode],
        inputs: Sequence[dict[str, Any]],
        meta: NetMeta | dict[str, Any] | None = None,
    ):
        super().__init__(layers, meta)
        self.graph = list(graph)
        self.inputs = [dict(i) for i in inputs]

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.inputs):
            raise InvalidNetworkError(f"expected {len(self.inputs)} input tensor(s), found {len(inputs)}")
        for i, (x, sig) in enumerate(zip(inputs, self.inputs)):
            want = str(sig["dtype"])
            if not isinstance(x, torch.Tensor):
                raise InvalidNetworkError(f"input {i}: expected a tensor, found {type(x).__name__}")
            floating = _DTYPES.get(want) is not None
            if (floating and x.dtype != self.dtype) or (not floating and dtype_name(x.dtype) != want):
                expected = dtype_name(self.dtype) if floating else want
                raise InvalidNetworkError(
                    f"input {i}: expected {expected} (as the example), found {dtype_name(x.dtype)}"
                )
        return run_graph(self.graph, inputs, self._realise)

    def _realise(self, i: int, node: GNode, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.layers[int(node.config["stage"])](*args)

    def norm_parameters(self) -> list[nn.Parameter]:
        """Exactly the tunable ``γ, β``: the factorised stages' BatchNorm affines and the LayerNorm affines."""
        out: list[nn.Parameter] = []
        for m in self.modules():
            if isinstance(m, (_BatchNorm, nn.LayerNorm)):
                out += [p for p in (m.weight, m.bias) if p is not None]
        return out

    def to_onnx(
        self,
        path: str | os.PathLike,
        *,
        example_input: Any = None,
        dynamic: bool | None = None,
        lower_conv: bool | None = None,
    ) -> dict[str, Any]:
        """Write this network as an ONNX file (needs ``pip install 'onlynorm[onnx]'``): batch and sequence axes
        dynamic where the network runs at other shapes; see :func:`onlynorm.nets.onnx_seq.export_seq_onnx`.
        ``lower_conv`` (NormNet's signature) is not used: a sequence network has no convolutions."""
        return export_seq_onnx(self, path, example_input=example_input, dynamic=dynamic)

    def summary(self) -> NetSummary:
        out = super().summary()
        out.target_name = str(self.meta.extra.get("target", "model"))
        out.widths += [int(math.prod(m.normalized_shape)) for m in self.layer_norms()]
        out.notes.append(f"{len(self.layer_norms())} LayerNorms kept (their γ, β tunable)")
        return out

    def layer_norms(self) -> list[nn.LayerNorm]:
        return [m for m in self.modules() if isinstance(m, nn.LayerNorm)]

    # ------------------------------------------------------------------ files
    def architecture(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "stages": [{"kind": s.kind, **s.config()} for s in self.layers],
            "graph": [n.to_dict() for n in self.graph],
            "inputs": self.inputs,
        }

    def save(self, path: str | os.PathLike) -> None:
        doc = {
            "format": SEQ_FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype_name(self.dtype),
            "architecture": self.architecture(),
            "meta": self.meta.to_dict(),
        }
        _io.write_tensors(path, {k: v.contiguous() for k, v in self.state_dict().items()}, metadata=doc)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None) -> SeqNet:
        net = NormNet.load(path, device=device)
        if not isinstance(net, SeqNet):
            raise FileFormatError(f"{str(path)!r} holds an MLP/CNN network, not a sequence network; use NormNet.load")
        return net

    @classmethod
    def from_document(
        cls, doc: dict, tensors: dict[str, torch.Tensor], *, source: str = "network", device=None
    ) -> SeqNet:
        dtype, meta = document_header(doc, source)
        arch = doc.get("architecture")
        if not isinstance(arch, dict) or not all(isinstance(arch.get(k), list) for k in ("stages", "graph", "inputs")):
            raise FileFormatError(f"{source}: expected an architecture with 'stages', 'graph', 'inputs' lists")
        held = max(sum(t.numel() for t in tensors.values()), 1)
        try:
            stages = []
            for cfg in arch["stages"]:
                cfg = dict(cfg)
                kind = cfg.pop("kind", None)
                if not isinstance(kind, str) or kind not in STAGES:
                    raise FileFormatError(f"{source}: unknown stage kind {kind!r}; known kinds: {sorted(STAGES)}")
                check_sizes({k: v for k, v in cfg.items() if k != "eps"}, kind, held)
                stages.append(STAGES[kind].from_config(cfg, dtype=dtype, device="meta"))
            graph = [GNode.from_dict(n, source) for n in arch["graph"]]
            _check_graph(graph, len(stages), len(arch["inputs"]), source)
            net = cls(stages, graph, arch["inputs"], meta=meta)
        except FileFormatError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FileFormatError(
                f"{source}: malformed architecture description ({first}); re-create the file"
            ) from None
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            raise FileFormatError(f"{source}: weights do not match the described architecture; re-create the file")
        for k, v in tensors.items():
            if v.is_floating_point() and not k.endswith(".value") and not all_finite(v):
                raise FileFormatError(f"{source}: tensor {k!r} holds NaN/Inf values; the file is corrupt")
        net.to_empty(device=device if device is not None else "cpu")
        net.load_state_dict({k: v.to(device=device) for k, v in tensors.items()}, strict=True)
        net.train(False)
        return net


def _check_graph(graph: list[GNode], stages: int, inputs: int, source: str) -> None:
    """Every reference points back, every stage index and input index exists, and the graph ends in an output."""
    if not graph or graph[-1].op != "output":
        raise FileFormatError(f"{source}: the graph must end in its output node")
    for i, node in enumerate(graph):
        for ref in _refs([node.args, node.kwargs]):
            if not (isinstance(ref, int) and 0 <= ref < i):
                raise FileFormatError(f"{source}: graph node {node.name!r} refers to node {ref!r}, not an earlier one")
        stage = node.config.get("stage")
        if node.op in PARAMETERISED and not (isinstance(stage, int) and 0 <= stage < stages):
            raise FileFormatError(f"{source}: graph node {node.name!r} names stage {stage!r}, not one of {stages}")
        index = node.config.get("index")
        if node.op == "input" and not (isinstance(index, int) and 0 <= index < inputs):
            raise FileFormatError(f"{source}: graph input {node.name!r} has index {index!r}, not one of {inputs}")


def _refs(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        if set(value) == {"ref"}:
            return [value["ref"]]
        return [r for v in value.values() for r in _refs(v)]
    return []


DOCUMENT_FORMATS[SEQ_FORMAT] = SeqNet
