"""ONNX export: the file passes onnx.checker and onnxruntime computes what the torch network computes."""

from __future__ import annotations

import functools
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import NormNet
from onlynorm.cli.app import main
from onlynorm.errors import MissingDependencyError
from onlynorm.nets.onnx import export_onnx

from .conftest import random_mlp


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        onlynorm.Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))),
        nn.AvgPool2d(2, padding=1, count_include_pad=False),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).double()


def _conv_stride():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.ReLU(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(2 * 2 * 3, 2),
    ).double()


BUILDERS = {
    "width": lambda dtype: onlynorm.reconstruct(random_mlp([4, 6, 3], seed=1), dtype=dtype, seed=2),
    "deep": lambda dtype: onlynorm.reconstruct(random_mlp([5, 4, 2], seed=2), method="deep", block=2, dtype=dtype),
    "lowrank": lambda dtype: onlynorm.reconstruct(random_mlp([5, 4, 2], seed=3), method="lowrank", dtype=dtype),
    "cnn-residual": lambda dtype: onlynorm.reconstruct(_cnn(), in_shape=(1, 8, 8), dtype=dtype),
    "cnn-stride-dilation": lambda dtype: onlynorm.reconstruct(_conv_stride(), in_shape=(1, 6, 6), dtype=dtype),
}


@functools.cache
def _built(case: str, dtype: torch.dtype) -> NormNet:
    return BUILDERS[case](dtype)


def build(case: str, dtype: torch.dtype) -> NormNet:
    """Each case is reconstructed once per dtype; tests get their own copy."""
    return _built(case, dtype).clone()


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _inputs(net: NormNet, dtype, n=200):
    shape = net.in_shape or (net.in_features,)
    return (torch.rand(n, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1).to(dtype)


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_float64_export_matches_torch_to_1e12(case, tmp_path):
    net = build(case, torch.float64)
    path = tmp_path / "net.onnx"
    info = net.to_onnx(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    x = _inputs(net, torch.float64)
    with torch.no_grad():
        expected = net(x).numpy()
    found = _run(path, x)
    assert found.dtype == np.float64 and found.shape == expected.shape
    assert np.abs(found - expected).max() <= 1e-12 * max(1.0, np.abs(expected).max())
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == len(net.norm_modules()) and info["nodes"] == len(model.graph.node)
    assert all(a.f == 0.0 for n in norms for a in n.attribute if a.name == "epsilon")


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_float32_export_matches_torch(case, tmp_path):
    """float32: within 1e-5, or — for networks whose own float32 rounding is larger — within a few times the
    torch network's own error against the exact float64 target (ONNX adds no error of its own)."""
    net = build(case, torch.float32)
    path = tmp_path / "net.onnx"
    export_onnx(net, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = _inputs(net, torch.float32)
    with torch.no_grad():
        expected = net(x).numpy()
        own_error = (net(x).double() - build(case, torch.float64)(x.double())).abs().max().item()
    found = _run(path, x)
    assert found.dtype == np.float32
    assert np.abs(found - expected).max() <= max(1e-5, 4 * own_error)


def test_gamma_and_beta_are_the_batchnorm_inputs_bit_for_bit(tmp_path):
    net = build("width", torch.float64)
    net.to_onnx(tmp_path / "n.onnx")
    model = onnx.load(str(tmp_path / "n.onnx"))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for node, bn in zip(norms, net.norm_modules()):
        assert np.array_equal(init[node.input[1]], bn.weight.detach().numpy())
        assert np.array_equal(init[node.input[2]], bn.bias.detach().numpy())


def test_training_flag_does_not_leak_into_the_file(tmp_path):
    net = build("width", torch.float64)
    net.batch_statistics = True
    net.train()
    net.to_onnx(tmp_path / "n.onnx")
    assert net.training and net.norm_modules()[0].eps > 0  # the caller's mode is restored
    net.eval()
    x = _inputs(net, torch.float64)
    with torch.no_grad():
        assert np.abs(_run(tmp_path / "n.onnx", x) - net(x).numpy()).max() <= 1e-12


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code, capsys.readouterr()


def test_cli_export(tmp_path, capsys):
    net = build("cnn-residual", torch.float64)
    net.save(tmp_path / "net.safetensors")
    code, out = _cli(["export", tmp_path / "net.safetensors", "--onnx", tmp_path / "net.onnx"], capsys)
    assert code == 0 and "BatchNormalization" not in out.err and "opset" in out.out
    x = _inputs(net, torch.float64, 20)
    with torch.no_grad():
        assert np.abs(_run(tmp_path / "net.onnx", x) - net(x).numpy()).max() <= 1e-12


def test_cli_export_bad_inputs_are_one_line_and_leave_no_file(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    code, out = _cli(["export", tmp_path / "junk.safetensors", "--onnx", tmp_path / "x.onnx"], capsys)
    assert code == 2 and out.err.count("\n") == 1 and out.err.startswith("error:")
    build("width", torch.float64).save(tmp_path / "net.safetensors")
    code, out = _cli(["export", tmp_path / "net.safetensors", "--onnx", tmp_path / "missing" / "x.onnx"], capsys)
    assert code == 2 and "does not exist" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "net.safetensors"]


def test_missing_onnx_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` sees when it is not installed
    with pytest.raises(MissingDependencyError, match=r"onlynorm\[onnx\]"):
        build("width", torch.float64).to_onnx(tmp_path / "n.onnx")
    assert not (tmp_path / "n.onnx").exists()
