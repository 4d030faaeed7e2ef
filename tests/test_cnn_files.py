"""CNN target files (JSON architecture + safetensors), pooling geometries, BN inside residual blocks, norm-set shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm import Box, FileFormatError, InvalidNetworkError
from onlynorm._io import read_tensors, write_tensors
from onlynorm.targets.cnn import ConvNetSpec
from onlynorm.targets.convert import load_target
from onlynorm.targets.residual import Residual


def _max_rel(f, g, box, in_shape, n=1500, seed=0):
    x = box.expand(in_shape[0] * in_shape[1] * in_shape[2]).sample(n, seed=seed).reshape(n, *in_shape)
    with torch.no_grad():
        gx, fx = g(x), f(x)
    return float((fx - gx).abs().max()) / max(float(gx.abs().max()), 1e-6)


def _small_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        .double()
        .eval()
    )


def test_architecture_description_is_plain_json_and_round_trips(tmp_path):
    spec = ConvNetSpec.from_module(_small_cnn(0), in_shape=(1, 6, 6))
    path = tmp_path / "t.safetensors"
    spec.save(path)
    tensors, doc = read_tensors(path)
    assert doc["kind"] == "cnn-target" and doc["in_shape"] == [1, 6, 6]
    assert [d["type"] for d in doc["layers"]] == ["conv", "relu", "avgpool", "flatten", "linear"]
    assert doc["layers"][0]["weight"] in tensors and doc["layers"][0]["padding"] == [1, 1]
    loaded = load_target(path)
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), spec(x))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["layers"][0].update(type="lambda"), "unknown layer type 'lambda'"),
        (lambda d: d["layers"][0].update(weight="nowhere"), "tensor 'nowhere' is missing"),
        (lambda d: d.pop("in_shape"), "malformed CNN architecture description"),
    ],
)
def test_malformed_architecture_descriptions_are_refused(tmp_path, edit, message):
    path = tmp_path / "t.safetensors"
    ConvNetSpec.from_module(_small_cnn(1), in_shape=(1, 6, 6)).save(path)
    tensors, doc = read_tensors(path)
    edit(doc)
    write_tensors(path, tensors, metadata=doc)
    with pytest.raises(FileFormatError, match=message):
        load_target(path)


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["max", "avg"]),
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    pad=st.integers(0, 1),
    seed=st.integers(0, 100),
    low=st.floats(-1, 0.5),
)
def test_pooling_geometries_are_exact(kind, k, stride, pad, seed, low):
    if pad > k // 2:  # torch refuses padding larger than half the kernel
        return
    torch.manual_seed(seed)
    pool = nn.MaxPool2d(k, stride, pad) if kind == "max" else nn.AvgPool2d(k, stride, pad)
    size = 6
    out = (size + 2 * pad - k) // stride + 1
    g = (
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.Linear(2 * out * out, 2))
        .double()
        .eval()
    )
    box = Box(low, low + 1.0)
    f = onlynorm.reconstruct(g, in_shape=(1, size, size), domain=box, seed=seed)
    assert _max_rel(f, g, box, (1, size, size), seed=seed) <= 1e-9


def test_batchnorm_inside_a_residual_block_is_folded_and_exact():
    torch.manual_seed(5)
    block = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
    )
    g = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), Residual(block), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)
    ).double()
    with torch.no_grad():
        for bn in (block[1], block[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    g.eval()
    spec = ConvNetSpec.from_module(g, in_shape=(1, 5, 5))
    assert [r.type for r in spec.layers[2].body] == ["conv", "relu", "conv"]
    box = Box(0.0, 1.0)
    f = onlynorm.reconstruct(g, in_shape=(1, 5, 5), domain=box)
    assert _max_rel(f, g, box, (1, 5, 5)) <= 1e-9


def test_norm_set_with_a_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    g = _small_cnn(2)
    net = onlynorm.reconstruct(g, in_shape=(1, 6, 6), domain=Box(0.0, 1.0))
    path = tmp_path / "norms.safetensors"
    net.save_norms(path)
    tensors, doc = read_tensors(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    write_tensors(path, tensors, metadata=doc)
    with pytest.raises(InvalidNetworkError, match=rf"{name} has shape \({tensors[name].shape[0]},\), expected"):
        net.load_norms(path)
