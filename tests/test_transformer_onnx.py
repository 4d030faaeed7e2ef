"""ONNX export of sequence networks (SeqNet): the file passes onnx.checker and onnxruntime computes what the
network's own forward computes — at the example's shape and at other batch sizes and sequence lengths."""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onlynorm
from onlynorm.cli.app import main
from onlynorm.errors import InvalidNetworkError
from onlynorm.nets import NormNet, SeqNet
from onlynorm.nets.onnx_seq_ops import LOWERINGS
from onlynorm.targets.seqgraph import FUNCTIONS, METHODS

from .test_transformer import GPT, SDPAModel, encoder

F64, F32 = torch.float64, torch.float32


def _feat(shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _ids(shape, vocab=11, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    # name: (model builder(dtype), example input, fresh inputs of other batch sizes and lengths)
    **{
        f"encoder-{'pre' if nf else 'post'}-{act}-{'bf' if bf else 'lbe'}": (
            functools.partial(lambda dtype, nf, act, bf: encoder(nf, act, bf, dtype=dtype), nf=nf, act=act, bf=bf),
            lambda dtype, bf=bf: _feat((3, 5, 16) if bf else (5, 3, 16), dtype),
            lambda dtype, bf=bf: [_feat((n, t, 16) if bf else (t, n, 16), dtype, seed=t) for n, t in ((1, 1), (2, 7))],
        )
        for nf in (False, True)
        for act in ("relu", "gelu")
        for bf in (True, False)
    },
    "gpt": (
        lambda dtype: GPT().to(dtype).eval(),
        lambda dtype: _ids((3, 4)),
        lambda dtype: [_ids((n, t), seed=t) for n, t in ((1, 1), (2, 9), (4, 12))],
    ),
    "sdpa": (
        lambda dtype: SDPAModel().to(dtype).eval(),
        lambda dtype: _feat((3, 4, 16), dtype),
        lambda dtype: [_feat((n, t, 16), dtype, seed=t) for n, t in ((1, 1), (5, 9))],
    ),
}


@functools.cache
def _built(case: str, dtype: torch.dtype) -> SeqNet:
    model, example, _ = CASES[case]
    torch.manual_seed(1)
    return onlynorm.reconstruct(model(dtype), example_input=example(dtype), method="deep", seed=0)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(net: SeqNet, session: ort.InferenceSession, *x: torch.Tensor) -> float:
    with torch.no_grad():
        want = net(*x)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: t.numpy() for n, t in zip(names, x)})[0]
    assert got.shape == tuple(want.shape) and got.dtype == want.numpy().dtype
    return float(np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max())


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_graph_computes_the_network_at_other_batch_sizes_and_lengths(case, dtype, tmp_path):
    net = _built(case, dtype)
    info = net.to_onnx(tmp_path / "net.onnx")
    assert info["dynamic"] and info["checked"] == "onnxruntime" and info["dtype"] == str(dtype)[6:]
    assert all(isinstance(d, str) for d in info["inputs"][:2])  # batch and sequence axes dynamic
    model = onnx.load(str(tmp_path / "net.onnx"))
    onnx.checker.check_model(model, full_check=True)
    session = _session(tmp_path / "net.onnx")
    tolerance = 1e-12 if dtype == F64 else 1e-5
    for x in CASES[case][2](dtype):
        assert _rel(net, session, x) <= tolerance


def test_the_tuned_parameters_are_visible_in_the_graph(tmp_path):
    net = _built("gpt", F64)
    net.to_onnx(tmp_path / "net.onnx")
    model = onnx.load(str(tmp_path / "net.onnx"))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    factorised = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bn) == len(factorised) > 0
    for node, module in zip(bn, factorised):
        assert np.array_equal(init[node.input[1]], module.weight.detach().numpy())  # γ as the scale input
    gammas = [init[n.input[1]] for n in model.graph.node if n.op_type == "Mul" and n.input[1].startswith("ln_gamma")]
    assert len(gammas) == len(net.layer_norms()) == 5
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    # the initializers are the network's own tensors (no dense zero-padded copies of the blocked factors)
    held = sum(t.numel() for t in net.state_dict().values())
    assert sum(v.size for v in init.values()) <= 1.05 * held + 10_000


def test_a_loaded_network_exports_and_the_cli_exports_a_sequence_network(tmp_path, capsys):
    net = _built("sdpa", F64)
    net.save(tmp_path / "net.safetensors")
    loaded = NormNet.load(tmp_path / "net.safetensors")
    assert isinstance(loaded, SeqNet) and loaded.inputs[0]["shape"] == [3, 4, 16]
    with pytest.raises(SystemExit) as code:
        main(["export", str(tmp_path / "net.safetensors"), "--onnx", str(tmp_path / "cli.onnx")])
    assert code.value.code == 0
    assert "input_dim0 × input_dim1 × 16" in capsys.readouterr().out
    assert _rel(net, _session(tmp_path / "cli.onnx"), _feat((2, 6, 16), seed=4)) <= 1e-12


def test_static_export_and_a_model_that_only_runs_at_its_example_shape(tmp_path):
    """A key padding mask buffer of the example's batch size: the longer batch does not run, so the export falls
    back to static shapes (dynamic=None) or refuses (dynamic=True)."""
    torch.manual_seed(4)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)
            self.register_buffer("mask", torch.tensor([[False, True, False]]).repeat(3, 1))

        def forward(self, x, mem):
            return self.attn(x, mem, mem, key_padding_mask=self.mask[: x.size(0)])[0]

    example = (_feat((3, 5, 16)), _feat((3, 3, 8), seed=1))
    net = onlynorm.reconstruct(Cross().double().eval(), example_input=example)
    info = net.to_onnx(tmp_path / "net.onnx")
    assert not info["dynamic"] and info["signature"] == [[3, 5, 16], [3, 3, 8]]
    assert _rel(net, _session(tmp_path / "net.onnx"), _feat((3, 5, 16), seed=2), _feat((3, 3, 8), seed=3)) <= 1e-12
    with pytest.raises(InvalidNetworkError) as exc:
        net.to_onnx(tmp_path / "dyn.onnx", dynamic=True)
    assert "no dynamic-shape export" in _one_line(exc) and "'attn.attention'" in str(exc.value)
    assert not (tmp_path / "dyn.onnx").exists()
    static = _built("gpt", F64).to_onnx(tmp_path / "static.onnx", dynamic=False)
    assert static["inputs"] == [3, 4] and not static["dynamic"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_an_op_without_a_lowering_is_refused_naming_the_node_and_nothing_is_written(tmp_path):
    class Picks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.register_buffer("keep", torch.tensor([True, False, True, True]))

        def forward(self, x):
            return self.norm(self.lin(x))[..., self.keep]  # boolean-mask indexing

    net = onlynorm.reconstruct(Picks().double().eval(), example_input=_feat((2, 3, 4)))
    target = tmp_path / "net.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(InvalidNetworkError) as exc:
        net.to_onnx(target)
    message = _one_line(exc)
    assert "node 'getitem'" in message and "indexing by a tensor" in message and "cannot be exported" in message
    assert target.read_bytes() == b"previous"  # written atomically: the old file is untouched


def test_every_graph_function_and_method_has_a_lowering():
    # math.sqrt only ever sees constants (sizes that change with the input are refused by the exporter)
    assert set(FUNCTIONS) - {"math.sqrt"} <= set(LOWERINGS)
    assert {f".{m}" for m in METHODS} <= set(LOWERINGS)


def test_float64_erf_matches_math_erf():
    """onnxruntime's Erf is float32-only: the float64 graph's own erf, on a dense grid and at the piece edges."""
    from onlynorm.nets.onnx_seq_graph import SeqGraph
    from onlynorm.nets.onnx_seq_math import erf

    g = SeqGraph(F64)
    out = erf(g, "x", F64)
    info = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        g.nodes,
        "erf",
        [info("x", onnx.TensorProto.DOUBLE, ["n"])],
        [info(out, onnx.TensorProto.DOUBLE, ["n"])],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.concatenate([np.linspace(-7, 7, 40001), np.arange(-12, 13) / 2, [1e-300, -1e-8, 0.0]])
    got = session.run(None, {"x": x})[0]
    want = np.array([math.erf(v) for v in x])
    assert np.abs(got - want).max() <= 5e-16
    small = np.abs(x) < 1e-4
    assert np.all(np.abs(got[small] - want[small]) <= 1e-16 * np.abs(want[small]) + 1e-320)  # relative near 0


def _own_forward(self, x):
    t = x.size(1)
    q, k, v = self.qkv(x).split(8, dim=-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    mask = torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), diagonal=1)
    scores = (scores + mask).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -1e9)
    y = F.softmax(scores, dim=-1) @ v
    a, b = self.out(y).chunk(2, dim=-1)
    return self.norm(x + F.gelu(torch.cat([a, b], dim=-1), approximate="tanh"))


def test_hand_written_masks_and_gelu_tanh_export(tmp_path):
    """A model writing its own causal mask (torch.full/triu with a traced length), masked_fill, tanh GELU,
    split and chunk, through the dynamic path."""

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.out = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        forward = _own_forward

    torch.manual_seed(5)
    net = onlynorm.reconstruct(Own().double().eval(), example_input=_feat((2, 3, 8)))
    info = net.to_onnx(tmp_path / "net.onnx")
    assert info["dynamic"]
    session = _session(tmp_path / "net.onnx")
    for n, t in ((1, 1), (4, 6)):
        assert _rel(net, session, _feat((n, t, 8), seed=t)) <= 1e-12


def test_unbatched_attention_and_encoder_export(tmp_path):
    """Unbatched (L, E) inputs: a bare MultiheadAttention (output and weights) and an encoder, dynamic length."""
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(8, 2).double().eval()
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 1, enable_nested_tensor=False).double().eval()
    for name, model, arity in (("mha", mha, 3), ("enc", enc, 1)):
        net = onlynorm.reconstruct(model, example_input=(_feat((5, 8)),) * arity)
        info = net.to_onnx(tmp_path / f"{name}.onnx")
        assert info["dynamic"] and all(dims[1] == 8 for dims in info["signature"])
        session = _session(tmp_path / f"{name}.onnx")
        y = _feat((7, 8), seed=3)
        with torch.no_grad():
            want = net(*(y,) * arity)
            ref = model(*(y,) * arity)
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, {n: y.numpy() for n in names})
        for g, w, r in zip(got, want if arity == 3 else [want], ref if arity == 3 else [ref]):
            assert np.abs(g - w.numpy()).max() <= 1e-12 * np.abs(w.numpy()).max()
            assert float((w - r).abs().max() / r.abs().max()) <= 1e-9


def test_a_network_without_a_recorded_example_shape_needs_example_input(tmp_path):
    net = _built("sdpa", F64).clone()
    for sig in net.inputs:
        sig.pop("shape")  # as a network file written before the shape was recorded
    with pytest.raises(InvalidNetworkError) as exc:
        net.to_onnx(tmp_path / "net.onnx")
    assert "example_input=" in _one_line(exc) and not (tmp_path / "net.onnx").exists()
    info = net.to_onnx(tmp_path / "net.onnx", example_input=_feat((2, 3, 16)))
    assert info["dynamic"] and _rel(net, _session(tmp_path / "net.onnx"), _feat((4, 5, 16), seed=8)) <= 1e-12
    with pytest.raises(InvalidNetworkError) as exc:
        net.to_onnx(tmp_path / "other.onnx", example_input=(_feat((2, 3, 16)), _feat((2, 3, 16))))
    assert "expected 1 tensor(s), found 2" in _one_line(exc)
