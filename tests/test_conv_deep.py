"""method='deep' on CNN targets: exact and certified over geometries, blocks and projection shortcuts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm import Box, MemoryBudgetError
from onlynorm.constructions.memory import set_memory_limit
from onlynorm.nets.conv_stream import ConvStream
from onlynorm.targets.cnn import ConvNetSpec
from onlynorm.targets.residual import Residual


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_target(c_in, c_out, k, s, p, d, size, seed) -> nn.Sequential:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d)
    n = c_out * _out(size, k, s, p, d) ** 2
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(n, 2)).double().eval()


@settings(max_examples=8, deadline=None)
@given(
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    k=st.integers(1, 3),
    s=st.integers(1, 2),
    p=st.integers(0, 2),
    d=st.integers(1, 2),
    size=st.integers(3, 6),
    block=st.integers(1, 3),
    paired=st.integers(0, 1),
    seed=st.integers(0, 100),
)
def test_deep_conv_is_exact_and_certified_over_geometries(c_in, c_out, k, s, p, d, size, block, paired, seed):
    assume(p < k * d and _out(size, k, s, p, d) >= 1)
    g = _conv_target(c_in, c_out, k, s, p, d, size, seed)
    box = Box(-1.0, 1.0)
    f = onlynorm.reconstruct(
        g, method="deep", in_shape=(c_in, size, size), domain=box, seed=seed, block=block, paired=paired
    )
    stage = f.layers[0]
    assert isinstance(stage, ConvStream) and stage.paired == bool(paired)
    kb = min(block, c_in)
    assert len(stage.block_slices()) == math.ceil(c_in / kb)
    assert stage.channels == c_out * c_in * k * k  # Σ_t c_out·k_t·kh·kw
    report = onlynorm.verify(f, g, samples=400, seed=seed, certify=True)
    assert report.max_rel_error <= 1e-9
    assert report.certified and report.certified_bound <= 1e-8 * max(report.max_target_abs, 1.0)


def test_each_block_is_one_square_system_of_size_c_out_k_kh_kw():
    g = _conv_target(5, 3, 3, 1, 1, 1, 5, 0)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(5, 5, 5), block=2)
    conv_record = f.meta.solve.records[0]
    assert conv_record.details["blocks"] == 3 and conv_record.details["size"] == 3 * 2 * 9 and conv_record.exact
    assert conv_record.relative_residual <= 1e-13
    assert f.summary().widths[:2] == [3 * 5 * 9, 3]


@pytest.mark.parametrize("paired", [0, 1])
def test_grouped_evaluation_equals_the_sum_over_blocks(paired):
    g = _conv_target(5, 2, 3, 2, 1, 1, 6, 1)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(5, 6, 6), block=2, paired=paired)
    stage = f.layers[0]
    x = torch.rand(3, 5, 6, 6, dtype=torch.float64)
    s = 0
    for t, (units, J) in enumerate(stage.block_slices()):
        weight = stage.branch.weight[units] if t < stage.full else stage.rest.weight
        v = F.conv2d(x[:, J], weight, None, 2, 1, 1) * stage.branch_norm.weight[units].reshape(
            1, -1, 1, 1
        ) + stage.branch_norm.bias[units].reshape(1, -1, 1, 1)
        s = s + F.conv2d(torch.relu(v), stage.readout.weight[:, units])
        if paired:  # the frozen readout of relu(−v) is −B
            s = s - F.conv2d(torch.relu(-v), stage.readout.weight[:, units])
    expected = (s * stage.norm.weight.reshape(1, -1, 1, 1) + stage.norm.bias.reshape(1, -1, 1, 1)).detach()
    with torch.no_grad():
        assert float((stage(x) - expected).abs().max()) <= 1e-12


class _Block(nn.Module):
    """A basic block whose shortcut is a strided conv + BatchNorm (any stride) or the identity."""

    def __init__(self, c_in, c_out, stride, k_short):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, k_short, stride, k_short // 2, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _Net(nn.Module):
    def __init__(self, c, c_mid, stride, k_short):
        super().__init__()
        self.stem = nn.Conv2d(c, c, 1)
        self.block = _Block(c, c_mid, stride, k_short)
        self.same = _Block(c_mid, c_mid, 1, 1)
        self.fc = nn.Linear(c_mid, 3)

    def forward(self, x):
        x = self.same(self.block(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomised(model, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.double().eval()


@settings(max_examples=4, deadline=None)
@given(
    c=st.integers(1, 3),
    c_mid=st.integers(1, 3),
    stride=st.integers(1, 3),
    k_short=st.sampled_from([1, 3]),
    block=st.integers(1, 2),
    paired=st.integers(0, 1),
    seed=st.integers(0, 50),
)
def test_projection_shortcuts_any_stride_are_exact_and_certified(c, c_mid, stride, k_short, block, paired, seed):
    torch.manual_seed(seed)
    g = _randomised(_Net(c, c_mid, stride, k_short), seed)
    size = 6
    spec = ConvNetSpec.from_module(g, (c, size, size))
    has_projection = stride != 1 or c != c_mid
    assert len(spec.layers[2].shortcut) == (1 if has_projection else 0)
    box = Box(0.0, 1.0)
    f = onlynorm.reconstruct(
        g, method="deep", in_shape=(c, size, size), domain=box, block=block, seed=seed, paired=paired
    )
    assert len(f.layers[2].shortcut) == (1 if has_projection else 0)
    report = onlynorm.verify(f, g, samples=300, seed=seed, certify=True)
    assert report.max_rel_error <= 1e-9 and report.certified


def test_saved_and_loaded_deep_cnn_is_identical_and_only_norms_were_solved(tmp_path):
    g = _randomised(_Net(2, 3, 2, 1), 3)
    frozen = onlynorm.random_normnet(g, method="deep", in_shape=(2, 6, 6), block=2)
    f = onlynorm.solve_norms(frozen, g, Box(0.0, 1.0))
    for p0, p1 in zip(frozen.frozen_parameters(), f.frozen_parameters()):
        assert torch.equal(p0, p1)
    assert any(not torch.equal(a, b) for a, b in zip(frozen.norm_parameters(), f.norm_parameters()))
    f.save(tmp_path / "f.safetensors")
    loaded = onlynorm.NormNet.load(tmp_path / "f.safetensors")
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), f(x))
    s = loaded.summary()
    assert s.method == "conv_deep" and s.exact and s.in_shape == [2, 6, 6]
    assert s.tunable_parameters == sum(p.numel() for p in f.norm_parameters())
    assert onlynorm.verify(loaded, g, samples=200, certify=True).certified


def test_broken_branch_beta_is_caught_by_the_certificate():
    g = _conv_target(2, 2, 3, 1, 1, 1, 4, 7)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(2, 4, 4), domain=Box(-1.0, 1.0), paired=0)
    with torch.no_grad():
        f.layers[0].branch_norm.bias[0] -= 100.0
    report = onlynorm.verify(f, g, samples=300, certify=True)
    assert report.certified is False and any("layer 0 (conv at stage 0)" in n for n in report.notes)


def test_paired_branches_need_no_bounds_and_a_broken_gamma_shows_in_the_certified_bound():
    g = _conv_target(2, 2, 3, 1, 1, 1, 4, 8)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(2, 4, 4), domain=Box(-1.0, 1.0))
    stage = f.layers[0]
    assert stage.paired and torch.equal(
        stage.branch_norm.bias.detach(), torch.zeros(stage.channels, dtype=torch.float64)
    )
    # exact far outside the box it was solved for: relu(v) − relu(−v) = v for every v
    x = 50 * torch.randn(20, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert float((f(x) - g(x)).abs().max()) <= 1e-9 * float(g(x).abs().max())
    good = onlynorm.verify(f, g, samples=300, certify=True)
    assert good.certified and good.certified_bound <= 1e-9
    with torch.no_grad():
        stage.branch_norm.weight[0] *= 1.5
    broken = onlynorm.verify(f, g, samples=300, certify=True)
    assert broken.certified_bound >= 1e-4 and not broken.passed


def test_float32_deep_network_runs_in_float32_with_gamma_solved_in_float64():
    from onlynorm.linalg import solve_khatri_rao_batched

    g = _conv_target(3, 2, 3, 1, 1, 1, 5, 4)
    f32 = onlynorm.reconstruct(g, method="deep", in_shape=(3, 5, 5), domain=Box(0.0, 1.0), dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32(torch.rand(2, 3, 5, 5)).dtype == torch.float32
    stage = f32.layers[0]
    units, J = stage.block_slices()[0]
    A = stage.branch.weight[units].double().flatten(1)[None]
    B = stage.readout.weight[:, units].double().flatten(1)[None]
    W = g[0].weight.detach()[:, J].flatten(1)[None]
    gamma64 = solve_khatri_rao_batched(A, B, W).gamma
    # γ of the float32 network is the float64 solution for its own (float32) frozen weights, rounded once
    assert torch.equal(stage.branch_norm.weight[units].detach(), gamma64[0].float())
    assert onlynorm.verify(f32, g, samples=300).max_rel_error <= 1e-4


def test_memory_guard_names_deep_for_a_cnn_width_cannot_afford():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16, 2)).double()
    set_memory_limit("2G")
    try:
        with pytest.raises(MemoryBudgetError, match=r"method 'conv' needs about .* use method='conv_deep' \(~"):
            onlynorm.random_normnet(g, in_shape=(64, 4, 4))
        set_memory_limit("64M")  # untied deep does not fit, the same with one shared draw per layer does
        with pytest.raises(MemoryBudgetError, match=r"method 'conv_deep' needs about .* use method='deep', tied=True"):
            onlynorm.random_normnet(g, method="deep", in_shape=(64, 4, 4))
        with pytest.raises(MemoryBudgetError, match="method 'conv_deep' needs about .* no construction fits"):
            set_memory_limit("8M")
            onlynorm.random_normnet(g, method="deep", in_shape=(64, 4, 4))
    finally:
        set_memory_limit(None)


def test_residual_sequential_targets_also_take_deep():
    torch.manual_seed(5)
    g = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 1))),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()
    f = onlynorm.reconstruct(g, method="deep", in_shape=(1, 4, 4), domain=Box(0.0, 1.0))
    report = onlynorm.verify(f, g, samples=300, certify=True)
    assert report.max_rel_error <= 1e-9 and report.certified


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solve_records_are_the_residuals_of_the_gamma_the_network_holds(dtype):
    """The records take ``max |Ŵ − W|`` and ``‖Ŵ − W‖_F / ‖W‖_F`` from the solves' accurate residuals; the residual
    of every block recomputed from the network's stored (rounded) γ and frozen weights gives the same numbers."""
    from onlynorm.linalg_refine import accurate_residual

    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    cnn = _conv_target(4, 3, 3, 1, 1, 1, 5, 2)
    for g, shape in ((mlp, None), (cnn, (4, 5, 5))):
        f = onlynorm.reconstruct(g, method="deep", in_shape=shape, block=2, dtype=dtype)
        stage, record = f.layers[0], f.meta.solve.records[0]
        W = g[0].weight.detach().to(dtype).double() if shape is None else g[0].weight.detach().double()
        errors = []
        for t, slices in enumerate(stage.block_slices()):
            if shape is None:  # residual stream: branch t reads input columns J
                A, B = stage.branches[t].linear.weight.double(), stage.readouts[t].weight.double()
                gamma, block = stage.branches[t].norm.weight.detach().double(), W[:, slices]
            else:  # conv stream: branch channels `units` read input channels J
                units, J = slices
                A = (stage.branch.weight[units] if t < stage.full else stage.rest.weight).double().flatten(1)
                B = stage.readout.weight[:, units].double().flatten(1)
                gamma, block = stage.branch_norm.weight[units].detach().double(), W[:, J].flatten(1)
            errors.append(accurate_residual(A[None], B[None], gamma[None], block[None]).flatten())
        error = torch.cat(errors)
        assert error.numel() == W.numel()  # every weight in exactly one block
        relative = float(torch.linalg.vector_norm(error) / torch.linalg.vector_norm(W))
        assert record.residual == pytest.approx(float(error.abs().max()), rel=1e-6, abs=1e-300)
        assert record.relative_residual == pytest.approx(relative, rel=1e-6, abs=1e-300)
        assert relative <= (1e-13 if dtype == torch.float64 else 1e-6)
