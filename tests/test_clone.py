"""``copy_sharing`` (the mechanism of ``NormNet.clone``) against ``copy.deepcopy``: the same copy, except for the
shared tensors."""

from __future__ import annotations

import copy

import torch
from torch import nn

import onlynorm
from onlynorm.nets.clone import copy_sharing


class _Odd(nn.Module):
    """Attributes deepcopy must handle: a plain tensor, a list, an alias of a submodule, a forward hook."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.alias = self.inner  # the same module twice: one copy, two names
        self.scale = torch.tensor([2.0])
        self.sizes = [1, 2]
        self.register_buffer("count", torch.zeros(1))
        self.calls = 0
        self.seen = 0
        self.register_forward_hook(_count)
        self.register_forward_pre_hook(self._see)  # a bound method: the copy's hook must be bound to the copy

    def _see(self, module, args):
        self.seen += 1

    def forward(self, x):
        return self.alias(x) * self.scale


def _count(module, args, out):
    module.calls += 1


def test_copy_sharing_is_deepcopy_but_for_the_shared_tensors():
    torch.manual_seed(0)
    src = _Odd()
    shared = src.inner.weight
    got, ref = copy_sharing(src, {id(shared): shared}), copy.deepcopy(src)
    assert got.inner.weight is shared and ref.inner.weight is not shared
    assert got.alias is got.inner and got.inner is not src.inner
    assert got.inner.bias is not src.inner.bias and torch.equal(got.inner.bias, src.inner.bias)
    assert got.scale is not src.scale and torch.equal(got.scale, ref.scale)
    got.sizes.append(3)
    assert src.sizes == [1, 2]  # lists are copied, not shared
    x = torch.randn(4, 3)
    assert torch.equal(got(x), ref(x)) and got.calls == 1 and src.calls == 0  # the hook runs on the copy
    assert got.seen == 1 and src.seen == 0 and ref.seen == 1  # the bound-method hook too, as deepcopy rebinds it
    assert set(got.state_dict()) == set(ref.state_dict())
    for k, v in got.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    with torch.no_grad():
        got.count.add_(1)
        got.inner.bias.zero_()
    assert float(src.count) == 0 and bool(src.inner.bias.abs().sum() > 0)


def test_clone_of_a_tied_network_computes_the_same_function_and_owns_its_norms():
    torch.manual_seed(1)
    g = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    f = onlynorm.reconstruct(g, method="deep", tied=1)
    twin = f.clone()
    x = onlynorm.Box(-1.0, 1.0, dim=5).sample(50, seed=2)
    with torch.no_grad():
        assert torch.equal(twin(x), f(x))
    assert twin.meta == f.meta
    frozen_ptrs = {p.data_ptr() for p in f.frozen_parameters()}
    assert {p.data_ptr() for p in twin.frozen_parameters()} == frozen_ptrs
    assert not frozen_ptrs & {p.data_ptr() for p in twin.norm_parameters()}
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.norm_parameters(), f.norm_parameters()))
