"""The memory guard refuses oversized constructions quickly, before allocating, with a useful message."""

from __future__ import annotations

import resource

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import MemoryBudgetError
from onlynorm.constructions import memory
from onlynorm.errors import OnlyNormError


def test_400_wide_layer_is_refused_without_allocating():
    g = nn.Linear(400, 400).double()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        MemoryBudgetError, match=r"method 'width' needs about 19\d\.\d GiB.*use method='deep' \(~"
    ) as info:
        onlynorm.reconstruct(g)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024  # nowhere near the 192 GiB system
    assert info.value.needed_bytes == 160000**2 * 8 + 2 * 400 * 160000 * 8
    assert info.value.limit_bytes < info.value.needed_bytes


def test_user_limit_from_api_and_environment(monkeypatch):
    g = nn.Linear(40, 40).double()  # one 1600 × 1600 float64 system: 19.5 MiB
    memory.set_memory_limit("10M")
    try:
        with pytest.raises(
            MemoryBudgetError, match=r"limit is 10.0 MiB \(onlynorm.constructions.memory.set_memory_limit\)"
        ):
            onlynorm.random_normnet(g)
    finally:
        memory.set_memory_limit(None)
    monkeypatch.setenv("ONLYNORM_MEMORY_LIMIT", "1G")
    assert onlynorm.random_normnet(g).summary().max_width == 1600
    monkeypatch.setenv("ONLYNORM_MEMORY_LIMIT", "1K")
    with pytest.raises(MemoryBudgetError, match="ONLYNORM_MEMORY_LIMIT"):
        onlynorm.random_normnet(g)


@pytest.mark.parametrize(
    "text, expected",
    [("512M", 512 << 20), ("1.5G", int(1.5 * (1 << 30))), ("1000", 1000), ("2GiB", 2 << 30), ("3kb", 3 << 10)],
)
def test_parse_bytes(text, expected):
    assert memory.parse_bytes(text) == expected


def test_parse_bytes_refuses_garbage():
    with pytest.raises(OnlyNormError, match="expected a memory size like 8G"):
        memory.parse_bytes("lots")


def test_estimate_is_an_upper_bound_of_the_width_system():
    from onlynorm.constructions import get_construction
    from onlynorm.targets.mlp import MLPSpec

    spec = MLPSpec((torch.zeros(12, 10, dtype=torch.float64),), (torch.zeros(12, dtype=torch.float64),))
    need = get_construction("width").estimate_bytes(spec, torch.float64)
    assert need >= (120 * 120) * 8
