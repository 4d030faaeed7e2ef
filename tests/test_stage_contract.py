"""The stage contract, tested by type over every registered stage type: each computes one function in every grad
mode, exports what it computes, and a type without a view or lowering is refused — the bug classes of a stage meaning
written in several places. (Module state the certificate's views refuse is tampered with in test_tamper.py.)"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import onlynorm
from onlynorm.errors import InvalidNetworkError, NotCertifiableError
from onlynorm.nets import (
    STAGES,
    ConstStage,
    ConvStream,
    FactorisedEmbedding,
    FactorisedLinear,
    FactorisedTable,
    FixedOp,
    LayerNormStage,
    NormConv2d,
    NormLinear,
    NormNet,
    PretrainedConv2d,
    PretrainedLinear,
    PretrainedMap,
    ResidualStage,
    ResidualStream,
    SeqNet,
    Stage,
    TiedConvStream,
    TiedResidualStream,
)
from onlynorm.nets.onnx import build_model

from .conftest import random_mlp

IMAGE = (3, 5, 5)


def _image_stages() -> dict[str, tuple[list[Stage], tuple[int, ...]]]:
    """One small network per stage type (and variant), with its input shape (without the batch)."""
    return {
        "norm_linear": ([NormLinear(4, 6), NormLinear(6, 3, relu=False)], (4,)),
        "norm_conv2d": ([NormConv2d(3, 4, (3, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2))], IMAGE),
        "maxpool": ([NormConv2d(3, 3), FixedOp("maxpool", kernel=[2, 2], stride=[1, 1], padding=[1, 1])], IMAGE),
        "avgpool": (
            [
                NormConv2d(3, 3),
                FixedOp("avgpool", kernel=[3, 3], stride=[2, 2], padding=[1, 1], count_include_pad=False),
            ],
            IMAGE,
        ),
        "relu+flatten": ([NormConv2d(3, 3, relu=False), FixedOp("relu"), FixedOp("flatten")], IMAGE),
        "residual-identity": ([ResidualStage([NormConv2d(3, 3, (3, 3), padding=(1, 1))])], IMAGE),
        "residual-projection": (
            [
                ResidualStage(
                    [NormConv2d(3, 4, (3, 3), stride=(2, 2), padding=(1, 1)), NormConv2d(4, 4, relu=False)],
                    [NormConv2d(3, 4, (1, 1), stride=(2, 2), relu=False)],
                )
            ],
            IMAGE,
        ),
        "residual_stream": ([ResidualStream(5, 3, block=2), ResidualStream(3, 2, block=3, relu=False)], (5,)),
        "conv_stream": ([ConvStream(3, 2, (3, 3), padding=(1, 1), block=2)], IMAGE),
        "conv_stream-paired": ([ConvStream(3, 4, (2, 2), stride=(2, 2), block=3, paired=True)], IMAGE),
        "conv_stream-flat": ([ConvStream(5, 3, block=2, flat=True, paired=True)], (5,)),
        "tied_residual_stream": (
            [TiedResidualStream(5, 3, block=2), TiedResidualStream(3, 2, block=3, relu=False)],
            (5,),
        ),
        "tied_conv_stream": ([TiedConvStream(3, 2, (3, 3), padding=(1, 1), block=2)], IMAGE),
        "tied_conv_stream-paired": ([TiedConvStream(3, 4, (2, 2), stride=(2, 2), block=3, paired=True)], IMAGE),
        "tied_conv_stream-flat": ([TiedConvStream(5, 3, block=2, flat=True, paired=True)], (5,)),
        "pretrained_linear": ([PretrainedLinear(4, 3)], (4,)),
        "pretrained_conv2d": ([PretrainedConv2d(3, 2, (3, 3), padding=(1, 1))], IMAGE),
        "factorised_linear": ([FactorisedLinear(5, 3, block=2, out_block=2)], (5,)),
        "factorised_linear-width": ([FactorisedLinear(4, 3), FactorisedLinear(3, 2, block=1)], (4,)),
        "layer_norm": ([FactorisedLinear(4, 6, block=3), LayerNormStage([6])], (4,)),
    }


CASES = sorted(_image_stages())

#: stage types with no ONNX lowering: exporting a network holding one is refused in one line (tested below);
#: every registered type has one now (the sequence stages lower inside a SeqNet's graph: test_transformer_onnx.py)
NO_LOWERING: tuple[type, ...] = ()


class _Sequence(nn.Module):
    """Token embedding + a learned table + a mask buffer + LayerNorm + attention: every sequence stage type."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 8)
        self.pos = nn.Parameter(torch.randn(1, 6, 8))
        self.register_buffer("mask", torch.ones(6, 6, dtype=torch.bool).triu(1))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, idx):
        t = idx.size(1)
        x = self.norm(self.tok(idx) + self.pos[:, :t])
        return x + self.attn(x, x, x, attn_mask=self.mask[:t, :t])[0]


def _sequence_net(seed: int, pretrained: bool = False) -> SeqNet:
    """The sequence stages in their own network (token ids in; no NormNet chain can feed them), every parameter
    and BatchNorm statistic drawn at random; ``pretrained``: the with_norms form (PretrainedMap stages)."""
    torch.manual_seed(seed)
    model, example = _Sequence().double().eval(), torch.zeros(2, 3, dtype=torch.long)
    net = onlynorm.with_norms(model, example_input=example) if pretrained else None
    net = net or onlynorm.reconstruct(model, example_input=example)
    assert isinstance(net, SeqNet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
                m.eps = 0.01
    return net


def _randomised(case: str, seed: int, *, inference_form: bool = False) -> tuple[NormNet, tuple[int, ...]]:
    """The case's network with every parameter and buffer drawn at random — BatchNorm statistics and eps too
    (what an edited file holds), unless ``inference_form`` keeps BN(z) = γ z + β."""
    stages, shape = _image_stages()[case]
    meta = {"method": "custom", "target_dims": [shape[0], 1]} if len(shape) == 1 else {"in_shape": list(shape)}
    net = NormNet(stages, meta=meta)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in net.modules():
            if isinstance(m, _BatchNorm) and not inference_form:
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
                m.eps = 0.01
    return net, shape


def test_every_registered_stage_type_is_covered_and_defines_the_contract():
    covered = {type(s) for stages, _ in _image_stages().values() for top in stages for s in top.modules()}
    covered |= {type(s) for s in [*_sequence_net(0).layers, *_sequence_net(0, pretrained=True).layers]}
    assert set(STAGES.values()) <= covered  # a new stage type must be added to the cases above
    for cls in STAGES.values():
        for method in ("lower_onnx", "layout", "config"):
            assert getattr(cls, method) is not getattr(Stage, method), f"{cls.__name__} lacks {method}"
        assert cls.layout(_any_instance(cls)).type is cls


def _any_instance(cls: type[Stage]) -> Stage:
    sequence = [*_sequence_net(0).layers, *_sequence_net(0, pretrained=True).layers]
    for stages, _ in [*_image_stages().values(), (sequence, ())]:
        for top in stages:
            for s in top.modules():
                if type(s) is cls:
                    return s
    raise AssertionError(cls)


@pytest.mark.parametrize("case", CASES)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4))
@settings(max_examples=8, deadline=None)
def test_one_function_in_every_grad_mode(case, seed, batch):
    """Same bits with and without autograd, with arbitrary (edited) BatchNorm statistics and eps — the fast
    in-place path and the autograd path are one function."""
    net, shape = _randomised(case, seed)
    x = torch.randn(batch, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        quiet = net(x.clone())
    with torch.enable_grad():
        tracked = net(x.clone().requires_grad_(True))
    with torch.inference_mode():
        inferred = net(x.clone())
    assert torch.equal(quiet, tracked.detach()) and torch.equal(quiet, inferred)
    assert torch.isfinite(quiet).all()


def _run_onnx(net: NormNet, x: torch.Tensor, tmp_path, lower: bool) -> np.ndarray:
    path = tmp_path / "net.onnx"
    onlynorm.nets.onnx.export_onnx(net, path, lower_conv=lower)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_export_computes_what_torch_computes(case, dtype, tmp_path):
    """Every stage type (projection shortcuts, streams, pretrained layers with running statistics and eps)."""
    net, shape = _randomised(case, seed=3)
    net = net.to(dtype)
    x = torch.randn(5, *shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = net(x).numpy()
    if any(isinstance(m, NO_LOWERING) for m in net.modules()):  # refused in one line, never skipped
        with pytest.raises(InvalidNetworkError, match=r"^a \w+ stage has no ONNX lowering[^\n]*$"):
            _run_onnx(net, x, tmp_path, lower=True)
        return
    got = _run_onnx(net, x, tmp_path, lower=dtype == torch.float64)
    scale = max(1.0, float(np.abs(want).max()))
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert got.shape == want.shape and float(np.abs(got - want).max()) <= tol * scale


def test_a_stage_type_without_a_lowering_or_a_view_is_refused_not_skipped():
    class Doubling(Stage):
        kind = "test_doubling"

        def forward(self, x):
            return 2 * x

        def config(self):
            return {}

    net = NormNet([NormLinear(3, 3), Doubling()], meta={"method": "custom", "target_dims": [3, 3]})
    with pytest.raises(InvalidNetworkError, match="Doubling stage has no ONNX lowering"):
        build_model(net)
    with pytest.raises(NotCertifiableError, match="no model of a Doubling stage"):
        Doubling().affine("stage 1")


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, 6))
@settings(max_examples=8, deadline=None)
def test_sequence_stages_compute_one_function_in_every_grad_mode(seed, batch, length):
    net = _sequence_net(seed % 4, pretrained=seed % 2 == 1)
    x = torch.randint(0, 7, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        quiet = net(x)
    with torch.enable_grad():
        tracked = net(x)
    with torch.inference_mode():
        inferred = net(x)
    assert torch.equal(quiet, tracked.detach()) and torch.equal(quiet, inferred)
    assert torch.isfinite(quiet).all()


@pytest.mark.parametrize("pretrained", [False, True])
def test_sequence_stages_export_and_compute_what_torch_computes(pretrained, tmp_path):
    """Every sequence stage type (embedding, table, buffer, LayerNorm, pretrained maps) in an exported SeqNet,
    through both entry points (``net.to_onnx`` and ``export_onnx``, what `onlynorm export` calls)."""
    net = _sequence_net(1, pretrained=pretrained)
    kinds = {type(stage) for stage in net.layers}
    assert kinds >= ({PretrainedMap} if pretrained else {FactorisedEmbedding, FactorisedTable}) | {LayerNormStage}
    assert ConstStage in kinds
    for export in (net.to_onnx, lambda p: onlynorm.nets.onnx.export_onnx(net, p)):
        info = export(tmp_path / "net.onnx")
        assert info["checked"] == "onnxruntime"
        session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
        x = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = net(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-12 * max(1.0, np.abs(want).max())


def test_export_refuses_hooks():
    net = onlynorm.reconstruct(random_mlp([3, 4, 2], seed=0))
    handle = next(m for m in net.modules() if isinstance(m, nn.Linear)).register_forward_hook(lambda m, i, o: o + 1)
    try:
        with pytest.raises(InvalidNetworkError, match="forward hooks"):
            build_model(net)
    finally:
        handle.remove()
    build_model(net)  # without the hook it exports


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


# ---------------------------------------------------------------------- the plan flows
@pytest.mark.parametrize(
    "method, target, options",
    [
        ("width", lambda: random_mlp([3, 4, 2], seed=0), {}),
        ("deep", lambda: random_mlp([3, 4, 2], seed=0), {"block": 2}),
        ("lowrank", lambda: random_mlp([3, 4, 2], seed=0), {}),
        ("conv", _cnn, {"in_shape": (1, 4, 4)}),
        ("deep", _cnn, {"in_shape": (1, 4, 4)}),
    ],
)
def test_reconstruct_validates_and_plans_once(method, target, options, monkeypatch):
    """One target conversion, one option check, one plan per reconstruct, handed to the memory guard, the build
    and the solve (counted by wrapping the real methods: every call still runs)."""
    from onlynorm import api
    from onlynorm.constructions import base

    calls = {"plan": 0, "check_options": 0, "as_target": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(api, "as_target", counted("as_target", api.as_target))
    for cls in {type(c) for c in map(base.get_construction, base.available_methods())}:
        if "plan" in vars(cls):
            monkeypatch.setattr(cls, "plan", counted("plan", vars(cls)["plan"]))
    monkeypatch.setattr(base.Construction, "check_options", counted("check_options", base.Construction.check_options))
    g = target()
    f = onlynorm.reconstruct(g, method=method, **options)
    assert calls == {"plan": 1, "check_options": 1, "as_target": 1}, calls
    assert f.is_solved


def test_the_architecture_guide_example_stage_type_works(tmp_path):
    """docs/ARCHITECTURE.md's worked example of adding a stage type, executed as written: one class and one
    registration line give a stage that loads, exports and is read by the certificate's view."""
    from onlynorm.nets import stage as stage_module
    from onlynorm.nets.modules import frozen_module, make_batchnorm, normalize
    from onlynorm.nets.onnx_graph import batchnorm, linear, relu_if
    from onlynorm.nets.stage import StageLayout, register_stage
    from onlynorm.nets.views import AffineView, read_linear, read_norm

    doc = (Path(__file__).parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    found = re.search(r"```python\n( *@register_stage[^\n]*\n *class ScaledLinear.*?) *```", doc, re.S)
    assert found is not None, "the worked example is gone from docs/ARCHITECTURE.md"
    source = found.group(1)
    namespace = dict(
        torch=torch,
        nn=nn,
        Stage=Stage,
        StageLayout=StageLayout,
        register_stage=register_stage,
        frozen_module=frozen_module,
        make_batchnorm=make_batchnorm,
        normalize=normalize,
        AffineView=AffineView,
        read_linear=read_linear,
        read_norm=read_norm,
        linear=linear,
        batchnorm=batchnorm,
        relu_if=relu_if,
    )
    exec(compile(textwrap.dedent(source), "ARCHITECTURE.md", "exec"), namespace)
    cls = namespace["ScaledLinear"]
    try:
        stage = cls(3, 2, scale=0.5, relu=False)
        with torch.no_grad():
            stage.linear.weight.copy_(torch.randn(2, 3, dtype=torch.float64))
            stage.norm.weight.copy_(torch.tensor([2.0, -1.0], dtype=torch.float64))
        net = NormNet([stage], meta={"method": "custom", "target_dims": [3, 2]})
        x = torch.randn(4, 3, dtype=torch.float64)
        view = stage.affine("stage 0")
        assert torch.allclose(net(x), x @ (view.gamma[:, None] * view.weight).T + view.beta, atol=1e-14)
        with torch.enable_grad():
            assert torch.equal(net(x), net(x.clone().requires_grad_(True)).detach())
        net.save(tmp_path / "scaled.safetensors")
        assert torch.equal(NormNet.load(tmp_path / "scaled.safetensors")(x), net(x))
        got = _run_onnx(net, x, tmp_path, lower=True)
        assert np.abs(got - net(x).detach().numpy()).max() < 1e-14
    finally:
        stage_module.STAGES.pop("scaled_linear", None)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_paired_relu_is_exactly_the_identity(seed, dtype):
    """``relu(v) − relu(−v)`` (what autograd evaluates) has the bits of ``v`` (what the no-grad path returns) for
    every value — subnormals, the largest finite, ±Inf, NaN — up to the sign of a zero."""
    from onlynorm.nets.modules import paired_relu

    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.tiny / 4, -info.tiny / 3, info.max, -info.max, float("inf"), -float("inf")]
    special = torch.tensor(special, dtype=torch.float64)  # exact in float64, rounded once to `dtype` below
    v = torch.cat(
        [
            torch.randn(200, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-30, 30, (200,), generator=gen),
            special,
        ]
    ).to(dtype)
    explicit = paired_relu(v.clone())
    assert paired_relu(v, inplace=True) is v
    nonzero = v != 0
    int_t = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(explicit[nonzero].view(int_t), v[nonzero].view(int_t))  # bit for bit
    assert bool((explicit[~nonzero] == 0).all())
    nan = torch.tensor([float("nan")], dtype=dtype)
    assert bool(torch.isnan(paired_relu(nan)).all())
