"""Same target, method, options and seed → bit-identical saved networks."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import Box

from .conftest import random_mlp


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_give_identical_files(tmp_path):
    g = random_mlp([5, 6, 3], seed=2)
    paths = []
    for k in range(2):
        net = onlynorm.reconstruct(g, domain=Box(0.0, 3.0), seed=17)
        paths.append(tmp_path / f"net{k}.safetensors")
        net.save(paths[-1])
    assert _digest(paths[0]) == _digest(paths[1])


def test_different_seed_gives_a_different_network_computing_the_same_function(tmp_path):
    g = random_mlp([5, 6, 3], seed=2)
    a = onlynorm.reconstruct(g, seed=1)
    b = onlynorm.reconstruct(g, seed=2)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert _digest(tmp_path / "a.safetensors") != _digest(tmp_path / "b.safetensors")
    x = Box(-1.0, 1.0, dim=5).sample(1000)
    assert float((a(x) - b(x)).detach().abs().max()) < 1e-11


def test_random_normnet_does_not_touch_the_global_rng():
    import torch

    target = random_mlp([3, 4, 2])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    onlynorm.random_normnet(target, seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "method, options, cnn",
    [
        ("width", {}, False),
        ("deep", {}, False),
        ("deep", {"tied": 1}, False),
        ("lowrank", {}, False),
        ("sparse", {"density": 0.9}, False),
        ("width", {}, True),
        ("deep", {"tied": 1}, True),
    ],
)
def test_reconstruct_solving_its_own_network_in_place_equals_build_then_solve(method, options, cnn):
    """``reconstruct`` solves the network it built without cloning it (``solving_in_place``); the result is bit
    for bit ``solve_norms(random_normnet(...))``, which solves a clone and leaves the built network untouched."""
    torch.manual_seed(4)
    if cnn:
        g = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
        shape = {"in_shape": (2, 4, 4)}
    else:
        g = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
        shape = {}
    f = onlynorm.reconstruct(g, method=method, seed=5, **shape, **options)
    built = onlynorm.random_normnet(g, method=method, seed=5, **shape, **options)
    before = {k: v.clone() for k, v in built.state_dict().items()}
    solved = onlynorm.solve_norms(built, g)
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in before.items())  # the clone path copies
    assert f.state_dict().keys() == solved.state_dict().keys()
    for k, v in f.state_dict().items():
        assert torch.equal(v, solved.state_dict()[k]), k
    assert f.meta == solved.meta


def test_begin_solve_clones_except_for_the_network_handed_over():
    from onlynorm.constructions.base import begin_solve, solving_in_place
    from onlynorm.targets.convert import as_target

    g = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    net, other = onlynorm.random_normnet(g), onlynorm.random_normnet(g, seed=1)
    spec = as_target(g)
    assert begin_solve(net, spec)[1] is not net
    with solving_in_place(net):
        assert begin_solve(net, spec)[1] is net
        assert begin_solve(other, spec)[1] is not other  # only the network handed over
    assert begin_solve(net, spec)[1] is not net
