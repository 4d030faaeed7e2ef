"""Graph expansions of ``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder`` and ``nn.Transformer``, written
as their forward computes (dropout inactive): self-attention on the target sequence (its mask, key padding mask
and causal hint), cross-attention on the memory (the encoder's output, or a second input), a feed-forward block,
each wrapped in a residual addition and a LayerNorm — after it (``norm_first=False``) or before it
(``norm_first=True``). Every weight is a ``linear``/``layer_norm`` node (:mod:`onlynorm.targets.transformer_modules`).

>>> import torch
>>> from torch import nn
>>> from onlynorm.targets.transformer import TransformerSpec
>>> layer = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True, dtype=torch.float64).eval()
>>> x, memory = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 4, 8, dtype=torch.float64)
>>> spec = TransformerSpec.from_module(layer, (x, memory))
>>> [n.op for n in spec.nodes].count("linear"), [n.op for n in spec.nodes].count("layer_norm")
(10, 3)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .transformer_modules import GraphBuilder, activation, expand_encoder, expand_mha

__all__ = ["expand_decoder_layer", "expand_decoder", "expand_transformer"]


def _attend(b: GraphBuilder, name: str, mha: nn.MultiheadAttention, x: Any, memory: Any, **masks: Any) -> Any:
    out = expand_mha(b, name, mha, x, memory, memory, need_weights=False, **masks)  # as the layer calls it
    return b.call(f"{name}.output", "getitem", out, 0)


def expand_decoder_layer(
    b: GraphBuilder,
    name: str,
    layer: nn.TransformerDecoderLayer,
    tgt: Any,
    memory: Any,
    tgt_mask: Any = None,
    memory_mask: Any = None,
    tgt_key_padding_mask: Any = None,
    memory_key_padding_mask: Any = None,
    tgt_is_causal: Any = False,
    memory_is_causal: Any = False,
) -> dict[str, int]:
    """``nn.TransformerDecoderLayer.forward``: ``x + SA(x)``, ``x + CA(x, memory)``, ``x + FF(x)`` with the
    LayerNorms ``norm1..3`` after (post-norm) or before (pre-norm) each block."""
    act, act_kwargs = activation(name, layer.activation, "TransformerDecoderLayer")

    def self_block(x: Any) -> Any:
        masks = {"key_padding_mask": tgt_key_padding_mask, "attn_mask": tgt_mask, "is_causal": bool(tgt_is_causal)}
        return _attend(b, f"{name}.self_attn", layer.self_attn, x, x, **masks)

    def cross_block(x: Any) -> Any:
        masks = {"key_padding_mask": memory_key_padding_mask, "attn_mask": memory_mask}
        return _attend(
            b, f"{name}.multihead_attn", layer.multihead_attn, x, memory, **masks, is_causal=bool(memory_is_causal)
        )

    def feed_forward(x: Any) -> Any:
        h = b.linear(f"{name}.linear1", x, layer.linear1.weight, layer.linear1.bias)
        h = b.call(f"{name}.activation", act, h, **act_kwargs)
        return b.linear(f"{name}.linear2", h, layer.linear2.weight, layer.linear2.bias)

    x = tgt
    blocks = ((self_block, layer.norm1), (cross_block, layer.norm2), (feed_forward, layer.norm3))
    for i, (block, norm) in enumerate(blocks, start=1):
        if layer.norm_first:
            x = b.call(f"{name}.add{i}", "add", x, block(b.layer_norm(f"{name}.norm{i}", x, norm)))
        else:
            x = b.layer_norm(f"{name}.norm{i}", b.call(f"{name}.add{i}", "add", x, block(x)), norm)
    return x


def _final_norm(b: GraphBuilder, name: str, owner: str, norm: Any, x: Any) -> Any:
    if norm is None:
        return x
    if not isinstance(norm, nn.LayerNorm):
        raise UnsupportedModelError(
            f"module {name!r} ({owner}): final norm {type(norm).__name__} is not supported; use nn.LayerNorm"
        )
    return b.layer_norm(f"{name}.norm", x, norm)


def expand_decoder(
    b: GraphBuilder,
    name: str,
    decoder: nn.TransformerDecoder,
    tgt: Any,
    memory: Any,
    tgt_mask: Any = None,
    memory_mask: Any = None,
    tgt_key_padding_mask: Any = None,
    memory_key_padding_mask: Any = None,
    tgt_is_causal: Any = None,
    memory_is_causal: Any = False,
) -> dict[str, int]:
    """``nn.TransformerDecoder.forward``: its layers in turn (each given the memory), then its final norm."""
    x = tgt
    for i, layer in enumerate(decoder.layers):
        x = expand_decoder_layer(
            b,
            f"{name}.layers.{i}",
            layer,
            x,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            bool(tgt_is_causal),
            bool(memory_is_causal),
        )
    return _final_norm(b, name, "TransformerDecoder", decoder.norm, x)


def expand_transformer(
    b: GraphBuilder,
    name: str,
    model: nn.Transformer,
    src: Any,
    tgt: Any,
    src_mask: Any = None,
    tgt_mask: Any = None,
    memory_mask: Any = None,
    src_key_padding_mask: Any = None,
    tgt_key_padding_mask: Any = None,
    memory_key_padding_mask: Any = None,
    src_is_causal: Any = None,
    tgt_is_causal: Any = None,
    memory_is_causal: Any = False,
) -> dict[str, int]:
    """``nn.Transformer.forward``: the encoder on ``src``, the decoder on ``tgt`` with the encoder's output as
    memory."""
    for part, cls in (("encoder", nn.TransformerEncoder), ("decoder", nn.TransformerDecoder)):
        if type(getattr(model, part)) is not cls:
            raise UnsupportedModelError(
                f"module {name!r} (Transformer): a custom {part} ({type(getattr(model, part)).__name__}) is not "
                f"supported; use nn.{cls.__name__}"
            )
    memory = expand_encoder(b, f"{name}.encoder", model.encoder, src, src_mask, src_key_padding_mask, src_is_causal)
    return expand_decoder(
        b,
        f"{name}.decoder",
        model.decoder,
        tgt,
        memory,
        tgt_mask,
        memory_mask,
        tgt_key_padding_mask,
        memory_key_padding_mask,
        tgt_is_causal,
        memory_is_causal,
    )
