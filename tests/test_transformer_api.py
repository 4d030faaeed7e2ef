"""``random_normnet`` / ``solve_norms`` / ``capacity`` for transformers: one frozen SeqNet per architecture and
seed, solved for several models of that architecture, checked against each model's own forward; capacity's ranks
against an independent dense computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm.errors import InvalidNetworkError, InvalidOptionError, InvalidTargetError
from onlynorm.nets import SeqNet
from onlynorm.nets.factorised import FactorisedLinear

DTYPES = (torch.float64, torch.float32)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def encoder(seed: int, dtype: torch.dtype, d: int = 8, ff: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=ff, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(d), enable_nested_tensor=False).to(dtype).eval()


class Tokens(nn.Module):
    """Token embedding + learned positions + a causal attention block (a buffer mask) + head."""

    def __init__(self, vocab: int = 7, d: int = 8, length: int = 6):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, length, d))
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        t = idx.size(1)
        x = self.tok(idx) + self.pos[:, :t]
        x = x + self.attn(x, x, x, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        return self.head(self.ln(x))


def rel_error(f, g, *inputs) -> float:
    with torch.no_grad():
        want = g(*inputs)
        return float((f(*inputs) - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["deep", "width"])
def test_one_frozen_network_serves_every_model_of_its_architecture(dtype, method):
    x = torch.randn(2, 3, 8, dtype=dtype)
    frozen = onlynorm.random_normnet(encoder(1, dtype), method=method, seed=7, example_input=x)
    assert isinstance(frozen, SeqNet) and frozen.dtype == dtype
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    for seed in (2, 3):
        g = encoder(seed, dtype)
        f = onlynorm.solve_norms(frozen, g, example_input=x)
        assert rel_error(f, g, torch.randn(4, 5, 8, dtype=dtype)) <= TOL[dtype]  # a length the example never had
        tunable = {id(p) for p in f.norm_parameters()}
        for (name, p), (_, q) in zip(f.named_parameters(), frozen.named_parameters()):
            if id(p) not in tunable:
                assert torch.equal(p, q), name  # frozen tensors bit for bit those of the frozen network
        # and the same network reconstruct builds from the same seed
        g_rec = onlynorm.reconstruct(g, method=method, seed=7, example_input=x)
        assert all(torch.equal(a, b) for a, b in zip(f.state_dict().values(), g_rec.state_dict().values()))
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())  # the input is not modified


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_model_round_trip_through_a_file(dtype, tmp_path):
    idx = torch.randint(0, 7, (2, 6))
    torch.manual_seed(0)
    g1 = Tokens().to(dtype).eval()
    frozen = onlynorm.random_normnet(g1, example_input=idx, seed=1)
    frozen.save(tmp_path / "frozen.safetensors")
    loaded = SeqNet.load(tmp_path / "frozen.safetensors")
    torch.manual_seed(5)
    g2 = Tokens().to(dtype).eval()
    f = onlynorm.solve_norms(loaded, g2, example_input=idx)
    assert rel_error(f, g2, torch.randint(0, 7, (3, 4))) <= TOL[dtype]
    assert onlynorm.capacity(loaded, g2, example_input=idx).expressible


@pytest.mark.parametrize("dtype", DTYPES)
def test_capacity_ranks_match_a_dense_computation(dtype):
    x = torch.randn(1, 2, 8, dtype=dtype)
    g = encoder(4, dtype)
    frozen = onlynorm.random_normnet(g, example_input=x, seed=2, out_block=4)  # several output blocks per map
    report = onlynorm.capacity(frozen, g, example_input=x)
    stages = [s for s in frozen.layers if isinstance(s, FactorisedLinear)]
    assert report.expressible and len(report.systems) == len(stages)
    for system, stage in zip(report.systems, stages):
        a, b = (t.to(torch.float64) for t in stage.dense())  # (S·T·N, n), (m, S·T·N), zeros off the blocks
        # column j of the map γ ↦ vec(B diag(γ) A) is vec of the outer product B[:, j] A[j, :]
        M = torch.einsum("ij,jk->kij", b, a).reshape(-1, b.shape[1])
        assert system.equations == b.shape[0] * a.shape[1] == M.shape[0]
        assert system.unknowns == sum(p.numel() for p in stage.norm.parameters()) // 2
        assert system.rank == int(torch.linalg.matrix_rank(M)) == system.equations
        assert 1.0 <= system.condition < 1e3


def test_capacity_sees_a_rank_deficient_map():
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    g = encoder(4, torch.float64)
    frozen = onlynorm.random_normnet(g, example_input=x, seed=2)
    stage = next(s for s in frozen.layers if isinstance(s, FactorisedLinear))
    with torch.no_grad():
        stage.A[0, 0, :2] = 0.0  # two unknowns of one block now reach nothing
    report = onlynorm.capacity(frozen, g, example_input=x)
    first = report.systems[0]
    assert first.rank == first.equations - 2 and not first.expressible and first.residual > 1e-6
    assert all(s.expressible for s in report.systems[1:]) and not report.expressible
    assert "NOT exactly expressible" in str(report)


def test_refusals_are_one_line():
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    g = encoder(1, torch.float64)
    frozen = onlynorm.random_normnet(g, example_input=x)
    cases = [
        (lambda: onlynorm.random_normnet(g), InvalidTargetError, "example_input"),
        (lambda: onlynorm.solve_norms(frozen, g), InvalidTargetError, "example_input"),
        (lambda: onlynorm.solve_norms(frozen, g, (0.0, 1.0), example_input=x), InvalidOptionError, "domain"),
        (
            lambda: onlynorm.solve_norms(frozen, encoder(1, torch.float64, ff=10), example_input=x),
            InvalidNetworkError,
            "another architecture",
        ),
        (
            lambda: onlynorm.solve_norms(frozen, copy.deepcopy(g).float(), example_input=x.float()),
            InvalidNetworkError,
            "float64",
        ),
        (lambda: onlynorm.capacity(frozen, g), InvalidNetworkError, "example_input"),
        (
            lambda: onlynorm.solve_norms(onlynorm.with_norms(g, example_input=x), g, example_input=x),
            InvalidNetworkError,
            "fit_norms",
        ),
        (lambda: onlynorm.random_normnet(g, method="sparse", example_input=x), InvalidOptionError, "method"),
    ]
    for call, error, word in cases:
        with pytest.raises(error) as info:
            call()
        assert word in str(info.value) and "\n" not in str(info.value)
