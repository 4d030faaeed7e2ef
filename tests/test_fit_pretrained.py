"""with_norms on pretrained torch MLPs/CNNs, and fit_norms of their norms to another network's function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onlynorm import Box, InvalidNetworkError, NormNet, fit_norms, with_norms
from onlynorm.fit.data import relative_rms

from .conftest import random_mlp


def _with_stats(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
    return bn


def _perturbed(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """A 'fine-tuned' copy: every weight moved by a relative amount ``scale``."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out.eval()


def test_with_norms_computes_the_model_exactly_and_keeps_its_batchnorm():
    model = (
        nn.Sequential(
            nn.Linear(4, 6),
            _with_stats(nn.BatchNorm1d(6, eps=1e-3).double(), 1),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(6, 3),
        )
        .double()
        .eval()
    )
    net = with_norms(model)
    x = torch.randn(50, 4, dtype=torch.float64)
    assert torch.allclose(net(x), model(x), atol=1e-12)
    assert len(net.norm_modules()) == 2  # the model's BatchNorm reused, one new after Linear 2
    assert torch.equal(net.norm_parameters()[0], model[1].weight)
    assert all(m.eps == 0.0 for m in net.norm_modules())
    assert net.meta["target_dims"] == [4, 6, 3]


def test_with_norms_cnn_and_file_round_trip(tmp_path):
    model = (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            _with_stats(nn.BatchNorm2d(3).double(), 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 2),
        )
        .double()
        .eval()
    )
    net = with_norms(model, in_shape=(1, 4, 4))
    x = torch.randn(20, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(net(x), model(x), atol=1e-12)
    net.save(tmp_path / "net.safetensors")
    again = NormNet.load(tmp_path / "net.safetensors")
    assert torch.equal(again(x), net(x))


@pytest.mark.parametrize(
    "bad, match",
    [
        (nn.Sequential(nn.Linear(2, 2), nn.Tanh()), "Tanh"),
        (nn.Sequential(nn.Conv2d(1, 1, 3)), "in_shape"),
        (nn.ReLU(), "Sequential"),
    ],
)
def test_with_norms_refuses_what_it_cannot_represent(bad, match):
    with pytest.raises(InvalidNetworkError, match=match):
        with_norms(bad)


def test_fit_pretrained_mlp_to_a_fine_tuned_target():
    base = random_mlp([5, 12, 12, 3], seed=1).eval()
    target = _perturbed(base, 0.3, seed=2)
    x = torch.rand(600, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    frozen = with_norms(base)
    lw, lw_report = fit_norms(frozen, target, x, method="layerwise")
    auto, auto_report = fit_norms(frozen, target, x, steps=20)
    assert lw_report.final_error < 0.7 * lw_report.initial_error
    assert auto_report.final_error <= lw_report.final_error
    assert all(torch.equal(p, q) for p, q in zip(auto.frozen_parameters(), frozen.frozen_parameters()))
    test = torch.rand(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert relative_rms(auto(test), target(test)) < relative_rms(frozen(test), target(test))


def test_fit_pretrained_cnn_in_float32():
    base = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    ).eval()
    target = _perturbed(base, 0.3, seed=4)
    frozen = with_norms(base, in_shape=(1, 6, 6))
    net, report = fit_norms(frozen, target, Box(0.0, 1.0), samples=256, steps=10)
    assert net.dtype == torch.float32 and not report.exact
    assert [p.name for p in report.phases] == ["layerwise", "gauss-newton"]
    assert report.final_error < report.initial_error
