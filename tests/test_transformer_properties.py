"""Property tests over transformer targets: encoder or decoder, heads, widths, masks (none, causal bool/float, key
padding as a buffer or an input), norm placement, activation, batch order — the reconstruction equals the target
on fresh inputs of other lengths, and the exported ONNX graph equals the reconstruction."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm

F64 = torch.float64


class Target(nn.Module):
    """One encoder or decoder layer in a stack, with the mask the configuration names; a decoder takes a memory
    (second input) and, for ``padding``, the memory's key padding mask as a third input."""

    def __init__(self, kind, width, heads, norm_first, activation, batch_first, mask):
        super().__init__()
        common = {"activation": activation, "batch_first": batch_first, "norm_first": norm_first}
        if kind == "encoder":
            layer = nn.TransformerEncoderLayer(width, heads, 2 * width, **common)
            self.stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.stack = nn.TransformerDecoder(nn.TransformerDecoderLayer(width, heads, 2 * width, **common), 1)
        self.kind, self.batch_first, self.mask = kind, batch_first, mask
        # key 2 padded, so no row has every key padded (fully masked rows: see test_transformer_decoder.py)
        self.register_buffer("pad", torch.zeros(4, 12, dtype=torch.bool).index_fill(1, torch.tensor([2]), True))

    def forward(self, x, memory=None, memory_pad=None):
        t = x.size(1) if self.batch_first else x.size(0)
        n = x.size(0) if self.batch_first else x.size(1)
        kwargs = {}
        if self.mask == "causal-bool":
            kwargs["mask"] = torch.ones(t, t, dtype=torch.bool).triu(1)
        elif self.mask == "causal-float":
            kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
        if self.kind == "encoder":
            if self.mask == "padding":  # a buffer, sliced to the batch and length
                kwargs["src_key_padding_mask"] = self.pad[:n, :t]
            return self.stack(x, **kwargs)
        if "mask" in kwargs:
            kwargs = {"tgt_mask": kwargs["mask"]}
        if self.mask == "padding":
            kwargs["memory_key_padding_mask"] = memory_pad
        return self.stack(x, memory, **kwargs)


def _inputs(kind, batch_first, mask, width, t, s, seed):
    gen = torch.Generator().manual_seed(seed)

    def seq(length):
        return torch.randn((2, length, width) if batch_first else (length, 2, width), generator=gen, dtype=F64)

    if kind == "encoder":
        return (seq(t),)
    if mask != "padding":
        return seq(t), seq(s)
    return seq(t), seq(s), torch.arange(s).expand(2, s) >= torch.tensor([[s], [max(1, s - 1)]])


CONFIG = {
    "kind": st.sampled_from(["encoder", "decoder"]),
    "heads": st.sampled_from([1, 2, 4]),
    "width": st.sampled_from([4, 8, 12]),
    "norm_first": st.booleans(),
    "activation": st.sampled_from(["relu", "gelu"]),
    "batch_first": st.booleans(),
    "mask": st.sampled_from(["none", "causal-bool", "causal-float", "padding"]),
    "seed": st.integers(0, 2**16),
}


def _build(kind, heads, width, norm_first, activation, batch_first, mask, seed):
    assume(width % heads == 0)
    torch.manual_seed(seed)
    g = Target(kind, width, heads, norm_first, activation, batch_first, mask).double().eval()
    f = onlynorm.reconstruct(g, example_input=_inputs(kind, batch_first, mask, width, 3, 4, seed), seed=seed % 5)
    return g, f


@given(**CONFIG)
@settings(max_examples=12, deadline=None)
def test_reconstruction_is_exact_over_transformer_configurations(
    kind, heads, width, norm_first, activation, batch_first, mask, seed
):
    g, f = _build(kind, heads, width, norm_first, activation, batch_first, mask, seed)
    for t, s in ((1, 2), (5, 3)):
        x = _inputs(kind, batch_first, mask, width, t, s, seed + t)
        with torch.no_grad():
            want, got = g(*x), f(*x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-9


@given(**CONFIG)
@settings(max_examples=6, deadline=None)
def test_onnx_export_equals_the_reconstruction_over_transformer_configurations(
    tmp_path_factory, kind, heads, width, norm_first, activation, batch_first, mask, seed
):
    _, f = _build(kind, heads, width, norm_first, activation, batch_first, mask, seed)
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    info = f.to_onnx(path)
    assert info["dynamic"] and info["checked"] == "onnxruntime"  # the padding buffer is longer than the example
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for t, s in ((1, 2), (5, 3)):
        x = _inputs(kind, batch_first, mask, width, t, s, seed + 2 * t)
        with torch.no_grad():
            want = f(*x).numpy()
        got = session.run(None, {n: v.numpy() for n, v in zip(names, x)})[0]
        assert got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-12 * float(np.abs(want).max())
