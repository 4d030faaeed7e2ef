"""Norm-only training: selection by module type, freezing, both statistics modes, data sources."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import Box, norm_parameters, train_norm_only
from onlynorm.errors import OnlyNormError

from .conftest import random_mlp


def test_selection_by_type_not_by_name():
    class Sneaky(nn.Module):  # a parameter *named* like a norm, in a non-norm module
        def __init__(self):
            super().__init__()
            self.bn_weight = nn.Parameter(torch.ones(3))
            self.norm = nn.Linear(3, 3)  # named "norm" but a Linear

    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        nn.LayerNorm(4),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, affine=True),
        nn.InstanceNorm1d(4),
        nn.LayerNorm(4, elementwise_affine=False),
        nn.BatchNorm2d(2),
        nn.BatchNorm3d(2),
        Sneaky(),
    )
    if hasattr(nn, "RMSNorm"):
        model.append(nn.RMSNorm(4))
    params = norm_parameters(model)
    expected = []
    for m in model:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d)) and getattr(
            m, "affine", True
        ):
            expected += [m.weight, m.bias]
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            expected += [m.weight, m.bias]
        elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            expected += [m.weight]
    assert [id(p) for p in params] == [id(p) for p in expected]
    sneaky = model[9]
    assert all(p is not sneaky.bn_weight and p is not sneaky.norm.weight for p in params)


def test_only_norm_parameters_change_and_loss_falls():
    g = random_mlp([3, 6, 2], seed=0)
    net = onlynorm.random_normnet(g, seed=1)
    spec = onlynorm.MLPSpec.from_module(g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    history = train_norm_only(net, target=spec, box=Box(-1.0, 1.0, dim=3), steps=200, lr=1e-2, progress=False)
    assert history.final_loss < 0.2 * history.losses[0]
    assert history.tuned_parameters == sum(p.numel() for p in net.norm_parameters())
    norm_keys = {k for k, p in net.named_parameters() if any(p is q for q in net.norm_parameters())}
    for k, v in net.state_dict().items():
        if k in norm_keys:
            continue
        assert torch.equal(v, before[k]), k  # frozen weights and running statistics untouched
    assert not net.training and all(not p.requires_grad for p in net.frozen_parameters())


def test_batch_statistics_mode_updates_running_stats_and_restores_exact_eval():
    g = random_mlp([3, 4, 2], seed=2)
    net = onlynorm.random_normnet(g, seed=0)
    X = torch.rand(64, 3, dtype=torch.float64)
    Y = torch.randn(64, 2, dtype=torch.float64)
    train_norm_only(net, (X, Y), steps=5, statistics="batch", progress=False)
    bn = net.norm_modules()[0]
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not net.training and bn.eps == 0.0 and not net.batch_statistics


def test_any_torch_model_and_a_dataloader():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1)).double()
    X = torch.randn(100, 4, dtype=torch.float64)
    Y = X.sum(1, keepdim=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=20, shuffle=True)
    lin_before = model[0].weight.clone()
    history = train_norm_only(model, loader, steps=30, progress=False)
    assert len(history.losses) == 30 and torch.equal(model[0].weight, lin_before)
    assert model[0].weight.requires_grad  # requires_grad flags restored afterwards


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "expected exactly one of data="),
        ({"target": lambda x: x, "box": Box(0.0, 1.0)}, "needs a sized box"),
        ({"data": (torch.zeros(3, 2), torch.zeros(4, 1))}, "same positive number of rows"),
        ({"data": (torch.zeros(3, 2), torch.zeros(3, 1)), "statistics": "running"}, "expected 'fixed' or 'batch'"),
    ],
)
def test_bad_arguments(kwargs, message):
    net = onlynorm.random_normnet(random_mlp([2, 3, 1]))
    with pytest.raises(OnlyNormError, match=message):
        train_norm_only(net, progress=False, **kwargs)


def test_model_without_norm_layers_is_refused():
    with pytest.raises(OnlyNormError, match="has no normalization layers"):
        train_norm_only(nn.Linear(2, 1), (torch.zeros(4, 2), torch.zeros(4, 1)), progress=False)
