"""``tied=1`` for transformers: every block of a factorised map shares one frozen pair ``(A, B)`` — one LU per map.
Checked against the target's own forward (float32 and float64, block sizes with padding and several output
blocks), against an independent dense evaluation of each stage, through a file, ONNX and ``solve_norms``."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import onlynorm
from onlynorm.constructions import memory
from onlynorm.errors import FileFormatError, InvalidOptionError
from onlynorm.nets import SeqNet
from onlynorm.nets.factorised import FactorisedLinear

from .test_transformer import GPT, _features, _tokens, encoder

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-4}


def _rel(f, g, x) -> float:
    with torch.no_grad():
        want = g(x)
        return float((f(x) - want).abs().max() / want.abs().max())


def _stages(net: SeqNet) -> list[FactorisedLinear]:
    return [s for s in net.layers if isinstance(s, FactorisedLinear)]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(("block", "out_block"), [(1, None), (3, 5), (16, 16), (2, 7)])
def test_tied_gpt_is_exact_with_one_draw_per_map(dtype, block, out_block):
    torch.manual_seed(0)
    g = GPT().to(dtype).eval()  # token embedding, a learned table, q/k/v/out, MLP, head
    options = {"block": block} | ({"out_block": out_block} if out_block else {})
    f = onlynorm.reconstruct(g, example_input=_tokens(4), tied=True, **options)
    untied = onlynorm.reconstruct(g, example_input=_tokens(4), **options)
    for x in (_tokens(1, seed=1), _tokens(9, seed=2)):
        assert _rel(f, g, x) <= TOL[dtype]
    stages = _stages(f)
    assert stages and all(s.tied and s.A.shape[:2] == (1, 1) and s.B.shape[:2] == (1, 1) for s in stages)
    assert any(s.blocks[0] * s.blocks[1] > 1 for s in stages)  # a shared pair really serves several blocks
    assert all(r.kind == "shared" and r.details["tied"] == 1 for r in f.meta.solve.records)
    assert f.summary().frozen_parameters < untied.summary().frozen_parameters
    assert f.summary().tunable_parameters == untied.summary().tunable_parameters


def test_tied_encoder_float32_and_float64():
    for dtype in (F64, F32):
        g = encoder(True, "gelu", True, dtype=dtype)
        f = onlynorm.reconstruct(g, example_input=_features(True, 3, dtype=dtype), tied=1, out_block=8)
        assert f.dtype == dtype and _rel(f, g, _features(True, 7, dtype=dtype, seed=4)) <= TOL[dtype]


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    block=st.integers(1, 4),
    out_block=st.integers(1, 4),
    rows=st.integers(1, 5),
)
def test_tied_stage_equals_a_dense_evaluation_in_every_grad_mode(n, m, block, out_block, rows):
    gen = torch.Generator().manual_seed(n * 100 + m * 10 + block)
    stage = FactorisedLinear(n, m, block, out_block, tied=True)
    with torch.no_grad():
        for p in (stage.A, stage.B, stage.norm.weight, stage.norm.bias):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(rows, n, generator=gen, dtype=F64)
    a, b = stage.dense()  # (S·T·N, n), (m, S·T·N): the shared pair on every block, zeros elsewhere
    want = (x @ a.T * stage.norm.weight + stage.norm.bias) @ b.T  # y = B (γ ⊙ (A x) + β), independently
    with torch.no_grad():
        quiet = stage(x)
    tracked = stage(x)
    assert torch.allclose(quiet, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(quiet, tracked.detach())


def test_solve_norms_and_a_file_give_the_same_tied_network(tmp_path):
    x = _features(True, 3)
    g = encoder(False, "relu", True)
    frozen = onlynorm.random_normnet(g, example_input=x, seed=3, tied=1)
    f = onlynorm.solve_norms(frozen, g, example_input=x)
    rec = onlynorm.reconstruct(g, example_input=x, seed=3, tied=1)
    assert all(torch.equal(a, b) for a, b in zip(f.state_dict().values(), rec.state_dict().values()))
    shared = {p.data_ptr() for p in frozen.frozen_parameters()}
    assert all(p.data_ptr() in shared for p in f.frozen_parameters())  # the solve shares the frozen storage
    f.save(tmp_path / "tied.safetensors")
    loaded = SeqNet.load(tmp_path / "tied.safetensors")
    assert all(s.tied for s in _stages(loaded))
    y = _features(True, 5, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(y), f(y))
    assert onlynorm.capacity(loaded, g, example_input=x).expressible


def test_tied_network_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    g = GPT().double().eval()
    f = onlynorm.reconstruct(g, example_input=_tokens(4), tied=1, out_block=8, block=3)
    info = f.to_onnx(tmp_path / "tied.onnx")
    assert info["checked"] == "onnxruntime"
    session = ort.InferenceSession(str(tmp_path / "tied.onnx"), providers=["CPUExecutionProvider"])
    for x in (_tokens(1, seed=5), _tokens(11, seed=6)):
        with torch.no_grad():
            want = f(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-12


def test_tied_option_is_checked_and_the_memory_guard_suggests_it():
    x = _features(True, 3)
    g = encoder(False, "relu", True)
    with pytest.raises(InvalidOptionError, match="tied"):
        onlynorm.reconstruct(g, example_input=x, tied=2)
    with pytest.raises(InvalidOptionError, match="tied"):
        onlynorm.reconstruct(g, example_input=x, method="width", tied=1)
    from onlynorm.constructions.transformer import estimate_bytes
    from onlynorm.targets.transformer import TransformerSpec

    spec = TransformerSpec.from_module(g, x)
    untied = estimate_bytes(spec, {"method": "deep", "tied": 0}, F64)
    tied = estimate_bytes(spec, {"method": "deep", "tied": 1}, F64)
    assert tied < untied
    memory.set_memory_limit((tied + untied) // 2)
    try:
        with pytest.raises(onlynorm.MemoryBudgetError, match="tied=True"):
            onlynorm.reconstruct(g, example_input=x)
        assert _rel(onlynorm.reconstruct(g, example_input=x, tied=True), g, x) <= 1e-10  # and it fits
    finally:
        memory.set_memory_limit(None)


def test_a_tampered_tied_field_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match="tied"):
        FactorisedLinear.from_config({"in_features": 4, "out_features": 3, "tied": "yes"}, dtype=F64)
