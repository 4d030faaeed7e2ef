"""Transformers: exact reconstruction by tuning only normalization parameters (the BatchNorm γ, β of factorised
linear maps and the LayerNorm affines), against the target's own forward, on several sequence lengths."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm.constructions import memory
from onlynorm.errors import InvalidOptionError, NotCertifiableError, UnsupportedModelError
from onlynorm.nets import NormNet, SeqNet

F64 = torch.float64
LENGTHS = (1, 3, 8)


# ---------------------------------------------------------------------------------------------- targets, as written
class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        t = x.size(1)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, causal MultiheadAttention blocks, GELU MLP, final LayerNorm, LM head."""

    def __init__(self, vocab: int = 11, d: int = 16, heads: int = 2, layers: int = 2, max_len: int = 12):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, max_len, d))
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class SDPAModel(nn.Module):
    """Its own q/k/v nn.Linear layers and F.scaled_dot_product_attention, a position-embedding nn.Embedding."""

    def __init__(self, d: int = 16, heads: int = 4, max_len: int = 12):
        super().__init__()
        self.heads = heads
        self.pos = nn.Embedding(max_len, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        x = x + self.pos(torch.arange(t, device=x.device))
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        x = self.norm(x + self.proj(y))
        return x + self.ff(x)


def encoder(norm_first: bool, activation: str, batch_first: bool, dtype=F64, d: int = 16, heads: int = 4):
    layer = nn.TransformerEncoderLayer(
        d, heads, dim_feedforward=32, activation=activation, batch_first=batch_first, norm_first=norm_first
    )
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
    return enc.to(dtype).eval()


def _features(batch_first: bool, t: int, d: int = 16, dtype=F64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + t)
    shape = (3, t, d) if batch_first else (t, 3, d)
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def _tokens(t: int, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (3, t), generator=torch.Generator().manual_seed(seed + t))


def _rel(f: nn.Module, g: nn.Module, *x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = f(*x), g(*x)
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_is_reconstructed_exactly(norm_first, activation, batch_first):
    torch.manual_seed(1)
    g = encoder(norm_first, activation, batch_first)
    f = onlynorm.reconstruct(g, example_input=_features(batch_first, 5), method="deep", seed=0)
    assert isinstance(f, SeqNet)
    for t in LENGTHS:
        assert _rel(f, g, _features(batch_first, t, seed=7)) <= 1e-10


@pytest.mark.parametrize("method", ["deep", "width"])
def test_gpt_style_causal_model_is_reconstructed_exactly(method):
    torch.manual_seed(2)
    g = GPT().double().eval()
    f = onlynorm.reconstruct(g, example_input=_tokens(4), method=method, seed=3)
    for t in LENGTHS + (12,):
        assert _rel(f, g, _tokens(t, seed=5)) <= 1e-10
    report = onlynorm.verify(f, g, inputs=[_tokens(t, seed=9) for t in LENGTHS])
    assert report.passed and report.max_rel_error <= 1e-10


def test_sdpa_model_with_its_own_qkv_linears_is_reconstructed_exactly():
    torch.manual_seed(3)
    g = SDPAModel().double().eval()
    f = onlynorm.reconstruct(g, example_input=_features(True, 4), method="deep", seed=0, block=2)
    for t in LENGTHS:
        assert _rel(f, g, _features(True, t, seed=11)) <= 1e-10


@pytest.mark.parametrize("packed", [True, False])
def test_multihead_attention_with_masks_and_separate_weights(packed):
    torch.manual_seed(4)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            kv = None if packed else 8
            self.attn = nn.MultiheadAttention(16, 4, kdim=kv, vdim=kv, batch_first=True)
            self.register_buffer("mask", torch.tensor([[False, True, False]]).repeat(3, 1))

        def forward(self, x, mem):
            out, _ = self.attn(x, mem, mem, key_padding_mask=self.mask[: x.size(0)])
            return out

    g = Cross().double().eval()
    mem = torch.randn(3, 3, 16 if packed else 8, dtype=F64)
    f = onlynorm.reconstruct(g, example_input=(torch.randn(3, 5, 16, dtype=F64), mem))
    for t in LENGTHS:
        assert _rel(f, g, torch.randn(3, t, 16, dtype=F64), mem) <= 1e-10


def test_float32_targets():
    torch.manual_seed(5)
    g = GPT().eval()
    f = onlynorm.reconstruct(g, example_input=_tokens(4), method="deep")
    assert f.dtype == torch.float32
    for t in LENGTHS:
        assert _rel(f, g, _tokens(t)) <= 1e-4
    enc = encoder(True, "gelu", True, dtype=torch.float32)
    f = onlynorm.reconstruct(enc, example_input=_features(True, 4, dtype=torch.float32))
    assert _rel(f, enc, _features(True, 6, dtype=torch.float32)) <= 1e-4


# ---------------------------------------------------------------------------------------------- the frozen network
def test_frozen_tensors_do_not_depend_on_the_target_weights():
    torch.manual_seed(6)
    g1, g2 = GPT().double().eval(), GPT().double().eval()
    f1 = onlynorm.reconstruct(g1, example_input=_tokens(4), seed=7, method="deep")
    f2 = onlynorm.reconstruct(g2, example_input=_tokens(6), seed=7, method="deep")
    frozen1, frozen2 = f1.frozen_parameters(), f2.frozen_parameters()
    assert len(frozen1) == len(frozen2) > 0
    assert all(torch.equal(a, b) for a, b in zip(frozen1, frozen2))
    assert not all(torch.equal(a, b) for a, b in zip(f1.norm_parameters(), f2.norm_parameters()))
    f3 = onlynorm.reconstruct(g1, example_input=_tokens(4), seed=8, method="deep")
    assert not torch.equal(f3.frozen_parameters()[0], frozen1[0])


def test_norm_parameters_are_exactly_the_tunable_gamma_beta():
    g = GPT().double().eval()
    f = onlynorm.reconstruct(g, example_input=_tokens(4), method="deep")
    norms = f.norm_parameters()
    owners = [m for m in f.modules() if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))]
    assert {id(p) for p in norms} == {id(p) for m in owners for p in (m.weight, m.bias)}
    assert sum(isinstance(m, nn.LayerNorm) for m in owners) == 5  # 2 per block + the final one
    frozen = {id(p) for p in f.frozen_parameters()}
    assert frozen.isdisjoint({id(p) for p in norms}) and all(not p.requires_grad for p in f.frozen_parameters())
    assert len(frozen) + len(norms) == len(list(f.parameters()))
    assert f.summary().tunable_parameters == sum(p.numel() for p in norms)


def test_save_and_load_round_trip(tmp_path):
    g = SDPAModel().double().eval()
    f = onlynorm.reconstruct(g, example_input=_features(True, 4), method="deep")
    path = tmp_path / "f.safetensors"
    f.save(path)
    for loaded in (NormNet.load(path), SeqNet.load(path)):
        assert isinstance(loaded, SeqNet)
        x = _features(True, 6, seed=3)
        with torch.no_grad():
            assert torch.equal(loaded(x), f(x))
    assert "transformer" in str(f.summary())


def test_grad_mode_does_not_change_the_function():
    g = GPT().double().eval()
    f = onlynorm.reconstruct(g, example_input=_tokens(4), method="deep")
    x = _tokens(5)
    with torch.no_grad():
        quiet = f(x)
    with torch.enable_grad():
        tracked = f(x)
    assert torch.equal(quiet, tracked.detach())


# ---------------------------------------------------------------------------------------------- refusals
def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_train_mode_with_active_dropout_is_refused():
    g = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dtype=F64), 1, enable_nested_tensor=False)
    with pytest.raises(UnsupportedModelError) as exc:
        onlynorm.reconstruct(g.train(), example_input=_features(False, 3))
    assert "dropout" in _one_line(exc)


def test_data_dependent_control_flow_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -x

    with pytest.raises(UnsupportedModelError) as exc:
        onlynorm.reconstruct(Branchy().double(), example_input=torch.randn(2, 3, 4, dtype=F64))
    assert "control flow" in _one_line(exc)


@pytest.mark.parametrize(
    "use, name",
    [
        (lambda self, x: x * self.scale, "scale"),
        (lambda self, x: x @ self.w, "w"),
        (lambda self, x: F.linear(x, self.w), "w"),
        (lambda self, x: x + torch.exp(self.scale), "scale"),
    ],
)
def test_a_parameter_used_non_linearly_is_refused(use, name):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, dtype=F64))
            self.w = nn.Parameter(torch.ones(4, 4, dtype=F64))

        forward = use

    with pytest.raises(UnsupportedModelError) as exc:
        onlynorm.reconstruct(Odd(), example_input=torch.randn(2, 4, dtype=F64))
    assert name in _one_line(exc) and "non-linearly" in str(exc.value)


def test_attention_weights_are_reconstructed_and_unknown_modules_refused():
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=F64)

        def forward(self, x):
            return self.attn(x, x, x)[1]

    g = Weights().eval()
    f = onlynorm.reconstruct(g, example_input=torch.randn(2, 3, 8, dtype=F64))
    for t in LENGTHS:
        assert _rel(f, g, torch.randn(2, t, 8, dtype=F64)) <= 1e-10
    conv = nn.Sequential(nn.Embedding(5, 4), nn.Conv1d(3, 3, 1)).double()
    with pytest.raises(UnsupportedModelError) as exc:
        onlynorm.reconstruct(conv, example_input=torch.zeros(2, 3, dtype=torch.long))
    assert "'1' (Conv1d)" in _one_line(exc)


def test_certify_is_refused_in_one_line_and_sampled_verification_works():
    g = encoder(False, "relu", True)
    f = onlynorm.reconstruct(g, example_input=_features(True, 4))
    with pytest.raises(NotCertifiableError) as exc:
        onlynorm.verify(f, g, inputs=_features(True, 4), certify=True)
    assert "not piecewise linear" in _one_line(exc)
    report = onlynorm.verify(f, g, inputs=[_features(True, t) for t in LENGTHS])
    assert report.passed and report.samples == 3 * len(LENGTHS)
    with pytest.raises(InvalidOptionError):
        onlynorm.reconstruct(g, example_input=_features(True, 4), method="lowrank")


def test_verify_inputs_works_for_mlps_too():
    g = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    f = onlynorm.reconstruct(g, domain=onlynorm.Box(-1.0, 1.0))
    report = onlynorm.verify(f, g, inputs=torch.rand(50, 3, dtype=F64) * 2 - 1)
    assert report.passed and report.samples == 50


def test_a_sequence_model_without_an_example_is_refused():
    with pytest.raises(onlynorm.InvalidTargetError) as exc:
        onlynorm.reconstruct(GPT().double())
    assert "example_input" in _one_line(exc)


def test_d64_encoder_is_fast():
    torch.manual_seed(8)
    g = encoder(True, "gelu", True, d=64, heads=4)
    start = time.perf_counter()
    f = onlynorm.reconstruct(g, example_input=_features(True, 8, d=64), method="deep")
    elapsed = time.perf_counter() - start
    assert _rel(f, g, _features(True, 16, d=64)) <= 1e-10
    assert elapsed < 30 and math.isfinite(elapsed)


def test_the_memory_guard_refuses_before_allocating():
    wide = nn.Sequential(nn.Embedding(100, 64), nn.LayerNorm(64)).double()
    with pytest.raises(onlynorm.MemoryBudgetError) as exc:
        onlynorm.reconstruct(wide, example_input=_tokens(3), method="width")
    assert "'0' (100→64)" in _one_line(exc) and "method='deep'" in str(exc.value)
    g = encoder(True, "relu", True, d=64)

    memory.set_memory_limit(1 << 20)
    try:
        with pytest.raises(onlynorm.MemoryBudgetError) as exc:
            onlynorm.reconstruct(g, example_input=_features(True, 4, d=64), method="deep")
        assert "out_block" in _one_line(exc)
    finally:
        memory.set_memory_limit(None)


def test_summary_names_the_target_and_counts_layer_norms():
    f = onlynorm.reconstruct(GPT().double().eval(), example_input=_tokens(3))
    text = str(f.summary())
    assert "GPT (sequence model)" in text and "5 LayerNorms kept" in text


_HASH_FROZEN = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import onlynorm
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(16, 2, 64, batch_first=True, dtype=torch.float64)
g = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
f = onlynorm.reconstruct(g, example_input=torch.zeros(1, 2, 16, dtype=torch.float64), seed=3, method="deep", block=2)
h = hashlib.sha256()
for p in f.frozen_parameters():
    h.update(p.numpy().tobytes())
print(h.hexdigest())
"""


def test_frozen_tensors_do_not_depend_on_the_thread_count():
    """No BLAS/LAPACK in drawing the frozen tensors: the same bits with 1 and 2 threads (separate processes)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    hashes = {
        subprocess.run(
            [sys.executable, "-c", _HASH_FROZEN, str(n)], capture_output=True, text=True, check=True, env=env
        ).stdout.strip()
        for n in (1, 2)
    }
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64


# ---------------------------------------------------------------------------------------------- LayerNorm-only fitting
def _layer_norm_tuned(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """A 'fine-tuned' copy whose LayerNorms changed (so a LayerNorm-only fit can reach it)."""
    import copy

    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tuned.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(scale * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.add_(scale * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return tuned


def test_with_norms_of_a_transformer_tunes_only_its_layer_norms():
    torch.manual_seed(9)
    g = GPT(layers=1).double().eval()
    net = onlynorm.with_norms(g, example_input=_tokens(3))
    assert isinstance(net, SeqNet) and _rel(net, g, _tokens(7)) <= 1e-14
    owners = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert {id(p) for p in net.norm_parameters()} == {id(p) for m in owners for p in (m.weight, m.bias)}


def test_fit_norms_layer_norm_only_beats_adam():
    torch.manual_seed(10)
    g = GPT(layers=1).double().eval()
    target = _layer_norm_tuned(g)
    net = onlynorm.with_norms(g, example_input=_tokens(3))
    data = [_tokens(6, seed=s) for s in range(3)]
    fitted, report = onlynorm.fit_norms(net, target, data, method="gauss-newton", steps=20)
    assert report.initial_error > 1e-2 and report.final_error < 1e-10
    assert _rel(fitted, target, _tokens(9, seed=20)) < 1e-9
    frozen_before = [p.clone() for p in net.frozen_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, fitted.frozen_parameters()))
    _, adam = onlynorm.fit_norms(net, target, data, method="adam", steps=50)
    assert adam.final_error > report.final_error
    with pytest.raises(onlynorm.OnlyNormError) as exc:
        onlynorm.fit_norms(net, target, data, method="layerwise")
    assert "transformer" in _one_line(exc)


def test_norm_sets_swap_tasks_in_one_frozen_network(tmp_path):
    """Two targets of one architecture, one frozen network (same seed): swapping the norm set swaps the function."""
    torch.manual_seed(11)
    g1, g2 = SDPAModel().double().eval(), SDPAModel().double().eval()
    f1 = onlynorm.reconstruct(g1, example_input=_features(True, 3), method="deep", seed=4)
    f2 = onlynorm.reconstruct(g2, example_input=_features(True, 3), method="deep", seed=4)
    f2.save_norms(tmp_path / "task2.safetensors")
    f1.load_norms(tmp_path / "task2.safetensors")
    assert _rel(f1, g2, _features(True, 5, seed=2)) <= 1e-10


def test_a_tampered_graph_is_refused_on_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    f = onlynorm.reconstruct(SDPAModel().double().eval(), example_input=_features(True, 3))
    path = tmp_path / "f.safetensors"
    f.save(path)
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    key = next(k for k, v in meta.items() if "onlynorm.seqnet" in v)
    doc = json.loads(meta[key])
    node = next(n for n in doc["architecture"]["graph"] if n["op"] == "call")
    node["target"] = "os.system"
    save_file(tensors, str(path), metadata={**meta, key: json.dumps(doc)})
    with pytest.raises(onlynorm.FileFormatError) as exc:
        NormNet.load(path)
    assert "unknown function 'os.system'" in _one_line(exc)


@given(
    heads=st.sampled_from([1, 2, 4]),
    width=st.sampled_from([8, 12, 16]),
    norm_first=st.booleans(),
    activation=st.sampled_from(["relu", "gelu"]),
    batch_first=st.booleans(),
    mask=st.sampled_from(["none", "causal-bool", "causal-float", "padding"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8, deadline=None)
def test_encoders_over_heads_widths_masks_norms_and_activations(
    heads, width, norm_first, activation, batch_first, mask, seed
):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(
        width, heads, 2 * width, activation=activation, batch_first=batch_first, norm_first=norm_first
    )
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc
            self.register_buffer("pad", torch.zeros(3, 12, dtype=torch.bool).index_fill(1, torch.tensor([0]), True))

        def forward(self, x):
            t = x.size(1) if batch_first else x.size(0)
            if mask == "causal-bool":
                return self.enc(x, mask=torch.ones(t, t, dtype=torch.bool).triu(1))
            if mask == "causal-float":
                return self.enc(x, mask=nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64))
            if mask == "padding":  # a key padding mask given as a module buffer
                n = x.size(0) if batch_first else x.size(1)
                return self.enc(x, src_key_padding_mask=self.pad[:n, :t])
            return self.enc(x)

    g = Masked().eval()
    f = onlynorm.reconstruct(g, example_input=_features(batch_first, 3, d=width), seed=seed % 7)
    for t in (2, 5):
        assert _rel(f, g, _features(batch_first, t, d=width, seed=seed)) <= 1e-10
