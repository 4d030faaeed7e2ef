"""CNN and residual targets: exactness over geometries, BatchNorm folding, files, norm sets, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm import Box, InvalidNetworkError, InvalidTargetError, NormNet
from onlynorm.targets.cnn import ConvNetSpec
from onlynorm.targets.convert import load_target
from onlynorm.targets.residual import Residual

from .conftest import random_mlp


def _randomise_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))


def _rel_error(f, g, box, in_shape, n=2000, seed=0):
    x = box.expand(in_shape[0] * in_shape[1] * in_shape[2]).sample(n, seed=seed).reshape(n, *in_shape)
    with torch.no_grad():
        gx, fx = g(x), f(x)
    return float((fx - gx).abs().max()) / max(float(gx.abs().max()), 1e-6)


@given(
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
    low=st.floats(-2, 1),
)
def test_conv_geometries_are_exact(k, stride, padding, dilation, c_in, c_out, bias, seed, low):
    torch.manual_seed(seed)
    size = 7
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    out = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    assume(out >= 1)
    g = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(c_out * out * out, 2).double()).eval()
    box = Box(low, low + 1.5)
    frozen = onlynorm.random_normnet(g, in_shape=(c_in, size, size), seed=seed)
    f = onlynorm.solve_norms(frozen, g, box)
    assert _rel_error(f, g, box, (c_in, size, size), seed=seed) <= 1e-9
    norm_keys = set(f.norm_state())
    before, after = frozen.state_dict(), f.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in norm_keys)
    assert f.layers[0].conv.out_channels == c_out * c_in * k * k


def test_batchnorm_folding_matches_the_module():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    g = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        nn.BatchNorm1d(4),
    ).double()
    _randomise_bn(g[1], gen)
    _randomise_bn(g[5], gen)
    g.eval()
    spec = ConvNetSpec.from_module(g, in_shape=(2, 5, 5))
    assert [r.type for r in spec.layers] == ["conv", "relu", "flatten", "linear"]
    x = torch.randn(20, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(spec(x), g(x), rtol=1e-12, atol=1e-12)
    f = onlynorm.reconstruct(g, in_shape=(2, 5, 5), domain=Box(-1.0, 1.0))
    assert _rel_error(f, g, Box(-1.0, 1.0), (2, 5, 5)) <= 1e-9


def test_mlp_with_batchnorm1d_is_folded_into_an_mlp_target():
    torch.manual_seed(1)
    g = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    _randomise_bn(g[1], torch.Generator().manual_seed(1))
    g.eval()
    f = onlynorm.reconstruct(g)
    assert f.method == "width" and onlynorm.verify(f, g, samples=3000).passed


def test_residual_blocks_with_pooling_are_exact():
    torch.manual_seed(2)
    g = (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1))),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 5),
        )
        .double()
        .eval()
    )
    box = Box(0.0, 1.0)
    f = onlynorm.reconstruct(g, in_shape=(1, 8, 8), domain=box)
    assert _rel_error(f, g, box, (1, 8, 8)) <= 1e-9
    report = onlynorm.verify(f, g, samples=3000)
    assert report.passed and f.summary().exact
    kinds = [s.kind for s in f.layers]
    assert kinds.count("residual") == 1 and kinds[0] == "norm_conv2d"


def test_cnn_target_files_and_cli_round_trip(tmp_path, capsys):
    from onlynorm.cli.app import main

    torch.manual_seed(3)
    g = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double().eval()
    spec = ConvNetSpec.from_module(g, in_shape=(1, 5, 5))
    spec.save(tmp_path / "cnn.safetensors")
    loaded = load_target(tmp_path / "cnn.safetensors")
    assert isinstance(loaded, ConvNetSpec) and loaded.in_shape == (1, 5, 5)
    x = torch.rand(4, 1, 5, 5, dtype=torch.float64)
    assert torch.equal(loaded(x), spec(x))
    out = tmp_path / "net.safetensors"
    for argv in (
        ["reconstruct", str(tmp_path / "cnn.safetensors"), "--out", str(out), "--low", "0", "--high", "1"],
        ["verify", str(out), str(tmp_path / "cnn.safetensors"), "--samples", "2000"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0, capsys.readouterr().err
    net = NormNet.load(out)
    with torch.no_grad():
        assert float((net(x) - g(x)).abs().max()) < 1e-10


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()), "only groups=1"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten()),
            r"Sigmoid\) is not supported in a CNN target; supported: Conv2d",
        ),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten()), "zero padding given as integers"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(7, 2)), "do not chain"),
        (nn.Sequential(nn.Conv2d(1, 2, 3)), "end with flat outputs"),
    ],
)
def test_unsupported_cnns_are_refused(module, message):
    with pytest.raises(InvalidTargetError, match=message):
        onlynorm.random_normnet(module.double(), in_shape=(1, 6, 6))


def test_cnn_needs_in_shape():
    with pytest.raises(InvalidTargetError, match=r"needs in_shape=\(c, H, W\)"):
        onlynorm.reconstruct(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten()).double())


def test_norm_sets_swap_tasks_and_refuse_mismatches(tmp_path):
    g1, g2 = random_mlp([4, 5, 3], seed=1), random_mlp([4, 5, 3], seed=2)
    frozen = onlynorm.random_normnet(g1, seed=0)
    onlynorm.solve_norms(frozen, g1).save_norms(tmp_path / "a.safetensors")
    onlynorm.solve_norms(frozen, g2).save_norms(tmp_path / "b.safetensors")
    frozen.save(tmp_path / "frozen.safetensors")
    net = NormNet.load(tmp_path / "frozen.safetensors")
    x = Box(-1.0, 1.0, dim=4).sample(500)
    for path, g in (
        (tmp_path / "a.safetensors", g1),
        (tmp_path / "b.safetensors", g2),
        (tmp_path / "a.safetensors", g1),
    ):
        net.load_norms(path)
        with torch.no_grad():
            assert float((net(x) - g(x)).abs().max()) < 1e-10
    assert (tmp_path / "a.safetensors").stat().st_size < (tmp_path / "frozen.safetensors").stat().st_size / 2
    with pytest.raises(InvalidNetworkError, match="solved for a different frozen network"):
        onlynorm.random_normnet(g1, seed=1).load_norms(tmp_path / "a.safetensors")
    with pytest.raises(InvalidNetworkError, match="does not fit this network"):
        onlynorm.random_normnet(random_mlp([4, 6, 3]), seed=0).load_norms(tmp_path / "a.safetensors")
    with pytest.raises(onlynorm.FileFormatError, match="not an onlynorm norm set"):
        net.load_norms(tmp_path / "frozen.safetensors")


def test_cnn_certificate_and_a_switched_off_channel():
    torch.manual_seed(4)
    g = (
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 1))),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        )
        .double()
        .eval()
    )
    box = Box(-0.5, 1.0)
    f = onlynorm.reconstruct(g, in_shape=(1, 8, 8), domain=box)
    report = onlynorm.verify(f, g, samples=3000, certify=True)
    assert report.certified and report.certified_bound < 1e-9
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    first = f.layers[0]
    with torch.no_grad():  # β₁ of channel 0 was −min + a margin ≪ 1 + |β|: it now dips below zero on the box
        first.norm.bias[0] -= 1.0 + first.norm.bias[0].abs()
    broken = onlynorm.verify(f, g, samples=500, certify=True)
    assert broken.certified is False and any("layer 0 (conv at stage 0)" in n for n in broken.notes)


def test_reconstruct_help_lists_every_method_with_its_cost(capsys):
    from onlynorm.cli.app import main

    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    out = capsys.readouterr().out
    for name in onlynorm.available_methods():
        assert f"* {name}:" in out
    assert "width m·k" in out and "m·n" in out


def test_corrupt_norm_set_leaves_the_network_unchanged(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = random_mlp([3, 4, 2], seed=5)
    frozen = onlynorm.random_normnet(g, seed=0)
    onlynorm.solve_norms(frozen, g).save_norms(tmp_path / "good.safetensors")
    with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last].clone().fill_(float("nan"))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.raises(onlynorm.FileFormatError, match="NaN/Inf"):
        frozen.load_norms(tmp_path / "bad.safetensors")
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
