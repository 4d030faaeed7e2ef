"""Same target, method, options and seed → bit-identical saved networks."""

from __future__ import annotations

import hashlib

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
