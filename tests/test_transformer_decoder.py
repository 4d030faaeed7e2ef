"""More transformer targets: nn.TransformerDecoder(Layer), nn.Transformer, nn.TransformerEncoder with the nested
fast path enabled, and a bare nn.MultiheadAttention — exact against the target's own forward on fresh inputs of
several lengths (float64 ≤ 1e-9 relative), exported to ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onlynorm
from onlynorm.errors import UnsupportedModelError
from onlynorm.nets import SeqNet

F64 = torch.float64
#: (target length, memory length) pairs of the fresh inputs
LENGTHS = ((1, 1), (3, 5), (7, 2))


def _x(shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _leaves(value):
    return [value] if isinstance(value, torch.Tensor) else [t for v in value for t in _leaves(v)]


def _rel(f, g, *x) -> float:
    with torch.no_grad():
        got, want = _leaves(f(*x)), _leaves(g(*x))
    assert len(got) == len(want) > 0
    errors = []
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        errors.append(float((a.double() - b.double()).abs().max() / b.double().abs().max()))
    return max(errors)


def _pair(batch_first: bool, t: int, s: int, d: int = 16, n: int = 2, seed: int = 0, dtype=F64):
    shape = (lambda length: (n, length, d)) if batch_first else (lambda length: (length, n, d))
    return _x(shape(t), dtype, seed), _x(shape(s), dtype, seed + 1)


class CausalDecoder(nn.Module):
    """A decoder stack with a causal target mask (bool or float) built from the traced length."""

    def __init__(self, norm_first: bool, activation: str, batch_first: bool, float_mask: bool, layers: int = 2):
        super().__init__()
        layer = nn.TransformerDecoderLayer(
            16, 4, 32, activation=activation, batch_first=batch_first, norm_first=norm_first
        )
        self.dec = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(16))
        self.batch_first, self.float_mask = batch_first, float_mask

    def forward(self, tgt, memory):
        t = tgt.size(1) if self.batch_first else tgt.size(0)
        if self.float_mask:
            mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=tgt.dtype)
        else:
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        return self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_is_reconstructed_exactly(norm_first, activation, batch_first):
    torch.manual_seed(1)
    g = CausalDecoder(norm_first, activation, batch_first, float_mask=activation == "gelu").double().eval()
    f = onlynorm.reconstruct(g, example_input=_pair(batch_first, 4, 3), seed=0)
    assert isinstance(f, SeqNet)
    for t, s in LENGTHS:
        assert _rel(f, g, *_pair(batch_first, t, s, seed=t)) <= 1e-9


def test_a_bare_decoder_layer_and_padding_masks_given_as_inputs():
    torch.manual_seed(2)
    layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, norm_first=True).double().eval()
    f = onlynorm.reconstruct(layer, example_input=_pair(True, 3, 4))
    for t, s in LENGTHS:
        assert _rel(f, layer, *_pair(True, t, s, seed=t)) <= 1e-9

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, tgt, memory, memory_pad):
            return self.layer(tgt, memory, memory_key_padding_mask=memory_pad, tgt_key_padding_mask=memory_pad[:, :1])

    g = Padded().eval()

    def pad(s: int) -> torch.Tensor:
        return torch.arange(s).expand(2, s) >= torch.tensor([[s], [max(1, s - 1)]])

    f = onlynorm.reconstruct(g, example_input=(*_pair(True, 1, 4), pad(4)))
    for s in (2, 5):
        assert _rel(f, g, *_pair(True, 1, s, seed=s), pad(s)) <= 1e-9


def test_nn_transformer_is_reconstructed_exactly():
    torch.manual_seed(3)
    g = nn.Transformer(16, 2, 1, 2, 32, batch_first=True).double().eval()
    f = onlynorm.reconstruct(g, example_input=_pair(True, 5, 4), method="deep", seed=2)
    for t, s in LENGTHS:
        src, tgt = _pair(True, s, t, seed=t)
        assert _rel(f, g, src, tgt) <= 1e-9


def test_float32_decoder():
    torch.manual_seed(4)
    g = CausalDecoder(False, "gelu", True, float_mask=False).eval()
    f = onlynorm.reconstruct(g, example_input=_pair(True, 4, 3, dtype=torch.float32))
    assert f.dtype == torch.float32
    for t, s in LENGTHS:
        assert _rel(f, g, *_pair(True, t, s, seed=t, dtype=torch.float32)) <= 1e-4


# ---------------------------------------------------------------------------------------------- the nested fast path
def _nested_encoder(norm_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).double().eval()


def _right_padded(n: int, t: int) -> torch.Tensor:
    return torch.arange(t).expand(n, t) >= torch.tensor([[t], [max(1, t - 1)], [max(1, t - 2)]])[:n]


def test_the_nested_fast_path_changes_the_function_and_is_refused_with_a_padding_mask():
    """torch's nested path (eval, no grad, a right-padded key padding mask) returns 0 at padded positions; with
    grad enabled or a left-padded mask it computes them: not one function of the inputs, so it is refused."""
    torch.manual_seed(5)
    enc = _nested_encoder(norm_first=False)
    assert enc.use_nested_tensor
    x, mask = _x((3, 5, 16)), _right_padded(3, 5)
    with torch.no_grad():
        nested = enc(x, src_key_padding_mask=mask)
    plain = enc(x, src_key_padding_mask=mask).detach()  # grad enabled: no nested path
    assert float(nested[mask].abs().max()) == 0.0 and float(plain[mask].abs().max()) > 0.1
    assert float((nested - plain)[~mask].abs().max()) <= 1e-12  # unpadded positions agree

    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc
            self.register_buffer("pad", mask)

        def forward(self, x):
            return self.enc(x, src_key_padding_mask=self.pad[: x.size(0), : x.size(1)])

    class WithInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x, pad):
            return self.enc(x, src_key_padding_mask=pad)

    for model, example in ((WithBuffer(), (x,)), (WithInput(), (x, mask))):
        with pytest.raises(UnsupportedModelError) as exc:
            onlynorm.reconstruct(model.eval(), example_input=example)
        message = str(exc.value)
        assert "\n" not in message and "'enc'" in message and "enable_nested_tensor=False" in message


def test_encoders_with_nested_tensors_enabled_but_not_used_are_reconstructed():
    """No padding mask (the nested path is never taken), or a pre-norm layer (torch disables it)."""
    torch.manual_seed(6)
    enc = _nested_encoder(norm_first=False)
    f = onlynorm.reconstruct(enc, example_input=_x((3, 4, 16)))
    for t in (1, 6):
        assert _rel(f, enc, _x((3, t, 16), seed=t)) <= 1e-9
    pre = _nested_encoder(norm_first=True)
    assert not pre.use_nested_tensor

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = pre

        def forward(self, x, pad):
            return self.enc(x, src_key_padding_mask=pad)

    g = Padded().eval()
    f = onlynorm.reconstruct(g, example_input=(_x((3, 4, 16)), _right_padded(3, 4)))
    for t in (2, 6):
        assert _rel(f, g, _x((3, t, 16), seed=t), _right_padded(3, t)) <= 1e-9


# ---------------------------------------------------------------------------------------------- bare attention
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_a_bare_multihead_attention_with_its_weights(batch_first, packed):
    """``nn.MultiheadAttention`` as the model: (q, k, v) in, (output, attention weights) out."""
    torch.manual_seed(7)
    kv = None if packed else 8
    g = nn.MultiheadAttention(16, 4, kdim=kv, vdim=kv, batch_first=batch_first).double().eval()

    def inputs(t: int, s: int, seed: int):
        q, _ = _pair(batch_first, t, s, seed=seed)
        _, k = _pair(batch_first, t, s, d=16 if packed else 8, seed=seed + 5)
        return q, k, 0.5 * k

    f = onlynorm.reconstruct(g, example_input=inputs(3, 4, 0))
    for t, s in LENGTHS:
        with torch.no_grad():
            out, weights = f(*inputs(t, s, t))
        assert weights.shape == (2, t, s) and torch.allclose(weights.sum(-1), torch.ones(2, t, dtype=F64))
        assert _rel(f, g, *inputs(t, s, t)) <= 1e-9


def test_multihead_attention_weights_per_head_and_without_weights():
    torch.manual_seed(8)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()

    class PerHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            t = x.size(1)
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
            out, per_head = self.mha(x, x, x, attn_mask=mask, average_attn_weights=False)
            quiet, _ = self.mha(x, x, x, need_weights=False)  # its None weights are never read
            return out + quiet, per_head

    g = PerHead().eval()
    f = onlynorm.reconstruct(g, example_input=_x((2, 3, 8)))
    for t in (1, 5):
        assert _rel(f, g, _x((2, t, 8), seed=t)) <= 1e-9
        with torch.no_grad():
            assert f(_x((2, t, 8)))[1].shape == (2, 2, t, t)


# ---------------------------------------------------------------------------------------------- export
def test_decoder_and_bare_attention_export_to_onnx(tmp_path):
    torch.manual_seed(9)
    g = CausalDecoder(True, "gelu", True, float_mask=True).double().eval()
    f = onlynorm.reconstruct(g, example_input=_pair(True, 4, 3))
    info = f.to_onnx(tmp_path / "dec.onnx")
    assert info["dynamic"] and info["signature"] == [["input_0_dim0", "input_0_dim1", 16]] + [
        ["input_1_dim0", "input_1_dim1", 16]
    ]
    session = ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])
    for t, s in LENGTHS:
        tgt, memory = _pair(True, t, s, n=3, seed=t)
        with torch.no_grad():
            want = f(tgt, memory).numpy()
        got = session.run(None, {"input_0": tgt.numpy(), "input_1": memory.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()
    mha = nn.MultiheadAttention(16, 2, batch_first=True).double().eval()
    f = onlynorm.reconstruct(mha, example_input=(_x((2, 3, 16)),) * 3)
    f.to_onnx(tmp_path / "mha.onnx")
    session = ort.InferenceSession(str(tmp_path / "mha.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1"]
    q = _x((4, 6, 16), seed=3)
    with torch.no_grad():
        want = [t.numpy() for t in f(q, q, q)]
    got = session.run(None, {"input_0": q.numpy(), "input_1": q.numpy(), "input_2": q.numpy()})
    assert all(np.abs(a - b).max() <= 1e-12 * np.abs(b).max() for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------- fully masked rows
def test_a_query_whose_every_key_is_masked_gets_what_torch_gives(tmp_path):
    """torch's scaled_dot_product_attention (and MultiheadAttention without weights) gives 0 where every key is
    masked; MultiheadAttention computing its weights gives NaN there. The graph and its ONNX export follow."""
    torch.manual_seed(10)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, pad):
            t = x.size(1)
            allowed = torch.ones(t, t, dtype=torch.bool).tril().masked_fill(pad[:1].transpose(0, 1), False)
            y = F.scaled_dot_product_attention(self.q(x), self.k(x), x, attn_mask=allowed)
            m = x + 0.0  # not self-attention: torch's MHA fast path (no grad) would give NaN, its math path 0
            quiet = self.mha(x, m, m, key_padding_mask=pad, need_weights=False)[0]
            loud = self.mha(x, m, m, key_padding_mask=pad)[0]
            return y + quiet, loud

    g = Masked().double().eval()
    x, pad = _x((2, 4, 8)), torch.tensor([[True, False, False, False], [True] * 4])
    f = onlynorm.reconstruct(g, example_input=(x, pad))
    with torch.no_grad():
        (a, loud), (b, loud_g) = f(x, pad), g(x, pad)
    assert torch.isfinite(b).all() and float(b[1].abs().max()) > 0  # row 0 of every query attends nothing
    assert float((a - b).abs().max()) <= 1e-12 and torch.isnan(loud_g[1]).all() and torch.isnan(loud[1]).all()
    assert torch.isfinite(loud_g[0]).all() and float((loud - loud_g)[0].abs().max()) <= 1e-12
    f.to_onnx(tmp_path / "masked.onnx")
    session = ort.InferenceSession(str(tmp_path / "masked.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_0": x.numpy(), "input_1": pad.numpy()})
    assert np.abs(got[0] - a.numpy()).max() <= 1e-12 and np.isnan(got[1][1]).all()


def test_an_encoder_with_a_fully_padded_sequence_follows_torchs_math_path():
    """torch is not one function here: its eval fast path (no grad) gives NaN for a sequence whose every key is
    padded, its math path (grad enabled) attends nothing (0). The graph follows the math path; an example on which
    they differ is refused in one line."""
    torch.manual_seed(11)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False)
    enc = enc.double().eval()

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x, pad):
            return self.enc(x, src_key_padding_mask=pad)

    g = Padded().eval()
    x, pad = _x((2, 3, 8)), torch.tensor([[False, False, True], [True, True, True]])
    with pytest.raises(UnsupportedModelError) as exc:  # torch's fast path (no grad): NaN for the padded sequence
        onlynorm.reconstruct(g, example_input=(x, pad))
    assert "\n" not in str(exc.value) and "fully padded" in str(exc.value)
    f = onlynorm.reconstruct(g, example_input=(x, pad[:1].expand(2, 3)))
    with torch.no_grad():
        fast, got = g(x, pad), f(x, pad)
    want = g(x, pad).detach()  # grad enabled: torch's own math path, 0 attention for the padded sequence
    assert torch.isnan(fast[1]).all() and torch.isfinite(want).all()
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-9
