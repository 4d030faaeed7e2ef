"""Graph expansions of the torch modules ``torch.fx`` cannot trace: ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder`` — written as their (non-fast-path) forward computes,
with every weight a ``linear``/``layer_norm`` node and the rest copied (:mod:`onlynorm.targets.seqgraph`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .seqgraph import GNode

__all__ = ["GraphBuilder", "expand_mha", "expand_encoder_layer", "expand_encoder", "activation"]


class GraphBuilder:
    """Appends :class:`GNode` s; parameterised nodes keep their target tensors in :attr:`tensors` by node index."""

    def __init__(self) -> None:
        self.nodes: list[GNode] = []
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        #: module paths of the nn.MultiheadAttention calls whose attention weights the model reads
        self.weights_read: set[str] = set()

    def add(
        self,
        op: str,
        name: str,
        target: str = "",
        args: tuple | list = (),
        kwargs: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor | None] | None = None,
    ) -> dict[str, int]:
        self.nodes.append(GNode(op, name, target, list(args), dict(kwargs or {}), dict(config or {})))
        index = len(self.nodes) - 1
        if tensors:
            self.tensors[index] = {k: v.detach().clone() for k, v in tensors.items() if v is not None}
        return {"ref": index}

    def call(self, name: str, target: str, *args: Any, **kwargs: Any) -> dict[str, int]:
        return self.add("call", name, target, args, kwargs)

    def linear(self, name: str, x: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, int]:
        config = {"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]), "bias": bias is not None}
        return self.add("linear", name, args=[x], config=config, tensors={"weight": weight, "bias": bias})

    def layer_norm(self, name: str, x: Any, ln: nn.LayerNorm) -> dict[str, int]:
        config = {
            "shape": list(ln.normalized_shape),
            "eps": float(ln.eps),
            "affine": bool(ln.elementwise_affine),
            "bias": getattr(ln, "bias", None) is not None,
        }
        return self.add("layer_norm", name, args=[x], config=config, tensors={"weight": ln.weight, "bias": ln.bias})


def expand_mha(
    b: GraphBuilder,
    name: str,
    m: nn.MultiheadAttention,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any = None,
    need_weights: Any = True,
    attn_mask: Any = None,
    average_attn_weights: Any = True,
    is_causal: Any = False,
) -> dict[str, int]:
    """``(out_proj(attention(q_proj(query), k_proj(key), v_proj(value))), weights)`` — the attention weights
    (:func:`onlynorm.targets.seqgraph.attention_weights`, averaged over heads unless ``average_attn_weights`` is
    False) only when ``need_weights`` and the model reads them (``b.weights_read``), else ``None``."""
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        raise UnsupportedModelError(
            f"module {name!r} (MultiheadAttention): add_bias_kv / add_zero_attn are not supported; "
            "build it without them"
        )
    if m.in_proj_weight is not None:
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    biases = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
    q = b.linear(f"{name}.q_proj", query, wq, biases[0])
    k = b.linear(f"{name}.k_proj", key, wk, biases[1])
    v = b.linear(f"{name}.v_proj", value, wv, biases[2])
    a = b.call(f"{name}.attention", "attention", q, k, v, m.num_heads, m.batch_first, attn_mask, key_padding_mask)
    if not isinstance(need_weights, bool):
        raise UnsupportedModelError(f"module {name!r} (MultiheadAttention): need_weights must be a constant bool")
    # torch attends by scaled_dot_product_attention (a query with every key masked gets 0) without the weights,
    # by a plain softmax (NaN there) with them
    b.nodes[-1].kwargs.update(is_causal=is_causal, safe=not need_weights)
    out = b.linear(f"{name}.out_proj", a, m.out_proj.weight, m.out_proj.bias)
    if not (need_weights and name in b.weights_read):
        return b.call(f"{name}.pack", "pack", out)
    masks = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "is_causal": is_causal}
    weights = b.call(f"{name}.weights", "attention_weights", q, k, m.num_heads, m.batch_first, **masks)
    b.nodes[-1].kwargs["average"] = average_attn_weights
    return b.call(f"{name}.pack", "pack", out, weights)


def activation(name: str, act: Any, owner: str = "TransformerEncoderLayer") -> tuple[str, dict[str, Any]]:
    """The graph function (and its arguments) of a transformer layer's ``activation``: ReLU or GELU."""
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu", {}
    if act is F.gelu:
        return "gelu", {}
    if isinstance(act, nn.GELU):
        return "gelu", {"approximate": act.approximate}
    raise UnsupportedModelError(f"module {name!r} ({owner}): activation {act!r} is not supported; use 'relu' or 'gelu'")


def expand_encoder_layer(
    b: GraphBuilder,
    name: str,
    layer: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: Any = False,
) -> dict[str, int]:
    """``nn.TransformerEncoderLayer.forward`` (pre- or post-norm; dropout inactive)."""
    act, act_kwargs = activation(name, layer.activation)

    def attention_block(x: Any) -> Any:
        out = expand_mha(
            b,
            f"{name}.self_attn",
            layer.self_attn,
            x,
            x,
            x,
            key_padding_mask=src_key_padding_mask,
            attn_mask=src_mask,
            is_causal=is_causal,
            need_weights=False,  # as the layer calls it (torch attends by scaled_dot_product_attention)
        )
        return b.call(f"{name}.self_attn.output", "getitem", out, 0)

    def feed_forward(x: Any) -> Any:
        h = b.linear(f"{name}.linear1", x, layer.linear1.weight, layer.linear1.bias)
        h = b.call(f"{name}.activation", act, h, **act_kwargs)
        return b.linear(f"{name}.linear2", h, layer.linear2.weight, layer.linear2.bias)

    x = src
    if layer.norm_first:
        x = b.call(f"{name}.add1", "add", x, attention_block(b.layer_norm(f"{name}.norm1", x, layer.norm1)))
        x = b.call(f"{name}.add2", "add", x, feed_forward(b.layer_norm(f"{name}.norm2", x, layer.norm2)))
    else:
        x = b.layer_norm(f"{name}.norm1", b.call(f"{name}.add1", "add", x, attention_block(x)), layer.norm1)
        x = b.layer_norm(f"{name}.norm2", b.call(f"{name}.add2", "add", x, feed_forward(x)), layer.norm2)
    return x


def expand_encoder(
    b: GraphBuilder,
    name: str,
    encoder: nn.TransformerEncoder,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: Any = None,
) -> dict[str, int]:
    """``nn.TransformerEncoder.forward``: its layers in turn, then its final norm if it has one.

    With ``enable_nested_tensor`` in effect (``use_nested_tensor``) and a key padding mask without ``mask``, torch
    takes a nested-tensor path in eval mode without grad that returns 0 at padded positions when the mask pads on
    the right, and computes them otherwise (grad enabled, left padding): not one function of the inputs, refused."""
    if getattr(encoder, "use_nested_tensor", False) and src_key_padding_mask is not None and mask is None:
        raise UnsupportedModelError(
            f"module {name!r} (TransformerEncoder): enable_nested_tensor=True with a src_key_padding_mask makes "
            "torch return 0 at padded positions only without grad and for right padding; build it with "
            "enable_nested_tensor=False (the same values at unpadded positions) or set use_nested_tensor = False"
        )
    x = src
    for i, layer in enumerate(encoder.layers):
        x = expand_encoder_layer(b, f"{name}.layers.{i}", layer, x, mask, src_key_padding_mask, bool(is_causal))
    if encoder.norm is not None:
        if not isinstance(encoder.norm, nn.LayerNorm):
            raise UnsupportedModelError(
                f"module {name!r} (TransformerEncoder): final norm {type(encoder.norm).__name__} is not supported; "
                "use nn.LayerNorm"
            )
        x = b.layer_norm(f"{name}.norm", x, encoder.norm)
    return x
